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
def _quantize_act_kernel(x_ptr, q_ptr, s_ptr, n_tiles, BLOCK_K: tl.constexpr, TILES: tl.constexpr,
                         UE8M0: tl.constexpr):
    """TILES consecutive 1 x BLOCK_K tiles per program, one pass over memory."""
    tiles = tl.program_id(0) * TILES + tl.arange(0, TILES)
    ok = tiles < n_tiles
    offsets = tiles.to(tl.int64)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
    x = tl.load(x_ptr + offsets, mask=ok[:, None], other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / 448.0
    if UE8M0:
        scale = tl.exp2(tl.ceil(tl.log2(scale)))
    tl.store(q_ptr + offsets, (x / scale[:, None]).to(q_ptr.dtype.element_ty), mask=ok[:, None])
    tl.store(s_ptr + tiles, scale, mask=ok)


def quantize_act(x: torch.Tensor, block_size: int = BLOCK, scale_fmt: str | None = None,
                 tiles_per_program: int = 16):
    """Same contract as moetune.kernels.quantize.quantize_act."""
    if block_size != BLOCK or x.shape[-1] % BLOCK:
        raise ValueError(f"triton quantize_act needs block_size {BLOCK} and K a multiple of {BLOCK}")
    x = x.contiguous()
    q = torch.empty_like(x, dtype=torch.float8_e4m3fn)
    scale = torch.empty(*x.shape[:-1], x.shape[-1] // BLOCK, dtype=torch.float32, device=x.device)
    n_tiles = scale.numel()
    if n_tiles:
        _quantize_act_kernel[(triton.cdiv(n_tiles, tiles_per_program),)](
            x, q, scale, n_tiles, BLOCK_K=BLOCK, TILES=tiles_per_program, UE8M0=scale_fmt == "ue8m0")
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


def grouped_gemm_configs() -> list[triton.Config]:
    """Autotuned on GPUs (once per N, K); one small config under the interpreter."""
    if triton.knobs.runtime.interpret:
        return [triton.Config({"BLOCK_N": 64})]
    return [triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
            for block_n in (64, 128) for warps in (4, 8) for stages in (3, 4)]


@triton.autotune(configs=grouped_gemm_configs(), key=["N", "K"])
@triton.jit
def _fp8_grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, tile_expert, tile_start,
                             tile_end, N, K, stride_am, stride_be, stride_bn, stride_cm,
                             stride_asm, stride_bse, stride_bsn,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # One grid axis (no 65,535 limit), N tiles varying fastest: the programs running together
    # share a row tile and one expert's weight, which stay in L2.
    n_tiles = tl.cdiv(N, BLOCK_N)
    tile, n_tile = tl.program_id(0) // n_tiles, tl.program_id(0) % n_tiles
    row_start, row_end = tl.load(tile_start + tile), tl.load(tile_end + tile)
    if row_start >= row_end:  # past the last tile (the grid is an upper bound)
        return
    expert = tl.load(tile_expert + tile).to(tl.int64)
    acc, rows, cols, row_ok, col_ok = _fp8_gemm_tile(
        a_ptr, b_ptr + expert * stride_be, a_s_ptr, b_s_ptr + expert * stride_bse,
        row_start, row_end, n_tile * BLOCK_N, N, K,
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


def expert_tiles(offsets: torch.Tensor, rows: int, block_m: int):
    """Row tiles of at most block_m rows that never straddle two experts, computed on
    offsets' device (no host sync): (expert, start, end) int32 tensors of length
    rows // block_m + E, an upper bound on the tile count; the tiles past the last are
    empty (start == end == 0)."""
    ends = offsets.long()
    starts = torch.cat((ends.new_zeros(1), ends[:-1]))
    tiles = (ends - starts + block_m - 1) // block_m
    last_tile = tiles.cumsum(0)  # one past each expert's last tile
    index = torch.arange(rows // block_m + len(offsets), device=offsets.device)
    expert = torch.searchsorted(last_tile, index, right=True).clamp_(max=len(offsets) - 1)
    start = starts[expert] + (index - (last_tile - tiles)[expert]) * block_m
    end = torch.minimum(start + block_m, ends[expert])
    used = index < last_tile[-1]
    return (expert.int(), start.where(used, 0).int(), end.where(used, 0).int())


def fp8_grouped_gemm(a, a_scale, b, b_scale, offsets, out_dtype=torch.bfloat16, block_m=64):
    """Rows of a [R, K] (fp8, sorted by expert; scales [R, K/128]) in groups ending at
    offsets [E], times b [E, N, K] (fp8; scales [E, ceil(N/128), K/128]) transposed -> [R, N]
    (rows past offsets[-1] are not written). The N tile, warps and stages are autotuned."""
    a, b, a_scale, b_scale = (t.contiguous() for t in (a, b, a_scale, b_scale))
    N, K = b.shape[1:]
    c = torch.empty(a.shape[0], N, dtype=out_dtype, device=a.device)
    if a.shape[0] == 0:
        return c
    tile_expert, tile_start, tile_end = expert_tiles(offsets, a.shape[0], block_m)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * len(tile_expert),)
    _fp8_grouped_gemm_kernel[grid](
        a, b, c, a_scale, b_scale, tile_expert, tile_start, tile_end, N, K, a.stride(0),
        b.stride(0), b.stride(1), c.stride(0), a_scale.stride(0), b_scale.stride(0),
        b_scale.stride(1), BLOCK_M=block_m, BLOCK_K=BLOCK)
    return c
