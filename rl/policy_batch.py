"""Rollouts -> padded tensors for the policy update, and the policy's token logprobs on them.

Each row is prompt + completion, right-padded. Position t of the `[B, L-1]` tensors scores
token t+1, so the completion tokens of a row sit at positions len(prompt)-1 ... and
`completion_mask` marks them (and only them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moetune.rl.algorithms import entropy_from_logits
from moetune.rl.rollout import Rollout


@dataclass
class PolicyBatch:
    input_ids: torch.Tensor  # [B, L] prompt + completion, right-padded
    attention_mask: torch.Tensor  # [B, L] 1 on real tokens
    completion_mask: torch.Tensor  # [B, L-1] float, 1 where position t scores a completion token
    sampler_logprobs: torch.Tensor  # [B, L-1] the rollout engine's logprobs there, else 0

    def rows(self, index: slice) -> PolicyBatch:
        return PolicyBatch(self.input_ids[index], self.attention_mask[index],
                           self.completion_mask[index], self.sampler_logprobs[index])

    @property
    def completion_tokens(self) -> int:
        return int(self.completion_mask.sum())


def build_batch(rollouts: list[Rollout], pad_id: int) -> PolicyBatch:
    length = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    batch = len(rollouts)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    completion_mask = torch.zeros(batch, length - 1)
    sampler = torch.zeros(batch, length - 1)
    for row, rollout in enumerate(rollouts):
        prompt, completion = len(rollout.prompt_ids), len(rollout.completion_ids)
        input_ids[row, :prompt + completion] = torch.tensor(rollout.prompt_ids + rollout.completion_ids)
        attention_mask[row, :prompt + completion] = 1
        completion_mask[row, prompt - 1:prompt - 1 + completion] = 1
        sampler[row, prompt - 1:prompt - 1 + completion] = torch.tensor(rollout.logprobs)
    return PolicyBatch(input_ids, attention_mask, completion_mask, sampler)


def token_logprobs(model, batch: PolicyBatch, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[torch.Tensor, float | None]:
    """([B, L-1] logprob of each next token at `temperature` (float32; 0 off the
    completion), mean completion-token entropy or None)."""
    device = next(model.parameters()).device
    logits = model(batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
    logits = logits[:, :-1].float() / max(temperature, 1e-6)
    targets = batch.input_ids[:, 1:].to(device)
    logprobs = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    mask = batch.completion_mask.to(device)
    entropy = entropy_from_logits(logits.detach(), mask) if with_entropy else None
    return logprobs * mask, entropy
