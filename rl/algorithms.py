"""GRPO-family math as pure tensor functions (no I/O, no model, no trainer).

- `group_advantages` (grpo / dr_grpo / leave_one_out) and `zero_std_groups`
- `policy_loss` (grpo / dapo / dr_grpo / gspo) with an optional k3 KL penalty and truncated
  importance sampling, aggregated over the whole batch (`global_tokens`, `global_rows`: the
  micro-batches' losses add up to the batch's), returning the loss and `PolicyLossStats`
- `soft_overlong_penalty` and `overlong_mask` (DAPO's overlong handling)
- `mismatch_kl` (sampler vs trainer logprobs) and `entropy_from_logits`

Papers: GRPO, DeepSeekMath (arXiv 2402.03300); DAPO (2503.14476); Dr. GRPO, "Understanding
R1-Zero-Like Training" (2503.20783); GSPO (2507.18071); RLOO, Ahmadian et al. 2024
(2402.14740); TIS, Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
Off-Policy RL Training"; the k3 KL estimator, Schulman 2020, "Approximating KL Divergence".

Shapes: B sequences of T (padded) completion tokens, V vocabulary, G groups of n samples.
`mask` [B, T] is 1 on counted tokens; values under mask 0 are never used, so padding may hold
anything (even -inf), and a sequence without counted tokens adds 0 to the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

ADVANTAGE_KINDS = ("grpo", "dr_grpo", "leave_one_out")
LOSS_KINDS = ("grpo", "dapo", "dr_grpo", "gspo")


def _grouped(rewards: Tensor, n: int) -> Tensor:
    if (
        rewards.dim() not in (1, 2)
        or n < 2
        or rewards.numel() % n
        or (rewards.dim() == 2 and rewards.shape[1] != n)
    ):
        raise ValueError(
            f"rewards of shape {tuple(rewards.shape)} do not split into groups of "
            f"n={n}: pass [G*n] or [G, n] with n >= 2"
        )
    return (rewards if rewards.is_floating_point() else rewards.float()).reshape(-1, n)


def group_advantages(rewards: Tensor, n: int, kind: str = "grpo", eps: float = 1e-4) -> Tensor:
    """Advantages within groups of n consecutive samples; rewards [G*n] or [G, n] -> same shape.

    grpo:          (r - mean) / (std + eps), std the unbiased (n - 1) one, as TRL's GRPOTrainer.
    dr_grpo:       r - mean (Dr. GRPO drops the std division).
    leave_one_out: r_i - mean of the other n - 1 rewards (RLOO) = n / (n - 1) * (r_i - mean).
    """
    if kind not in ADVANTAGE_KINDS:
        raise ValueError(f"unknown advantage kind {kind!r}; valid: {', '.join(ADVANTAGE_KINDS)}")
    r = _grouped(rewards, n)
    centred = r - r.mean(1, keepdim=True)
    if kind == "grpo":
        adv = centred / (r.std(1, keepdim=True) + eps)
    elif kind == "dr_grpo":
        adv = centred
    else:
        adv = centred * (n / (n - 1))
    return adv.reshape(rewards.shape)


def zero_std_groups(rewards: Tensor, n: int) -> Tensor:
    """BoolTensor [G]: groups whose n rewards are all equal (zero advantage, no signal)."""
    r = _grouped(rewards, n)
    return (r == r[:, :1]).all(1)


@dataclass
class PolicyLossStats:
    """Diagnostics of one `policy_loss` call, python floats computed without a graph."""

    clip_fraction: float  # counted tokens (gspo: sequences) where the clipped branch binds
    ratio_mean: float  # mean importance ratio over counted tokens (gspo: s_i over sequences)
    kl: float | None  # mean k3 KL(policy || ref) over counted tokens; None without KL
    tis_weight_mean: float | None  # mean TIS weight over counted tokens; None without TIS


def _check_shape(name: str, x: Tensor | None, shape: torch.Size, of: str) -> None:
    if x is not None and x.shape != shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but must match {of}'s shape {tuple(shape)}"
        )


def _masked_mean(x: Tensor, m: Tensor) -> float:
    return float((x * m).sum() / m.sum().clamp(min=1))


def policy_loss(
    kind: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    sampler_logprobs: Tensor | None = None,
    tis_cap: float | None = None,
    max_completion_length: int | None = None,
    global_tokens: int | None = None,
    global_rows: int | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """Clipped policy-gradient loss. logprobs, old_logprobs, mask, ref/sampler_logprobs [B, T];
    advantages [B]. Returns (scalar loss, PolicyLossStats).

    Per token: -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A), times the detached TIS
    weight min(exp(old - sampler), tis_cap) when sampler_logprobs is given, plus beta * k3 with
    k3 = exp(ref - logp) - (ref - logp) - 1 when beta != 0 and ref_logprobs is given.
    epsilon_high defaults to epsilon_low (DAPO's clip-higher sets it larger).

    The B rows may be one micro-batch (on one data-parallel rank) of a batch of `global_rows`
    sequences holding `global_tokens` counted tokens (default: these B rows and the tokens
    under `mask`): every kind divides by the whole batch's denominator, so the losses (and
    gradients) of the micro-batches add up to the loss of the batch in one call. Aggregation:
      grpo     r = exp(logp - old); each sequence's mean over its tokens, summed over
               sequences / global_rows (the mean over the batch's sequences).
      dapo     as grpo, but sum over all tokens / global_tokens (a token mean).
      dr_grpo  as grpo, but sum over all tokens / (global_rows * max_completion_length).
      gspo     s_i = exp(mean_t(logp - old)) in GSPO-token form, r_t = sg[s_i] exp(logp_t -
               sg[logp_t]): every token's value is s_i, the gradient equals sequence-level
               GSPO's (with TIS, each token's gradient carries its own weight). Aggregated
               as grpo. The paper uses epsilons around 3e-4 / 4e-4.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown policy loss kind {kind!r}; valid: {', '.join(LOSS_KINDS)}")
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    for name, x in (
        ("old_logprobs", old_logprobs),
        ("mask", mask),
        ("ref_logprobs", ref_logprobs),
        ("sampler_logprobs", sampler_logprobs),
    ):
        _check_shape(name, x, logprobs.shape, "logprobs")
    _check_shape("advantages", advantages, logprobs.shape[:1], "logprobs[:, 0]")
    if kind == "dr_grpo" and not max_completion_length:
        raise ValueError(
            "policy_loss('dr_grpo') needs max_completion_length (its constant "
            "normaliser global_rows * max_completion_length)"
        )
    if sampler_logprobs is not None and tis_cap is None:
        raise ValueError("sampler_logprobs given without tis_cap: set the TIS cap C")
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    keep = mask.bool()
    m = keep.to(dtype)
    tokens = m.sum(1)
    logp, old = logprobs.to(dtype), old_logprobs.to(dtype)
    adv = advantages.to(dtype)[:, None]

    log_ratio = torch.where(keep, logp - old, 0.0)
    if kind == "gspo":
        seq_ratio = torch.exp(log_ratio.sum(1) / tokens.clamp(min=1)).detach()
        ratio = seq_ratio[:, None] * torch.exp(torch.where(keep, logp - logp.detach(), 0.0))
    else:
        ratio = torch.exp(log_ratio)
    token_loss = -torch.minimum(ratio * adv, ratio.clamp(1 - epsilon_low, 1 + eps_high) * adv)
    tis = None
    if sampler_logprobs is not None:
        tis_log = torch.where(keep, old - sampler_logprobs.to(dtype), 0.0)
        tis = tis_log.exp().clamp(max=tis_cap).detach()
        token_loss = token_loss * tis
    k3 = None
    if beta != 0 and ref_logprobs is not None:
        d = torch.where(keep, ref_logprobs.to(dtype) - logp, 0.0)
        k3 = d.exp() - d - 1
        token_loss = token_loss + beta * k3

    token_loss = token_loss * m
    rows = max(logprobs.shape[0] if global_rows is None else global_rows, 1)
    if kind in ("grpo", "gspo"):
        loss = (token_loss.sum(1) / tokens.clamp(min=1)).sum() / rows
    elif kind == "dapo":
        loss = token_loss.sum() / (
            m.sum().clamp(min=1) if global_tokens is None else max(global_tokens, 1)
        )
    else:
        loss = token_loss.sum() / (rows * max_completion_length)

    with torch.no_grad():
        if kind == "gspo":  # one ratio per sequence; counted = sequences with tokens
            ratio, m = seq_ratio[:, None], (tokens > 0).to(dtype)[:, None]
        binds = ((adv > 0) & (ratio > 1 + eps_high)) | ((adv < 0) & (ratio < 1 - epsilon_low))
        stats = PolicyLossStats(
            clip_fraction=_masked_mean(binds.to(dtype), m),
            ratio_mean=_masked_mean(ratio, m),
            kl=None if k3 is None else _masked_mean(k3, keep.to(dtype)),
            tis_weight_mean=None if tis is None else _masked_mean(tis, keep.to(dtype)),
        )
    return loss, stats


