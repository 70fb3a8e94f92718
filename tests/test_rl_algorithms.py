"""moetune.rl.algorithms against hand-computed values (the arithmetic is in the comments) and
against plain-Python loop references on fresh random inputs."""

import math
import statistics

import pytest
import torch

from moetune.rl.algorithms import (
    entropy_from_logits,
    group_advantages,
    importance_weights,
    mismatch_kl,
    overlong_mask,
    policy_loss,
    soft_overlong_penalty,
    zero_std_groups,
)

LN2 = math.log(2.0)
F64 = torch.float64

# --- group advantages -----------------------------------------------------------------------

# Two groups of n = 3: [1, 0, 0] (mean 1/3) and [2, 4, 6] (mean 4).
REWARDS = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 6.0], dtype=F64)


def test_grpo_advantages_use_the_unbiased_std():
    # group 0: deviations (2/3, -1/3, -1/3), squares 4/9 + 1/9 + 1/9 = 2/3, / (n-1) = 1/3,
    #          std = sqrt(1/3) = 0.5773502691896258 -> 2/3 / std = 1.1547005383792515
    # group 1: deviations (-2, 0, 2), squares 8, / 2 = 4, std = 2 -> (-1, 0, 1)
    adv = group_advantages(REWARDS, 3, "grpo", eps=0.0)
    expected = [1.1547005383792515, -0.5773502691896258, -0.5773502691896258, -1.0, 0.0, 1.0]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=F64))
    # default eps = 1e-4 in the denominator: group 1 -> +-2 / 2.0001 = +-0.99995000249987
    adv = group_advantages(REWARDS.view(2, 3), 3)
    assert adv.shape == (2, 3)
    torch.testing.assert_close(
        adv[1], torch.tensor([-0.99995000249987, 0.0, 0.99995000249987], dtype=F64)
    )


def test_dr_grpo_advantages_only_centre():
    adv = group_advantages(REWARDS, 3, "dr_grpo")
    torch.testing.assert_close(
        adv, torch.tensor([2 / 3, -1 / 3, -1 / 3, -2.0, 0.0, 2.0], dtype=F64)
    )


def test_leave_one_out_advantages():
    # group 0: 1 - mean(0, 0) = 1, 0 - mean(1, 0) = -0.5, 0 - mean(1, 0) = -0.5
    # group 1: 2 - mean(4, 6) = -3, 4 - mean(2, 6) = 0, 6 - mean(2, 4) = 3
    adv = group_advantages(REWARDS, 3, "leave_one_out")
    torch.testing.assert_close(adv, torch.tensor([1.0, -0.5, -0.5, -3.0, 0.0, 3.0], dtype=F64))


def test_zero_std_groups_and_their_advantages_are_zero_not_nan():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5]])
    assert zero_std_groups(rewards, 3).tolist() == [True, False, True]
    assert zero_std_groups(torch.tensor([2, 2, 3, 3]), 2).tolist() == [True, True]
    adv = group_advantages(rewards.flatten(), 3)
    assert torch.equal(adv[:3], torch.zeros(3)) and torch.equal(adv[6:], torch.zeros(3))


def test_advantage_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"'ppo'.*grpo, dr_grpo, leave_one_out"):
        group_advantages(REWARDS, 3, "ppo")
    with pytest.raises(ValueError, match=r"\(6,\).*n=4"):
        group_advantages(REWARDS, 4)
    with pytest.raises(ValueError, match=r"\(3, 2\).*n=3"):
        group_advantages(REWARDS.view(3, 2), 3)


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "leave_one_out"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_advantages_match_a_loop_reference(kind, seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 9, (1,), generator=g))
    rewards = torch.randn(5 * n, generator=g, dtype=F64)
    expected = []
    for group in rewards.view(5, n).tolist():
        mean = statistics.fmean(group)
        for i, r in enumerate(group):
            if kind == "grpo":
                expected.append((r - mean) / (statistics.stdev(group) + 1e-4))
            elif kind == "dr_grpo":
                expected.append(r - mean)
            else:
                expected.append(r - (sum(group) - r) / (n - 1))
    torch.testing.assert_close(
        group_advantages(rewards, n, kind), torch.tensor(expected, dtype=F64)
    )


