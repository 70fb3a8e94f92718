"""WorkerPool: calls in warm child processes under a hard wall-clock limit."""

import math
import os
import time

import pytest

from moetune.rewards.time_limit import CallFailed, TimeLimitExceeded, WorkerCrashed, WorkerPool


@pytest.fixture(scope="module")
def pool():
    pool = WorkerPool(size=2)
    yield pool
    pool.close()


def test_results_come_back(pool):
    assert pool.call(math.factorial, 10, timeout_s=5) == 3628800
    assert pool.map(math.gcd, [(12, 18), (7, 5)], timeout_s=5) == [6, 1]


def test_a_late_call_is_killed_in_time_and_its_worker_replaced(pool):
    start = time.monotonic()
    outcomes = pool.map(time.sleep, [(30,), (0,)], timeout_s=0.5)
    assert isinstance(outcomes[0], TimeLimitExceeded) and outcomes[1] is None
    assert time.monotonic() - start < 1.5
    assert pool.call(math.factorial, 5, timeout_s=5) == 120  # the replacement works


def test_raising_and_dying_calls_fail_without_breaking_the_pool(pool):
    with pytest.raises(CallFailed, match="ValueError: math domain error") as raised:
        pool.call(math.sqrt, -1, timeout_s=5)
    assert type(raised.value) is CallFailed  # the function raised; its worker lives on
    with pytest.raises(WorkerCrashed, match="exited with 3"):
        pool.call(os._exit, 3, timeout_s=5)
    assert pool.call(print, "stray output must not corrupt the channel", timeout_s=5) is None
    assert pool.call(math.factorial, 4, timeout_s=5) == 24


def test_a_worker_that_cannot_start_is_an_error_not_a_failed_call():
    pool = WorkerPool(size=1, preload=("moetune_no_such_module",))
    with pytest.raises(RuntimeError, match="failed to start"):
        pool.call(math.factorial, 3, timeout_s=5)
    pool.close()
