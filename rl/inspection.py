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


def overlap_sums(engine: torch.Tensor, trainer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """routes [num_moe_layers, B, L, top_k] -> (summed top-k overlap, tokens counted), both
    [num_moe_layers, B], over the tokens the engine routed (its rows of -1 left out)."""
    fed = (engine[..., 0] >= 0).float()
    return (route_overlap(engine, trainer) * fed).sum(-1), fed.sum(-1)


def router_agreement(
    engine: torch.Tensor, trainer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """routes [num_moe_layers, B, L, top_k] -> (per layer [num_moe_layers], per sequence [B])
    mean top-k overlap over the tokens the engine routed; nan where there are none."""
    sums, counts = overlap_sums(engine, trainer)
    return sums.sum(1) / counts.sum(1), sums.sum(0) / counts.sum(0)


class RouterAgreement:
    """Router agreement of a batch of `rollouts`, added micro-batch by micro-batch (so no
    batch-sized route tensors are held): `add(rows, chosen)` after each forward run inside
    model.routing_replay.recording_choices. `of` gives None unless the engine reported the
    routes of every rollout."""

    def __init__(self, rollouts: list[Rollout]):
        self.rollouts = rollouts
        self.row_sums = torch.zeros(len(rollouts), dtype=torch.float64)
        self.row_counts = torch.zeros(len(rollouts), dtype=torch.float64)
        self.layer_sums: torch.Tensor | None = None
        self.layer_counts: torch.Tensor | None = None

    @classmethod
    def of(cls, rollouts: list[Rollout]) -> RouterAgreement | None:
        if not rollouts or any(r.routed_experts is None for r in rollouts):
            return None
        return cls(rollouts)

    def add(self, rows: slice, chosen: list[list[torch.Tensor]], length: int) -> None:
        """The routers' own choices of one forward of the batch's `rows` (padded to `length`
        tokens): per MoE layer a list holding one [len(rows) * length, top_k] tensor."""
        rollouts = self.rollouts[rows]
        if not chosen or not all(chosen):
            return
        mine = torch.stack([torch.cat(layer) for layer in chosen])
        engine = stack_routes(rollouts, length)
        if mine.numel() != engine.numel():
            return  # not this batch's forward (another layer count or top-k)
        sums, counts = overlap_sums(engine.to(mine.device), mine.view_as(engine))
        sums, counts = sums.double().cpu(), counts.double().cpu()
        index = range(len(self.rollouts))[rows]
        self.row_sums[index.start : index.stop] += sums.sum(0)
        self.row_counts[index.start : index.stop] += counts.sum(0)
        if self.layer_sums is None:
            self.layer_sums, self.layer_counts = sums.sum(1), counts.sum(1)
        else:
            self.layer_sums += sums.sum(1)
            self.layer_counts += counts.sum(1)

    def per_row(self) -> list[float]:
        return (self.row_sums / self.row_counts).tolist()  # nan: no routed token

    def per_layer(self) -> list[float] | None:
        if self.layer_sums is None:
            return None
        return (self.layer_sums / self.layer_counts).tolist()


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
        agreement: RouterAgreement | None = None,
    ) -> Inspected:
        mean, most = logprob_gaps(trainer_logprobs, batch.sampler_logprobs, batch.completion_mask)
        inspected = cls(advantages.tolist(), mean.tolist(), most.tolist())
        if agreement is not None and agreement.per_layer() is not None:
            inspected.router_agreement = agreement.per_row()
            inspected.layer_agreement = agreement.per_layer()
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


def sample_records(step: int, groups, inspected: Inspected | None, decode) -> list[dict]:
    """One rollouts.jsonl row per sample of this rank's `groups` (rl.collector.Groups), in
    order; `group` numbers this rank's groups (rl.inspection.number_groups makes it global).
    decode: token ids -> text (the prompt as the model saw it, template included).
    policy_version / version_max: the oldest / newest weight version that sampled one of its
    tokens (they differ only when a sync landed mid-generation: partial rollouts)."""
    n = len(groups.rollouts[0]) if groups.rollouts else 0
    rewards = groups.rewards.flatten().tolist()
    staleness = groups.staleness()
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
            "policy_version": rollout.oldest_version,
            "version_max": max(rollout.versions, default=rollout.oldest_version),
            "staleness": staleness[index],
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