# --- policy losses: one hand-computed batch, B = 2, T = 3 ----------------------------------
#
# ratios r = exp(logp - old):  row 0 [1.1, 0.7, 1.5]       A0 = +1, 3 tokens
#                              row 1 [0.5, 1.3, (padding)] A1 = -2, 2 tokens
# per-token loss -min(r A, clip(r, 0.8, 1.2) A):
#   row 0: -min(1.1, 1.1) = -1.1;  -min(0.7, 0.8) = -0.7;  -min(1.5, 1.2) = -1.2 (clip binds)
#   row 1: -min(-1.0, -1.6) = 1.6 (clip binds);  -min(-2.6, -2.4) = 2.6
#   sums: row 0 -3.0, row 1 4.2; 2 of the 5 tokens have the clipped branch active.

OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.3, -2.0]], dtype=F64)
RATIOS = torch.tensor([[1.1, 0.7, 1.5], [0.5, 1.3, 3.0]], dtype=F64)  # 3.0 sits on padding
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -2.0], dtype=F64)
GSPO_LOG_RATIOS = torch.tensor(
    [[0.3, -0.1, 0.1], [-0.2, 0.0, 7.0]], dtype=F64
)  # log r of the gspo tests


def batch(log_ratios=None):
    logp = OLD + (RATIOS.log() if log_ratios is None else log_ratios)
    return logp.requires_grad_(), OLD, ADV, MASK


def test_grpo_loss_is_the_mean_of_per_sequence_means():
    loss, stats = policy_loss("grpo", *batch())
    # (-3.0 / 3 + 4.2 / 2) / 2 = (-1.0 + 2.1) / 2
    torch.testing.assert_close(loss, torch.tensor(0.55, dtype=F64))
    assert stats.clip_fraction == pytest.approx(2 / 5)
    assert stats.ratio_mean == pytest.approx((1.1 + 0.7 + 1.5 + 0.5 + 1.3) / 5)  # 1.02
    assert stats.kl is None and stats.tis_weight_mean is None


def test_dapo_loss_is_a_token_mean_with_clip_higher():
    loss, _ = policy_loss("dapo", *batch())
    torch.testing.assert_close(loss, torch.tensor(1.2 / 5, dtype=F64))  # (-3.0 + 4.2) / 5
    # epsilon_high 0.28: row 0's 1.5 clips to 1.28 (row sum -3.08); row 1 is unchanged
    # (1.3 with A < 0 takes the unclipped branch, 0.5 clips at the unchanged low side).
    loss, stats = policy_loss("dapo", *batch(), epsilon_high=0.28)
    torch.testing.assert_close(loss, torch.tensor((-3.08 + 4.2) / 5, dtype=F64))  # 0.224
    assert stats.clip_fraction == pytest.approx(2 / 5)


def test_dr_grpo_loss_divides_by_a_constant():
    loss, _ = policy_loss("dr_grpo", *batch(), max_completion_length=4)
    torch.testing.assert_close(loss, torch.tensor(1.2 / 8, dtype=F64))  # (-3.0 + 4.2) / (2 * 4)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss("dr_grpo", *batch())


def test_gspo_loss_uses_the_sequence_ratio():
    # log-ratios row 0 [0.3, -0.1, 0.1] -> mean 0.1, s0 = e^0.1 = 1.1051709180756477
    #            row 1 [-0.2, 0.0, pad] -> mean -0.1, s1 = e^-0.1 = 0.9048374180359595
    # epsilon 0.2: neither clips; (-1 * 1.10517... + 2 * 0.90483...) / 2
    loss, stats = policy_loss("gspo", *batch(GSPO_LOG_RATIOS))
    torch.testing.assert_close(loss, torch.tensor(0.35225195899813565, dtype=F64))
    assert stats.clip_fraction == 0.0
    assert stats.ratio_mean == pytest.approx(1.0050041680558036)  # (s0 + s1) / 2
    # GSPO's epsilons 3e-4 / 4e-4: s0 clips to 1.0004 (A > 0) and s1 to 0.9997 (A < 0):
    # (-1.0004 + 2 * 0.9997) / 2 = 0.4995, both sequences clipped.
    loss, stats = policy_loss("gspo", *batch(GSPO_LOG_RATIOS), epsilon_low=3e-4, epsilon_high=4e-4)
    torch.testing.assert_close(loss, torch.tensor(0.4995, dtype=F64))
    assert stats.clip_fraction == 1.0


