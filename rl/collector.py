"""What one GRPO step learns from: prompts drawn from the stream, `group_size` completions
sampled for each from the RolloutPool, scored by the recipe's rewards (plus DAPO's soft
overlong penalty). With dynamic sampling, groups whose rewards all agree are dropped and new
prompts refill them, for at most `max_refills` more sampling rounds.

A step's first round may have been sampled ahead, while the trainer updated on earlier steps
(rl.async_collector). Its groups holding a sample more than `rollout.max_staleness` weight
versions older than the trainer's are dropped and their prompts sampled again (the stream's
order is kept: no prompt is skipped or drawn twice).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moetune.config.schema import GRPORecipe
from moetune.data.arithmetic import arithmetic_spec
from moetune.data.prompt_template import few_shot_examples, render
from moetune.rewards import TrainerState, score
from moetune.rl import algorithms
from moetune.rl.prompt_stream import PromptStream, StreamedPrompts
from moetune.rl.rollout import (
    EnginesNeedWeights,
    Generation,
    Rollout,
    RolloutPool,
    SamplingSpec,
)


@dataclass(eq=False)
class Prefetched:
    """A step's first round sampled ahead: its problems and the generation sent for them
    (None: not sent yet), or, once collected (or restored from a checkpoint), its rollouts."""

    step: int
    problems: list[dict]
    generation: Generation | None = None
    rollouts: list[list[Rollout]] | None = None


@dataclass
class Groups:
    """What one step learns from: G groups of n rollouts and their rewards."""

    problems: list[dict]
    rollouts: list[list[Rollout]]  # [G][n]
    rewards: torch.Tensor  # [G, n] weighted total per sample (after overlong shaping)
    per_function: dict[str, list[float]]  # reward name -> values of the kept samples
    generated_groups: int
    zero_std_groups: int
    rounds: int
    logged: dict[str, list[float]] = field(default_factory=dict)  # log_metric calls, all rounds
    # The trainer's weight version when the groups were collected (None: not known), and the
    # samples dropped for being more than rollout.max_staleness versions older.
    policy_version: int | None = None
    dropped_stale: int = 0

    def share(self, part: int, parts: int) -> Groups:
        """Every parts-th group from `part` (rl.pool_share: a process's share of the groups
        its pool's leader collected). The sampling counts (generated, zero-std, rounds,
        dropped, logged metrics) stay with part 0."""
        n = self.rewards.shape[1]
        picked = list(range(part, len(self.problems), parts))
        first = part == 0
        return Groups(
            [self.problems[g] for g in picked],
            [self.rollouts[g] for g in picked],
            self.rewards[picked],
            {
                name: [v for g in picked for v in values[g * n : (g + 1) * n]]
                for name, values in self.per_function.items()
            },
            self.generated_groups if first else 0,
            self.zero_std_groups if first else 0,
            self.rounds if first else 0,
            self.logged if first else {},
            self.policy_version,
            self.dropped_stale if first else 0,
        )

    def staleness(self) -> list[int]:
        """Per kept sample, in order: how many versions its oldest token's weights were behind
        the trainer's (`policy_version` - `Rollout.oldest_version`; 0: on-policy)."""
        version = self.policy_version
        return [
            0 if version is None else version - r.oldest_version for g in self.rollouts for r in g
        ]

    def metrics(self, seconds: float) -> dict[str, float]:
        """Rewards, lengths and filtering of the groups, sampled in `seconds`."""
        flat = [r for group in self.rollouts for r in group]
        lengths = [len(r.completion_ids) for r in flat] or [0]
        rewards = self.rewards.flatten()
        metrics = {
            "reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
            "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "zero_std_fraction": self.zero_std_groups / max(self.generated_groups, 1),
            "groups_used": float(len(self.problems)),
            "refill_rounds": float(self.rounds - 1),
            "completion_length_mean": sum(lengths) / len(lengths),
            "completion_length_max": float(max(lengths)),
            "clipped_fraction": sum(r.finish_reason == "length" for r in flat) / max(len(flat), 1),
            "rollout_tokens_per_second": sum(lengths) / max(seconds, 1e-9),
            "dropped_stale": float(self.dropped_stale),
        }
        staleness = self.staleness()
        if staleness:
            metrics["staleness_mean"] = sum(staleness) / len(staleness)
            metrics["staleness_max"] = float(max(staleness))
        metrics |= {f"reward/{name}": mean(values) for name, values in self.per_function.items()}
        metrics |= {f"reward_metric/{name}": mean(values) for name, values in self.logged.items()}
        return metrics


