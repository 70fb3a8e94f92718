"""Reference (plain torch) 128x128 block-scaled FP8 weight quantisation.

DeepSeek checkpoints store a weight W [M, N] as float8_e4m3fn W_q plus `weight_scale_inv`
S [ceil(M/128), ceil(N/128)] (float32) with W = W_q * S per block; edge blocks are partial.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def expand_block_scale(scale: torch.Tensor, shape: torch.Size, block_size: int) -> torch.Tensor:
    """Per-block scales [ceil(M/b), ceil(N/b)] -> per-element [M, N]."""
    rows, cols = shape[-2], shape[-1]
    full = scale.repeat_interleave(block_size, dim=-2).repeat_interleave(block_size, dim=-1)
    return full[..., :rows, :cols]


def dequantize_weight(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128,
                      dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """W_q [M, N] float8 and scale_inv [ceil(M/b), ceil(N/b)] -> W [M, N] in `dtype`."""
    expected = (-(-w_fp8.shape[-2] // block_size), -(-w_fp8.shape[-1] // block_size))
    if tuple(scale_inv.shape[-2:]) != expected:
        raise ValueError(f"weight_scale_inv shape {tuple(scale_inv.shape)} does not match weight "
                         f"{tuple(w_fp8.shape)} with {block_size}x{block_size} blocks (want {expected})")
    scale = expand_block_scale(scale_inv.float(), w_fp8.shape, block_size)
    return (w_fp8.float() * scale).to(dtype)


def quantize_weight(w: torch.Tensor, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """W [M, N] -> (W_q float8_e4m3fn [M, N], scale_inv float32 [ceil(M/b), ceil(N/b)])."""
    rows, cols = w.shape[-2:]
    pad_r, pad_c = -rows % block_size, -cols % block_size
    padded = torch.nn.functional.pad(w.float(), (0, pad_c, 0, pad_r))
    blocks = padded.unflatten(-2, (-1, block_size)).unflatten(-1, (-1, block_size))
    amax = blocks.abs().amax(dim=(-3, -1)).clamp(min=1e-12)  # [Mb, Nb]
    scale = amax / FP8_MAX
    w_q = (w.float() / expand_block_scale(scale, w.shape, block_size)).to(torch.float8_e4m3fn)
    return w_q, scale