def test_k3_kl_penalty_is_added_per_token():
    # ref - logp: row 0 [ln 2, 0, -ln 2], row 1 [ln 2, 0, pad]; k3(d) = e^d - d - 1:
    # k3(ln 2) = 1 - ln 2 = 0.3068528194400547, k3(0) = 0, k3(-ln 2) = ln 2 - 0.5
    # row means: 0.5 / 3 and 0.3068528194400547 / 2; grpo adds 0.1 * their mean
    # = 0.1 * 0.160046538193347 to 0.55; kl over 5 tokens = 0.8068528194400547 / 5.
    logp, old, adv, mask = batch()
    ref = logp.detach() + torch.tensor([[LN2, 0.0, -LN2], [LN2, 0.0, 5.0]], dtype=F64)
    loss, stats = policy_loss("grpo", logp, old, adv, mask, ref_logprobs=ref, beta=0.1)
    torch.testing.assert_close(loss, torch.tensor(0.5660046538193347, dtype=F64))
    assert stats.kl == pytest.approx(0.16137056388801094)
    _, stats = policy_loss("grpo", logp, old, adv, mask, ref_logprobs=ref, beta=0.0)
    assert stats.kl is None


def test_truncated_importance_sampling_weights_the_policy_term():
    # old - sampler: row 0 [ln 2, 0, -ln 2] -> weights [min(2, 1.5), 1, 0.5]
    #                row 1 [ln 3, ln 0.8, pad] -> [min(3, 1.5), 0.8]
    # row 0: -1.1 * 1.5 - 0.7 - 1.2 * 0.5 = -2.95 -> / 3; row 1: 1.6 * 1.5 + 2.6 * 0.8 = 4.48
    # -> / 2 = 2.24; loss (-0.98333... + 2.24) / 2; mean weight 5.3 / 5.
    logp, old, adv, mask = batch()
    sampler = old - torch.tensor([[LN2, 0.0, -LN2], [math.log(3), math.log(0.8), 9.0]], dtype=F64)
    loss, stats = policy_loss("grpo", logp, old, adv, mask, sampler_logprobs=sampler, tis_cap=1.5)
    torch.testing.assert_close(loss, torch.tensor((-2.95 / 3 + 2.24) / 2, dtype=F64))
    assert stats.tis_weight_mean == pytest.approx(1.06)
    with pytest.raises(ValueError, match="tis_cap"):
        policy_loss("grpo", logp, old, adv, mask, sampler_logprobs=sampler)


def reference_importance_weights(old, sampler, mask, cap, level, mode):
    """The weights as the TIS / MIS papers write them, one sequence at a time in Python."""
    out = []
    for o_row, s_row, m_row in zip(old.tolist(), sampler.tolist(), mask.tolist()):
        logs = [o - s for o, s, m in zip(o_row, s_row, m_row) if m]
        if level == "sequence":
            logs = [sum(logs)] * len(logs)
        weights = iter(
            min(math.exp(x), cap)
            if mode == "truncate"
            else (math.exp(x) if x <= math.log(cap) else 0.0)
            for x in logs
        )
        out.append([next(weights) if m else 1.0 for m in m_row])
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_importance_weights_match_the_papers_on_random_inputs(level, mode):
    generator = torch.Generator().manual_seed(3)
    old = -torch.rand(6, 5, generator=generator, dtype=F64) * 3
    sampler = old + torch.randn(6, 5, generator=generator, dtype=F64) * 0.5
    mask = (torch.rand(6, 5, generator=generator) > 0.3).long()
    mask[0] = 0  # a row without counted tokens: weights 1, never nan
    sampler[1, 0], old[1, 0] = float("-inf"), float("-inf")  # padding may hold anything
    mask[1, 0] = 0
    for cap in (0.8, 1.3, 2.0):
        got = importance_weights(old, sampler, mask, cap, level, mode)
        torch.testing.assert_close(
            got, reference_importance_weights(old, sampler, mask, cap, level, mode)
        )
    kept = importance_weights(old, sampler, mask, 1.3, level, mode)[mask.bool()]
    assert (kept <= 1.3).all() and (mode == "truncate" or (kept == 0).any())
    # in the loss: the policy term of every token times its weight (grpo: sequence means)
    logp = old + torch.randn(6, 5, generator=generator, dtype=F64) * 0.1
    adv = torch.randn(6, generator=generator, dtype=F64)
    kw = dict(sampler_logprobs=sampler, tis_cap=1.3, is_level=level, is_mode=mode)
    loss, stats = policy_loss("dapo", logp, old, adv, mask, **kw)
    ratio = torch.where(mask.bool(), logp - old, 0.0).exp()
    token = -torch.minimum(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None])
    weights = reference_importance_weights(old, sampler, mask, 1.3, level, mode)
    torch.testing.assert_close(loss, (token * weights * mask).sum() / mask.sum())
    masked = ((weights == 0) & mask.bool()).sum() / mask.sum()
    assert stats.is_masked_fraction == (pytest.approx(float(masked)) if mode == "mask" else None)


