"""The routed experts' fused row kernels (SwiGLU forward and backward, the combine of each
token's rows) against plain references, the Triton kernels under the interpreter
(see conftest.py)."""

import pytest
import torch
import torch.nn.functional as F

from moetune.kernels import expert_rows as kernels


def autograd_reference(h, row_weight, grad_act):
    """act = w * silu(gate) * up in float64 and its gradients by autograd."""
    h64 = h.double().requires_grad_()
    w64 = row_weight.double().requires_grad_()
    gate, up = h64.chunk(2, dim=-1)
    act = w64[:, None] * F.silu(gate) * up
    act.backward(grad_act.double())
    return act.detach(), h64.grad, w64.grad


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rows, inter", [(7, 200), (5, 1100), (0, 64)])  # 1, 3 and no chunks
def test_swiglu_forward_and_backward_equal_autograd(backend, rows, inter):
    h = torch.randn(rows, 2 * inter) * 3
    row_weight = torch.rand(rows)
    grad_act = torch.randn(rows, inter)
    act, grad_h, grad_w = autograd_reference(h, row_weight, grad_act)
    ours = kernels.swiglu(h, row_weight, backend=backend)
    ours_grad_h, ours_grad_w = kernels.swiglu_backward(h, row_weight, grad_act, backend=backend)
    assert ours.dtype == ours_grad_h.dtype == ours_grad_w.dtype == torch.float32
    torch.testing.assert_close(ours.double(), act, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grad_h.double(), grad_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_grad_w.double(), grad_w, rtol=1e-5, atol=1e-5)


def test_swiglu_takes_strided_rows_and_bf16():
    """A column slice of a wider buffer (non-contiguous rows) in bfloat16: the Triton kernels
    compute in float32 and round once, so they sit within one bf16 step (2^-7 relative; the
    interpreter's cast may truncate) of the float64 truth."""
    wide = torch.randn(9, 2 * 96 + 8).bfloat16()
    h = wide[:, : 2 * 96]
    row_weight = torch.rand(9).bfloat16()
    grad_act = torch.randn(9, 96).bfloat16()
    act, grad_h, grad_w = autograd_reference(h, row_weight, grad_act)
    ours = kernels.swiglu(h, row_weight, backend="triton")
    ours_grad_h, ours_grad_w = kernels.swiglu_backward(h, row_weight, grad_act, backend="triton")
    torch.testing.assert_close(ours.double(), act, rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(ours_grad_h.double(), grad_h, rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(ours_grad_w.double(), grad_w, rtol=2**-7, atol=1e-2)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="expert-row kernel backend"):
        kernels.swiglu(torch.zeros(1, 2), torch.ones(1), backend="cuda")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tokens, k, width", [(6, 4, 1500), (0, 2, 64)])  # 2 column blocks; none
def test_combine_sums_each_tokens_rows(backend, tokens, k, width):
    rows = torch.randn(tokens * k + 3, width)  # 3 rows no token reads
    token_rows = torch.randperm(tokens * k + 3)[: tokens * k].view(tokens, k)
    expected = (
        torch.stack([rows[token_rows[t]].double().sum(0) for t in range(tokens)])
        if tokens
        else torch.zeros(0, width, dtype=torch.double)
    )
    ours = kernels.combine(rows, token_rows, backend=backend)
    assert ours.shape == (tokens, width) and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), expected, rtol=1e-6, atol=1e-5)


def test_routed_experts_through_the_triton_row_kernels_equal_the_torch_path(monkeypatch):
    """The whole grouped-expert function (forward, input, weight and routing-weight gradients)
    with the interpreted Triton row kernels, against the same function on the torch path."""
    from moetune.model.experts import RoutedExperts

    experts = RoutedExperts(num_experts=4, hidden_size=16, intermediate_size=24)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.3)
    torch.nn.init.normal_(experts.down_proj, std=0.3)
    x = torch.randn(5, 16)
    expert_ids = torch.stack([torch.randperm(4)[:2] for _ in range(5)])
    weights = torch.rand(5, 2)

    def run():
        experts.zero_grad(set_to_none=True)
        inputs, routing = x.clone().requires_grad_(), weights.clone().requires_grad_()
        out = experts(inputs, expert_ids, routing)
        out.backward(torch.randn(5, 16, generator=torch.Generator().manual_seed(1)))
        return [out, inputs.grad, routing.grad, experts.gate_up_proj.grad, experts.down_proj.grad]

    reference = run()
    monkeypatch.setattr(kernels, "use_triton", lambda t, backend: True)
    for ours, theirs in zip(run(), reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
