"""Routing and grouped experts against plain per-expert reference code."""

import torch
import torch.nn.functional as F
from tiny_configs import v2_lite_config, v3_config

from moetune.model import DeepseekV3ForCausalLM
from moetune.model.experts import RoutedExperts
from moetune.model.router import Router, sequence_balance_loss


def reference_experts(x, gate_up, down, expert_ids, weights):
    """Loop over tokens and their experts: the plainest statement of the math."""
    out = torch.zeros_like(x)
    intermediate = down.shape[-1]
    for t in range(x.shape[0]):
        for slot in range(expert_ids.shape[1]):
            e = expert_ids[t, slot]
            h = gate_up[e] @ x[t]
            act = F.silu(h[:intermediate]) * h[intermediate:]
            out[t] = out[t] + weights[t, slot] * (down[e] @ act)
    return out


def test_grouped_experts_forward_and_backward_match_reference():
    experts = RoutedExperts(num_experts=6, hidden_size=16, intermediate_size=8)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    x = torch.randn(13, 16, requires_grad=True)
    expert_ids = torch.stack([torch.randperm(5)[:3] for _ in range(13)])  # expert 5 gets no token
    weights = torch.rand(13, 3, requires_grad=True)
    grad = torch.randn(13, 16)

    ours = experts(x, expert_ids, weights)
    ours_grads = torch.autograd.grad(
        ours, (x, weights, experts.gate_up_proj, experts.down_proj), grad
    )
    ref = reference_experts(x, experts.gate_up_proj, experts.down_proj, expert_ids, weights)
    ref_grads = torch.autograd.grad(
        ref, (x, weights, experts.gate_up_proj, experts.down_proj), grad
    )

    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for name, a, b in zip(("x", "weights", "gate_up", "down"), ours_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"grad of {name}")
    assert ours_grads[3][5].abs().max() == 0  # unrouted expert gets exactly zero gradient


def reference_route(x, weight, bias, config):
    """Per-token routing written out with Python loops over groups."""
    logits = x.float() @ weight.float().T
    scores = logits.sigmoid() if config.scoring_func == "sigmoid" else logits.softmax(-1)
    ids, ws = [], []
    per_group = config.n_routed_experts // (config.n_group or 1)
    for s in scores:
        choice = s + bias if bias is not None else s.clone()
        if config.topk_method != "greedy" and (config.n_group or 1) > 1:
            groups = choice.view(config.n_group, per_group)
            g = (
                groups.topk(2).values.sum(-1)
                if config.topk_method == "noaux_tc"
                else groups.max(-1).values
            )
            kept = set(g.topk(config.topk_group).indices.tolist())
            choice = torch.tensor(
                [
                    c if i // per_group in kept else float("-inf")
                    for i, c in enumerate(choice.tolist())
                ]
            )
        top = sorted(choice.topk(config.num_experts_per_tok).indices.tolist())
        w = s[top]
        if config.norm_topk_prob:
            w = w / w.sum()
        ids.append(top)
        ws.append(w * config.routed_scaling_factor)
    return torch.tensor(ids), torch.stack(ws)


def check_router(config):
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    bias = None
    if router.e_score_correction_bias is not None:
        router.e_score_correction_bias.normal_(0, 0.3)
        bias = router.e_score_correction_bias
    x = torch.randn(50, config.hidden_size)
    ids, weights, _ = router(x)
    order = ids.sort(dim=-1)
    ref_ids, ref_weights = reference_route(x, router.weight, bias, config)
    assert torch.equal(order.values, ref_ids)
    torch.testing.assert_close(weights.gather(1, order.indices), ref_weights)


def test_router_v3_sigmoid_noaux_tc_group_limited():
    check_router(v3_config())


def test_router_v2_softmax_greedy_and_group_limited_greedy():
    check_router(v2_lite_config())
    check_router(
        v2_lite_config(
            topk_method="group_limited_greedy", n_group=4, topk_group=2, norm_topk_prob=True
        )
    )


def test_bias_changes_selection_but_not_weights():
    config = v3_config()
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(8, config.hidden_size)
    ids_before, _, scores = router(x)
    router.e_score_correction_bias[ids_before[0, 0]] = -10.0  # never pick it again
    ids_after, weights_after, _ = router(x)
    assert (ids_after[0] != ids_before[0, 0]).all()
    raw = scores.gather(1, ids_after)
    torch.testing.assert_close(weights_after, raw / raw.sum(-1, keepdim=True) * 2.5)


def load_cv(model):
    load = model.expert_load().float()
    return (load.std(dim=-1) / load.mean(dim=-1)).mean().item()


def test_aux_free_bias_updates_lower_load_imbalance():
    model = DeepseekV3ForCausalLM(v3_config(num_nextn_predict_layers=0)).train()
    for router in model.routers():  # a deliberately skewed router: experts 0-3 win most tokens
        router.e_score_correction_bias[:4] = 0.3
    ids = torch.randint(0, 128, (4, 32))
    cvs = []
    for _ in range(25):
        with torch.no_grad():
            model(ids)
        cvs.append(load_cv(model))
        model.update_expert_bias(gamma=0.02)
    assert model.expert_load().sum() == 0  # counts reset by the update
    assert cvs[-1] < 0.5 * cvs[0], cvs


def test_bias_update_rule_is_gamma_sign_of_mean_minus_load():
    router = Router(v3_config())
    router.load.copy_(torch.tensor([5.0] * 4 + [1.0] * 4 + [3.0] * 8))  # mean 3
    router.update_bias(gamma=0.1)
    expected = torch.tensor([-0.1] * 4 + [0.1] * 4 + [0.0] * 8)
    assert torch.equal(router.e_score_correction_bias, expected)
    assert router.load.sum() == 0


def test_counts_only_in_training_mode():
    model = DeepseekV3ForCausalLM(v3_config(num_nextn_predict_layers=0)).eval()
    model(torch.randint(0, 128, (2, 8)))
    assert model.expert_load().sum() == 0
    model.train()
    model(torch.randint(0, 128, (2, 8)))
    # 2 MoE layers x 16 tokens x top-4
    assert model.expert_load().sum().item() == 2 * 16 * 4


def test_sequence_balance_loss_matches_formula():
    scores = torch.rand(2 * 5, 4)
    ids = torch.tensor([[0, 1]] * 5 + [[2, 3]] * 5)
    expected = 0.0
    for b in range(2):
        s = scores[b * 5 : (b + 1) * 5]
        f = torch.zeros(4)
        for row in ids[b * 5 : (b + 1) * 5]:
            f[row] += 4 / (2 * 5)
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        expected += (f * p).sum() / 2
    torch.testing.assert_close(sequence_balance_loss(scores, ids, batch=2), expected)


def test_frozen_experts_skip_weight_gradients_and_keep_input_gradients():
    experts = RoutedExperts(num_experts=4, hidden_size=16, intermediate_size=8)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    experts.requires_grad_(False)
    x = torch.randn(9, 16, requires_grad=True)
    expert_ids = torch.stack([torch.randperm(4)[:2] for _ in range(9)])
    weights = torch.rand(9, 2)
    grad = torch.randn(9, 16)
    (ours,) = torch.autograd.grad(experts(x, expert_ids, weights), x, grad)
    ref = reference_experts(x, experts.gate_up_proj, experts.down_proj, expert_ids, weights)
    (expected,) = torch.autograd.grad(ref, x, grad)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    assert experts.gate_up_proj.grad is None and experts.down_proj.grad is None