def test_importance_weights_check_their_arguments():
    x = torch.zeros(1, 2)
    for kw, message in (
        (dict(level="word"), "importance level"),
        (dict(mode="clip"), "importance mode"),
        (dict(cap=0.0), "cap must be > 0"),
    ):
        with pytest.raises(ValueError, match=message):
            importance_weights(x, x, x, **(dict(cap=2.0) | kw))


def test_grpo_gradient_is_minus_advantage_times_ratio_over_tokens():
    # unclipped tokens: d loss / d logp_t = -A r_t / n_tokens / B; clipped ones: 0
    # row 0: -1.1 / 6, -0.7 / 6, 0 (1.5 clipped); row 1: 0 (0.5 clipped), 2 * 1.3 / 4, 0 (pad)
    logp, old, adv, mask = batch()
    policy_loss("grpo", logp, old, adv, mask)[0].backward()
    expected = torch.tensor([[-1.1 / 6, -0.7 / 6, 0.0], [0.0, 0.65, 0.0]], dtype=F64)
    torch.testing.assert_close(logp.grad, expected)


def test_gspo_token_form_has_the_sequence_level_gradient():
    # d/d logp_t of -A_i s_i / B with s_i = exp(mean_t log-ratio) is -A_i s_i / n_i / B:
    # row 0: -1.1051709180756477 / 6 per token; row 1: 2 * 0.9048374180359595 / 4
    logp, old, adv, mask = batch(GSPO_LOG_RATIOS)
    policy_loss("gspo", logp, old, adv, mask)[0].backward()
    a, b = -0.18419515301260795, 0.45241870901797976
    torch.testing.assert_close(logp.grad, torch.tensor([[a, a, a], [b, b, 0.0]], dtype=F64))


@pytest.mark.parametrize("kind", ["grpo", "dapo", "dr_grpo", "gspo"])
def test_empty_mask_rows_add_nothing_and_never_nan(kind):
    inf = float("-inf")
    logp = torch.tensor([[-1.0, -2.0], [inf, inf]], dtype=F64, requires_grad=True)
    old = torch.tensor([[-1.0, -2.0], [inf, inf]], dtype=F64)
    mask = torch.tensor([[1, 1], [0, 0]])
    kw = dict(
        ref_logprobs=old, beta=0.1, sampler_logprobs=old, tis_cap=2.0, max_completion_length=2
    )
    loss, stats = policy_loss(kind, logp, old, torch.tensor([1.0, -1.0], dtype=F64), mask, **kw)
    # row 0 has ratio 1 and A = 1: -1 per token; grpo/gspo: (-1 + 0) / 2, dapo: -2 / 2,
    # dr_grpo: -2 / (2 * 2)
    expected = {"grpo": -0.5, "gspo": -0.5, "dapo": -1.0, "dr_grpo": -0.5}[kind]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=F64))
    loss.backward()
    assert torch.isfinite(logp.grad).all() and torch.equal(logp.grad[1], torch.zeros(2, dtype=F64))
    loss, stats = policy_loss(
        kind, logp, old, torch.tensor([1.0, -1.0], dtype=F64), torch.zeros(2, 2), **kw
    )
    assert float(loss.detach()) == 0.0 and stats.clip_fraction == 0.0 and stats.kl == 0.0