class Collector:
    """Samples and scores this rank's groups: `local_prompts` prompts a step from `stream`,
    through `pool`; sampling seeds derive from (training.seed, step, round, rank)."""

    def __init__(
        self,
        recipe: GRPORecipe,
        tokenizer,
        pool: RolloutPool,
        stream: PromptStream | StreamedPrompts,
        local_prompts: int,
        rank: int,
        stop_ids: list[int],
    ):
        self.recipe, self.tokenizer, self.pool, self.stream = recipe, tokenizer, pool, stream
        self.local_prompts, self.rank, self.stop_ids = local_prompts, rank, stop_ids
        data = recipe.data
        self.shots = few_shot_examples(
            recipe.template, data.source, arithmetic_spec(data.arithmetic)
        )

    def sampling(self, step: int, round_: int, greedy: bool = False) -> SamplingSpec:
        rollout = self.recipe.rollout
        seed = (
            ((self.recipe.training.seed * 100_003 + step) * 17 + round_) * 1_009 + self.rank
        ) * 1_000_003
        return SamplingSpec(
            temperature=0.0 if greedy else rollout.temperature,
            top_p=rollout.top_p,
            top_k=rollout.top_k,
            max_new_tokens=rollout.max_new_tokens,
            stop_token_ids=self.stop_ids,
            seed=seed % 2**31,
        )

    def encode(self, problems: list[dict]) -> list[list[int]]:
        """Token ids of each problem's prompt shown through the recipe's template."""
        texts = [
            render(p["prompt"], self.recipe.template, self.tokenizer, self.shots) for p in problems
        ]
        return [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]

    def trainer_state(self, completed: int) -> TrainerState:
        """Progress as TRL gives it to reward functions: `completed` optimizer steps."""
        return TrainerState(
            global_step=completed,
            max_steps=self.recipe.training.max_steps,
            epoch=self.stream.progress,
        )

    def rewards(self, problems: list[dict], rollouts: list[list[Rollout]], completed: int):
        """(totals [G, n], {name: [G*n values]}, {logged metric: [values]}) for the flattened
        groups."""
        n = len(rollouts[0])
        flat = [r for group in rollouts for r in group]
        columns = {
            key: [p.get(key) for p in problems for _ in range(n)]
            for key in sorted({k for p in problems for k in p} - {"prompt", "completion"})
        }
        result = score(
            self.recipe.rewards,
            [p["prompt"] for p in problems for _ in range(n)],
            [r.text for r in flat],
            columns,
            completion_ids=[r.completion_ids for r in flat],
            trainer_state=self.trainer_state(completed),
        )
        totals = torch.tensor(result.totals, dtype=torch.float32)
        algorithm = self.recipe.algorithm
        if algorithm.overlong == "soft":
            lengths = torch.tensor([len(r.completion_ids) for r in flat])
            totals += algorithms.soft_overlong_penalty(
                lengths, self.recipe.rollout.max_new_tokens, algorithm.overlong_buffer
            )
        values = {
            metric_name(name): [0.0 if v is None else float(v) for v in vals]
            for name, vals in result.values.items()
        }
        return totals.view(len(problems), n), values, result.metrics

    def prefetch(self, step: int) -> Prefetched:
        """`step`'s first round of prompts, taken from the stream now (`submit` samples it)."""
        return Prefetched(step, self.stream.take(self.local_prompts))

    def submit(self, prefetched: Prefetched) -> None:
        """Send a prefetched round to the engines (round 0's sampling seed), without waiting."""
        n = self.recipe.algorithm.group_size
        prompts = self.encode(prefetched.problems)
        prefetched.generation = self.pool.submit(prompts, n, self.sampling(prefetched.step, 0))

    def result(self, prefetched: Prefetched) -> list[list[Rollout]]:
        """A prefetched round's rollouts, waiting for them (sent now if it was not)."""
        if prefetched.rollouts is None:
            if prefetched.generation is None:
                self.submit(prefetched)
            prefetched.rollouts = self.pool.collect(prefetched.generation)
        return prefetched.rollouts

    def collect(
        self, step: int, policy_version: int | None = None, first: Prefetched | None = None
    ) -> Groups:
        """The groups of `step` (rewards see step - 1 completed steps). first: its first
        round, sampled ahead; its groups with a sample more than rollout.max_staleness
        versions older than `policy_version` (the trainer's weights) are dropped, and their
        prompts sampled again in the next round. An engine restarted meanwhile
        (EnginesNeedWeights: the trainer resyncs it and calls again) puts the prompts taken
        back, so the call again samples and scores the same prompts with the same seeds (its
        rounds from the first): no prompt is skipped or drawn twice."""
        position = self.stream.state()
        try:
            return self._collect(step, policy_version, first)
        except EnginesNeedWeights:
            if self.stream.state() != position:  # (a streamed set replays up to there)
                self.stream.restore(position)
            raise

    def _collect(self, step: int, policy_version: int | None, first: Prefetched | None) -> Groups:
        algorithm = self.recipe.algorithm
        wanted, n = self.local_prompts, algorithm.group_size
        kept_problems, kept_rollouts, kept_rewards = [], [], []
        per_function: dict[str, list[float]] = {}
        logged: dict[str, list[float]] = {}
        generated = zero_std = rounds = dropped = 0
        redo: list[dict] = []  # prompts whose samples were too stale
        while redo or (len(kept_problems) < wanted and rounds <= algorithm.max_refills):
            if rounds == 0 and first is not None:
                problems = first.problems
                rollouts = self.result(first)
                problems, rollouts, redo = self.fresh(problems, rollouts, policy_version)
                dropped += n * len(redo)
            else:
                taken = self.stream.take(wanted - len(kept_problems) - len(redo))
                problems, redo = redo + taken, []
                rollouts = self.pool.generate(self.encode(problems), n, self.sampling(step, rounds))
            rounds += 1
            if not problems:  # every prefetched group was stale
                continue
            totals, values, round_logged = self.rewards(problems, rollouts, step - 1)
            for name, logged_values in round_logged.items():
                logged.setdefault(name, []).extend(logged_values)
            generated += len(problems)
            flat = algorithms.zero_std_groups(totals.flatten(), n)
            zero_std += int(flat.sum())
            for g, problem in enumerate(problems):
                if algorithm.dynamic_sampling and flat[g]:
                    continue
                kept_problems.append(problem)
                kept_rollouts.append(rollouts[g])
                kept_rewards.append(totals[g])
                for name, vals in values.items():
                    per_function.setdefault(name, []).extend(vals[g * n : (g + 1) * n])
            if not algorithm.dynamic_sampling and not redo:
                break
        rewards = torch.stack(kept_rewards) if kept_rewards else torch.zeros(0, n)
        return Groups(
            kept_problems,
            kept_rollouts,
            rewards,
            per_function,
            generated,
            zero_std,
            rounds,
            logged,
            policy_version,
            dropped,
        )

    def fresh(
        self, problems: list[dict], rollouts: list[list[Rollout]], policy_version: int | None
    ) -> tuple[list[dict], list[list[Rollout]], list[dict]]:
        """(problems, rollouts) of the groups within rollout.max_staleness versions of
        `policy_version` (None: all), and the problems of the others."""
        if policy_version is None:
            return problems, rollouts, []
        limit = self.recipe.rollout.max_staleness
        stale = [
            any(policy_version - r.oldest_version > limit for r in group) for group in rollouts
        ]
        return (
            [p for p, s in zip(problems, stale) if not s],
            [g for g, s in zip(rollouts, stale) if not s],
            [p for p, s in zip(problems, stale) if s],
        )


def metric_name(reward: str) -> str:
    """A reward's name in metrics: `pkg.module:fn` and `path/file.py:fn` shorten to `fn`."""
    return reward.rsplit(":", 1)[-1]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
