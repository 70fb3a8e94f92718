"""The loss and advantage menu beyond GRPO/DAPO/Dr. GRPO/GSPO: CISPO, SAPO, GMPO, dual-clip,
REINFORCE++-baseline and pass@k advantages. Each against a worked example (the arithmetic is
in the comments), against a plain loop implementation written from its paper's formula on
fresh random inputs (value and autograd gradient), and the gradient the paper states where it
states one. Then the recipe keys: their errors, and that they reach the trainer."""

import itertools
import math
import statistics
import typing
from types import SimpleNamespace

import pytest
import torch

from moetune.config.build import RecipeError
from moetune.config.schema import CLIPPED_LOSSES, AlgorithmSection
from moetune.recipes.loader import load_recipe
from moetune.recipes.run import resolve
from moetune.rl import algorithms
from moetune.rl.algorithms import (
    group_advantages,
    pass_at_k_advantages,
    policy_loss,
    reinforce_pp_advantages,
)
from moetune.rl.collector import Groups
from moetune.rl.grpo import GRPOTrainer
from moetune.rl.policy_update import batch_advantages
from moetune.rl.rollout import Rollout
from moetune.training.model_loading import load_model, load_tokenizer

F64 = torch.float64

# The batch of tests/test_rl_algorithms.py: B = 2, T = 3.
# ratios r = exp(logp - old): row 0 [1.1, 0.7, 1.5] A0 = +1, 3 tokens
#                             row 1 [0.5, 1.3, pad] A1 = -2, 2 tokens
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.3, -2.0]], dtype=F64)
RATIOS = torch.tensor([[1.1, 0.7, 1.5], [0.5, 1.3, 3.0]], dtype=F64)  # 3.0 sits on padding
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
ADV = torch.tensor([1.0, -2.0], dtype=F64)


def batch(ratios=RATIOS, adv=ADV):
    return (OLD + ratios.log()).requires_grad_(), OLD, adv, MASK


def grad_of(loss, logp):
    return torch.autograd.grad(loss, logp, retain_graph=True)[0]


# --- CISPO -----------------------------------------------------------------------------------


def test_cispo_worked_example_keeps_every_token_with_a_clipped_constant_weight():
    # w = clip(r, 0.8, 1.2): row 0 [1.1, 0.8, 1.2], row 1 [0.8, 1.2]
    # value -w A per token: row 0 -1.1 - 0.8 - 1.2 = -3.1, row 1 1.6 + 2.4 = 4.0 -> / 5 tokens
    # gradient -w A / 5 per token, also on the clipped tokens (0.7, 1.5, 0.5), where grpo's
    # gradient is 0: row 0 [-0.22, -0.16, -0.24], row 1 [0.32, 0.48, 0]
    logp, old, adv, mask = batch()
    loss, stats = policy_loss("cispo", logp, old, adv, mask)
    torch.testing.assert_close(loss, torch.tensor(0.9 / 5, dtype=F64))
    torch.testing.assert_close(
        grad_of(loss, logp), torch.tensor([[-0.22, -0.16, -0.24], [0.32, 0.48, 0.0]], dtype=F64)
    )
    assert stats.clip_fraction == pytest.approx(4 / 5)  # all but 1.1 clipped
    assert stats.ratio_mean == pytest.approx(5.1 / 5)


# --- SAPO ------------------------------------------------------------------------------------


def test_sapo_worked_example_soft_gate():
    # One token, A = +1, tau_pos = 1, r = 1.5: p = sigmoid(0.5) = 0.6224593312018546,
    # gate 4 / 1 * p = 2.4898373248074184 -> loss -2.4898373248074184;
    # gradient -4 p (1 - p) r A = -4 * 0.2350037122015945 * 1.5 = -1.410022273209567
    logp = torch.tensor([[math.log(1.5)]], dtype=F64, requires_grad=True)
    old, mask = torch.zeros(1, 1, dtype=F64), torch.ones(1, 1)
    loss, stats = policy_loss("sapo", logp, old, torch.tensor([1.0], dtype=F64), mask)
    torch.testing.assert_close(loss, torch.tensor(-2.4898373248074184, dtype=F64))
    torch.testing.assert_close(grad_of(loss, logp), torch.tensor([[-1.410022273209567]], dtype=F64))
    assert stats.clip_fraction == 0.0
    # A = -2 with tau_neg = 2, r = 1.5: p = sigmoid(1), loss = -(4 / 2) p (-2) = 4 p
    loss, _ = policy_loss("sapo", logp, old, torch.tensor([-2.0], dtype=F64), mask, tau_neg=2.0)
    torch.testing.assert_close(loss, torch.tensor(4 / (1 + math.exp(-1)), dtype=F64))


