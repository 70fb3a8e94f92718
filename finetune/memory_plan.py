"""Per-device memory estimate for training a DeepSeek-V3-family model (bytes, GB = 1e9).

`plan_memory` reads the model as built (on the meta device is enough: only shapes and
dtypes are used), so FP8 bases, LoRA adapters and frozen parameters count as they are held.
Mixed precision follows DeepSpeed: with `master_weights_fp32` and low-precision parameters,
gradients are float32 and the optimizer keeps a float32 master copy; ZeRO stage >= 1
shards optimizer states over the devices, >= 2 gradients too, 3 every weight too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd": 0}  # float32 states per trainable param
MAX_DEVICES = 65536


@dataclass
class MemoryPlan:
    """Bytes per device, by what holds them."""

    weights: int
    gradients: int
    optimizer: int  # states + float32 master copy
    activations: int
    logits: int
    rollout_kv_cache: int
    devices: int
    zero_stage: int
    replan: Callable[[int], MemoryPlan] | None = field(default=None, repr=False, compare=False)

    PARTS = ("weights", "gradients", "optimizer", "activations", "logits", "rollout_kv_cache")

    @property
    def total(self) -> int:
        return sum(getattr(self, part) for part in self.PARTS)

    def devices_needed(self, device_bytes: int) -> int:
        """The smallest device count whose re-planned per-device total fits `device_bytes`."""
        floor = self.replan(MAX_DEVICES)  # what no amount of sharding removes
        if floor.total > device_bytes:
            raise ValueError(
                f"does not fit in {device_bytes / 1e9:g} GB per device at any device count "
                f"under ZeRO-{self.zero_stage} ({floor.total / 1e9:,.1f} GB stays per device): "
                "raise zero_stage, or use gradient checkpointing, LoRA, FP8, or a smaller "
                "micro_batch_size/seq_len")
        low, high = 1, MAX_DEVICES  # the per-device total never grows with the device count
        while low < high:
            mid = (low + high) // 2
            low, high = (low, mid) if self.replan(mid).total <= device_bytes else (mid + 1, high)
        return low

    def table(self) -> str:
        lines = [f"  {part:<18}{getattr(self, part) / 1e9:>12,.2f} GB" for part in self.PARTS]
        return "\n".join(lines + [f"  {'total':<18}{self.total / 1e9:>12,.2f} GB"])


def plan_memory(model: nn.Module, *, devices: int = 1, zero_stage: int = 0,
                micro_batch_size: int = 1, seq_len: int = 2048,
                gradient_checkpointing: bool = False, optimizer: str = "adamw",
                master_weights_fp32: bool = True, rollout_tokens: int = 0) -> MemoryPlan:
    """Estimate per-device training memory for `model` (see the module docstring).

    weights: every parameter and buffer at its element size (FP8: 1 byte + float32 scales).
    gradients: trainable parameters, float32 under `master_weights_fp32`, else their dtype.
    optimizer: OPTIMIZER_STATE_BYTES per trainable parameter, + 4 for the float32 master
    copy of a non-float32 parameter under `master_weights_fp32`.
    activations: see `activation_bytes`. logits: see `logit_bytes`.
    rollout_kv_cache: `rollout_tokens` cached on this device, kv_lora_rank + qk_rope_head_dim
    bf16 values per token per layer (MLA's latent cache).
    """
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer {optimizer!r}: choose from {sorted(OPTIMIZER_STATE_BYTES)}")
    if zero_stage not in (0, 1, 2, 3) or devices < 1:
        raise ValueError(f"zero_stage={zero_stage}, devices={devices}: need stage 0-3, devices >= 1")
    config = model.config
    trainable = [p for p in model.parameters() if p.requires_grad]
    tensors = list(model.parameters()) + list(model.buffers())
    weights = sum(t.numel() * t.element_size() for t in tensors)
    gradients = sum(p.numel() * (4 if master_weights_fp32 else p.element_size()) for p in trainable)
    master = sum(p.numel() * 4 for p in trainable
                 if master_weights_fp32 and p.dtype != torch.float32)
    states = OPTIMIZER_STATE_BYTES[optimizer] * sum(p.numel() for p in trainable)
    dtype_bytes = next((p.element_size() for p in trainable), 2)
    tokens = micro_batch_size * seq_len
    mtp_heads = len(model.model.mtp) if config.mtp_loss_weight else 0
    cache = rollout_tokens * config.num_hidden_layers * (
        config.kv_lora_rank + config.qk_rope_head_dim) * 2

    def shard(nbytes: int, stage: int, count: int) -> int:
        return math.ceil(nbytes / count) if zero_stage >= stage else nbytes

    def replan(count: int) -> MemoryPlan:
        return MemoryPlan(
            weights=shard(weights, 3, count), gradients=shard(gradients, 2, count),
            optimizer=shard(states + master, 1, count),
            activations=activation_bytes(config, tokens, dtype_bytes, gradient_checkpointing),
            logits=logit_bytes(config, tokens, mtp_heads), rollout_kv_cache=cache,
            devices=count, zero_stage=zero_stage, replan=replan)

    return replan(devices)


def layer_activation_bytes(config, moe: bool, dtype_bytes: int) -> int:
    """Bytes one decoder layer saves for the backward pass, per token (an estimate, +-30%).

    With h = hidden_size, H = heads, dn/dr/dv = nope/rope/v head dims, rq/rkv = q/kv LoRA
    ranks, I = intermediate_size, Im = moe_intermediate_size, k = experts per token:
      float32      2h + rq + rkv     RMSNorm inputs (normalised in float32)
                   + (H + 1) dr      rotated query/key pairs
                   + h + E           MoE router: input copy and scores
      compute      2h + rq + rkv     RMSNorm outputs
      dtype        + H (dn + dv)     kv_b_proj output (per-head k_nope, v)
                   + 4 H (dn + dr)   SDPA's q, k, v (padded to q's head dim) and output
                   + H dv            o_proj input
                   + 4 I             dense MLP: gate, up, silu(gate), silu(gate) * up
                   + k (h + 2 Im)    MoE: rows gathered per expert and their gate/up
                                     outputs (the SwiGLU is recomputed in the backward)
                   + 4 Im n_shared   MoE: shared experts, as a dense MLP
    """
    h, heads = config.hidden_size, config.num_attention_heads
    dn, dr, dv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    norms = 2 * h + (config.q_lora_rank or 0) + config.kv_lora_rank
    float32 = norms + (heads + 1) * dr
    low = norms + heads * (dn + dv) + 4 * heads * (dn + dr) + heads * dv
    if moe:
        inter = config.moe_intermediate_size
        float32 += h + config.n_routed_experts
        low += config.num_experts_per_tok * (h + 2 * inter)
        low += 4 * inter * (config.n_shared_experts or 0)
    else:
        low += 4 * config.intermediate_size
    return 4 * float32 + dtype_bytes * low


def activation_bytes(config, tokens: int, dtype_bytes: int, checkpointing: bool) -> int:
    """Saved activations for `tokens` tokens over the decoder layers and MTP blocks. With
    gradient checkpointing each decoder layer keeps only its input (h values per token)
    and one layer's full set is live at a time while it is recomputed; MTP blocks are not
    checkpointed."""
    main = [layer_activation_bytes(config, config.is_moe_layer(i), dtype_bytes)
            for i in range(config.num_hidden_layers)]
    mtp = [layer_activation_bytes(config, config.is_moe_layer(config.num_hidden_layers + k),
                                  dtype_bytes) for k in range(config.num_nextn_predict_layers)]
    if checkpointing:
        main = [len(main) * config.hidden_size * dtype_bytes + max(main, default=0)]
    return tokens * (sum(main) + sum(mtp))


def logit_bytes(config, tokens: int, mtp_heads: int = 0) -> int:
    """float32 logits and their gradient, vocab_size values each per token, for the main
    head and each MTP depth trained."""
    return tokens * config.vocab_size * 4 * 2 * (1 + mtp_heads)
