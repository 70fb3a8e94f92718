"""GRPO-family math as pure tensor functions (no I/O, no model, no trainer).

- `group_advantages` (grpo / dr_grpo / leave_one_out = rloo / reinforce_pp / pass_at_k; the
  last two are `reinforce_pp_advantages` and `pass_at_k_advantages`) and `zero_std_groups`
- `policy_loss` (grpo / dapo / dr_grpo / gspo, optionally dual-clipped; cispo / sapo / gmpo)
  with an optional k3 KL penalty and truncated importance sampling, aggregated over the whole
  batch (`global_tokens`, `global_rows`: the micro-batches' losses add up to the batch's),
  returning the loss and `PolicyLossStats`
- `importance_weights`: the correction of a loss computed on samples another policy drew (the
  engine's: train/inference mismatch, and asynchronous samples' lag), per token or per
  sequence, truncated (TIS) or masked (MIS)
- `soft_overlong_penalty` and `overlong_mask` (DAPO's overlong handling)
- `mismatch_kl` (sampler vs trainer logprobs) and `entropy_from_logits`

Papers: GRPO, DeepSeekMath (arXiv 2402.03300); DAPO (2503.14476); Dr. GRPO, "Understanding
R1-Zero-Like Training" (2503.20783); GSPO (2507.18071); RLOO, Ahmadian et al. 2024
(2402.14740); REINFORCE++ (2501.03262); Pass@k Training (2508.10751); CISPO, MiniMax-M1
(2506.13585); SAPO (2511.20347); GMPO (2507.20673); dual-clip PPO (1912.09729); TIS, Yao et
al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"; MIS, Liu et
al. 2025, "When Speed Kills Stability: Demystifying RL Collapse from the Training-Inference
Mismatch" (sequence-level masked importance sampling) and IcePop (token-level masking, Ling
team 2025, "Every Step Evolves: Scaling Reinforcement Learning for Trillion-Scale Thinking
Model"); the k3 KL estimator, Schulman 2020, "Approximating KL Divergence".

Shapes: B sequences of T (padded) completion tokens, V vocabulary, G groups of n samples.
`mask` [B, T] is 1 on counted tokens; values under mask 0 are never used, so padding may hold
anything (even -inf), and a sequence without counted tokens adds 0 to the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ADVANTAGE_KINDS = ("grpo", "dr_grpo", "leave_one_out", "rloo", "reinforce_pp", "pass_at_k")
# Advantages that read the whole batch (not one group at a time): under data parallelism they
# must see every rank's rewards (rl.policy_update.batch_advantages gathers them).
BATCH_ADVANTAGE_KINDS = ("reinforce_pp",)
LOSS_KINDS = ("grpo", "dapo", "dr_grpo", "gspo", "cispo", "sapo", "gmpo")
CLIPPED_LOSS_KINDS = ("grpo", "dapo", "dr_grpo", "gspo")  # PPO's clip; dual-clip composes
IS_LEVELS = ("token", "sequence")
IS_MODES = ("truncate", "mask")


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


def group_advantages(
    rewards: Tensor,
    n: int,
    kind: str = "grpo",
    eps: float = 1e-4,
    *,
    k: int | None = None,
    tokens: Tensor | None = None,
) -> Tensor:
    """Advantages of groups of n consecutive samples; rewards [G*n] or [G, n] -> same shape.

    grpo:          (r - mean) / (std + eps), std the unbiased (n - 1) one, as TRL's GRPOTrainer.
    dr_grpo:       r - mean (Dr. GRPO drops the std division).
    leave_one_out: r_i - mean of the other n - 1 rewards (RLOO) = n / (n - 1) * (r_i - mean);
                   `rloo` is the same.
    reinforce_pp:  `reinforce_pp_advantages(rewards, n, tokens)` (batch-wide statistics).
    pass_at_k:     `pass_at_k_advantages(rewards, n, k)`.
    eps is grpo's; the last two use their papers' constants.
    """
    if kind not in ADVANTAGE_KINDS:
        raise ValueError(f"unknown advantage kind {kind!r}; valid: {', '.join(ADVANTAGE_KINDS)}")
    if kind == "reinforce_pp":
        return reinforce_pp_advantages(rewards, n, tokens)
    if kind == "pass_at_k":
        if k is None:
            raise ValueError("group_advantages('pass_at_k') needs k")
        return pass_at_k_advantages(rewards, n, k)
    r = _grouped(rewards, n)
    centred = r - r.mean(1, keepdim=True)
    if kind == "grpo":
        adv = centred / (r.std(1, keepdim=True) + eps)
    elif kind == "dr_grpo":
        adv = centred
    else:
        adv = centred * (n / (n - 1))
    return adv.reshape(rewards.shape)


def reinforce_pp_advantages(rewards: Tensor, n: int, tokens: Tensor | None = None) -> Tensor:
    """REINFORCE++-baseline (Hu et al., arXiv 2501.03262), rewards [G*n] or [G, n] -> same
    shape, in reward units divided by the batch's std (so unitless).

    Each reward minus its group's mean (the baseline), then normalised over the whole batch:
    A = (c - mu) / sqrt(max(var, 1e-8)), mu and var (the biased one) the mean and variance of
    the centred rewards c over the batch's tokens, as OpenRLHF's `reinforce_baseline` (every
    token of a sequence carries its sequence's advantage): `tokens` [G*n] (or [G, n]) weighs
    each sequence by its counted tokens; None weighs sequences equally. The batch statistics
    make the result depend on every group: under data parallelism pass the whole batch's
    rewards and tokens (rl.policy_update.batch_advantages). The paper's token-level KL in the
    reward is not folded in here (moetune adds KL to the loss: `policy_loss(beta=...)`).
    """
    r = _grouped(rewards, n)
    centred = (r - r.mean(1, keepdim=True)).flatten()
    if tokens is None:
        weights = torch.ones_like(centred)
    else:
        if tokens.numel() != centred.numel():
            raise ValueError(
                f"tokens has {tokens.numel()} entries for {centred.numel()} rewards: "
                "pass one token count per sequence"
            )
        weights = tokens.flatten().to(centred)
    total = weights.sum()
    if total <= 0:
        return torch.zeros_like(centred).reshape(rewards.shape)
    mean = (weights * centred).sum() / total
    var = (weights * (centred - mean) ** 2).sum() / total
    return ((centred - mean) * var.clamp(min=1e-8).rsqrt()).reshape(rewards.shape)


def pass_at_k_advantages(rewards: Tensor, n: int, k: int, eps: float = 1e-6) -> Tensor:
    """Pass@k Training's analytical advantage (Chen et al., arXiv 2508.10751), rewards [G*n]
    or [G, n] -> same shape, unitless.

    A group of k samples drawn without replacement from the n is rewarded with the best of
    their rewards (pass@k's "any passes" for 0/1 rewards). Over all C(n, k) such subsets: Rbar
    the mean of that reward, sigma its (population) std, and a sample's advantage
    (E[best of a subset holding it] - Rbar) / (sigma + eps). For binary rewards with N_neg
    failures this is the paper's closed form: Rbar = 1 - C(N_neg, k) / C(n, k), sigma =
    sqrt(Rbar (1 - Rbar)), A_pos = (1 - Rbar) / sigma, A_neg = (1 - Rbar - C(N_neg - 1,
    k - 1) / C(n - 1, k - 1)) / sigma (eps 1e-6 as the authors' code). Non-binary rewards use
    the same definition with the max (PKPO's maxg@k, arXiv 2505.15201): exact over all
    subsets, nothing is thresholded. k = 1 gives (r - mean) / (population std + eps). A group
    whose subsets all score alike (all pass, all fail, fewer than k failures) gets zeros.

    Computed in closed form from the sorted group v_1 <= ... <= v_n (1-based ranks): the best
    of a random subset is v_j with probability C(j-1, k-1) / C(n, k); of a subset holding v_i
    it is v_i in C(i-1, k-1) of the C(n-1, k-1) cases and v_j (j > i) in C(j-2, k-2).
    """
    r = _grouped(rewards, n)
    if not 1 <= k <= n:
        raise ValueError(f"pass@k advantages need 1 <= k <= n, got k={k} for groups of n={n}")
    v, order = r.to(torch.float64).sort(dim=1, stable=True)
    ranks = range(1, n + 1)

    def holding(i: int, j: int) -> int:  # subsets holding v_i whose best is v_j
        if j == i:
            return math.comb(i - 1, k - 1)
        return math.comb(j - 2, k - 2) if j > i and k > 1 else 0

    # Integer counts as float64: sums of 0/1 rewards stay exact (counts below 2**53).
    as_tensor = dict(dtype=torch.float64, device=v.device)
    best = torch.tensor([math.comb(j - 1, k - 1) for j in ranks], **as_tensor)
    counts = torch.tensor([[holding(i, j) for j in ranks] for i in ranks], **as_tensor)
    mean = (v * best).sum(1, keepdim=True) / math.comb(n, k)
    sigma = ((v - mean) ** 2 * best).sum(1, keepdim=True).div(math.comb(n, k)).sqrt()
    conditional = v @ counts.T / math.comb(n - 1, k - 1)
    # sigma 0: every subset scores alike (numerators 0 too); a constant group's float noise
    flat = (sigma == 0) | (v == v[:, :1]).all(1, keepdim=True)
    adv_sorted = torch.where(flat, 0.0, (conditional - mean) / (sigma + eps))
    adv = torch.empty_like(adv_sorted).scatter_(1, order, adv_sorted)
    return adv.to(r.dtype).reshape(rewards.shape)


def zero_std_groups(rewards: Tensor, n: int) -> Tensor:
    """BoolTensor [G]: groups whose n rewards are all equal (zero advantage, no signal)."""
    r = _grouped(rewards, n)
    return (r == r[:, :1]).all(1)


@dataclass
class PolicyLossStats:
    """Diagnostics of one `policy_loss` call, python floats computed without a graph."""

    # counted tokens (gspo: sequences) where the clipped branch binds; cispo: where the IS
    # weight is clipped; sapo: 0 (no hard clip); gmpo: tokens whose log-ratio clip binds
    clip_fraction: float
    # mean importance ratio over counted tokens (gspo: s_i over sequences; gmpo: the
    # unclipped geometric mean exp(mean_t(logp - old)) over sequences)
    ratio_mean: float
    kl: float | None  # mean k3 KL(policy || ref) over counted tokens; None without KL
    tis_weight_mean: float | None  # mean TIS weight over counted tokens; None without TIS
    # counted tokens where dual-clip's -c A cap binds; None without dual-clip
    dual_clip_fraction: float | None = None
    # counted tokens whose importance weight the mask mode zeroed; None unless is_mode "mask"
    is_masked_fraction: float | None = None


def _check_shape(name: str, x: Tensor | None, shape: torch.Size, of: str) -> None:
    if x is not None and x.shape != shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but must match {of}'s shape {tuple(shape)}"
        )


def _masked_mean(x: Tensor, m: Tensor) -> float:
    return float((x * m).sum() / m.sum().clamp(min=1))


def importance_weights(
    old_logprobs: Tensor,
    sampler_logprobs: Tensor,
    mask: Tensor,
    cap: float,
    level: str = "token",
    mode: str = "truncate",
) -> Tensor:
    """Importance weights [B, T] (unitless, no gradient) of the trainer's policy before the
    update (`old_logprobs`, nats) against the engine that sampled the tokens
    (`sampler_logprobs`), all [B, T]; 1 where `mask` is 0.

    level token:    w_t = exp(old_t - sampler_t), one weight per token.
    level sequence: every token of a sequence carries its likelihood ratio
                    w = exp(sum_t (old_t - sampler_t)) over the sequence's counted tokens.
    mode truncate:  min(w, cap): truncated importance sampling (TIS, Yao et al. 2025, "Your
                    Efficient RL Framework Secretly Brings You Off-Policy RL Training").
    mode mask:      w where w <= cap, else 0: the token (sequence) is dropped from the loss
                    (masked importance sampling: MIS, Liu et al. 2025, "When Speed Kills
                    Stability", per sequence; IcePop's token-level masking). The loss's
                    denominators are left as they are: a dropped token adds 0.
    The comparison with the cap is made in log space, so huge sequence ratios do not overflow.
    """
    if level not in IS_LEVELS:
        raise ValueError(f"unknown importance level {level!r}; valid: {', '.join(IS_LEVELS)}")
    if mode not in IS_MODES:
        raise ValueError(f"unknown importance mode {mode!r}; valid: {', '.join(IS_MODES)}")
    if not cap > 0:
        raise ValueError(f"the importance weight cap must be > 0, not {cap}")
    _check_shape("sampler_logprobs", sampler_logprobs, old_logprobs.shape, "old_logprobs")
    _check_shape("mask", mask, old_logprobs.shape, "old_logprobs")
    keep = mask.bool()
    dtype = torch.promote_types(old_logprobs.dtype, torch.float32)
    log_w = torch.where(keep, old_logprobs.to(dtype) - sampler_logprobs.to(dtype), 0.0)
    if level == "sequence":
        log_w = log_w.sum(1, keepdim=True).expand_as(log_w)
    log_cap = math.log(cap)
    if mode == "truncate":
        weights = log_w.clamp(max=log_cap).exp()
    else:
        weights = torch.where(log_w <= log_cap, log_w.clamp(max=log_cap).exp(), 0.0)
    return torch.where(keep, weights, 1.0).detach()


def policy_loss(
    kind: str,
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    clip_ratio_c: float | None = None,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
    ref_logprobs: Tensor | None = None,
    beta: float = 0.0,
    sampler_logprobs: Tensor | None = None,
    tis_cap: float | None = None,
    is_level: str = "token",
    is_mode: str = "truncate",
    max_completion_length: int | None = None,
    global_tokens: int | None = None,
    global_rows: int | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """Policy-gradient loss. logprobs, old_logprobs, mask, ref/sampler_logprobs [B, T] (nats);
    advantages [B]. Returns (scalar loss, PolicyLossStats).

    Per token of the clipped kinds (grpo, dapo, dr_grpo, gspo): -min(r A, clip(r, 1 -
    epsilon_low, 1 + epsilon_high) A) with r = exp(logp - old); with `clip_ratio_c` = c > 1
    (dual-clip PPO, Ye et al., arXiv 1912.09729) a negative advantage's term is further
    capped at -c A (its gradient is 0 where the cap binds, i.e. r > c). Every kind's policy
    term is multiplied by the detached importance weight `importance_weights(old, sampler,
    mask, tis_cap, is_level, is_mode)` (default: TIS, min(exp(old - sampler), tis_cap) per
    token) when sampler_logprobs is given, and gets beta * k3 added per token, k3 =
    exp(ref - logp) - (ref - logp) - 1, when beta != 0 and ref_logprobs is given.
    epsilon_high defaults to epsilon_low (DAPO's clip-higher sets it larger).

    The B rows may be one micro-batch (on one data-parallel rank) of a batch of `global_rows`
    sequences holding `global_tokens` counted tokens (default: these B rows and the tokens
    under `mask`): every kind divides by the whole batch's denominator, so the losses (and
    gradients) of the micro-batches add up to the loss of the batch in one call. Kinds:
      grpo     each sequence's mean over its tokens, summed over sequences / global_rows (the
               mean over the batch's sequences).
      dapo     as grpo, but sum over all tokens / global_tokens (a token mean).
      dr_grpo  as grpo, but sum over all tokens / (global_rows * max_completion_length).
      gspo     s_i = exp(mean_t(logp - old)) in GSPO-token form, r_t = sg[s_i] exp(logp_t -
               sg[logp_t]): every token's value is s_i, the gradient equals sequence-level
               GSPO's (with TIS, each token's gradient carries its own weight). Aggregated
               as grpo. The paper uses epsilons around 3e-4 / 4e-4.
      cispo    (MiniMax-M1, arXiv 2506.13585) -sg[w] A per token, w = clip(r, 1 - epsilon_low,
               1 + epsilon_high), written sg[w] A exp(logp - sg[logp]): its value is -w A and
               its gradient -w A grad(logp), the paper's REINFORCE gradient with the clipped
               IS weight held constant (no token is dropped, none gets a gradient through w).
               Aggregated as dapo (the paper divides by the batch's tokens). MiniMax-M1 sets
               no lower bound (a large epsilon_low).
      sapo     (Soft Adaptive Policy Optimization, arXiv 2511.20347) -f(r) A per token with the
               soft gate f(r) = 4 / tau * sigmoid(tau (r - 1)), tau = tau_pos where A > 0 else
               tau_neg; its gradient is -4 p (1 - p) r A grad(logp), p = sigmoid(tau (r - 1)),
               which equals -A grad(logp) at r = 1 and fades smoothly off-policy instead of a
               hard clip. Aggregated as grpo. The paper (and verl) use tau_pos 1, tau_neg 1.05.
      gmpo     (Geometric-Mean Policy Optimization, arXiv 2507.20673) one term per sequence:
               -A exp(mean_t l_t), l_t the token log-ratio clipped in log space, sgn(A)
               min(sgn(A) (logp - old), sgn(A) clip(logp - old, -epsilon_low, epsilon_high))
               as verl's geo_mean loss (verl's GMPO recipe: epsilons 0.4 / 0.4), i.e. -A
               times the geometric mean of the clipped token ratios. With TIS the term is
               multiplied by the geometric mean of the sequence's TIS weights (as verl;
               is_mode mask: a masked token zeroes its sequence's term); the KL term is
               the sequence's token mean of k3. Summed / global_rows.
    Dual-clip (`clip_ratio_c`) is for the clipped kinds only.
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
    if clip_ratio_c is not None and (kind not in CLIPPED_LOSS_KINDS or not clip_ratio_c > 1):
        raise ValueError(
            f"clip_ratio_c={clip_ratio_c} with policy_loss({kind!r}): dual-clip needs "
            f"clip_ratio_c > 1 and a clipped loss ({', '.join(CLIPPED_LOSS_KINDS)})"
        )
    if kind == "sapo" and not (tau_pos > 0 and tau_neg > 0):
        raise ValueError(f"sapo needs tau_pos, tau_neg > 0, got {tau_pos}, {tau_neg}")
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    dtype = torch.promote_types(logprobs.dtype, torch.float32)
    keep = mask.bool()
    m = keep.to(dtype)
    tokens = m.sum(1)
    logp, old = logprobs.to(dtype), old_logprobs.to(dtype)
    adv = advantages.to(dtype)[:, None]
    rows = max(logprobs.shape[0] if global_rows is None else global_rows, 1)

    log_ratio = torch.where(keep, logp - old, 0.0)
    tis = k3 = dual = None
    if sampler_logprobs is not None:
        tis = importance_weights(old, sampler_logprobs, mask, tis_cap, is_level, is_mode)
    if beta != 0 and ref_logprobs is not None:
        d = torch.where(keep, ref_logprobs.to(dtype) - logp, 0.0)
        k3 = d.exp() - d - 1

    if kind == "gmpo":
        sign = torch.sign(adv)
        clipped = log_ratio.clamp(-epsilon_low, eps_high)
        kept_log = sign * torch.minimum(sign * log_ratio, sign * clipped)
        per_token = tokens.clamp(min=1)
        seq_loss = -adv[:, 0] * torch.exp((kept_log * m).sum(1) / per_token)
        if tis is not None:
            seq_loss = seq_loss * torch.exp((tis.log() * m).sum(1) / per_token)
        if k3 is not None:
            seq_loss = seq_loss + beta * (k3 * m).sum(1) / per_token
        loss = torch.where(tokens > 0, seq_loss, 0.0).sum() / rows
    else:
        if kind == "gspo":
            seq_ratio = torch.exp(log_ratio.sum(1) / tokens.clamp(min=1)).detach()
            ratio = seq_ratio[:, None] * torch.exp(torch.where(keep, logp - logp.detach(), 0.0))
        else:
            ratio = torch.exp(log_ratio)
        if kind == "cispo":
            weight = ratio.detach().clamp(1 - epsilon_low, 1 + eps_high)
            token_loss = -weight * adv * torch.exp(torch.where(keep, logp - logp.detach(), 0.0))
        elif kind == "sapo":
            tau = torch.where(adv > 0, tau_pos, tau_neg).to(dtype)
            token_loss = -(4 / tau) * torch.sigmoid(tau * (ratio - 1)) * adv
        else:
            token_loss = -torch.minimum(
                ratio * adv, ratio.clamp(1 - epsilon_low, 1 + eps_high) * adv
            )
            if clip_ratio_c is not None:
                cap = (-clip_ratio_c * adv).expand_as(token_loss)
                dual = (adv < 0) & (token_loss > cap)
                token_loss = torch.where(dual, cap, token_loss)
        if tis is not None:
            token_loss = token_loss * tis
        if k3 is not None:
            token_loss = token_loss + beta * k3
        token_loss = token_loss * m
        if kind in ("grpo", "gspo", "sapo"):
            loss = (token_loss.sum(1) / tokens.clamp(min=1)).sum() / rows
        elif kind in ("dapo", "cispo"):
            loss = token_loss.sum() / (
                m.sum().clamp(min=1) if global_tokens is None else max(global_tokens, 1)
            )
        else:
            loss = token_loss.sum() / (rows * max_completion_length)

    with torch.no_grad():
        counted = m
        if kind == "gmpo":
            binds = ((adv > 0) & (log_ratio > eps_high)) | ((adv < 0) & (log_ratio < -epsilon_low))
            ratio = torch.exp(log_ratio.sum(1) / tokens.clamp(min=1))[:, None]
            ratio_counted = (tokens > 0).to(dtype)[:, None]
        else:
            if kind == "gspo":  # one ratio per sequence; counted = sequences with tokens
                ratio, counted = seq_ratio[:, None], (tokens > 0).to(dtype)[:, None]
            ratio_counted = counted
            if kind == "cispo":  # the IS weight is clipped, whatever the advantage's sign
                binds = (ratio < 1 - epsilon_low) | (ratio > 1 + eps_high)
            elif kind == "sapo":  # no hard clip
                binds = torch.zeros_like(ratio, dtype=torch.bool)
            else:
                binds = ((adv > 0) & (ratio > 1 + eps_high)) | (
                    (adv < 0) & (ratio < 1 - epsilon_low)
                )
        stats = PolicyLossStats(
            clip_fraction=_masked_mean(binds.to(dtype), counted),
            ratio_mean=_masked_mean(ratio, ratio_counted),
            kl=None if k3 is None else _masked_mean(k3, m),
            tis_weight_mean=None if tis is None else _masked_mean(tis, m),
            dual_clip_fraction=None if dual is None else _masked_mean(dual.to(dtype), m),
            is_masked_fraction=(
                _masked_mean((tis == 0).to(dtype), m)
                if tis is not None and is_mode == "mask"
                else None
            ),
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