def test_sapo_gradient_on_policy_is_the_plain_policy_gradient():
    # At r = 1 the gate's slope 4 p (1 - p) = 1 for any tau: d loss / d logp_t = -A / n / B
    logp, old, adv, mask = batch(torch.ones(2, 3, dtype=F64))
    for tau_pos, tau_neg in ((1.0, 1.05), (3.0, 0.5)):
        loss, _ = policy_loss("sapo", logp, old, adv, mask, tau_pos=tau_pos, tau_neg=tau_neg)
        torch.testing.assert_close(
            grad_of(loss, logp),
            torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [0.5, 0.5, 0.0]], dtype=F64),
        )


# --- GMPO ------------------------------------------------------------------------------------

GMPO_LOG_RATIOS = torch.tensor([[0.3, -0.1, 0.5], [-0.6, 0.1, 9.0]], dtype=F64)  # 9.0: padding


def test_gmpo_worked_example_clips_in_log_space():
    # epsilons 0.4 / 0.4 (log space). Row 0, A = +1: the upper clip binds on 0.5 -> 0.4;
    # kept [0.3, -0.1, 0.4], mean 0.2 -> term -e^0.2. Row 1, A = -2: the lower clip binds on
    # -0.6 -> -0.4; kept [-0.4, 0.1], mean -0.15 -> term +2 e^-0.15. Loss: their mean over 2.
    # Gradient: unclipped tokens -A e^(mean) / n / B, clipped ones 0.
    logp, old, adv, mask = batch(GMPO_LOG_RATIOS.exp())
    loss, stats = policy_loss("gmpo", logp, old, adv, mask, epsilon_low=0.4, epsilon_high=0.4)
    e0, e1 = math.exp(0.2), math.exp(-0.15)
    torch.testing.assert_close(loss, torch.tensor((-e0 + 2 * e1) / 2, dtype=F64))
    a, b = -e0 / 3 / 2, 2 * e1 / 2 / 2
    torch.testing.assert_close(
        grad_of(loss, logp), torch.tensor([[a, a, 0.0], [0.0, b, 0.0]], dtype=F64)
    )
    assert stats.clip_fraction == pytest.approx(2 / 5)
    # the unclipped geometric means e^(0.7 / 3) and e^(-0.25), over the 2 sequences
    assert stats.ratio_mean == pytest.approx((math.exp(0.7 / 3) + math.exp(-0.25)) / 2)


# --- dual-clip -------------------------------------------------------------------------------


def test_dual_clip_caps_negative_advantages_and_zeroes_their_gradient():
    # Row 1 (A = -2) ratios [1.3, 4.0], c = 3: -min(rA, clip(r, 0.8, 1.2) A) = [2.6, 8.0];
    # the cap -c A = 6 binds on 8.0 -> [2.6, 6.0]. Row 0 (A = +1) is unchanged: -3.0.
    # grpo: (-3.0 / 3 + 8.6 / 2) / 2 = 1.65 (without dual-clip (-1 + 10.6 / 2) / 2 = 2.15).
    # Gradient on row 1: 2 * 1.3 / 2 / 2 = 0.65 on 1.3; 0 where the cap binds.
    ratios = torch.tensor([[1.1, 0.7, 1.5], [1.3, 4.0, 1.0]], dtype=F64)
    logp, old, adv, mask = batch(ratios)
    loss, stats = policy_loss("grpo", logp, old, adv, mask, clip_ratio_c=3.0)
    torch.testing.assert_close(loss, torch.tensor(1.65, dtype=F64))
    torch.testing.assert_close(
        grad_of(loss, logp), torch.tensor([[-1.1 / 6, -0.7 / 6, 0.0], [0.65, 0.0, 0.0]], dtype=F64)
    )
    assert stats.dual_clip_fraction == pytest.approx(1 / 5)
    plain, stats = policy_loss("grpo", logp, old, adv, mask)
    torch.testing.assert_close(plain, torch.tensor(2.15, dtype=F64))
    assert stats.dual_clip_fraction is None
    # gspo: row 1's log-ratios [1.5, 1.5] give s = e^1.5 = 4.4816890703380645 > c; its
    # tokens' 2 s = 8.96... are capped at 6, gradient 0. Row 0 [0.3, -0.1, 0.1]: s = e^0.1,
    # unclipped: -1.1051709180756477 per token, gradient -s / 3 / 2 = -0.18419515301260795.
    log_ratios = torch.tensor([[0.3, -0.1, 0.1], [1.5, 1.5, 0.0]], dtype=F64)
    logp, old, adv, mask = batch(log_ratios.exp())
    loss, stats = policy_loss("gspo", logp, old, adv, mask, clip_ratio_c=3.0)
    torch.testing.assert_close(loss, torch.tensor((6.0 - 1.1051709180756477) / 2, dtype=F64))
    g = -0.18419515301260795
    torch.testing.assert_close(
        grad_of(loss, logp), torch.tensor([[g, g, g], [0.0, 0.0, 0.0]], dtype=F64)
    )
    assert stats.dual_clip_fraction == pytest.approx(2 / 5)
    # positive advantages are never capped: ratios [1.3, 4.0] with A = +2 take the clip at 1.2
    # (-2.4 each), as without dual-clip
    logp, old, _, mask = batch(ratios)
    adv = torch.tensor([1.0, 2.0], dtype=F64)
    loss, stats = policy_loss("dapo", logp, old, adv, mask, clip_ratio_c=3.0)
    assert stats.dual_clip_fraction == 0.0
    torch.testing.assert_close(loss, policy_loss("dapo", logp, old, adv, mask)[0])


