"""Per-device memory estimate for training a DeepSeek-V3-family model (bytes, GB = 1e9).

`plan_memory` reads the model as built (on the meta device is enough: only shapes and
dtypes are used), so FP8 bases, LoRA adapters and frozen parameters count as they are held.

- weights: parameters at their element size. ZeRO-3 (and FSDP2) shard parameters and
  gather one decoder block's at a time, so a stage-3 plan holds a shard plus the largest
  block whole. Buffers are never sharded (DeepSpeed: "Buffers are never ZeRO-partitioned";
  FSDP2 converts parameters only): a frozen FP8 base, held as float8 buffers with float32
  128x128-block scales, stays whole on every device.
- gradients and optimizer: trainable parameters only (LoRA: the adapters). With
  `master_weights_fp32` (DeepSpeed ZeRO's mixed precision) gradients are float32 and the
  optimizer keeps a float32 master copy of every non-float32 parameter; without it (plain
  PyTorch) both follow the parameter's dtype. ZeRO stage >= 1 shards optimizer states,
  >= 2 gradients too, 3 parameters too.
- expert parallelism (`expert_parallel` N): each device holds 1/N of the routed experts
  (parameters or FP8 buffers, adapters, their gradients and states), outside ZeRO.
- activations: what autograd saves for the backward pass, counted from the model's forward
  (see `block_activation_bytes`; FP8 training keeps 1-byte linear inputs, counted here at
  the compute dtype); logits: see `logit_bytes`.

`plan_rollout` sizes the GRPO rollout engines, which run in their own processes on their
own devices: weights (split over tensor-parallel ranks) plus MLA's latent KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0}  # tensors kept per trainable parameter
HEADROOM = 0.10  # of each device kept free: CUDA context, allocator fragmentation, transients
MAX_DEVICES = 65536


def usable_bytes(device_memory_gb: float, share: float = 1.0) -> int:
    """What a plan may fill of a device of `device_memory_gb` GB (the `share` a process
    may take, e.g. vLLM's gpu_memory_utilization), less HEADROOM."""
    return int(device_memory_gb * 1e9 * share * (1 - HEADROOM))


@dataclass
class MemoryPlan:
    """Bytes per training device, by what holds them."""

    weights: int  # parameters: all, or (ZeRO-3) a shard plus one gathered block
    buffers: int  # never sharded by ZeRO: FP8 base weights and scales, router bias and counts
    gradients: int
    optimizer: int  # states + float32 master copy
    activations: int
    logits: int
    reference_model: int  # GRPO's frozen copy for the KL term (full fine-tuning, beta > 0)
    devices: int
    zero_stage: int
    expert_parallel: int = 1
    replan: Callable[[int], MemoryPlan] | None = field(default=None, repr=False, compare=False)

    PARTS = (
        "weights",
        "buffers",
        "gradients",
        "optimizer",
        "activations",
        "logits",
        "reference_model",
    )

    @property
    def total(self) -> int:
        return sum(getattr(self, part) for part in self.PARTS)

    def devices_needed(self, device_bytes: int) -> int:
        """The smallest device count (a multiple of expert_parallel) whose re-planned
        per-device total fits `device_bytes`."""
        step = self.expert_parallel
        floor = self.replan(MAX_DEVICES)  # what no amount of sharding removes
        if floor.total > device_bytes:
            biggest = sorted(self.PARTS, key=lambda part: -getattr(floor, part))[:2]
            stays = ", ".join(f"{part} {getattr(floor, part) / 1e9:,.1f} GB" for part in biggest)
            raise ValueError(
                f"does not fit in {device_bytes / 1e9:,.1f} GB per device at any device count "
                f"under ZeRO-{self.zero_stage}: {floor.total / 1e9:,.1f} GB stays on each device "
                f"({stays}). ZeRO never shards buffers (a frozen FP8 base): shard the routed "
                "experts with model.expert_parallel; else raise zero_stage, or use gradient "
                "checkpointing, LoRA, or a smaller micro-batch or sequence"
            )
        low, high = 1, MAX_DEVICES // step  # the per-device total never grows with the count
        while low < high:
            mid = (low + high) // 2
            low, high = (
                (low, mid) if self.replan(mid * step).total <= device_bytes else (mid + 1, high)
            )
        return low * step

    def as_dict(self) -> dict[str, int]:
        return {part: getattr(self, part) for part in self.PARTS} | {"total": self.total}

    def table(self) -> str:
        return format_parts(self.as_dict())


def format_parts(parts: dict[str, int]) -> str:
    return "\n".join(f"  {name:<18}{nbytes / 1e9:>12,.2f} GB" for name, nbytes in parts.items())


@dataclass
class HeldBytes:
    """Bytes that a group of tensors holds whole, before any sharding."""

    params: int
    buffers: int
    gradients: int
    optimizer: int  # states + float32 master copy


def held_bytes(
    params: list[nn.Parameter], buffers: list[torch.Tensor], states: int, master_weights_fp32: bool
) -> HeldBytes:
    """Gradients and `states` optimizer tensors per trainable parameter: float32 under
    `master_weights_fp32` (plus a float32 master copy of a non-float32 one), else in the
    parameter's own dtype."""
    trainable = [p for p in params if p.requires_grad]
    high = sum(p.numel() * (4 if master_weights_fp32 else p.element_size()) for p in trainable)
    master = sum(
        p.numel() * 4 for p in trainable if master_weights_fp32 and p.dtype != torch.float32
    )
    return HeldBytes(
        params=sum(tensor_bytes(params)),
        buffers=sum(tensor_bytes(buffers)),
        gradients=high,
        optimizer=states * high + master,
    )


def plan_memory(
    model: nn.Module,
    *,
    devices: int = 1,
    zero_stage: int = 0,
    expert_parallel: int = 1,
    micro_batch_size: int = 1,
    seq_len: int = 2048,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    master_weights_fp32: bool = True,
    train_mtp: bool = True,
    reference_copy: bool = False,
) -> MemoryPlan:
    """Estimate per-device training memory for `model` (see the module docstring).

    expert_parallel: N > 1 holds 1/N of every MoE layer's routed experts (weights, adapters,
    gradients, optimizer states) on each device, outside ZeRO (moetune.model.expert_parallel);
    the device count must be a multiple of N.
    train_mtp: the MTP blocks run (SFT with mtp_loss_weight > 0; GRPO with
    algorithm.mtp_weight > 0, which keeps the speculative drafter trained).
    reference_copy: a frozen copy of the whole model is held (GRPO's KL reference).
    """
    from moetune.model.experts import RoutedExperts
    from moetune.model.fp8 import FP8RoutedExperts

    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer {optimizer!r}: choose from {sorted(OPTIMIZER_STATES)}")
    if zero_stage not in (0, 1, 2, 3) or devices < 1 or expert_parallel < 1:
        raise ValueError(
            f"zero_stage={zero_stage}, devices={devices}, expert_parallel="
            f"{expert_parallel}: need stage 0-3, devices >= 1, expert_parallel >= 1"
        )
    if devices % expert_parallel or model.config.n_routed_experts % expert_parallel:
        raise ValueError(
            f"expert_parallel={expert_parallel} must divide devices={devices} and "
            f"n_routed_experts={model.config.n_routed_experts}"
        )
    local = (
        {
            id(t)
            for m in model.modules()
            if isinstance(m, (RoutedExperts, FP8RoutedExperts))
            for t in (*m.parameters(), *m.buffers())
        }
        if expert_parallel > 1
        else set()
    )

    def held(tensors, is_local: bool) -> list:
        return [t for t in tensors if (id(t) in local) == is_local]

    states = OPTIMIZER_STATES[optimizer]
    shared, experts = (
        held_bytes(
            held(model.parameters(), is_local),
            held(model.buffers(), is_local),
            states,
            master_weights_fp32,
        )
        for is_local in (False, True)
    )
    blocks = [*model.model.layers, *model.model.mtp]
    largest_block = max(sum(tensor_bytes(held(block.parameters(), False))) for block in blocks)
    mtp = train_mtp and bool(model.config.mtp_loss_weight) and len(model.model.mtp) > 0
    tokens = micro_batch_size * seq_len
    activations = activation_bytes(model, tokens, gradient_checkpointing, mtp, expert_parallel)
    logits = logit_bytes(model.config, tokens, len(model.model.mtp) if mtp else 0)

    def part(name: str, count: int, stage: int | None = None) -> int:
        """Shared tensors, sharded over `count` devices from ZeRO `stage` on (None: never),
        plus this device's share of the expert-parallel experts."""
        whole = getattr(shared, name)
        sharded = stage is not None and zero_stage >= stage
        return (math.ceil(whole / count) if sharded else whole) + math.ceil(
            getattr(experts, name) / expert_parallel
        )

    def replan(count: int) -> MemoryPlan:
        gathered = largest_block if zero_stage == 3 and count > 1 else 0
        return MemoryPlan(
            weights=min(part("params", count, 3) + gathered, part("params", count)),
            buffers=part("buffers", count),
            gradients=part("gradients", count, 2),
            optimizer=part("optimizer", count, 1),
            activations=activations,
            logits=logits,
            reference_model=part("params", count) + part("buffers", count) if reference_copy else 0,
            devices=count,
            zero_stage=zero_stage,
            expert_parallel=expert_parallel,
            replan=replan,
        )

    return replan(devices)


def tensor_bytes(tensors) -> list[int]:
    return [t.numel() * t.element_size() for t in tensors]


def block_activation_bytes(
    config, layer: int, tokens: int, dtype_bytes: int, frozen: bool, fp8_experts: int = 0
) -> int:
    """What one decoder block (MLA + dense MLP or MoE) saves for the backward pass over
    `tokens` tokens, read off the forward of moetune.model (within a few % of the saved
    tensors measured on tiny configs).

    Per token, with h = hidden_size, H = heads, dn/dr/dv = nope/rope/v head dims, rq/rkv
    = q/kv LoRA ranks (rq = 0 without q_lora_rank), I = intermediate_size, Im =
    moe_intermediate_size, Is = Im x n_shared_experts, E experts, k per token:
      float32  (w + 1) per RMSNorm of width w     its float32 input and 1/rms
                                                  (norms of width h, rkv, rq; h after MLA)
               + dr + H                           rotary cos/sin for k_rope; SDPA's logsumexp
               + E + 1 + k  (MoE)                 router scores, weight sums, top-k weights
               + h  (MoE, trainable router)       router input (float32 copy)
      dtype    + sum of norm widths (trainable)   normalised inputs for the norms' weights
               + h + rq + rkv                     inputs of the q/kv projections (norm outputs)
               + 4 H (dn + dr) + H dv             SDPA's q, k, v (v padded) and output; o_proj input
               + h                                MLP input (post-attention norm output)
               + 4 I  (dense)                     gate, up, silu(gate), silu(gate) * up
               + k (h + 2 Im) + k + 4 Is  (MoE)   expert-sorted rows, their gate/up outputs
                                                  (the SwiGLU is recomputed), row weights;
                                                  shared experts as a dense MLP
      int64    + 4 k  (MoE)                       expert ids and the sort's three indexes
    and per MoE block, whatever the token count: the router weight in float32 (E h, when
    the compute dtype is not float32) and, for routed experts trained in FP8, the FP8 copies
    of their weights the grouped-expert function keeps (3 Im h bytes for each of the
    `fp8_experts` this device holds; a frozen FP8 base is used as stored).
    `frozen`: the base is frozen (LoRA), so the norms' and router's weights take no
    gradient and their inputs above are not kept. Left out: LoRA's rank-r activations and,
    under LoRA, the input of a dense MLP without adapters (I values: an overestimate).
    """
    h, heads = config.hidden_size, config.num_attention_heads
    dn, dr, dv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    rq, rkv = config.q_lora_rank or 0, config.kv_lora_rank
    norms = [h, rkv, h] + ([rq] if rq else [])
    float32 = sum(width + 1 for width in norms) + dr + heads
    low = (0 if frozen else sum(norms)) + h + rq + rkv + 4 * heads * (dn + dr) + heads * dv + h
    int64 = 0
    constant = 0
    if config.is_moe_layer(layer):
        k, experts, inter = (
            config.num_experts_per_tok,
            config.n_routed_experts,
            config.moe_intermediate_size,
        )
        float32 += experts + 1 + k + (0 if frozen else h)
        low += k * (h + 2 * inter) + k + 4 * inter * (config.n_shared_experts or 0)
        int64 += 4 * k
        constant += 4 * experts * h if dtype_bytes != 4 else 0
        constant += 3 * fp8_experts * inter * h
    else:
        low += 4 * config.intermediate_size
    return tokens * (4 * float32 + dtype_bytes * low + 8 * int64) + constant


def activation_bytes(
    model: nn.Module, tokens: int, checkpointing: bool, mtp: bool, expert_parallel: int = 1
) -> int:
    """Saved activations for `tokens` tokens: the decoder blocks, the final norm and, when
    `mtp`, the MTP blocks (see `block_activation_bytes`). With gradient checkpointing each
    decoder block keeps only its input (h values per token) and one block's full set is
    live at a time while it is recomputed; MTP blocks are not checkpointed."""
    from moetune.model.fp8 import FP8TrainingExperts

    config = model.config
    dtype_bytes = next((p.element_size() for p in model.parameters() if p.requires_grad), 2)
    frozen = not any(p.requires_grad for p in model.model.norm.parameters())
    fp8 = any(isinstance(m, FP8TrainingExperts) for m in model.modules())
    fp8_experts = config.n_routed_experts // expert_parallel if fp8 else 0
    layers = config.num_hidden_layers
    depths = len(model.model.mtp) if mtp else 0

    def block(layer: int) -> int:
        return block_activation_bytes(config, layer, tokens, dtype_bytes, frozen, fp8_experts)

    main = [block(i) for i in range(layers)]
    if checkpointing:
        main = [layers * tokens * config.hidden_size * dtype_bytes + max(main)]
    h = config.hidden_size
    # Final norm: float32 input and 1/rms; trainable: normalised copy and head input.
    # MTP depth: enorm (trainable: its embedding input needs no gradient otherwise), hnorm
    # and shared_head_norm as the final norm, plus eh_proj's concatenated input.
    outside = 4 * (h + 1) + (0 if frozen else 2 * h * dtype_bytes)
    outside += depths * (2 * 4 * (h + 1) + (0 if frozen else 4 * (h + 1) + 6 * h * dtype_bytes))
    return sum(main) + sum(block(layers + d) for d in range(depths)) + tokens * outside


def logit_bytes(config, tokens: int, mtp_heads: int = 0) -> int:
    """float32 log-probabilities and their gradient, vocab_size values each per token, for
    the main head and each MTP depth trained."""
    return tokens * config.vocab_size * 4 * 2 * (1 + mtp_heads)


@dataclass
class RolloutPlan:
    """Bytes per rollout device. Each of `workers` engines runs in its own process on its own
    `tensor_parallel_size` devices; MLA's latent KV cache is replicated on every TP rank."""

    workers: int
    tensor_parallel_size: int
    sequences: int  # generated concurrently by one engine
    engine_weights: int  # one engine's weights, whole
    kv_cache: int  # per device

    @property
    def weights(self) -> int:
        """Per device: the engine's weights split over its TP ranks."""
        return math.ceil(self.engine_weights / self.tensor_parallel_size)

    @property
    def devices(self) -> int:
        return self.workers * self.tensor_parallel_size

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache

    def as_dict(self) -> dict[str, int]:
        return {"weights": self.weights, "kv_cache": self.kv_cache, "total": self.total}

    def tensor_parallel_needed(self, device_bytes: int, num_heads: int) -> int | None:
        """The smallest tensor_parallel_size (a power of two dividing the attention heads, as
        vLLM needs) at which a device holds `device_bytes` or less; None if none does."""
        tp = 1
        while num_heads % tp == 0:
            if replace(self, tensor_parallel_size=tp).total <= device_bytes:
                return tp
            tp *= 2
        return None


def plan_rollout(
    model: nn.Module,
    *,
    backend: str,
    workers: int,
    tensor_parallel_size: int,
    dtype_bytes: int,
    sequences: int,
    max_model_len: int,
    speculative: bool = False,
) -> RolloutPlan:
    """Rollout engines for `model` (as built for training: FP8 bases and LoRA adapters are
    read off it). vLLM serves a FP8 base in FP8 and skips the MTP blocks (unless
    `speculative`: its drafter holds them); the native engine
    loads the whole model in `dtype_bytes`. KV cache: `sequences` x `max_model_len` tokens,
    kv_lora_rank + qk_rope_head_dim values per token per layer, in `dtype_bytes`."""
    vllm = backend == "vllm"
    weights = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if (
            "lora" in name
            or name.endswith("gate.load")
            or (vllm and not speculative and ".mtp." in name)
        ):
            continue  # adapters are merged into the base; load counts are training-only
        if name.endswith("scale_inv"):
            weights += tensor.numel() * 4 if vllm else 0
        else:
            fp8 = tensor.dtype == torch.float8_e4m3fn and vllm
            weights += tensor.numel() * (1 if fp8 else dtype_bytes)
    config = model.config
    cache = (
        sequences
        * max_model_len
        * config.num_hidden_layers
        * (config.kv_lora_rank + config.qk_rope_head_dim)
        * dtype_bytes
    )
    return RolloutPlan(
        workers=workers,
        tensor_parallel_size=tensor_parallel_size,
        sequences=sequences,
        engine_weights=weights,
        kv_cache=cache,
    )
