"""What a person inspects of a GRPO step: per-sequence trainer-vs-engine logprob gaps, router
agreement, and the samples as rows of `rollouts.jsonl` (rl.rollouts_file reads them back).

The policy update computes the trainer's logprobs of every sampled token before it changes
the weights (the "old" logprobs); the engine reported its own when it sampled. Per sequence:
  logprob_gap      mean |trainer logprob - engine logprob| over the completion tokens
  logprob_gap_max  max of the same
Router agreement: where the engine reports the experts it routed each token to (the native
engine always; vLLM on GPU with routing replay), the trainer's routers record their own
top-k in that same forward (before a replay overrides it) and per token
|engine set & trainer set| / top_k is averaged over the tokens the engine fed (prompt and
completion) - per MoE layer, per sequence, and over both (`router_agreement`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moetune.model.routing_replay import route_overlap
from moetune.rl.policy_batch import PolicyBatch, stack_routes
from moetune.rl.rollout import Rollout


def engine_routes(rollouts: list[Rollout], batch: PolicyBatch | None) -> torch.Tensor | None:
    """[num_moe_layers, B, L, top_k] experts the engine routed the batch's tokens to (-1: not
    fed); None unless every rollout carries them."""
    if batch is None or not rollouts or any(r.routed_experts is None for r in rollouts):
        return None
    return stack_routes(rollouts, batch.input_ids.shape[1])


def trainer_routes(chosen: list[list[torch.Tensor]], parts: int, shape) -> torch.Tensor:
    """The routers' own choices over the first `parts` forwards (the batch's micro-batches, in
    row order; idle passes come after them) -> [num_moe_layers, B, L, top_k]."""
    return torch.stack([torch.cat(layer[:parts]).view(*shape, -1) for layer in chosen])


def router_agreement(
    engine: torch.Tensor, trainer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """routes [num_moe_layers, B, L, top_k] -> (per layer [num_moe_layers], per sequence [B])
    mean top-k overlap over the tokens the engine routed (its rows of -1 left out); a
    sequence or layer without such tokens gets nan."""
    fed = (engine[..., 0] >= 0).float()
    overlap = route_overlap(engine, trainer).cpu() * fed
    per_layer = overlap.sum((1, 2)) / fed.sum((1, 2))
    per_row = overlap.sum((0, 2)) / fed.sum((0, 2))
    return per_layer, per_row


def logprob_gaps(
    trainer: torch.Tensor, sampler: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L-1] logprobs of both and the completion mask -> per sequence (mean, max) of
    |trainer - sampler| over the completion tokens (0 for an empty completion)."""
    gap = (trainer.float() - sampler.float()).abs() * mask
    return gap.sum(-1) / mask.sum(-1).clamp(min=1), gap.amax(-1)


@dataclass
class Inspected:
    """Per sequence of a policy update's batch (rows in rollout order): its advantage, logprob
    gap (mean, max) and router agreement (None: no routes from the engine); the agreement per
    MoE layer."""

    advantage: list[float]
    logprob_gap: list[float]
    logprob_gap_max: list[float]
    router_agreement: list[float] | None = None
    layer_agreement: list[float] | None = None

    @classmethod
    def of(
        cls,
        batch: PolicyBatch,
        trainer_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        routes: torch.Tensor | None,
        chosen: list[list[torch.Tensor]] | None,
        parts: int,
    ) -> Inspected:
        mean, most = logprob_gaps(trainer_logprobs, batch.sampler_logprobs, batch.completion_mask)
        inspected = cls(advantages.tolist(), mean.tolist(), most.tolist())
        if routes is not None and chosen is not None and all(chosen):
            mine = trainer_routes(chosen, parts, batch.input_ids.shape)
            if mine.shape == routes.shape:
                per_layer, per_row = router_agreement(routes, mine)
                inspected.router_agreement = per_row.tolist()
                inspected.layer_agreement = per_layer.tolist()
        return inspected

    def metrics(self, layer_ids: list[int]) -> dict[str, float]:
        """router_agreement (mean over MoE layers) and router_agreement/layer_i; {} without
        routes."""
        if self.layer_agreement is None:
            return {}
        values = self.layer_agreement
        metrics = {"router_agreement": sum(values) / max(len(values), 1)}
        metrics |= {f"router_agreement/layer_{i}": v for i, v in zip(layer_ids, values)}
        return metrics


def sample_records(
    step: int,
    groups,
    inspected: Inspected | None,
    decode,
    version: int,
    staleness: int,
) -> list[dict]:
    """One rollouts.jsonl row per sample of this rank's `groups` (rl.collector.Groups), in
    order; `group` numbers this rank's groups (rl.inspection.number_groups makes it global).
    decode: token ids -> text (the prompt as the model saw it, template included)."""
    n = len(groups.rollouts[0]) if groups.rollouts else 0
    rewards = groups.rewards.flatten().tolist()
    rows = []
    for index, rollout in enumerate(r for group in groups.rollouts for r in group):
        row = {
            "step": step,
            "group": index // n,
            "sample": index % n,
            "prompt": decode(rollout.prompt_ids),
            "completion": rollout.text,
            "rewards": {name: values[index] for name, values in groups.per_function.items()},
            "reward": rewards[index],
            "advantage": None,
            "policy_version": version,
            "staleness": staleness,
            "finish_reason": rollout.finish_reason,
            "completion_tokens": len(rollout.completion_ids),
            "logprob_gap": None,
            "logprob_gap_max": None,
            "router_agreement": None,
        }
        if inspected is not None:
            row["advantage"] = inspected.advantage[index]
            row["logprob_gap"] = inspected.logprob_gap[index]
            row["logprob_gap_max"] = inspected.logprob_gap_max[index]
            if inspected.router_agreement is not None:
                row["router_agreement"] = inspected.router_agreement[index]
        rows.append(row)
    return rows


def number_groups(per_rank: list[list[dict]]) -> list[dict]:
    """Every rank's rows (in rank order) as one step's, groups numbered across ranks."""
    rows, offset = [], 0
    for rank, records in enumerate(per_rank):
        for record in records:
            rows.append({**record, "group": offset + record["group"], "rank": rank})
        offset += 1 + max((r["group"] for r in records), default=-1)
    return rows


def spread(rows: list[dict], limit: int | bool) -> list[dict]:
    """`training.log_rollouts`: true keeps every row, false none, an int N at most N rows
    spread evenly over the step (rows i * len / N)."""
    if limit is True:
        return rows
    if limit is False or limit <= 0:
        return []
    if limit >= len(rows):
        return rows
    return [rows[i * len(rows) // limit] for i in range(limit)]
