"""Score a batch of completions with weighted reward functions: the GRPO trainer's call.

    specs = [RewardSpec("math_accuracy"), RewardSpec("format", weight=0.2, on_error="zero")]
    result = score(specs, prompts, completions, {"answer": answers})
    result.totals    # [float] per sample: sum of weight * value over values that are not None
    result.values    # {"math_accuracy": [1.0, 0.0, None, ...], "format": [...]}
    result.errors    # {"math_accuracy": 0, "format": 1}: samples that failed (on_error="zero")
    result.timeouts  # {"math_accuracy": 1, ...}: samples that hit a time limit (scored 0.0)
    result.metrics   # {"name": [value, ...]}: what the functions passed to log_metric
    result.extra     # {"column": [one value per sample]}: what they passed to log_extra

`score_async` is the same for callers inside an event loop. Each function is called once
with the whole batch, by keyword, as TRL's GRPOTrainer calls it:

    fn(prompts=..., completions=..., completion_ids=..., **columns,
       trainer_state=..., log_extra=..., log_metric=...)

A function that takes **kwargs gets all of these; any other gets the ones it names. With
conversational prompts (lists of `{"role", "content"}` messages) completions arrive in TRL's
conversational form, `[{"role": "assistant", "content": text}]`; `completion_texts` gives
the plain texts either way. `completion_ids` is passed when the caller has the token ids.
`trainer_state` has `global_step`, `max_steps` and `epoch`. `log_metric(name, value)` and
`log_extra(column, values)` land in `ScoreResult.metrics` and `ScoreResult.extra`. Async
functions run concurrently; sync functions run one after another in a worker thread,
alongside the async ones.

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

from moetune.config.schema import RewardSpec
from moetune.rewards.registry import RUN_ARGUMENTS, RewardNotFound, get_reward

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainerState:
    """The run's progress, passed to reward functions as `trainer_state` (TRL passes its
    transformers TrainerState, which has these fields)."""

    global_step: int = 0
    max_steps: int = 0
    epoch: float = 0.0


@dataclass
class ScoreResult:
    """Scores of one batch: `values[name]` per sample (None: not applicable), the weighted
    `totals`, per-reward counts of `errors` and `timeouts`, what functions logged through
    `log_metric` (`metrics`) and `log_extra` (`extra`)."""

    values: dict[str, list[float | None]]
    totals: list[float]
    errors: dict[str, int]
    timeouts: dict[str, int]
    metrics: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list] = field(default_factory=dict)


def completion_texts(completions: list) -> list[str]:
    """Plain texts of completions given as strings or in TRL's conversational form."""
    return [c if isinstance(c, str) else c[-1]["content"] for c in completions]


def is_conversational(prompts: list) -> bool:
    """Prompts given as message lists, as TRL's `is_conversational` tells them apart."""
    return bool(prompts) and isinstance(prompts[0], list)


class RewardError(RuntimeError):
    """A reward function failed; the message names it and, where known, the sample."""


class RewardSpecError(ValueError):
    """A listed reward cannot be used (not found, not importable, wrong options); the message
    names its place in the list, `rewards[i]`."""


def resolve_rewards(specs: Sequence[RewardSpec]) -> list[Callable]:
    """The function of each spec, with its options bound, or a RewardSpecError naming the
    first that fails. Run before any work by `moetune run` and `moetune reward score`."""
    functions = []
    for index, spec in enumerate(specs):
        try:
            functions.append(get_reward(spec.name, **spec.kwargs))
        except (RewardNotFound, TypeError, ValueError, ImportError, SyntaxError) as error:
            detail = (
                str(error)
                if isinstance(error, (RewardNotFound, TypeError))
                else f"{type(error).__name__}: {error}"
            )
            raise RewardSpecError(f"rewards[{index}] ({spec.name}): {detail}") from None
    return functions


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


