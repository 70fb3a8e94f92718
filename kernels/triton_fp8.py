"""Triton FP8 kernels: 1x128 activation quantisation and block-scaled (grouped) GEMMs.

Run on GPUs, and on CPU under Triton's interpreter (`TRITON_INTERPRET=1` set before triton
is first imported) for tests.
The interpreter's float32 -> float8 cast is not round-to-nearest-even, so interpreted
quantisation may differ from torch's cast by one float8 step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
BLOCK = 128  # scale granularity along K (and along N for weights)


@triton.jit
def _quantize_act_kernel(x_ptr, q_ptr, s_ptr, n_tiles, BLOCK_K: tl.constexpr, UE8M0: tl.constexpr):
    tile = tl.program_id(0)
    offsets = tile * BLOCK_K + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + offsets).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
    if UE8M0:
        scale = tl.exp2(tl.ceil(tl.log2(scale)))
    tl.store(q_ptr + offsets, (x / scale).to(q_ptr.dtype.element_ty))
    tl.store(s_ptr + tile, scale)


def quantize_act(x: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None):
    """Same contract as moetune.kernels.quantize.quantize_act."""
    if block_size != BLOCK or x.shape[-1] % BLOCK:
        raise ValueError(f"triton quantize_act needs block_size {BLOCK} and K a multiple of {BLOCK}")
    x = x.contiguous()
    q = torch.empty_like(x, dtype=torch.float8_e4m3fn)
    scale = torch.empty(*x.shape[:-1], x.shape[-1] // BLOCK, dtype=torch.float32, device=x.device)
    n_tiles = scale.numel()
    _quantize_act_kernel[(n_tiles,)](x, q, scale, n_tiles, BLOCK_K=BLOCK, UE8M0=scale_fmt == "ue8m0")
    return q, scale


@triton.jit
def _fp8_gemm_tile(a_ptr, b_ptr, a_s_ptr, b_s_ptr, row_start, row_end, n_start, N, K,
                   stride_am, stride_bn, stride_asm, stride_bsn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] tile of (a * a_s) @ (b * b_s).T over rows [row_start, row_end)."""
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = n_start + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < row_end
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(K // BLOCK_K):
        k = kb * BLOCK_K + ks
        a = tl.load(a_ptr + rows[:, None] * stride_am + k[None, :], mask=row_ok[:, None], other=0.0)
        b = tl.load(b_ptr + cols[None, :] * stride_bn + k[:, None], mask=col_ok[None, :], other=0.0)
        a_s = tl.load(a_s_ptr + rows * stride_asm + kb, mask=row_ok, other=0.0)
        b_s = tl.load(b_s_ptr + (cols // 128) * stride_bsn + kb, mask=col_ok, other=0.0)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    return acc, rows, cols, row_ok, col_ok


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, M, N, K,
                     stride_am, stride_bn, stride_cm, stride_asm, stride_bsn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row_start = tl.program_id(0) * BLOCK_M
    acc, rows, cols, row_ok, col_ok = _fp8_gemm_tile(
        a_ptr, b_ptr, a_s_ptr, b_s_ptr, row_start, M, tl.program_id(1) * BLOCK_N, N, K,
        stride_am, stride_bn, stride_asm, stride_bsn, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _fp8_grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, tile_expert, tile_start,
                             tile_end, N, K, stride_am, stride_be, stride_bn, stride_cm,
                             stride_asm, stride_bse, stride_bsn,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tile = tl.program_id(0)
    expert = tl.load(tile_expert + tile).to(tl.int64)
    acc, rows, cols, row_ok, col_ok = _fp8_gemm_tile(
        a_ptr, b_ptr + expert * stride_be, a_s_ptr, b_s_ptr + expert * stride_bse,
        tl.load(tile_start + tile), tl.load(tile_end + tile), tl.program_id(1) * BLOCK_N, N, K,
        stride_am, stride_bn, stride_asm, stride_bsn, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, block_m=64, block_n=64):
    """a [M, K] fp8, a_scale [M, K/128]; b [N, K] fp8, b_scale [ceil(N/128), K/128] -> [M, N]."""
    a, b, a_scale, b_scale = (t.contiguous() for t in (a, b, a_scale, b_scale))
    (M, K), N = a.shape, b.shape[0]
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _fp8_gemm_kernel[grid](a, b, c, a_scale, b_scale, M, N, K, a.stride(0), b.stride(0),
                           c.stride(0), a_scale.stride(0), b_scale.stride(0),
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK)
    return c


def expert_tiles(offsets: torch.Tensor, block_m: int):
    """Row tiles that never straddle two experts: (expert, start, end) int32 tensors."""
    ends = offsets.tolist()
    experts, starts, stops = [], [], []
    start = 0
    for expert, end in enumerate(ends):
        for tile_start in range(start, end, block_m):
            experts.append(expert)
            starts.append(tile_start)
            stops.append(min(tile_start + block_m, end))
        start = end
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int32, device=offsets.device)
    return as_tensor(experts), as_tensor(starts), as_tensor(stops)


def fp8_grouped_gemm(a, a_scale, b, b_scale, offsets, out_dtype=torch.bfloat16, block_m=64,
                     block_n=64):
    """Rows of a [R, K] (fp8, sorted by expert; scales [R, K/128]) in groups ending at
    offsets [E], times b [E, N, K] (fp8; scales [E, ceil(N/128), K/128]) transposed -> [R, N]."""
    a, b, a_scale, b_scale = (t.contiguous() for t in (a, b, a_scale, b_scale))
    N, K = b.shape[1:]
    c = torch.zeros(a.shape[0], N, dtype=out_dtype, device=a.device)
    tile_expert, tile_start, tile_end = expert_tiles(offsets, block_m)
    if len(tile_expert) == 0:
        return c
    grid = (len(tile_expert), triton.cdiv(N, block_n))
    _fp8_grouped_gemm_kernel[grid](
        a, b, c, a_scale, b_scale, tile_expert, tile_start, tile_end, N, K, a.stride(0),
        b.stride(0), b.stride(1), c.stride(0), a_scale.stride(0), b_scale.stride(0),
        b_scale.stride(1), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK)
    return c