# --- loop references on random inputs --------------------------------------------------------


def reference_loss(
    kind, logp, old, adv, mask, el, eh, c, tau_pos, tau_neg, ref, beta, sampler, cap
):
    """The papers' objectives with plain loops over sequences and tokens, 0-d tensors so that
    autograd gives the reference gradient. cispo is the paper's -sg(w) A log pi (its value
    differs from moetune's by the log pi factor; its gradient is the one to match)."""
    B, T = mask.shape
    seq_terms, token_terms = [], []
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        if not idx:
            seq_terms.append(None)
            continue
        A = float(adv[b])
        weights = [min(math.exp(float(old[b, t] - sampler[b, t])), cap) for t in idx]
        kls = []
        for t in idx:
            d = ref[b, t] - logp[b, t]
            kls.append(torch.exp(d) - d - 1)
        if kind == "gmpo":  # GMPO eq.: -A prod_t clip(rho_t, e^-el, e^eh)^(1/|o|), sign-wise
            product = torch.ones((), dtype=F64)
            for t in idx:
                rho = torch.exp(logp[b, t] - old[b, t])
                if A > 0:
                    rho = torch.minimum(rho, torch.tensor(math.exp(eh), dtype=F64))
                elif A < 0:
                    rho = torch.maximum(rho, torch.tensor(math.exp(-el), dtype=F64))
                product = product * rho ** (1 / len(idx))
            geo_weight = math.prod(w ** (1 / len(idx)) for w in weights)
            seq_terms.append(-A * product * geo_weight + beta * sum(kls) / len(idx))
            continue
        row = []
        for t, w, kl in zip(idx, weights, kls):
            r = torch.exp(logp[b, t] - old[b, t])
            if kind == "cispo":
                clipped_weight = min(max(r.item(), 1 - el), 1 + eh)  # a number: no gradient
                term = -clipped_weight * A * logp[b, t]
            elif kind == "sapo":
                tau = tau_pos if A > 0 else tau_neg
                term = -(4 / tau) * torch.sigmoid(tau * (r - 1)) * A
            else:  # the clipped surrogate, then dual-clip (Ye et al. eq. 5) for A < 0
                term = torch.maximum(-r * A, -torch.clamp(r, 1 - el, 1 + eh) * A)
                if c is not None and A < 0:
                    term = torch.minimum(term, torch.tensor(-c * A, dtype=F64))
            row.append(term * w + beta * kl)
        token_terms.append(row)
        seq_terms.append(sum(row) / len(row))
    rows = [s for s in seq_terms if s is not None]
    if kind in ("cispo", "dapo"):
        return sum(sum(row) for row in token_terms) / sum(len(row) for row in token_terms)
    return sum(rows) / B