# Aggregation over micro-batches: the batch above split into row 0 and row 1, each call given
# the whole batch's 5 counted tokens and 2 rows. Per kind, (row 0's loss, row 1's loss):
#   grpo     row means -3.0 / 3 = -1.0 and 4.2 / 2 = 2.1, each / 2 rows: -0.5, 1.05 (sum 0.55)
#   dapo     token sums / 5 tokens: -3.0 / 5 = -0.6, 4.2 / 5 = 0.84 (sum 0.24 = 1.2 / 5)
#   dr_grpo  token sums / (2 rows * 4): -3.0 / 8 = -0.375, 4.2 / 8 = 0.525 (sum 0.15 = 1.2 / 8)
#   gspo     (log-ratios of the gspo test) row means -s0 = -1.1051709180756477 and
#            2 s1 = 1.809674836071919, each / 2: -0.5525854590378239, 0.9048374180359595
#            (sum 0.35225195899813565)
MICRO_LOSSES = {
    "grpo": (-0.5, 1.05, 0.55),
    "dapo": (-0.6, 0.84, 0.24),
    "dr_grpo": (-0.375, 0.525, 0.15),
    "gspo": (-0.5525854590378239, 0.9048374180359595, 0.35225195899813565),
}


@pytest.mark.parametrize("kind", ["grpo", "dapo", "dr_grpo", "gspo"])
def test_micro_batch_losses_over_global_denominators_add_up_to_the_batch_loss(kind):
    logp, old, adv, mask = batch(GSPO_LOG_RATIOS if kind == "gspo" else None)
    first, second, whole = MICRO_LOSSES[kind]
    full, _ = policy_loss(kind, logp, old, adv, mask, max_completion_length=4)
    torch.testing.assert_close(full, torch.tensor(whole, dtype=F64))
    (full_grad,) = torch.autograd.grad(full, logp)
    micro = [
        policy_loss(
            kind,
            logp[rows],
            old[rows],
            adv[rows],
            mask[rows],
            max_completion_length=4,
            global_tokens=5,
            global_rows=2,
        )[0]
        for rows in (slice(0, 1), slice(1, 2))
    ]
    torch.testing.assert_close(micro[0], torch.tensor(first, dtype=F64))
    torch.testing.assert_close(micro[1], torch.tensor(second, dtype=F64))
    torch.testing.assert_close(micro[0] + micro[1], full)
    (micro_grad,) = torch.autograd.grad(micro[0] + micro[1], logp)
    torch.testing.assert_close(micro_grad, full_grad)


def test_without_global_denominators_a_micro_batch_is_its_own_batch():
    # row 0 alone: dapo -3.0 / 3 tokens; dr_grpo -3.0 / (1 row * 4); grpo its row mean
    logp, old, adv, mask = batch()
    row = (logp[:1], old[:1], adv[:1], mask[:1])
    for kind, expected in (("dapo", -1.0), ("dr_grpo", -0.75), ("grpo", -1.0)):
        loss, _ = policy_loss(kind, *row, max_completion_length=4)
        torch.testing.assert_close(loss, torch.tensor(expected, dtype=F64))