def soft_overlong_penalty(
    lengths: Tensor, max_length: int, buffer: int, penalty: float = 1.0
) -> Tensor:
    """DAPO's soft overlong punishment, lengths [B] -> rewards [B]: 0 up to max_length - buffer,
    linear down to -penalty at max_length, -penalty beyond."""
    if not 0 < buffer <= max_length:
        raise ValueError(
            f"need 0 < buffer <= max_length, got buffer={buffer}, max_length={max_length}"
        )
    over = (lengths.to(torch.get_default_dtype()) - (max_length - buffer)) / buffer
    return -penalty * over.clamp(0.0, 1.0)


def overlong_mask(finish_reasons: list[str]) -> Tensor:
    """BoolTensor [B], True where generation stopped at the length limit ("length"): the
    truncated sequences to mask out of the loss (`mask & ~overlong_mask(reasons)[:, None]`)."""
    return torch.tensor([reason == "length" for reason in finish_reasons], dtype=torch.bool)


@torch.no_grad()
def mismatch_kl(trainer_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> float:
    """KL(sampler || trainer) on the sampled tokens, all [B, T]: the k3 estimate (the tokens
    were drawn by the sampler) exp(d) - d - 1 with d = trainer - sampler, averaged over counted
    tokens. 0 when the two agree."""
    _check_shape("sampler_logprobs", sampler_logprobs, trainer_logprobs.shape, "trainer_logprobs")
    _check_shape("mask", mask, trainer_logprobs.shape, "trainer_logprobs")
    keep = mask.bool()
    dtype = torch.promote_types(trainer_logprobs.dtype, torch.float32)
    d = torch.where(keep, trainer_logprobs.to(dtype) - sampler_logprobs.to(dtype), 0.0)
    return _masked_mean(d.exp() - d - 1, keep.to(dtype))


@torch.no_grad()
def entropy_from_logits(logits: Tensor, mask: Tensor, chunk_size: int = 128) -> float:
    """Mean entropy (nats) of softmax(logits) over counted tokens; logits [B, T, V], mask
    [B, T]. Works on chunk_size positions at a time: one [B, chunk_size, V] float32 buffer."""
    if logits.dim() != 3 or logits.shape[:2] != mask.shape:
        raise ValueError(
            f"logits has shape {tuple(logits.shape)}, mask {tuple(mask.shape)}: "
            "need logits [B, T, V] and mask [B, T]"
        )
    keep = mask.bool()
    dtype = torch.promote_types(logits.dtype, torch.float32)
    total = torch.zeros((), dtype=dtype, device=logits.device)
    for start in range(0, logits.shape[1], chunk_size):
        probs = torch.softmax(logits[:, start : start + chunk_size].to(dtype), dim=-1)
        entropy = torch.special.entr(probs).sum(-1)  # entr(0) = 0: -inf logits are fine
        total += entropy[keep[:, start : start + chunk_size]].sum()
    return float(total / keep.sum().clamp(min=1))