def random_batch(seed, B=4, T=6):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    logp = old + torch.randn(B, T, generator=g, dtype=F64) * 0.4
    ref = old + torch.randn(B, T, generator=g, dtype=F64) * 0.3
    sampler = old + torch.randn(B, T, generator=g, dtype=F64) * 0.5
    adv = torch.randn(B, generator=g, dtype=F64)
    mask = (torch.rand(B, T, generator=g) < 0.7).long()
    mask[0] = 1
    mask[1] = 0  # an empty row
    return logp, old, adv, mask, ref, sampler


CASES = [
    ("cispo", {}),
    ("sapo", {"tau_pos": 1.0, "tau_neg": 1.05}),
    ("sapo", {"tau_pos": 2.5, "tau_neg": 0.7}),
    ("gmpo", {}),
    ("grpo", {"clip_ratio_c": 1.5}),
    ("dapo", {"clip_ratio_c": 1.2}),
]


@pytest.mark.parametrize("kind, options", CASES)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_losses_match_a_loop_reference_with_tis_and_kl(kind, options, seed):
    logp, old, adv, mask, ref, sampler = random_batch(seed)
    el, eh = (0.4, 0.4) if kind == "gmpo" else (0.2, 0.28)
    if kind == "gmpo":  # log-ratios of +-0.4 and beyond occur: both clips bind somewhere
        logp = old + (logp - old) * 2
    options = {"tau_pos": 1.0, "tau_neg": 1.05, "clip_ratio_c": None} | options
    expected_logp = logp.clone().requires_grad_()
    expected = reference_loss(
        kind,
        expected_logp,
        old,
        adv,
        mask,
        el,
        eh,
        options["clip_ratio_c"],
        options["tau_pos"],
        options["tau_neg"],
        ref,
        0.05,
        sampler,
        1.3,
    )
    logp.requires_grad_()
    loss, _ = policy_loss(
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
        **options,
    )
    torch.testing.assert_close(grad_of(loss, logp), torch.autograd.grad(expected, expected_logp)[0])
    if kind != "cispo":
        torch.testing.assert_close(loss, expected.detach())


@pytest.mark.parametrize("seed", [1, 2])
def test_cispo_gradient_is_clipped_weight_times_advantage_times_grad_logprob(seed):
    # MiniMax-M1 eq. 4: grad J = 1 / sum|o_i| sum_i sum_t sg(w_it) A_i grad log pi(o_it);
    # d loss / d logp_t = -w A / tokens, no gradient through w. Its value: -sum w A / tokens.
    logp, old, adv, mask, _, _ = random_batch(seed)
    ratios = (logp - old).exp().tolist()
    logp.requires_grad_()
    loss, _ = policy_loss("cispo", logp, old, adv, mask, epsilon_low=0.1, epsilon_high=0.15)
    tokens = int(mask.sum())
    expected_grad = torch.zeros_like(old)
    value = 0.0
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                w = min(max(ratios[b][t], 0.9), 1.15)
                expected_grad[b, t] = -w * float(adv[b]) / tokens
                value += -w * float(adv[b]) / tokens
    torch.testing.assert_close(grad_of(loss, logp), expected_grad)
    assert float(loss.detach()) == pytest.approx(value)


@pytest.mark.parametrize("kind", ["cispo", "sapo", "gmpo"])
def test_new_losses_split_into_micro_batches_add_up_and_empty_rows_add_nothing(kind):
    logp, old, adv, mask, ref, sampler = random_batch(4, B=5)
    kw = dict(ref_logprobs=ref, beta=0.05, sampler_logprobs=sampler, tis_cap=1.3)
    logp.requires_grad_()
    full, _ = policy_loss(kind, logp, old, adv, mask, **kw)
    total = sum(
        policy_loss(
            kind,
            logp[rows],
            old[rows],
            adv[rows],
            mask[rows],
            **(kw | dict(ref_logprobs=ref[rows], sampler_logprobs=sampler[rows])),
            global_tokens=int(mask.sum()),
            global_rows=5,
        )[0]
        for rows in (slice(0, 2), slice(2, 5))
    )
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(grad_of(total, logp), grad_of(full, logp))
    assert torch.equal(grad_of(full, logp)[1], torch.zeros(6, dtype=F64))  # row 1 is empty
    inf = torch.full((1, 2), float("-inf"), dtype=F64)
    loss, _ = policy_loss(kind, inf, inf, torch.ones(1, dtype=F64), torch.zeros(1, 2))
    assert float(loss) == 0.0