@pytest.mark.parametrize("kind", ["grpo", "dapo", "dr_grpo", "gspo"])
def test_uneven_micro_batches_add_up_to_the_batch_loss_and_gradient(kind):
    g = torch.Generator().manual_seed(5)
    B, T = 5, 6
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    logp = (old + torch.randn(B, T, generator=g, dtype=F64) * 0.3).requires_grad_()
    ref = old + torch.randn(B, T, generator=g, dtype=F64) * 0.3
    sampler = old + torch.randn(B, T, generator=g, dtype=F64) * 0.5
    adv = torch.randn(B, generator=g, dtype=F64)
    mask = (torch.rand(B, T, generator=g) < 0.7).long()
    mask[3] = 0  # an empty row still counts in the rows
    kw = dict(
        epsilon_high=0.28,
        ref_logprobs=ref,
        beta=0.05,
        sampler_logprobs=sampler,
        tis_cap=1.3,
        max_completion_length=8,
    )
    full, _ = policy_loss(kind, logp, old, adv, mask, **kw)
    (full_grad,) = torch.autograd.grad(full, logp)
    tokens = int(mask.sum())
    total = sum(
        policy_loss(
            kind,
            logp[rows],
            old[rows],
            adv[rows],
            mask[rows],
            **(kw | dict(ref_logprobs=ref[rows], sampler_logprobs=sampler[rows])),
            global_tokens=tokens,
            global_rows=B,
        )[0]
        for rows in (slice(0, 2), slice(2, 5))
    )
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(torch.autograd.grad(total, logp)[0], full_grad)


def test_policy_loss_errors_name_kind_and_shapes():
    logp, old, adv, mask = batch()
    with pytest.raises(ValueError, match=r"'ppo'.*grpo, dapo, dr_grpo, gspo"):
        policy_loss("ppo", logp, old, adv, mask)
    with pytest.raises(ValueError, match=r"old_logprobs has shape \(2, 2\).*\(2, 3\)"):
        policy_loss("grpo", logp, old[:, :2], adv, mask)
    with pytest.raises(ValueError, match=r"advantages has shape \(3,\).*\(2,\)"):
        policy_loss("grpo", logp, old, torch.ones(3), mask)


def reference_policy_loss(kind, logp, old, adv, mask, el, eh, ref, beta, sampler, cap, length):
    """Plain loops over 0-d tensors (autograd gives the reference gradient); gspo in the
    GSPO-token form, so each token's gradient carries its own TIS weight."""
    B, T = mask.shape
    rows, total, clipped, ratios, kls, weights = [], 0.0, [], [], [], []
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        s = torch.exp(sum(logp[b, t] - old[b, t] for t in idx) / len(idx)) if idx else None
        if s is not None and kind == "gspo":
            ratios.append(s.item())
            clipped.append((adv[b] > 0 and s > 1 + eh) or (adv[b] < 0 and s < 1 - el))
        row = []
        for t in idx:
            if kind == "gspo":
                r = s.detach() * torch.exp(logp[b, t] - logp[b, t].detach())
            else:
                r = torch.exp(logp[b, t] - old[b, t])
            if kind != "gspo":
                ratios.append(r.item())
                clipped.append((adv[b] > 0 and r > 1 + eh) or (adv[b] < 0 and r < 1 - el))
            term = -torch.minimum(r * adv[b], torch.clamp(r, 1 - el, 1 + eh) * adv[b])
            w = min(math.exp(float(old[b, t] - sampler[b, t])), cap)
            weights.append(w)
            d = ref[b, t] - logp[b, t]
            kls.append((torch.exp(d) - d - 1).item())
            row.append(term * w + beta * (torch.exp(d) - d - 1))
        total += len(row)
        rows.append(sum(row) / len(row) if row else 0.0)
    flat_sum = sum(r * len([t for t in range(T) if mask[b, t]]) for b, r in enumerate(rows))
    loss = {
        "grpo": sum(rows) / B,
        "gspo": sum(rows) / B,
        "dapo": flat_sum / total,
        "dr_grpo": flat_sum / (B * length),
    }[kind]
    stats = (
        statistics.fmean(clipped),
        statistics.fmean(ratios),
        statistics.fmean(kls),
        statistics.fmean(weights),
    )
    return loss, stats


