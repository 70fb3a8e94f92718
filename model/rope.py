"""Rotary position embedding with DeepSeek's YaRN extension, on interleaved pairs.

DeepSeek rotates the `qk_rope_head_dim` channels as pairs (x0, x1), (x2, x3), ...
(`torch.view_as_complex` layout), which is what its checkpoints and vLLM expect.
"""

from __future__ import annotations

import math

import torch


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_frequencies(dim: int, theta: float, yarn: dict | None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] (float32) and the cos/sin magnitude scale.

    With YaRN, low frequencies (wavelength beyond the original context) are interpolated by
    `factor`, high ones kept, with a linear ramp between the beta_fast/beta_slow bounds.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim))
    if yarn is None:
        return inv_freq.float(), 1.0
    factor = yarn["factor"]
    original_len = yarn["original_max_position_embeddings"]
    beta_fast, beta_slow = yarn.get("beta_fast") or 32, yarn.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(
        0, 1
    )
    extrapolated = 1 - ramp
    inv_freq = inv_freq / factor * (1 - extrapolated) + inv_freq * extrapolated
    mscale, mscale_all_dim = yarn.get("mscale"), yarn.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        magnitude = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        magnitude = yarn_mscale(factor)
    return inv_freq.float(), magnitude


def softmax_scale(qk_head_dim: int, yarn: dict | None) -> float:
    """1/sqrt(d), times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = qk_head_dim**-0.5
    if yarn and yarn.get("mscale_all_dim"):
        scale *= yarn_mscale(yarn["factor"], yarn["mscale_all_dim"]) ** 2
    return scale


class RotaryEmbedding(torch.nn.Module):
    """Produces (cos, sin) [..., dim/2] for given positions."""

    def __init__(self, dim: int, theta: float, yarn: dict | None):
        super().__init__()
        # A plain float32 attribute, not a buffer: model.to(bfloat16) must not round it.
        self.inv_freq, self.magnitude = rope_frequencies(dim, theta, yarn)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] -> cos, sin [B, S, dim/2] in float32."""
        angles = position_ids[..., None].float() * self.inv_freq.to(position_ids.device)
        return angles.cos() * self.magnitude, angles.sin() * self.magnitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, S, H, dim] (or [B, S, dim] with 3-D cos) by
    cos/sin [B, S, dim/2]; output in x's dtype, computed in float32."""
    if x.dim() == 4:
        cos, sin = cos[:, :, None], sin[:, :, None]
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)
