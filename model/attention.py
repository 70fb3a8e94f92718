"""Multi-head Latent Attention (DeepSeek-V2/V3).

Keys and values are compressed into one latent c = RMSNorm(W_dkv x) of `kv_lora_rank`
values plus a shared rotary key of `qk_rope_head_dim` values per token. Two paths:

- `forward(..., cache=None)`: the training path. `kv_b_proj` expands the latent into
  per-head keys/values, and attention runs through `scaled_dot_product_attention`.
- `forward(..., cache=LatentCache)`: the decode path. `kv_b_proj` is absorbed into the
  query (q_nope W_uk) and the output (W_uv), so attention runs directly against the cached
  latent: only kv_lora_rank + qk_rope_head_dim values per token per layer are stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moetune.model.config import DeepseekV3Config
from moetune.model.fp8 import dense_weight
from moetune.model.kv_cache import LatentCache
from moetune.model.layers import RMSNorm
from moetune.model.rope import apply_rope, softmax_scale


def hopper_or_newer(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.get_device_capability(t.device) >= (9, 0)


class MultiheadLatentAttention(nn.Module):
    """Multi-head Latent Attention. Queries go through a low-rank (q_lora_rank) projection;
    keys and values through one compressed latent (kv_lora_rank) plus a shared RoPE key
    (qk_rope_head_dim). Training runs SDPA over the expanded heads; decoding caches only the
    latent and the rope key per token, with kv_b_proj absorbed into the query and output."""

    def __init__(self, config: DeepseekV3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        qk_head_dim = self.nope_dim + self.rope_dim
        hidden, bias = config.hidden_size, config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, self.num_heads * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_dim, hidden, bias=bias)
        self.scale = softmax_scale(qk_head_dim, config.yarn)

    def project_query(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, hidden] -> q_nope [B, S, H, nope], rotated q_rope [B, S, H, rope]."""
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.unflatten(-1, (self.num_heads, -1)).split(
            [self.nope_dim, self.rope_dim], dim=-1
        )
        return q_nope, apply_rope(q_rope, cos, sin)

    def compress_kv(self, x: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, hidden] -> normalised latent [B, S, kv_lora_rank],
        rotated k_rope [B, S, rope]."""
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], -1)
        return self.kv_a_layernorm(latent), apply_rope(k_rope, cos, sin)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: LatentCache | None = None,
    ) -> torch.Tensor:
        """x [B, S, hidden]; cos/sin [B, S, rope/2]; mask: bool [B, 1, S, T] (True = attend)
        or None for plain causal attention. Returns [B, S, hidden]."""
        q_nope, q_rope = self.project_query(x, cos, sin)
        latent, k_rope = self.compress_kv(x, cos, sin)
        if cache is None:
            out = self.attend_expanded(q_nope, q_rope, latent, k_rope, mask)
        else:
            latent, k_rope = cache.append(self.layer_idx, latent, k_rope)
            out = self.attend_absorbed(q_nope, q_rope, latent, k_rope, mask)
        return self.o_proj(out.flatten(2))

    def attend_expanded(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """Training path: expand the latent to per-head K/V and run SDPA. -> [B, S, H, v]."""
        kv = self.kv_b_proj(latent).unflatten(-1, (self.num_heads, -1))
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1).transpose(1, 2)
        k_rope = k_rope[:, :, None].expand(-1, -1, self.num_heads, -1)
        k = torch.cat((k_nope, k_rope), dim=-1).transpose(1, 2)
        # SDPA's flash kernels need equal q/k/v head dims: pad v with zeros and drop the
        # padding from the output (on CPU 2.7x faster than the math fallback). On Hopper,
        # cuDNN's attention takes v as it is, and its backward pays for padding (6.2 vs 3.9 ms,
        # 4 layers, H200); other GPUs keep the padding (FlashAttention-2 needs it).
        v = (v if hopper_or_newer(v) else F.pad(v, (0, q.shape[-1] - self.v_dim))).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale
        )
        return out[..., : self.v_dim].transpose(1, 2)

    def attend_absorbed(self, q_nope, q_rope, latent, k_rope, mask) -> torch.Tensor:
        """Decode path over cached latents [B, T, r] and rope keys [B, T, rope]. -> [B, S, H, v]."""
        w_kv_b = dense_weight(self.kv_b_proj, latent.dtype).unflatten(0, (self.num_heads, -1))
        w_uk, w_uv = w_kv_b.split([self.nope_dim, self.v_dim], dim=1)  # [H, nope|v, r]
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)
        scores = torch.einsum("bshc,btc->bsht", q_latent, latent)
        scores = scores + torch.einsum("bshr,btr->bsht", q_rope, k_rope)
        scores = scores.float() * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask.transpose(1, 2), float("-inf"))
        probs = scores.softmax(dim=-1).to(latent.dtype)
        out_latent = torch.einsum("bsht,btc->bshc", probs, latent)
        return torch.einsum("bshc,hdc->bshd", out_latent, w_uv)