def score(
    specs: Sequence[RewardSpec],
    prompts: list,
    completions: list[str],
    columns: dict[str, list] | None = None,
    *,
    completion_ids: list[list[int]] | None = None,
    trainer_state: TrainerState | None = None,
) -> ScoreResult:
    """Score a batch; see the module docstring."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(
            score_async(
                specs,
                prompts,
                completions,
                columns,
                completion_ids=completion_ids,
                trainer_state=trainer_state,
            )
        )
    raise RuntimeError("score() was called inside a running event loop; await score_async()")


async def score_async(
    specs: Sequence[RewardSpec],
    prompts: list,
    completions: list[str],
    columns: dict[str, list] | None = None,
    *,
    completion_ids: list[list[int]] | None = None,
    trainer_state: TrainerState | None = None,
) -> ScoreResult:
    batch = _batch_arguments(prompts, completions, dict(columns or {}), completion_ids)
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"rewards listed twice: {', '.join(duplicates)}")
    functions = resolve_rewards(specs)
    for spec, fn in zip(specs, functions):
        _check_arguments(spec.name, fn, {*batch, *RUN_ARGUMENTS})
    sync_lock = asyncio.Lock()
    state = trainer_state or TrainerState()
    outcomes = await asyncio.gather(
        *(
            _run(spec, fn, batch, len(completions), state, sync_lock)
            for spec, fn in zip(specs, functions)
        )
    )
    values = {spec.name: outcome.values for spec, outcome in zip(specs, outcomes)}
    totals = [
        sum(spec.weight * v for spec in specs if (v := values[spec.name][i]) is not None)
        for i in range(len(completions))
    ]
    metrics: dict[str, list[float]] = {}
    extra: dict[str, list] = {}
    for spec, outcome in zip(specs, outcomes):
        for name, logged in outcome.log.metrics.items():
            metrics.setdefault(name, []).extend(logged)
        for column, logged in outcome.log.extra.items():
            if column in extra:
                raise RewardError(
                    f"reward {spec.name!r} logs the extra column {column!r}, "
                    "which another reward logs too"
                )
            extra[column] = logged
    return ScoreResult(
        values=values,
        totals=[float(total) for total in totals],
        errors={spec.name: outcome.errors for spec, outcome in zip(specs, outcomes)},
        timeouts={spec.name: outcome.timeouts for spec, outcome in zip(specs, outcomes)},
        metrics=metrics,
        extra=extra,
    )


def _batch_arguments(prompts, completions, columns, completion_ids) -> dict[str, list]:
    """The per-sample keyword arguments of every call, checked to be one row per sample."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if is_conversational(prompts):
        completions = [
            [{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions
        ]
    batch = {"prompts": prompts, "completions": completions}
    if completion_ids is not None:
        batch["completion_ids"] = completion_ids
    for name, column in columns.items():
        if name in batch or name in RUN_ARGUMENTS:
            raise ValueError(f"column {name!r} clashes with the reward argument of that name")
        batch[name] = column
    for name, column in batch.items():
        if len(column) != len(completions):
            raise ValueError(f"{name!r} has {len(column)} rows for {len(completions)} completions")
    return batch


@dataclass
class _Log:
    """What one reward function passed to log_metric and log_extra."""

    function: str
    rows: int
    metrics: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list] = field(default_factory=dict)

    def log_metric(self, name: str, value: float) -> None:
        self.metrics.setdefault(name, []).append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        if len(values) != self.rows:
            raise ValueError(
                f"reward {self.function!r}: log_extra({column!r}) got {len(values)} "
                f"values for {self.rows} samples"
            )
        if column in self.extra:
            raise ValueError(f"reward {self.function!r}: log_extra({column!r}) called twice")
        self.extra[column] = list(values)


@dataclass
class _Outcome:
    values: list[float | None]
    errors: int
    timeouts: int
    log: _Log


async def _run(
    spec: RewardSpec,
    fn: Callable,
    batch: dict[str, list],
    n: int,
    state: TrainerState,
    sync_lock: asyncio.Lock,
) -> _Outcome:
    """Values, errors, timeouts and logs of one reward function over the batch."""
    counter = [0]
    _timeouts.set(counter)  # each gathered task runs in its own copy of the context
    accepted = _accepted(fn)
    log = _Log(spec.name, n)
    try:
        values = _validate(spec.name, await _call(fn, batch, state, log, accepted, sync_lock), n)
        return _Outcome(values, 0, counter[0], log)
    except _WrongCount as failure:  # no single sample is to blame
        if spec.on_error == "raise":
            raise RewardError(str(failure)) from None
        logger.warning("%s; scoring the batch 0.0", failure)
        return _Outcome([0.0] * n, n, counter[0], _Log(spec.name, n))
    except Exception as error:  # noqa: BLE001 -- any failure: find the samples to blame
        logger.debug(
            "reward %r failed on the batch (%r); retrying sample by sample", spec.name, error
        )
    values, errors, counter[0] = [], 0, 0  # timeouts and logs count again, sample by sample
    log = _Log(spec.name, n)
    for i in range(n):
        one = {name: column[i : i + 1] for name, column in batch.items()}
        sample_log = _Log(spec.name, 1)
        try:
            result = await _call(fn, one, state, sample_log, accepted, sync_lock)
            values += _validate(spec.name, result, 1, first_index=i)
        except Exception as error:
            message = (
                str(error)
                if type(error) is _Failure
                else f"reward {spec.name!r} failed on sample {i}: {type(error).__name__}: {error}"
            )
            if spec.on_error == "raise":
                raise RewardError(message) from error
            logger.warning("%s; scoring it 0.0", message)
            values.append(0.0)
            errors += 1
        _merge_sample_log(log, sample_log, i)
    if errors == 0 and spec.on_error == "raise":
        raise RewardError(
            f"reward {spec.name!r} failed on the batch of {n} samples, though on no single sample"
        )
    return _Outcome(values, errors, counter[0], log)


def _merge_sample_log(log: _Log, sample: _Log, index: int) -> None:
    """Add one sample's logs; an extra column it did not log gets None for it."""
    for name, logged in sample.metrics.items():
        log.metrics.setdefault(name, []).extend(logged)
    for column in {*log.extra, *sample.extra}:
        log.extra.setdefault(column, [None] * index).extend(sample.extra.get(column, [None]))


async def _call(
    fn: Callable,
    batch: dict[str, list],
    state: TrainerState,
    log: _Log,
    accepted: set[str] | None,
    sync_lock: asyncio.Lock,
):
    arguments = {
        **batch,
        "trainer_state": state,
        "log_extra": log.log_extra,
        "log_metric": log.log_metric,
    }
    if accepted is not None:
        arguments = {name: value for name, value in arguments.items() if name in accepted}
    if inspect.iscoroutinefunction(fn):
        result = await fn(**arguments)
    else:
        async with sync_lock:  # sync functions run one at a time, off the event loop
            result = await asyncio.to_thread(fn, **arguments)
    return await result if inspect.isawaitable(result) else result


def _check_arguments(name: str, fn: Callable, available: set[str]) -> None:
    """Fail before any call when `fn` needs an argument no call gives it: most likely a
    function written for positional calls (`fn(p, c)`), or a column the data lacks."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    kinds = (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.KEYWORD_ONLY,
    )
    missing = [
        p.name
        for p in parameters.values()
        if p.kind in kinds
        and (
            p.default is inspect.Parameter.empty
            and p.name not in available
            or p.kind is inspect.Parameter.POSITIONAL_ONLY
        )
    ]
    if missing:
        raise RewardError(
            f"reward {name!r} takes {', '.join(missing)}, which no call gives it: reward functions "
            "are called by keyword, as TRL calls them, with prompts=, completions=, "
            "completion_ids=, the data set's columns, trainer_state=, log_extra= and "
            f"log_metric= (this batch has {', '.join(sorted(available))})"
        )


def _accepted(fn: Callable) -> set[str] | None:
    """The keyword arguments `fn` names, or None when it takes **kwargs (or cannot tell)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return {
        name for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL
    }


def _validate(name: str, values, n: int, first_index: int = 0) -> list[float | None]:
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise _WrongCount(
            f"reward {name!r} returned {type(values).__name__}, not a list of values "
            f"for {n} samples"
        )
    if len(values) != n:
        raise _WrongCount(f"reward {name!r} returned {len(values)} values for {n} samples")
    checked = []
    for offset, value in enumerate(values):
        if value is not None and not (isinstance(value, numbers.Real) and math.isfinite(value)):
            raise _Failure(
                f"reward {name!r} returned {value!r} for sample {first_index + offset}:"
                " expected a finite number or None"
            )
        checked.append(None if value is None else float(value))
    return checked
