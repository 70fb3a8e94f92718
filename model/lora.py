"""Expert-aware LoRA: adapters on MLA projections, dense MLPs, shared and routed experts.

A dense adapter wraps an `nn.Linear` as `LoraLinear`: y = W x + (alpha/r) B A dropout(x).
Routed experts keep stacked adapters per projection, A [S, r, in] and B [S, out, r] for the
S selected experts; `RoutedExpertsFunction` adds (x A_e^T) B_e^T to the expert-sorted rows
with grouped GEMMs inside its fused forward and backward: no per-expert Python loop, no
materialised delta-W, no gradient for the frozen expert weights. Unselected experts stay frozen
and cost nothing. Router weights and correction bias are never adapted.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from moetune.model.expert_parallel import hide_from_ddp, keep_adapter_slice, sharded_layers
from moetune.model.experts import RoutedExperts
from moetune.model.fp8 import FP8RoutedExperts, FrozenFP8Linear, compute_dtype, dense_weight
from moetune.model.layers import GatedMLP
from moetune.model.moe import MoE

ATTENTION_TARGETS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
COMPONENTS = ("attention", "dense_mlp", "shared_experts", "routed_experts")


@dataclass
class LoraSpec:
    """Which modules get adapters, and their size.

    rank/alpha: default rank and scale (scaling = alpha / rank); dropout applies to the
    inputs of dense adapters (routed-expert adapters take none); `ranks` overrides the rank
    per component (e.g. {"routed_experts": 8}). components: any of COMPONENTS. layers:
    [first, last) decoder layers to adapt (None = all). experts: {layer: [expert ids]} for
    an expert subset (layers absent from the dict get all experts), None = all experts.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    components: tuple[str, ...] = COMPONENTS
    ranks: dict[str, int] = field(default_factory=dict)
    layers: tuple[int, int] | None = None
    experts: dict[int, list[int]] | None = None

    def __post_init__(self):
        unknown = set(self.components) - set(COMPONENTS)
        if unknown:
            raise ValueError(
                f"lora.components: unknown {sorted(unknown)}; choose from {COMPONENTS}"
            )
        unknown = set(self.ranks) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"lora.ranks: unknown {sorted(unknown)}; choose from {COMPONENTS}")

    def rank_of(self, component: str) -> int:
        return self.ranks.get(component, self.rank)

    def scaling(self, component: str) -> float:
        return self.alpha / self.rank_of(component)


class LoraLinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update (PEFT's names and init)."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        like = dict(device=base.weight.device, dtype=compute_dtype(base))
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **like)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **like)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def dense_weight(self) -> torch.Tensor:
        """The effective weight W + s B A (used by the absorbed MLA decode path)."""
        base = dense_weight(self.base_layer, self.lora_B.weight.dtype)
        return base + self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def merged(self) -> nn.Linear:
        """The base linear with the update folded in (an FP8 base is dequantised first)."""
        with torch.no_grad():
            weight = self.dense_weight()
        merged = nn.Linear(
            self.base_layer.in_features,
            self.base_layer.out_features,
            bias=False,
            device=weight.device,
            dtype=weight.dtype,
        )
        merged.weight.data.copy_(weight)
        return merged


class ExpertLora(nn.Module):
    """Stacked adapters for the selected experts of one RoutedExperts module.

    gate_A/up_A [S, r, hidden], gate_B/up_B [S, I, r], down_A [S, r, I], down_B [S, hidden, r].
    """

    def __init__(
        self,
        experts: RoutedExperts,
        expert_ids: list[int],
        rank: int,
        scaling: float,
        num_experts: int | None = None,
    ):
        """expert_ids in [0, num_experts) (default: the module's experts; under expert
        parallelism the layer's total, before the adapter is cut to the rank's share)."""
        super().__init__()
        num_experts = num_experts or experts.num_experts
        down_shape = getattr(experts.down_proj, "ds_shape", experts.down_proj.shape)  # ZeRO-3
        hidden, inter = down_shape[1], experts.intermediate_size
        dtype = compute_dtype(experts)
        if rank * dtype.itemsize % 16:
            raise ValueError(
                f"routed-expert LoRA rank {rank} in {dtype}: grouped "
                f"GEMMs need rows of a multiple of 16 bytes; use a rank multiple of 8"
            )
        if len(set(expert_ids)) != len(expert_ids) or not all(
            0 <= e < num_experts for e in expert_ids
        ):
            raise ValueError(
                f"lora.experts: {sorted(expert_ids)} must be distinct expert ids in "
                f"[0, {num_experts})"
            )
        count = len(expert_ids)
        like = dict(device=experts.down_proj.device, dtype=dtype)
        self.gate_A = nn.Parameter(torch.empty(count, rank, hidden, **like))
        self.up_A = nn.Parameter(torch.empty(count, rank, hidden, **like))
        self.down_A = nn.Parameter(torch.empty(count, rank, inter, **like))
        self.gate_B = nn.Parameter(torch.zeros(count, inter, rank, **like))
        self.up_B = nn.Parameter(torch.zeros(count, inter, rank, **like))
        self.down_B = nn.Parameter(torch.zeros(count, hidden, rank, **like))
        for a in (self.gate_A, self.up_A, self.down_A):
            for slot in range(count if a.device.type != "meta" else 0):  # meta: shapes only
                nn.init.kaiming_uniform_(a[slot], a=math.sqrt(5))
        # (on the CPU for a model on the meta device: the ids are known values all the same)
        ids_device = "cpu" if like["device"].type == "meta" else like["device"]
        self.register_buffer(
            "expert_ids", torch.tensor(sorted(expert_ids), device=ids_device), persistent=False
        )
        self.all_experts = count == num_experts
        self.scaling = scaling

    def arguments(self, counts: torch.Tensor, row_expert: torch.Tensor) -> tuple:
        """The adapter arguments of RoutedExpertsFunction for this routing: the stacked
        A/B tensors, the rows of selected experts (None when all experts are adapted) and
        the cumulative row counts per selected expert."""
        offsets = counts[self.expert_ids].cumsum(0).to(torch.int32)
        rows = None
        if not self.all_experts:
            selected = torch.zeros_like(counts, dtype=torch.bool)
            selected[self.expert_ids] = True
            rows = selected[row_expert].nonzero().flatten()
        return (
            self.gate_A,
            self.up_A,
            self.down_A,
            self.gate_B,
            self.up_B,
            self.down_B,
            rows,
            offsets,
            self.scaling,
        )


