"""Triton kernels for `moetune.kernels.expert_rows`, float32 math. Run on GPUs, and under
Triton's interpreter on CPU for tests."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SWIGLU_BLOCK = 512  # columns per chunk, one program per row; I = 1408 takes three
COMBINE_BLOCK = 1024  # columns per program


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
def _swiglu_backward_kernel(
    h_ptr,
    w_ptr,
    grad_act_ptr,
    grad_h_ptr,
    grad_w_ptr,
    I,
    stride_h,
    stride_grad_act,
    stride_grad_h,
    BLOCK: tl.constexpr,
):
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


@triton.jit
def _combine_kernel(
    rows_ptr,
    token_rows_ptr,
    out_ptr,
    D,
    stride_rows,
    stride_out,
    K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < D
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(K):
        row = tl.load(token_rows_ptr + token * K + j).to(tl.int64)
        acc += tl.load(rows_ptr + row * stride_rows + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def swiglu(h: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """Same contract as moetune.kernels.expert_rows.swiglu."""
    h, row_weight = h.contiguous(), row_weight.contiguous()
    rows, inter = h.shape[0], h.shape[1] // 2
    act = torch.empty(rows, inter, dtype=h.dtype, device=h.device)
    if rows:
        _swiglu_kernel[(rows,)](
            h, row_weight, act, inter, h.stride(0), act.stride(0), BLOCK=SWIGLU_BLOCK
        )
    return act


def swiglu_backward(h: torch.Tensor, row_weight: torch.Tensor, grad_act: torch.Tensor):
    """Same contract as moetune.kernels.expert_rows.swiglu_backward."""
    h, row_weight, grad_act = h.contiguous(), row_weight.contiguous(), grad_act.contiguous()
    rows, inter = h.shape[0], h.shape[1] // 2
    grad_h = torch.empty_like(h)
    grad_row_weight = torch.empty(rows, dtype=h.dtype, device=h.device)
    if rows:
        _swiglu_backward_kernel[(rows,)](
            h,
            row_weight,
            grad_act,
            grad_h,
            grad_row_weight,
            inter,
            h.stride(0),
            grad_act.stride(0),
            grad_h.stride(0),
            BLOCK=SWIGLU_BLOCK,
        )
    return grad_h, grad_row_weight


def combine(rows: torch.Tensor, token_rows: torch.Tensor) -> torch.Tensor:
    """Same contract as moetune.kernels.expert_rows.combine."""
    rows, token_rows = rows.contiguous(), token_rows.contiguous()
    (tokens, k), width = token_rows.shape, rows.shape[1]
    out = torch.empty(tokens, width, dtype=rows.dtype, device=rows.device)
    if tokens and width:
        _combine_kernel[(tokens, triton.cdiv(width, COMBINE_BLOCK))](
            rows, token_rows, out, width, rows.stride(0), out.stride(0), K=k, BLOCK=COMBINE_BLOCK
        )
    return out
