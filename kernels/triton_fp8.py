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
def _quantize_act_kernel(
    x_ptr, q_ptr, s_ptr, n_tiles, BLOCK_K: tl.constexpr, TILES: tl.constexpr, UE8M0: tl.constexpr
):
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


def quantize_act(
    x: torch.Tensor,
    block_size: int = BLOCK,
    scale_fmt: str | None = None,
    tiles_per_program: int = 16,
):
    """Same contract as moetune.kernels.quantize.quantize_act."""
    if block_size != BLOCK or x.shape[-1] % BLOCK:
        raise ValueError(
            f"triton quantize_act needs block_size {BLOCK} and K a multiple of {BLOCK}"
        )
    x = x.contiguous()
    q = torch.empty_like(x, dtype=torch.float8_e4m3fn)
    scale = torch.empty(*x.shape[:-1], x.shape[-1] // BLOCK, dtype=torch.float32, device=x.device)
    n_tiles = scale.numel()
    if n_tiles:
        _quantize_act_kernel[(triton.cdiv(n_tiles, tiles_per_program),)](
            x, q, scale, n_tiles, BLOCK_K=BLOCK, TILES=tiles_per_program, UE8M0=scale_fmt == "ue8m0"
        )
    return q, scale


@triton.jit
def _transpose_kernel(x_ptr, y_ptr, R, C, BLOCK: tl.constexpr):
    """One BLOCK x BLOCK tile of matrix program_id(2): y [C, R] = x [R, C] transposed."""
    base = tl.program_id(2).to(tl.int64) * R * C
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    tile = tl.load(
        x_ptr + base + rows[:, None] * C + cols[None, :],
        mask=(rows[:, None] < R) & (cols[None, :] < C),
    )
    tl.store(
        y_ptr + base + cols[:, None] * R + rows[None, :],
        tl.trans(tile),
        mask=(cols[:, None] < C) & (rows[None, :] < R),
    )


def transpose(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """x [..., R, C] of a 1-byte dtype (float8) -> its transpose [..., C, R], contiguous."""
    if x.element_size() != 1:
        raise ValueError(f"triton transpose moves 1-byte elements, not {x.dtype}")
    x = x.contiguous()
    R, C = x.shape[-2:]
    y = torch.empty(*x.shape[:-2], C, R, dtype=x.dtype, device=x.device)
    matrices = x.numel() // max(R * C, 1)
    if x.numel():
        _transpose_kernel[(triton.cdiv(R, block), triton.cdiv(C, block), matrices)](
            x.view(torch.uint8), y.view(torch.uint8), R, C, BLOCK=block
        )
    return y


@triton.jit
def _fp8_gemm_tile(
    a_ptr,
    b_ptr,
    a_s_ptr,
    b_s_ptr,
    row_start,
    row_end,
    n_start,
    N,
    K,
    stride_am,
    stride_bn,
    stride_asm,
    stride_bsn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 [BLOCK_M, BLOCK_N] tile of (a * a_s) @ (b * b_s).T over rows [row_start, row_end)."""
    rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)  # rows x stride may pass 2^31
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
def _fp8_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    a_s_ptr,
    b_s_ptr,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_cm,
    stride_asm,
    stride_bsn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row_start = tl.program_id(0) * BLOCK_M
    acc, rows, cols, row_ok, col_ok = _fp8_gemm_tile(
        a_ptr,
        b_ptr,
        a_s_ptr,
        b_s_ptr,
        row_start,
        M,
        tl.program_id(1) * BLOCK_N,
        N,
        K,
        stride_am,
        stride_bn,
        stride_asm,
        stride_bsn,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )
    tl.store(
        c_ptr + rows[:, None] * stride_cm + cols[None, :],
        acc.to(c_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def grouped_gemm_configs() -> list[triton.Config]:
    """Autotuned on GPUs (once per N, K, expert count); one small config under the interpreter."""
    if triton.knobs.runtime.interpret:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64})]
    shapes = [
        (64, 64, 4, 4),
        (64, 128, 4, 3),
        (64, 128, 4, 4),
        (64, 256, 4, 3),
        (128, 64, 4, 4),
        (128, 128, 8, 3),
        (128, 128, 8, 4),
        (128, 256, 8, 3),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
        for m, n, warps, stages in shapes
    ]


@triton.jit
def _expert_tile(offsets_ptr, tile, E, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row tile `tile` of the expert-sorted rows, tiles never straddling two experts:
    (expert, first row, end row); first >= end when `tile` is past the last tile."""
    experts = tl.arange(0, E_PAD)
    ends = tl.load(offsets_ptr + experts, mask=experts < E, other=0)
    starts = tl.load(offsets_ptr + experts - 1, mask=(experts > 0) & (experts < E), other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    last = tl.cumsum(tiles, 0)  # one past each expert's last tile
    expert = tl.sum((last <= tile).to(tl.int32), 0)
    mine = experts == expert
    first_row = tl.sum(tl.where(mine, starts + (tile - last + tiles) * BLOCK_M, 0), 0)
    end_row = tl.minimum(first_row + BLOCK_M, tl.sum(tl.where(mine, ends, 0), 0))
    return expert, first_row, end_row


@triton.autotune(configs=grouped_gemm_configs(), key=["N", "K", "E"])
@triton.jit
def _fp8_grouped_gemm_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    a_s_ptr,
    b_s_ptr,
    offsets_ptr,
    N,
    K,
    E,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    stride_asm,
    stride_bse,
    stride_bsn,
    E_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One grid axis (no 65,535 limit), N tiles varying fastest: the programs running together
    # share a row tile and one expert's weight, which stay in L2. The row tiles are found
    # from the offsets here, so the launch needs no host sync.
    n_tiles = tl.cdiv(N, BLOCK_N)
    tile, n_tile = tl.program_id(0) // n_tiles, tl.program_id(0) % n_tiles
    expert, row_start, row_end = _expert_tile(offsets_ptr, tile, E, E_PAD, BLOCK_M)
    if row_start >= row_end:  # past the last tile (the grid is an upper bound)
        return
    expert = expert.to(tl.int64)
    acc, rows, cols, row_ok, col_ok = _fp8_gemm_tile(
        a_ptr,
        b_ptr + expert * stride_be,
        a_s_ptr,
        b_s_ptr + expert * stride_bse,
        row_start,
        row_end,
        n_tile * BLOCK_N,
        N,
        K,
        stride_am,
        stride_bn,
        stride_asm,
        stride_bsn,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )
    tl.store(
        c_ptr + rows[:, None] * stride_cm + cols[None, :],
        acc.to(c_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


def fp8_gemm(a, a_scale, b, b_scale, out_dtype=torch.bfloat16, block_m=64, block_n=64):
    """a [M, K] fp8, a_scale [M, K/128]; b [N, K] fp8, b_scale [ceil(N/128), K/128] -> [M, N]."""
    a, b, a_scale, b_scale = (t.contiguous() for t in (a, b, a_scale, b_scale))
    (M, K), N = a.shape, b.shape[0]
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _fp8_gemm_kernel[grid](
        a,
        b,
        c,
        a_scale,
        b_scale,
        M,
        N,
        K,
        a.stride(0),
        b.stride(0),
        c.stride(0),
        a_scale.stride(0),
        b_scale.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=BLOCK,
    )
    return c


def fp8_grouped_gemm(
    a, a_scale, b, b_scale, offsets, out_dtype=torch.bfloat16, tiles: tuple[int, int] | None = None
):
    """Rows of a [R, K] (fp8, sorted by expert; scales [R, K/128]) in groups ending at
    offsets [E], times b [E, N, K] (fp8; scales [E, ceil(N/128), K/128]) transposed -> [R, N]
    (rows past offsets[-1] are not written). Tile sizes, warps and stages are autotuned, or
    `tiles` = (BLOCK_M, BLOCK_N) fixes the tile."""
    a, b, a_scale, b_scale = (t.contiguous() for t in (a, b, a_scale, b_scale))
    (R, K), (E, N) = a.shape, b.shape[:2]
    c = torch.empty(R, N, dtype=out_dtype, device=a.device)
    if R == 0:
        return c
    # row tiles: at most R / BLOCK_M full ones plus one partial per expert
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * (R // meta["BLOCK_M"] + E),)
    kernel, fixed = _fp8_grouped_gemm_kernel, {}
    if tiles is not None:
        kernel, fixed = kernel.fn, {"BLOCK_M": tiles[0], "BLOCK_N": tiles[1]}
    kernel[grid](
        a,
        b,
        c,
        a_scale,
        b_scale,
        offsets.to(torch.int32).contiguous(),
        N,
        K,
        E,
        a.stride(0),
        b.stride(0),
        b.stride(1),
        c.stride(0),
        a_scale.stride(0),
        b_scale.stride(0),
        b_scale.stride(1),
        E_PAD=triton.next_power_of_2(E),
        BLOCK_K=BLOCK,
        **fixed,
    )
    return c
