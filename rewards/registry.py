"""Where reward functions come from.

`get_reward(name, **kwargs)` finds `name`, in this order:

1. functions registered with `@register_reward("name")` (the built-ins register on import);
2. the entry point group `moetune.rewards` of installed packages, e.g. in their pyproject.toml
   `[project.entry-points."moetune.rewards"] my_reward = "my_pkg.rewards:my_reward"`;
3. a reference `package.module:function` or `path/to/file.py:function`;

and returns the function with `kwargs` bound. A reward function takes TRL's keyword
arguments, `fn(prompts=, completions=, completion_ids=, **columns, trainer_state=, ...)`
(those it names, or all through **kwargs) and returns `list[float | None]`, sync or async
(see `scoring`). A function that names none of prompts, completions and completion_ids and
takes no **kwargs is a factory, like TRL's `get_soft_overlong_punishment(max_completion_len,
soft_punish_cache)`: it is called with `kwargs` and the reward function it returns is used.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import TypeVar

from moetune.config.references import UnresolvedReference, is_reference, load_reference

ENTRY_POINT_GROUP = "moetune.rewards"

RewardFn = TypeVar("RewardFn", bound=Callable)
_registry: dict[str, Callable] = {}


class RewardNotFound(LookupError):
    """No registered function, entry point or reference matches the name."""


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn` available as `name` to recipes and `get_reward`."""

    def register(fn: RewardFn) -> RewardFn:
        if _registry.get(name, fn) is not fn:
            raise ValueError(
                f"reward {name!r} is already registered by "
                f"{_registry[name].__module__}.{_registry[name].__qualname__}"
            )
        _registry[name] = fn
        return fn

    return register


def available_rewards() -> list[str]:
    """Registered names and installed entry point names."""
    return sorted({*_registry, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})


REWARD_INPUTS = ("prompts", "completions", "completion_ids")
RUN_ARGUMENTS = ("trainer_state", "log_extra", "log_metric")  # passed on every call, as TRL does


_built: dict[tuple[str, str], Callable] = {}  # (name, options) -> a factory's reward function


def get_reward(name: str, **kwargs) -> Callable:
    """The reward function called `name`, with `kwargs` bound (or built from them, for a
    factory: once per name and options, as TRL builds it once)."""
    fn = _find(name)
    factory = _is_factory(fn)
    _check_options(name, fn, kwargs, factory)
    if not factory:
        return functools.partial(fn, **kwargs) if kwargs else fn
    key = (name, json.dumps(kwargs, sort_keys=True, default=repr))
    if key not in _built:
        reward = fn(**kwargs)
        if not callable(reward):
            raise TypeError(
                f"reward {name!r} takes none of {', '.join(REWARD_INPUTS)}, so it was "
                f"called as a factory, but it returned {type(reward).__name__}, "
                "not a function"
            )
        _built[key] = reward
    return _built[key]


def _is_factory(fn: Callable) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return not any(
        p.kind is inspect.Parameter.VAR_KEYWORD or name in REWARD_INPUTS
        for name, p in parameters.items()
    )


def _find(name: str) -> Callable:
    if name in _registry:
        return _registry[name]
    for entry_point in entry_points(group=ENTRY_POINT_GROUP, name=name):
        return entry_point.load()
    if is_reference(name):
        try:
            return load_reference(name, "reward")
        except UnresolvedReference as error:
            raise RewardNotFound(str(error)) from None
    known = available_rewards()
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise RewardNotFound(
        f"unknown reward {name!r}.{hint} Known: {', '.join(known)}. Other rewards can be named "
        "as package.module:function or path/to/file.py:function, or installed under the "
        f"entry point group {ENTRY_POINT_GROUP!r}."
    )


def _check_options(name: str, fn: Callable, kwargs: dict, factory: bool) -> None:
    """Require the options a function (or factory) needs; reject, unless it takes **kwargs,
    ones it does not take, naming the nearest."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    option_kinds = (
        (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if factory
        else (inspect.Parameter.KEYWORD_ONLY,)
    )
    for parameter in parameters.values():
        required = (
            parameter.kind in option_kinds
            and parameter.default is inspect.Parameter.empty
            and parameter.name not in REWARD_INPUTS + RUN_ARGUMENTS
        )
        if required and parameter.name not in kwargs:
            how = (
                f" (it names none of {', '.join(REWARD_INPUTS)}, so it is taken for a factory "
                "called with its options; a reward function names the arguments TRL passes "
                "by keyword)"
                if factory
                else ""
            )
            raise TypeError(f"reward {name!r} needs the option {parameter.name!r}{how}")
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    options = [p for p in parameters if p not in REWARD_INPUTS + RUN_ARGUMENTS]
    for key in kwargs:
        if key not in parameters:
            close = difflib.get_close_matches(key, options, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(
                f"reward {name!r} has no option {key!r}{hint} (it takes: {', '.join(options)})"
            )