def test_policy_loss_rejects_bad_dual_clip_and_tau():
    logp, old, adv, mask = batch()
    with pytest.raises(ValueError, match=r"clip_ratio_c=1.0.*> 1"):
        policy_loss("grpo", logp, old, adv, mask, clip_ratio_c=1.0)
    with pytest.raises(ValueError, match=r"clip_ratio_c=3.0 with policy_loss\('cispo'\)"):
        policy_loss("cispo", logp, old, adv, mask, clip_ratio_c=3.0)
    with pytest.raises(ValueError, match="tau_pos, tau_neg > 0"):
        policy_loss("sapo", logp, old, adv, mask, tau_neg=0.0)
    with pytest.raises(ValueError, match=r"'ppo'.*cispo, sapo, gmpo"):
        policy_loss("ppo", logp, old, adv, mask)


# --- REINFORCE++-baseline --------------------------------------------------------------------


def test_reinforce_pp_worked_example():
    # groups [1, 0], [1, 1]: centred [0.5, -0.5, 0, 0]; per sequence: mean 0, variance
    # (0.25 + 0.25) / 4 = 1/8 -> [sqrt 2, -sqrt 2, 0, 0]
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=F64)
    s2 = math.sqrt(2)
    torch.testing.assert_close(
        reinforce_pp_advantages(rewards, 2), torch.tensor([s2, -s2, 0.0, 0.0], dtype=F64)
    )
    # tokens [3, 1, 2, 2] (8): mean (1.5 - 0.5) / 8 = 1/8; variance (3 (3/8)^2 + (5/8)^2 +
    # 4 (1/8)^2) / 8 = 7/64 -> (c - 1/8) * 8 / sqrt 7 = [3, -5, -1, -1] / sqrt 7
    adv = group_advantages(rewards, 2, "reinforce_pp", tokens=torch.tensor([3, 1, 2, 2]))
    torch.testing.assert_close(adv, torch.tensor([3.0, -5.0, -1.0, -1.0], dtype=F64) / 7**0.5)
    # every group agrees: all zeros (variance floored at 1e-8), never NaN
    assert torch.equal(
        reinforce_pp_advantages(torch.ones(4, dtype=F64), 2), torch.zeros(4, dtype=F64)
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_reinforce_pp_matches_a_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 7, (1,), generator=g))
    rewards = torch.randn(4 * n, generator=g, dtype=F64)
    tokens = torch.randint(0, 9, (4 * n,), generator=g)
    for weighted in (False, True):
        centred = []
        for group in rewards.view(4, n).tolist():
            centred += [r - statistics.fmean(group) for r in group]
        per_token = []  # every counted token carries its sequence's value (OpenRLHF)
        for i, c in enumerate(centred):
            per_token += [c] * (int(tokens[i]) if weighted else 1)
        mean, var = statistics.fmean(per_token), statistics.pvariance(per_token)
        expected = [(c - mean) / math.sqrt(max(var, 1e-8)) for c in centred]
        adv = reinforce_pp_advantages(rewards.view(4, n), n, tokens if weighted else None)
        assert adv.shape == (4, n)
        torch.testing.assert_close(adv.flatten(), torch.tensor(expected, dtype=F64))


class Rank:
    """rank of world_size with `shares` (every rank's (rewards, tokens)) as its gather."""

    def __init__(self, rank, shares):
        self.rank, self.world_size, self.shares = rank, len(shares), shares

    def gather(self, value):
        assert value == self.shares[self.rank]
        return self.shares


@pytest.mark.parametrize("kind", ["reinforce_pp", "grpo", "pass_at_k"])
def test_batch_advantages_on_two_ranks_equal_one_process(kind):
    g = torch.Generator().manual_seed(9)
    rewards = (torch.rand(5 * 4, generator=g) < 0.5).float()  # 5 groups of 4, float32
    tokens = torch.randint(1, 9, (20,), generator=g)
    algorithm = SimpleNamespace(group_size=4, advantage=kind, pass_at_k=2)
    single = batch_advantages(
        rewards, tokens, algorithm, Rank(0, [(rewards.tolist(), tokens.tolist())])
    )
    cut = 12  # rank 0 holds 3 groups, rank 1 two
    shares = [
        (rewards[:cut].tolist(), tokens[:cut].tolist()),
        (rewards[cut:].tolist(), tokens[cut:].tolist()),
    ]
    parts = [
        batch_advantages(rewards[rows], tokens[rows], algorithm, Rank(rank, shares))
        for rank, rows in ((0, slice(0, cut)), (1, slice(cut, None)))
    ]
    torch.testing.assert_close(torch.cat(parts), single)
    if kind == "reinforce_pp":  # the batch statistics matter: one rank's alone differ
        alone = batch_advantages(rewards[:cut], tokens[:cut], algorithm, Rank(0, [shares[0]]))
        assert not torch.allclose(alone, single[:cut])
    # a rank without groups still joins the gather and gets nothing
    empty = batch_advantages(
        torch.zeros(0), torch.zeros(0), algorithm, Rank(1, [shares[0], ([], [])])
    )
    assert empty.shape == (0,)