def apply_lora(model: nn.Module, spec: LoraSpec) -> int:
    """Freeze the model and attach adapters per `spec`. Returns the trainable parameter count.
    Routed experts sharded by expert parallelism: each rank keeps its experts' adapters, cut
    from adapters drawn for all (global rank 0's); collective then (every rank calls it)."""
    for p in model.parameters():
        p.requires_grad_(False)
    first, last = spec.layers or (0, len(model.model.layers) + len(model.model.mtp))
    blocks = list(model.model.layers) + [m.block for m in model.model.mtp]
    for index, layer in enumerate(blocks):
        if not first <= index < last:
            continue
        if "attention" in spec.components:
            wrap_linears(layer.self_attn, ATTENTION_TARGETS, spec, "attention")
        mlp = layer.mlp
        if isinstance(mlp, GatedMLP) and "dense_mlp" in spec.components:
            wrap_linears(mlp, ("gate_proj", "up_proj", "down_proj"), spec, "dense_mlp")
        if isinstance(mlp, MoE):  # routed experts: RoutedExperts or FP8RoutedExperts
            if mlp.shared_experts is not None and "shared_experts" in spec.components:
                wrap_linears(
                    mlp.shared_experts,
                    ("gate_proj", "up_proj", "down_proj"),
                    spec,
                    "shared_experts",
                )
            if "routed_experts" in spec.components:
                shard = mlp.expert_parallel
                total = shard.total if shard is not None else mlp.experts.num_experts
                chosen = adapted_expert_ids(spec, index, total)
                if len(chosen):
                    mlp.experts.lora = ExpertLora(
                        mlp.experts,
                        chosen,
                        spec.rank_of("routed_experts"),
                        spec.scaling("routed_experts"),
                        total,
                    )
                    if shard is not None:
                        keep_adapter_slice(mlp.experts.lora, shard)
    if sharded_layers(model):
        hide_from_ddp(model)  # the new expert adapters are the rank's own too
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapted_expert_ids(spec: LoraSpec, layer: int, total: int) -> list[int]:
    """The routed experts of checkpoint layer `layer` (of `total`) that `spec` adapts, in the
    order of their rows in the stacked adapter."""
    return list((spec.experts or {}).get(layer, range(total)))


def wrap_linears(parent: nn.Module, names, spec: LoraSpec, component: str) -> None:
    for name in names:
        base = getattr(parent, name, None)
        if isinstance(base, (nn.Linear, FrozenFP8Linear)):
            setattr(
                parent,
                name,
                LoraLinear(base, spec.rank_of(component), spec.scaling(component), spec.dropout),
            )


@contextmanager
def adapters_disabled(model: nn.Module):
    """Within the block the model computes as its frozen base (every adapter's scaling is
    0): the KL reference of LoRA RL without a second copy of the model."""
    adapters = [m for m in model.modules() if isinstance(m, (LoraLinear, ExpertLora))]
    scalings = [m.scaling for m in adapters]
    for module in adapters:
        module.scaling = 0.0
    try:
        yield model
    finally:
        for module, scaling in zip(adapters, scalings):
            module.scaling = scaling


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weights and remove the adapters (in place)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLinear):
                setattr(parent, name, child.merged())
        if isinstance(parent, FP8RoutedExperts) and parent.lora is not None:
            raise ValueError(
                "merge into FP8 experts is not supported: load the base in bf16 to merge"
            )
        if isinstance(parent, RoutedExperts) and parent.lora is not None:
            lora, inter = parent.lora, parent.intermediate_size
            ids = lora.expert_ids
            s = lora.scaling
            parent.gate_up_proj[ids, :inter] += s * (lora.gate_B @ lora.gate_A)
            parent.gate_up_proj[ids, inter:] += s * (lora.up_B @ lora.up_A)
            parent.down_proj[ids] += s * (lora.down_B @ lora.down_A)
            parent.lora = None
    return model
