"""Rollouts -> padded tensors for the policy update, and the policy's token logprobs on them.

Each row is prompt + completion, right-padded. Position t of the `[B, L-1]` tensors scores
token t+1, so the completion tokens of a row sit at positions len(prompt)-1 ... and
`completion_mask` marks them (and only them). With routing replay, `routes` holds the experts
the rollout engine routed each token to, and the policy's forward uses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moetune.model.routing_replay import replaying_routes
from moetune.rl.algorithms import entropy_from_logits
from moetune.rl.rollout import Rollout


@dataclass
class PolicyBatch:
    input_ids: torch.Tensor  # [B, L] prompt + completion, right-padded
    attention_mask: torch.Tensor  # [B, L] 1 on real tokens
    completion_mask: torch.Tensor  # [B, L-1] float, 1 where position t scores a completion token
    sampler_logprobs: torch.Tensor  # [B, L-1] the rollout engine's logprobs there, else 0
    routes: torch.Tensor | None = None  # [num_moe_layers, B, L, top_k] expert ids, -1 off tokens

    def rows(self, index: slice) -> PolicyBatch:
        return PolicyBatch(
            self.input_ids[index],
            self.attention_mask[index],
            self.completion_mask[index],
            self.sampler_logprobs[index],
            None if self.routes is None else self.routes[:, index],
        )

    def to(self, device: torch.device) -> PolicyBatch:
        return PolicyBatch(
            *(
                None if t is None else t.to(device)
                for t in (
                    self.input_ids,
                    self.attention_mask,
                    self.completion_mask,
                    self.sampler_logprobs,
                    self.routes,
                )
            )
        )

    @property
    def completion_tokens(self) -> int:
        return int(self.completion_mask.sum())


def build_batch(rollouts: list[Rollout], pad_id: int, with_routes: bool = False) -> PolicyBatch:
    """Pad the rollouts into one batch; with_routes also stacks their routed experts."""
    length = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    batch = len(rollouts)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    completion_mask = torch.zeros(batch, length - 1)
    sampler = torch.zeros(batch, length - 1)
    for row, rollout in enumerate(rollouts):
        prompt, completion = len(rollout.prompt_ids), len(rollout.completion_ids)
        input_ids[row, : prompt + completion] = torch.tensor(
            rollout.prompt_ids + rollout.completion_ids
        )
        attention_mask[row, : prompt + completion] = 1
        completion_mask[row, prompt - 1 : prompt - 1 + completion] = 1
        sampler[row, prompt - 1 : prompt - 1 + completion] = torch.tensor(rollout.logprobs)
    routes = stack_routes(rollouts, length) if with_routes else None
    return PolicyBatch(input_ids, attention_mask, completion_mask, sampler, routes)


def stack_routes(rollouts: list[Rollout], length: int) -> torch.Tensor:
    """[num_moe_layers, B, length, top_k] int64 of the rollouts' routed experts (-1 padded)."""
    if any(r.routed_experts is None for r in rollouts):
        raise ValueError(
            "routing replay: the rollout engine did not report routed experts "
            "(rollout.backend native reports them; vLLM only on GPU)"
        )
    first = rollouts[0].routed_experts
    routes = torch.full(
        (first.shape[0], len(rollouts), length, first.shape[-1]), -1, dtype=torch.long
    )
    for row, rollout in enumerate(rollouts):
        routes[:, row, : rollout.routed_experts.shape[1]] = rollout.routed_experts
    return routes


def token_logprobs(
    model, batch: PolicyBatch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, float | None]:
    """([B, L-1] logprob of each next token at `temperature` (float32; 0 off the
    completion), mean completion-token entropy or None)."""
    logprobs, entropy, _ = policy_forward(model, batch, temperature, with_entropy)
    return logprobs, entropy


def policy_forward(
    model,
    batch: PolicyBatch,
    temperature: float = 1.0,
    with_entropy: bool = False,
    with_mtp: bool = False,
) -> tuple[torch.Tensor, float | None, torch.Tensor | None]:
    """`token_logprobs`, and with_mtp also the MTP loss (the model's own, as SFT trains it:
    mean over depths of the cross-entropy of each completion token) from the same forward.
    It trains the MTP modules only: the policy's trunk, embedding and head enter it detached,
    so it does not pull the policy towards its own samples."""
    device = next(model.parameters()).device
    labels = None
    if with_mtp:
        targets = batch.input_ids[:, 1:].masked_fill(batch.completion_mask == 0, -100)
        labels = torch.cat((torch.full_like(targets[:, :1], -100), targets), dim=1).to(device)
    with replaying_routes(model, batch.routes):
        out = model(
            batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            labels=labels,
            **({"mtp_only": True} if with_mtp else {}),
        )
    logits = out.logits[:, :-1].float() / max(temperature, 1e-6)
    targets = batch.input_ids[:, 1:].to(device)
    logprobs = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    mask = batch.completion_mask.to(device)
    entropy = entropy_from_logits(logits.detach(), mask) if with_entropy else None
    return logprobs * mask, entropy, out.mtp_loss if with_mtp else None
