"""Triton kernels for `moetune.kernels.swiglu`: one program per row, float32 math, the row's
I columns in chunks of BLOCK. Run on GPUs, and under Triton's interpreter on CPU for tests."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 512  # columns per chunk; I = 1408 (64-expert models) takes three


@triton.jit
def _swiglu_kernel(h_ptr, w_ptr, act_ptr, I, stride_h, stride_act, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    weight = tl.load(w_ptr + row).to(tl.float32)
    for start in range(0, I, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < I
        gate = tl.load(h_ptr + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * stride_h + I + cols, mask=ok, other=0.0).to(tl.float32)
        act = gate * tl.sigmoid(gate) * up * weight
        tl.store(act_ptr + row * stride_act + cols, act.to(act_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_backward_kernel(h_ptr, w_ptr, grad_act_ptr, grad_h_ptr, grad_w_ptr, I, stride_h,
                            stride_grad_act, stride_grad_h, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    weight = tl.load(w_ptr + row).to(tl.float32)
    grad_w = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, I, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < I
        gate = tl.load(h_ptr + row * stride_h + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + row * stride_h + I + cols, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(grad_act_ptr + row * stride_grad_act + cols, mask=ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        grad_w += dy * silu * up
        dy = dy * weight
        grad_gate = dy * up * sig * (1 + gate * (1 - sig))
        out = grad_h_ptr + row * stride_grad_h + cols
        tl.store(out, grad_gate.to(grad_h_ptr.dtype.element_ty), mask=ok)
        tl.store(out + I, (dy * silu).to(grad_h_ptr.dtype.element_ty), mask=ok)
    tl.store(grad_w_ptr + row, tl.sum(grad_w, 0).to(grad_w_ptr.dtype.element_ty))


def swiglu(h: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """Same contract as moetune.kernels.swiglu.swiglu."""
    h, row_weight = h.contiguous(), row_weight.contiguous()
    rows, inter = h.shape[0], h.shape[1] // 2
    act = torch.empty(rows, inter, dtype=h.dtype, device=h.device)
    if rows:
        _swiglu_kernel[(rows,)](h, row_weight, act, inter, h.stride(0), act.stride(0), BLOCK=BLOCK)
    return act


def swiglu_backward(h: torch.Tensor, row_weight: torch.Tensor, grad_act: torch.Tensor):
    """Same contract as moetune.kernels.swiglu.swiglu_backward."""
    h, row_weight, grad_act = h.contiguous(), row_weight.contiguous(), grad_act.contiguous()
    rows, inter = h.shape[0], h.shape[1] // 2
    grad_h = torch.empty_like(h)
    grad_row_weight = torch.empty(rows, dtype=h.dtype, device=h.device)
    if rows:
        _swiglu_backward_kernel[(rows,)](
            h, row_weight, grad_act, grad_h, grad_row_weight, inter, h.stride(0),
            grad_act.stride(0), grad_h.stride(0), BLOCK=BLOCK)
    return grad_h, grad_row_weight
