"""Block-scaled FP8 quantisation in plain torch: the reference and the CPU path.

Weights: DeepSeek checkpoints store W [M, N] as float8_e4m3fn W_q plus `weight_scale_inv`
S [ceil(M/128), ceil(N/128)] (float32) with W = W_q * S per 128x128 block; edge blocks are
partial. Activations: x [..., K] is quantised per 1x128 tile along K with scales
[..., K/128], so that x = x_q * s tile by tile. Scales are amax / 448 (e4m3's largest
finite value), amax floored at 1e-12 so all-zero tiles give no NaN; `ue8m0` rounds scales
up to a power of two (DeepSeek-V3.1's checkpoints and DeepGEMM use that format).
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
AMAX_FLOOR = 1e-12
SCALE_FORMATS = (None, "ue8m0")


def round_scale(scale: torch.Tensor, scale_fmt: str | None) -> torch.Tensor:
    """float32 scales as they are (None), or rounded up to powers of two ("ue8m0")."""
    if scale_fmt is None:
        return scale
    if scale_fmt != "ue8m0":
        raise ValueError(f"scale_fmt must be one of {SCALE_FORMATS}, not {scale_fmt!r}")
    return torch.exp2(torch.ceil(torch.log2(scale)))


def quantize_act(
    x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (x_q float8_e4m3fn [..., K], scale float32 [..., K/block]) per 1 x block tile.
    K must be a multiple of block_size."""
    if x.shape[-1] % block_size:
        raise ValueError(
            f"quantize_act: last dim {x.shape[-1]} is not a multiple of {block_size}; "
            f"pad K to a multiple of {block_size}"
        )
    tiles = x.float().unflatten(-1, (-1, block_size))
    scale = round_scale(tiles.abs().amax(dim=-1).clamp(min=AMAX_FLOOR) / FP8_MAX, scale_fmt)
    x_q = (tiles / scale[..., None]).to(torch.float8_e4m3fn).flatten(-2)
    return x_q, scale


def dequantize_act(
    x_q: torch.Tensor,
    scale: torch.Tensor,
    block_size: int = 128,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of quantize_act: x_q [..., K], scale [..., K/block] -> x [..., K] in `dtype`."""
    return (x_q.float().unflatten(-1, (-1, block_size)) * scale[..., None]).flatten(-2).to(dtype)


def expand_block_scale(scale: torch.Tensor, shape: torch.Size, block_size: int) -> torch.Tensor:
    """Per-block scales [ceil(M/b), ceil(N/b)] -> per-element [M, N]."""
    rows, cols = shape[-2], shape[-1]
    full = scale.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    return full[..., :rows, :cols]


def dequantize_weight(
    w_fp8: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: int = 128,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """W_q [..., M, N] float8 and scale_inv [..., ceil(M/b), ceil(N/b)] -> W in `dtype`."""
    expected = (
        *w_fp8.shape[:-2],
        -(-w_fp8.shape[-2] // block_size),
        -(-w_fp8.shape[-1] // block_size),
    )
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv shape {tuple(scale_inv.shape)} does not match weight "
            f"{tuple(w_fp8.shape)} with {block_size}x{block_size} blocks (want {expected})"
        )
    scale = expand_block_scale(scale_inv.float(), w_fp8.shape, block_size)
    return (w_fp8.float() * scale).to(dtype)


def quantize_weight(
    w: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """W [..., M, N] -> (W_q float8_e4m3fn, scale_inv float32 [..., ceil(M/b), ceil(N/b)])."""
    rows, cols = w.shape[-2:]
    pad_r, pad_c = -rows % block_size, -cols % block_size
    padded = torch.nn.functional.pad(w.float(), (0, pad_c, 0, pad_r))
    blocks = padded.unflatten(-2, (-1, block_size)).unflatten(-1, (-1, block_size))
    amax = blocks.abs().amax(dim=(-3, -1)).clamp(min=AMAX_FLOOR)  # [..., Mb, Nb]
    scale = round_scale(amax / FP8_MAX, scale_fmt)
    w_q = (w.float() / expand_block_scale(scale, w.shape, block_size)).to(torch.float8_e4m3fn)
    return w_q, scale