# --- pass@k ----------------------------------------------------------------------------------


def test_pass_at_k_worked_examples_are_the_papers_closed_form():
    s5 = math.sqrt(5)
    rewards = torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=F64)
    adv = pass_at_k_advantages(rewards, 4, 2, eps=0.0)
    # [1, 0, 0, 0], k 2: Rbar = 1 - C(3,2)/C(4,2) = 1/2, sigma = 1/2; A_pos = (1/2) / (1/2) = 1,
    #   A_neg = (1 - 1/2 - C(2,1)/C(3,1)) / (1/2) = -1/3
    # [1, 1, 0, 0]: Rbar = 1 - 1/6 = 5/6, sigma = sqrt(5)/6; A_pos = (1/6) * 6 / sqrt 5,
    #   A_neg = (1/6 - C(1,1)/C(3,1)) * 6 / sqrt 5 = -1 / sqrt 5
    # [1, 1, 1, 0]: fewer failures than k, every pair passes: zeros; [0, 0, 0, 0]: zeros
    expected = [
        [1.0, -1 / 3, -1 / 3, -1 / 3],
        [1 / s5, 1 / s5, -1 / s5, -1 / s5],
        [0.0] * 4,
        [0.0] * 4,
    ]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=F64))
    # the default eps 1e-6 as the authors' code: A_pos = (1/2) / (1/2 + 1e-6)
    assert float(pass_at_k_advantages(rewards, 4, 2)[0, 0]) == pytest.approx(0.5 / (0.5 + 1e-6))


def test_pass_at_k_non_binary_rewards_take_the_best_of_each_subset():
    # [0.2, 0.5, 1.0], k 2: subsets' best 0.5, 1, 1 -> Rbar 5/6, variance
    # ((1/3)^2 + 2 (1/6)^2) / 3 = 1/18. A subset holding 0.2 (or 0.5) scores 0.75 on average,
    # one holding 1.0 scores 1: (0.75 - 5/6) sqrt 18 = -sqrt 18 / 12, (1/6) sqrt 18.
    adv = pass_at_k_advantages(torch.tensor([0.5, 1.0, 0.2], dtype=F64), 3, 2, eps=0.0)
    r18 = math.sqrt(18)
    torch.testing.assert_close(adv, torch.tensor([-r18 / 12, r18 / 6, -r18 / 12], dtype=F64))


def reference_pass_at_k(group, k, eps=1e-6):
    """Pass@k Training by enumeration: every k-subset is rewarded with its best; a sample's
    advantage is the mean over the subsets holding it, minus the mean over all, over the std."""
    subsets = list(itertools.combinations(range(len(group)), k))
    best = [max(group[i] for i in s) for s in subsets]
    mean, std = statistics.fmean(best), statistics.pstdev(best)
    if len(set(group)) == 1:
        return [0.0] * len(group)
    return [
        (statistics.fmean(b for s, b in zip(subsets, best) if i in s) - mean) / (std + eps)
        for i in range(len(group))
    ]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pass_at_k_matches_enumeration(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 8, (1,), generator=g))
    binary = (torch.rand(6, n, generator=g) < 0.4).to(F64)
    graded = torch.randint(0, 4, (6, n), generator=g).to(F64) / 3  # ties included
    for rewards in (binary, graded):
        for k in range(1, n + 1):
            expected = [reference_pass_at_k(group, k) for group in rewards.tolist()]
            torch.testing.assert_close(
                group_advantages(rewards.flatten(), n, "pass_at_k", k=k),
                torch.tensor(expected, dtype=F64).flatten(),
            )
    # k = 1 is GRPO with the population std
    r = torch.randn(3, n, generator=g, dtype=F64)
    torch.testing.assert_close(
        pass_at_k_advantages(r, n, 1),
        (r - r.mean(1, keepdim=True)) / (r.std(1, correction=0, keepdim=True) + 1e-6),
    )


