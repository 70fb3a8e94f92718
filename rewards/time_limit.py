"""Call a function in a warm child process under a hard wall-clock limit.

math-verify's own timeout uses SIGALRM, which works only in the main thread, and inputs such
as `9^{9^{9^{9}}}` spin inside C code (big-integer powers) that neither a signal nor another
thread can interrupt. `WorkerPool` keeps child processes (running `serve_worker`) that have
already imported what the calls need, sends each call to an idle one and, when a call misses
its deadline, kills that worker and starts a replacement. It works from any thread, and from
worker processes, daemonic ones included (the workers are plain subprocesses, not
multiprocessing children).

    pool = WorkerPool(size=2, preload=("math_verify",))
    pool.map(some_module.function, [(arg1, arg2), ...], timeout_s=5.0)
    # -> one result per call, or a CallFailed in its place: TimeLimitExceeded, WorkerCrashed,
    #    or CallFailed itself when the function raised

Functions are sent by reference (pickle), so they must be importable module-level functions.
A worker also caps each call's CPU time with RLIMIT_CPU, so a runaway call ends even if the
parent died without killing it.
"""

from __future__ import annotations

import atexit
import importlib
import math
import os
import pickle
import queue
import resource
import select
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from moetune.rewards.sandbox_protocol import read_frame, write_frame

_READY = b"ready"
_WORKER_MAIN = (
    f"import sys; from {__name__} import serve_worker; serve_worker(int(sys.argv[1]), sys.argv[2:])"
)
_STARTUP_TIMEOUT_S = 300.0  # a cold import of sympy on a busy machine can take long


class CallFailed(Exception):
    """A call did not return a result; raised as is when the function itself raised."""


class TimeLimitExceeded(CallFailed):
    """The call missed its deadline; its worker was killed."""


class WorkerCrashed(CallFailed):
    """The worker died or raised instead of answering."""


class _Worker:
    def __init__(self, preload: Sequence[str], memory_mb: int | None):
        argv = [sys.executable, "-c", _WORKER_MAIN, str(memory_mb or 0), *preload]
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.ready = False

    def call(self, fn: Callable, args: tuple, timeout_s: float):
        if not self.ready:
            try:
                self.ready = self._receive(_STARTUP_TIMEOUT_S) == _READY
            except CallFailed:
                pass
            if not self.ready:  # not the call's fault: every call would fail the same way
                raise RuntimeError(
                    f"a time-limit worker failed to start: {self.process.args} "
                    "(its error is on stderr)"
                )
        cpu_budget_s = math.ceil(timeout_s) + 1
        try:
            write_frame(self.process.stdin.fileno(), pickle.dumps((fn, args, cpu_budget_s)))
        except BrokenPipeError:
            raise WorkerCrashed("the worker exited") from None
        ok, value = pickle.loads(self._receive(timeout_s))
        if not ok:
            raise CallFailed(value)
        return value

    def _receive(self, timeout_s: float) -> bytes:
        fd = self.process.stdout.fileno()
        if not select.select([fd], [], [], timeout_s)[0]:
            raise TimeLimitExceeded(f"no answer within {timeout_s} s")
        payload = read_frame(fd)
        if payload is None:
            raise WorkerCrashed(f"the worker exited with {self.process.wait()}")
        return payload

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()


class WorkerPool:
    """Up to `size` warm workers (default: the number of cores), started on demand."""

    def __init__(
        self, size: int | None = None, preload: Sequence[str] = (), memory_mb: int | None = None
    ):
        self.size = size or os.cpu_count() or 1
        self._preload = tuple(preload)
        self._memory_mb = memory_mb
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._started = 0
        self._lock = threading.Lock()
        self._all: list[_Worker] = []
        self._executor = ThreadPoolExecutor(self.size, thread_name_prefix="time-limit")
        atexit.register(self.close)

    def call(self, fn: Callable, *args, timeout_s: float):
        """fn(*args) in a worker; raises a CallFailed (TimeLimitExceeded, WorkerCrashed)."""
        worker = self._acquire()
        try:
            return worker.call(fn, args, timeout_s)
        except (TimeLimitExceeded, WorkerCrashed):
            worker.kill()
            with self._lock:
                self._all.remove(worker)
            worker = self._spawn()  # the replacement warms up while we go on
            raise
        finally:
            self._idle.put(worker)

    def map(self, fn: Callable, calls: Sequence[tuple], timeout_s: float) -> list:
        """fn(*args) for each args in `calls`, in parallel; a CallFailed stands in for a failure."""

        def one(args: tuple):
            try:
                return self.call(fn, *args, timeout_s=timeout_s)
            except CallFailed as failure:
                return failure

        return list(self._executor.map(one, calls))

    def close(self) -> None:
        with self._lock:
            for worker in self._all:
                if worker.process.poll() is None:
                    worker.kill()
            self._all.clear()
        self._executor.shutdown(wait=False)

    def _acquire(self) -> _Worker:
        with self._lock:
            start_one = self._idle.empty() and self._started < self.size
            self._started += start_one
        return self._spawn() if start_one else self._idle.get()

    def _spawn(self) -> _Worker:
        worker = _Worker(self._preload, self._memory_mb)
        with self._lock:
            self._all.append(worker)
        return worker


def serve_worker(memory_mb: int, preload: Sequence[str]) -> None:
    """Worker main loop: answer (fn, args, cpu budget) frames on stdin with (ok, value) frames."""
    replies = os.dup(1)
    os.dup2(2, 1)  # stray prints must not corrupt the reply channel
    if memory_mb:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    for module in preload:
        importlib.import_module(module)
    write_frame(replies, _READY)
    while (payload := read_frame(0)) is not None:
        fn, args, cpu_budget_s = pickle.loads(payload)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        used_s = math.ceil(usage.ru_utime + usage.ru_stime)
        resource.setrlimit(resource.RLIMIT_CPU, (used_s + cpu_budget_s, resource.RLIM_INFINITY))
        try:
            reply = (True, fn(*args))
        except Exception as error:  # noqa: BLE001 -- reported to the caller as CallFailed
            reply = (False, f"{type(error).__name__}: {error}")
        write_frame(replies, pickle.dumps(reply))
