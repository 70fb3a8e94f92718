"""Row-wise work of the routed experts around their grouped GEMMs, fused: the SwiGLU with
per-row routing weights (forward and backward) and the combine of each token's k rows.

h [N, 2I] holds each expert-sorted row's gate and up projections side by side; the row's
routing weight w scales the output:

    act = w * silu(gate) * up                                   [N, I]
    d gate = dy * w * up * sig * (1 + gate * (1 - sig)),  sig = sigmoid(gate)
    d up   = dy * w * silu(gate)
    d w    = sum_i dy * silu(gate) * up                          [N]

On CUDA each function is one Triton kernel (each input read once, float32 math, each output
written once); elsewhere the same math in plain torch, which is also the tests' reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moetune.kernels.gemm import triton_available


def use_triton(t: torch.Tensor, backend: str) -> bool:
    """backend "auto": the Triton kernels on CUDA tensors when triton is installed."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(
            f"expert-row kernel backend must be auto, torch or triton, not {backend!r}"
        )
    return backend == "triton" or (backend == "auto" and t.is_cuda and triton_available(t.device))


def swiglu(h: torch.Tensor, row_weight: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """h [N, 2I] = [gate | up], row_weight [N] -> row_weight * silu(gate) * up [N, I]
    in h's dtype."""
    if use_triton(h, backend):
        from moetune.kernels import triton_expert_rows

        return triton_expert_rows.swiglu(h, row_weight)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate).mul_(up).mul_(row_weight[:, None].to(h.dtype))


def swiglu_backward(
    h: torch.Tensor, row_weight: torch.Tensor, grad_act: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `swiglu` given grad_act [N, I] = d loss / d act:
    (grad_h [N, 2I] in h's dtype, grad_row_weight [N] in h's dtype)."""
    if use_triton(h, backend):
        from moetune.kernels import triton_expert_rows

        return triton_expert_rows.swiglu_backward(h, row_weight, grad_act)
    gate, up = h.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    grad_row_weight = (grad_act * silu * up).sum(-1)
    grad_act = grad_act * row_weight[:, None].to(h.dtype)
    grad_h = torch.empty_like(h)
    grad_gate, grad_up = grad_h.chunk(2, dim=-1)
    torch.mul(grad_act, silu, out=grad_up)
    torch.mul(grad_act, up, out=grad_gate)
    grad_gate.mul_((1 - sig).mul_(gate).add_(1).mul_(sig))
    return grad_h, grad_row_weight


def combine(rows: torch.Tensor, token_rows: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Sum each token's k rows: rows [N, d], token_rows [T, k] (row indices) -> [T, d] in
    rows' dtype (float32 accumulation)."""
    if use_triton(rows, backend):
        from moetune.kernels import triton_expert_rows

        return triton_expert_rows.combine(rows, token_rows)
    return rows.index_select(0, token_rows.flatten()).unflatten(0, token_rows.shape).sum(1)
