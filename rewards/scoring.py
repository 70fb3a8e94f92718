"""Score a batch of completions with weighted reward functions: the GRPO trainer's call.

    specs = [RewardSpec("math_accuracy"), RewardSpec("format", weight=0.2, on_error="zero")]
    result = score(specs, prompts, completions, {"answer": answers})
    result.totals    # [float] per sample: sum of weight * value over values that are not None
    result.values    # {"math_accuracy": [1.0, 0.0, None, ...], "format": [...]}
    result.errors    # {"math_accuracy": 0, "format": 1}: samples that failed (on_error="zero")
    result.timeouts  # {"math_accuracy": 1, ...}: samples that hit a time limit (scored 0.0)

`score_async` is the same for callers inside an event loop. Each function is called once
with the whole batch: `fn(prompts, completions, **columns)`, given every column if it takes
**kwargs and otherwise only the columns it names. Async functions run concurrently; sync
functions run one after another in a worker thread, alongside the async ones.

A function that raises is called again sample by sample to find the failing samples. With
`on_error="raise"` (the default) the first one stops scoring with a RewardError naming the
function and the sample index; with `on_error="zero"` failing samples score 0.0 and are
counted and logged. Returning the wrong number of values, or a value that is not a finite
number or None, fails the same way. A sample whose values are all None totals 0.0.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from moetune.rewards.registry import get_reward

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardSpec:
    """One entry of a recipe's `rewards` list."""

    name: str  # registered name, entry point, package.module:function or file.py:function
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    on_error: Literal["raise", "zero"] = "raise"

    def __post_init__(self):
        if self.on_error not in ("raise", "zero"):
            raise ValueError(f"reward {self.name!r}: on_error must be 'raise' or 'zero', "
                             f"got {self.on_error!r}")


@dataclass
class ScoreResult:
    values: dict[str, list[float | None]]
    totals: list[float]
    errors: dict[str, int]
    timeouts: dict[str, int]


class RewardError(RuntimeError):
    """A reward function failed; the message names it and, where known, the sample."""


class _Failure(Exception):
    """A failure, before on_error decides what it means."""


class _WrongCount(_Failure):
    """The function did not return one value per sample."""


_timeouts: contextvars.ContextVar[list[int]] = contextvars.ContextVar("reward_timeouts")


def report_timeout(count: int = 1) -> None:
    """Called by a reward function when samples hit a time limit; `score` counts them."""
    counter = _timeouts.get(None)
    if counter is not None:
        counter[0] += count


def score(specs: Sequence[RewardSpec], prompts: list[str], completions: list[str],
          columns: dict[str, list] | None = None) -> ScoreResult:
    """Score a batch; see the module docstring."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(score_async(specs, prompts, completions, columns))
    raise RuntimeError("score() was called inside a running event loop; await score_async()")


async def score_async(specs: Sequence[RewardSpec], prompts: list[str], completions: list[str],
                      columns: dict[str, list] | None = None) -> ScoreResult:
    columns = dict(columns or {})
    _check_batch(specs, prompts, completions, columns)
    sync_lock = asyncio.Lock()
    outcomes = await asyncio.gather(*(
        _run(spec, get_reward(spec.name, **spec.kwargs), prompts, completions, columns, sync_lock)
        for spec in specs
    ))
    values = {spec.name: outcome[0] for spec, outcome in zip(specs, outcomes)}
    totals = [
        sum(spec.weight * v for spec in specs if (v := values[spec.name][i]) is not None)
        for i in range(len(completions))
    ]
    return ScoreResult(
        values=values,
        totals=[float(total) for total in totals],
        errors={spec.name: outcome[1] for spec, outcome in zip(specs, outcomes)},
        timeouts={spec.name: outcome[2] for spec, outcome in zip(specs, outcomes)},
    )


def _check_batch(specs, prompts, completions, columns) -> None:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    for name, column in columns.items():
        if len(column) != len(completions):
            raise ValueError(f"column {name!r} has {len(column)} rows for "
                             f"{len(completions)} completions")
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"rewards listed twice: {', '.join(duplicates)}")


async def _run(spec: RewardSpec, fn: Callable, prompts, completions, columns,
               sync_lock: asyncio.Lock) -> tuple[list[float | None], int, int]:
    """(values, errors, timeouts) of one reward function over the batch."""
    counter = [0]
    _timeouts.set(counter)  # each gathered task runs in its own copy of the context
    columns = _accepted_columns(fn, columns)
    n = len(completions)
    try:
        values = _validate(spec.name, await _call(fn, prompts, completions, columns, sync_lock), n)
        return values, 0, counter[0]
    except _WrongCount as failure:  # no single sample is to blame
        if spec.on_error == "raise":
            raise RewardError(str(failure)) from None
        logger.warning("%s; scoring the batch 0.0", failure)
        return [0.0] * n, n, counter[0]
    except Exception as error:  # noqa: BLE001 -- any failure: find the samples to blame
        logger.debug("reward %r failed on the batch (%r); retrying sample by sample",
                     spec.name, error)
    values, errors, counter[0] = [], 0, 0  # timeouts count again, sample by sample
    for i in range(n):
        one = {name: column[i:i + 1] for name, column in columns.items()}
        try:
            result = await _call(fn, prompts[i:i + 1], completions[i:i + 1], one, sync_lock)
            values += _validate(spec.name, result, 1, first_index=i)
        except Exception as error:
            message = (str(error) if type(error) is _Failure else
                       f"reward {spec.name!r} failed on sample {i}: {type(error).__name__}: {error}")
            if spec.on_error == "raise":
                raise RewardError(message) from error
            logger.warning("%s; scoring it 0.0", message)
            values.append(0.0)
            errors += 1
    if errors == 0 and spec.on_error == "raise":
        raise RewardError(f"reward {spec.name!r} failed on the batch of {n} samples, "
                          "though on no single sample")
    return values, errors, counter[0]


async def _call(fn: Callable, prompts, completions, columns, sync_lock: asyncio.Lock):
    if inspect.iscoroutinefunction(fn):
        result = await fn(prompts, completions, **columns)
    else:
        async with sync_lock:  # sync functions run one at a time, off the event loop
            result = await asyncio.to_thread(fn, prompts, completions, **columns)
    return await result if inspect.isawaitable(result) else result


def _accepted_columns(fn: Callable, columns: dict[str, list]) -> dict[str, list]:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return columns
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return columns
    return {name: column for name, column in columns.items() if name in parameters}


def _validate(name: str, values, n: int, first_index: int = 0) -> list[float | None]:
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise _WrongCount(f"reward {name!r} returned {type(values).__name__}, not a list of values "
                       f"for {n} samples")
    if len(values) != n:
        raise _WrongCount(f"reward {name!r} returned {len(values)} values for {n} samples")
    checked = []
    for offset, value in enumerate(values):
        if value is not None and not (isinstance(value, numbers.Real) and math.isfinite(value)):
            raise _Failure(f"reward {name!r} returned {value!r} for sample {first_index + offset}:"
                           " expected a finite number or None")
        checked.append(None if value is None else float(value))
    return checked