def test_rloo_is_leave_one_out_and_advantage_errors():
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 4.0, 6.0], dtype=F64)
    assert torch.equal(
        group_advantages(rewards, 3, "rloo"), group_advantages(rewards, 3, "leave_one_out")
    )
    with pytest.raises(ValueError, match=r"1 <= k <= n, got k=4 for groups of n=3"):
        pass_at_k_advantages(rewards, 3, 4)
    with pytest.raises(ValueError, match="needs k"):
        group_advantages(rewards, 3, "pass_at_k")
    with pytest.raises(ValueError, match="tokens has 2 entries for 6 rewards"):
        reinforce_pp_advantages(rewards, 3, torch.ones(2))
    assert algorithms.BATCH_ADVANTAGE_KINDS == ("reinforce_pp",)


# --- recipe keys -----------------------------------------------------------------------------


def recipe(*overrides):
    return load_recipe(resolve("grpo/arith_tiny"), list(overrides))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["algorithm.clip_ratio_c=1.0"],
            r"^algorithm\.clip_ratio_c: 1\.0: dual-clip needs a bound > 1",
        ),
        (["algorithm.clip_ratio_c=0.5"], r"^algorithm\.clip_ratio_c: 0\.5"),
        (
            ["algorithm.loss=cispo", "algorithm.clip_ratio_c=3"],
            r"^algorithm\.clip_ratio_c: dual-clip applies to .* not algorithm\.loss: cispo",
        ),
        (
            ["algorithm.tau_pos=0"],
            r"^algorithm\.tau_pos: 0\.0: sapo's gate temperature must be > 0",
        ),
        (["algorithm.tau_neg=-1"], r"^algorithm\.tau_neg: -1\.0"),
        (
            ["algorithm.advantage=pass_at_k"],
            r"^algorithm\.pass_at_k: None: .*1 <= k <= algorithm\.group_size \(8\)",
        ),
        (["algorithm.advantage=pass_at_k", "algorithm.pass_at_k=9"], r"^algorithm\.pass_at_k: 9:"),
        (["algorithm.advantage=pass_at_k", "algorithm.pass_at_k=0"], r"^algorithm\.pass_at_k: 0:"),
        (
            ["algorithm.advantage=pass_at_k", "algorithm.pass_at_k=1", "algorithm.group_size=1"],
            r"^algorithm\.group_size: 1: .*at least 2",
        ),
        (
            ["algorithm.pass_at_k=2"],
            r"^algorithm\.pass_at_k: 2 is read only with algorithm\.advantage: pass_at_k",
        ),
        (
            ["algorithm.loss=ppo"],
            r"^algorithm\.loss: expected one of \[.*'cispo', 'sapo', 'gmpo'\], got 'ppo'",
        ),
        (
            ["algorithm.advantage=gae"],
            (
                r"^algorithm\.advantage: expected one of "
                r"\[.*'rloo', 'reinforce_pp', 'pass_at_k'\], got 'gae'"
            ),
        ),
    ],
)
def test_bad_algorithm_keys_are_named(overrides, message):
    with pytest.raises(RecipeError, match=message):
        recipe(*overrides)


def test_epsilons_default_per_loss():
    a = recipe().algorithm  # grpo/arith_tiny leaves them unset
    assert (a.loss, a.epsilon_low, a.epsilon_high) == ("dapo", 0.2, 0.28)
    a = recipe("algorithm.loss=gmpo").algorithm
    assert (a.epsilon_low, a.epsilon_high) == (0.4, 0.4)  # verl's GMPO recipe
    a = recipe("algorithm.loss=gmpo", "algorithm.epsilon_low=0.3").algorithm
    assert (a.epsilon_low, a.epsilon_high) == (0.3, 0.4)
    a = recipe("algorithm.loss=cispo", "algorithm.epsilon_low=null").algorithm
    assert (a.epsilon_low, a.epsilon_high) == (0.2, 0.28)
    a = recipe("algorithm.loss=sapo", "algorithm.tau_neg=2").algorithm
    assert (a.tau_pos, a.tau_neg, a.clip_ratio_c, a.pass_at_k) == (1.0, 2.0, None, None)


# --- the keys reach the trainer --------------------------------------------------------------

