"""Rewards for GRPO: a registry of reward functions, the built-ins, and the scorer.

Reward functions are called as TRL's GRPOTrainer calls them, by keyword, so TRL's and
open-r1's functions plug in unchanged: `fn(prompts=, completions=, completion_ids=, **columns,
trainer_state=, log_extra=, log_metric=) -> list[float | None]` (a function gets the
arguments it names, or all through **kwargs), where None means "not applicable to this
sample". The trainer calls `score(specs, prompts, completions, columns, completion_ids=,
trainer_state=) -> ScoreResult` (see `scoring`).

Built-ins: `math_accuracy` (math-verify under a hard time limit), `code_tests` (programs run
in a sandbox), and the shaping rewards `format`, `tag_count`, `soft_overlong`,
`repetition_penalty`. Others come from `@register_reward`, the `moetune.rewards` entry point
group, or `package.module:function` / `path/to/file.py:function` references (see `registry`).
"""

# Importing the built-in modules registers their rewards.
from moetune.rewards import code_tests, math_accuracy, shaping  # noqa: F401
from moetune.rewards.registry import (
    ENTRY_POINT_GROUP,
    RewardNotFound,
    available_rewards,
    get_reward,
    register_reward,
)
from moetune.rewards.scoring import (
    RewardError,
    RewardSpec,
    RewardSpecError,
    ScoreResult,
    TrainerState,
    completion_texts,
    report_timeout,
    resolve_rewards,
    score,
    score_async,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "RewardError",
    "RewardNotFound",
    "RewardSpec",
    "RewardSpecError",
    "ScoreResult",
    "TrainerState",
    "available_rewards",
    "completion_texts",
    "get_reward",
    "register_reward",
    "report_timeout",
    "resolve_rewards",
    "score",
    "score_async",
]