@pytest.mark.parametrize("kind", ["grpo", "dapo", "dr_grpo", "gspo"])
@pytest.mark.parametrize("seed", [1, 2])
def test_policy_loss_matches_a_loop_reference(kind, seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 4, 6
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    logp = old + torch.randn(B, T, generator=g, dtype=F64) * 0.3
    ref = old + torch.randn(B, T, generator=g, dtype=F64) * 0.3
    sampler = old + torch.randn(B, T, generator=g, dtype=F64) * 0.5
    adv = torch.randn(B, generator=g, dtype=F64)
    mask = (torch.rand(B, T, generator=g) < 0.7).long()
    mask[0] = 1
    mask[1] = 0  # an empty row
    el, eh = (0.05, 0.08) if kind == "gspo" else (0.2, 0.28)
    args = (el, eh, ref, 0.05, sampler, 1.3, 8)
    logp_ref = logp.clone().requires_grad_()
    expected, (clip, ratio, kl, tis) = reference_policy_loss(kind, logp_ref, old, adv, mask, *args)
    expected.backward()
    logp.requires_grad_()
    loss, stats = policy_loss(
        kind,
        logp,
        old,
        adv,
        mask,
        epsilon_low=el,
        epsilon_high=eh,
        ref_logprobs=ref,
        beta=0.05,
        sampler_logprobs=sampler,
        tis_cap=1.3,
        max_completion_length=8,
    )
    loss.backward()
    torch.testing.assert_close(loss, expected.detach())
    torch.testing.assert_close(logp.grad, logp_ref.grad)
    assert stats.clip_fraction == pytest.approx(clip)
    assert stats.ratio_mean == pytest.approx(ratio)
    assert stats.kl == pytest.approx(kl) and stats.tis_weight_mean == pytest.approx(tis)


# --- overlong, mismatch KL, entropy ---------------------------------------------------------


def test_soft_overlong_penalty():
    # max 10, buffer 4: free up to 6, then -(L - 6) / 4, -1 from 10 on
    lengths = torch.tensor([3, 6, 7, 8, 10, 12])
    expected = torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0])
    torch.testing.assert_close(soft_overlong_penalty(lengths, 10, 4), expected)
    torch.testing.assert_close(soft_overlong_penalty(lengths, 10, 4, penalty=0.5), expected / 2)
    with pytest.raises(ValueError, match="buffer=0"):
        soft_overlong_penalty(lengths, 10, 0)


def test_overlong_mask():
    assert overlong_mask(["stop", "length", "stop", "length"]).tolist() == [
        False,
        True,
        False,
        True,
    ]
    assert overlong_mask([]).shape == (0,)


def test_mismatch_kl_is_k3_of_sampler_versus_trainer():
    sampler = torch.tensor([[-1.0, -2.0, -3.0]])
    assert mismatch_kl(sampler, sampler, torch.ones(1, 3)) == 0.0
    # trainer - sampler = [ln 2, -ln 2, (masked)]: k3 = 1 - ln 2 and ln 2 - 0.5, mean 0.25
    trainer = sampler + torch.tensor([[LN2, -LN2, 4.0]])
    assert mismatch_kl(trainer, sampler, torch.tensor([[1, 1, 0]])) == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"mask has shape \(1, 2\).*\(1, 3\)"):
        mismatch_kl(trainer, sampler, torch.ones(1, 2))


def test_entropy_from_logits():
    # position 0: uniform over 4 -> ln 4 = 1.3862943611198906
    # position 1: p = (1/4, 3/4, 0, 0) (logits 0, ln 3, -inf, -inf)
    #             -> 0.25 ln 4 + 0.75 ln(4/3) = 0.5623351446188083
    # position 2: masked out
    inf = float("-inf")
    logits = torch.tensor(
        [[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), inf, inf], [9.0, 0.0, 0.0, 0.0]]]
    )
    mask = torch.tensor([[1, 1, 0]])
    expected = (1.3862943611198906 + 0.5623351446188083) / 2
    for chunk in (1, 2, 128):
        assert entropy_from_logits(logits, mask, chunk_size=chunk) == pytest.approx(expected)


def test_entropy_matches_a_loop_reference():
    logits = torch.randn(3, 7, 11) * 2
    mask = torch.rand(3, 7) < 0.6
    values = []
    for b in range(3):
        for t in range(7):
            if mask[b, t]:
                z = [math.exp(x) for x in logits[b, t].tolist()]
                values.append(-sum(p / sum(z) * math.log(p / sum(z)) for p in z))
    assert entropy_from_logits(logits, mask, chunk_size=3) == pytest.approx(
        statistics.fmean(values), rel=1e-5
    )