TINY = [
    "model.path=null",
    "model.config=tiny_arith",
    "model.tokenizer=char",
    "rollout.backend=native",
    "rollout.max_new_tokens=8",
    "training.prompts_per_step=2",
    "algorithm.group_size=4",
    "eval.every=0",
    "training.report_to=[]",
]


def two_groups() -> Groups:
    """2 groups of 4 random completions (3 to 8 tokens), rewards 0/1 with both in each group."""
    g = torch.Generator().manual_seed(3)
    rollouts = []
    for _ in range(2):
        prompt = torch.randint(3, 90, (5,), generator=g).tolist()
        group = []
        for _ in range(4):
            ids = torch.randint(3, 90, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g)
            group.append(Rollout(prompt, ids.tolist(), "", "length", [-1.0] * len(ids)))
        rollouts.append(group)
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    return Groups([{}] * 2, rollouts, rewards, {}, 2, 0, 1)


@pytest.fixture(scope="module")
def trainer():
    """One GRPOTrainer on the tiny model (no rollout engines) for every case: the updater reads
    its recipe's algorithm section at each update, so a case swaps in its own recipe."""
    recipe = load_recipe(resolve("grpo/arith_tiny"), TINY)
    torch.manual_seed(0)
    model = load_model(recipe.model)
    return GRPOTrainer(recipe, model, load_tokenizer(recipe.model), None, None)


@pytest.mark.parametrize(
    "overrides, passed",
    [
        (["algorithm.loss=cispo"], {"kind": "cispo"}),
        (["algorithm.loss=sapo", "algorithm.tau_neg=2"], {"kind": "sapo", "tau_neg": 2.0}),
        (
            ["algorithm.loss=gmpo"],
            {"kind": "gmpo", "epsilon_low": 0.4, "epsilon_high": 0.4},
        ),
        (["algorithm.loss=grpo", "algorithm.clip_ratio_c=3"], {"kind": "grpo", "clip_ratio_c": 3}),
        (["algorithm.advantage=reinforce_pp"], {"advantage": "reinforce_pp"}),
        (["algorithm.advantage=pass_at_k", "algorithm.pass_at_k=2"], {"advantage": "pass_at_k"}),
        (["algorithm.advantage=rloo"], {"advantage": "rloo"}),
    ],
)
def test_algorithm_keys_reach_the_policy_update(trainer, monkeypatch, overrides, passed):
    """An update of the tiny model through GRPOTrainer's updater: the recipe's loss, its
    options and the advantages of its kind (reinforce_pp: weighted by the sequences' tokens)
    reach policy_loss, and the update moves the weights."""
    monkeypatch.setattr(
        trainer.updater, "recipe", load_recipe(resolve("grpo/arith_tiny"), [*TINY, *overrides])
    )
    model = trainer.model
    calls = []
    real = algorithms.policy_loss

    def spy(kind, logprobs, old, advantages, mask, **options):
        calls.append({"kind": kind, "advantages": advantages, "tokens": mask.sum(1)} | options)
        return real(kind, logprobs, old, advantages, mask, **options)

    monkeypatch.setattr(algorithms, "policy_loss", spy)
    before = model.lm_head.weight.detach().clone()
    groups = two_groups()
    metrics = trainer.updater.update(groups)
    ((call,),) = [calls]  # 8 rows: one micro-batch
    advantage = passed.get("advantage", "grpo")
    expected = group_advantages(
        groups.rewards.flatten(),
        4,
        advantage,
        k=2,
        tokens=torch.tensor([len(r.completion_ids) for g in groups.rollouts for r in g]),
    )
    torch.testing.assert_close(call["advantages"].cpu(), expected)
    for key, value in passed.items():
        if key != "advantage":
            assert call[key] == value, key
    assert ("policy_dual_clip_fraction" in metrics) == ("clip_ratio_c" in passed)
    assert math.isfinite(metrics["loss"]) and not torch.equal(model.lm_head.weight, before)


def test_the_schema_names_the_kinds_rl_algorithms_knows():
    """config is plain data (no torch): its lists of kinds are copies, kept equal here."""
    hints = typing.get_type_hints(AlgorithmSection)
    assert typing.get_args(hints["loss"]) == algorithms.LOSS_KINDS
    assert typing.get_args(hints["advantage"]) == algorithms.ADVANTAGE_KINDS
    assert CLIPPED_LOSSES == algorithms.CLIPPED_LOSS_KINDS
