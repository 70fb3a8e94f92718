"""The weights a rollout engine serves, read from the policy being trained, block by block.

`weight_stream(model)` yields (HF name, tensor) for every tensor of the decoder as an engine
loads it: LoRA folded in (W + s B A; routed experts per selected expert), FP8 weights
dequantised. It walks the model one block at a time (the embedding, each decoder layer, the
norm, the head), so a model sharded by ZeRO-3, FSDP2 or expert parallelism is gathered one
block at a time (moetune.model.gathering) and no rank holds more than a block beyond its
own shards. Sharded, it is collective: every rank iterates it in step.

`trained_only=True` keeps what an optimizer step can have changed, known without a copy of
the old weights: tensors computed from a trainable parameter (a trained weight, a LoRA base
with its adapter, a routed expert with its adapter) and the aux-free bias of a router whose
weight trains. Under LoRA the frozen base is never in it.

`mtp=True` (speculative decoding: the engines draft with them) sends the MTP modules along,
under their HF names (`model.layers.{num_hidden_layers + k}.*`).

`adapter_stream(model)` yields the LoRA tensors alone, for engines that apply the adapters
themselves (the native engine).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from moetune.kernels import dequantize_weight
from moetune.model.checkpoint import Slot, checkpoint_layout, slot_tensor
from moetune.model.expert_parallel import adapted_experts
from moetune.model.fp8 import FrozenFP8Linear
from moetune.model.gathering import full_shapes, gathered, whole
from moetune.model.moe import MoE

ADAPTER_TENSOR = re.compile(r"\.lora_[AB]\.|\.lora\.")
EXPERT_WEIGHT = re.compile(r"\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
BLOCK = re.compile(r"model\.(layers|mtp)\.\d+")
LORA_BASE = ".base_layer.weight"

Values = Callable[[str], torch.Tensor]  # state-dict name -> its whole tensor


def weight_stream(
    model, trained_only: bool = False, mtp: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every decoder tensor as an engine loads it, block by block (FP8
    scales left out, and the MTP modules unless `mtp`); `trained_only`: those an optimizer
    step can have changed. Tensors are valid until the next one is asked for."""
    modules = dict(model.named_modules())
    tensors = model.state_dict(keep_vars=True)
    for block, entries in weight_entries(model, trained_only, mtp):
        with block_values(model, modules[block], tensors) as value:
            for name, slot in entries:  # a LoRA base goes out merged, under its own name
                yield name.replace(".base_layer", ""), engine_tensor(name, slot, value, modules)


def adapter_stream(model, trained_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of every LoRA tensor (each adapted linear's lora_A/lora_B, each
    routed-expert adapter's stacked A and B; MTP modules' included), block by block;
    `trained_only`: the trainable ones."""
    modules = dict(model.named_modules())
    tensors = model.state_dict(keep_vars=True)
    for block, entries in adapter_entries(model, trained_only):
        # (expert parallel: the adapters gathered, never the experts)
        with block_values(model, modules[block], tensors, experts=False) as value:
            for name, slot in entries:
                yield name, slot_tensor({slot.param: value(slot.param)}, slot)


Entries = list[tuple[str, list[tuple[str, Slot]]]]  # [(block, [(checkpoint name, slot)])]


def weight_entries(model, trained_only: bool, mtp: bool) -> Entries:
    """What `weight_stream` sends, by block (collective under expert parallelism)."""
    trained = trained_names(model) if trained_only else None
    adapted = adapted_expert_ids(model) if trained_only else {}

    def wanted(name: str, slot: Slot) -> bool:
        if (slot.param.startswith("model.mtp.") and not mtp) or name.endswith("_scale_inv"):
            return False
        if ADAPTER_TENSOR.search(slot.param):
            return False
        return trained is None or bool(sources(name, slot, adapted) & trained)

    return blocks(model, wanted)


def adapter_entries(model, trained_only: bool) -> Entries:
    """What `adapter_stream` sends, by block."""
    trained = trained_names(model) if trained_only else None

    def wanted(name: str, slot: Slot) -> bool:
        return bool(ADAPTER_TENSOR.search(slot.param)) and (
            trained is None or slot.param in trained
        )

    return blocks(model, wanted)


def sync_bytes(model, adapter: bool, mtp: bool, dtype: torch.dtype) -> int:
    """Bytes one step's sync sends to each engine, read from the shapes alone (a model on the
    meta device will do): the trainable adapter tensors (`adapter`: engines that apply the
    adapters themselves), else every tensor an optimizer step can change, in the engine's
    `dtype` (LoRA merged, FP8 dequantised)."""
    shapes = full_shapes(model)
    tensors = model.state_dict(keep_vars=True)
    entries = adapter_entries(model, True) if adapter else weight_entries(model, True, mtp)
    total = 0
    for _, block in entries:
        for _, slot in block:
            shape = torch.empty(shapes[slot.param], device="meta")[slot.index or ()].shape
            itemsize = tensors[slot.param].dtype.itemsize if adapter else dtype.itemsize
            total += shape.numel() * itemsize
    return total


def blocks(model, wanted) -> list[tuple[str, list[tuple[str, Slot]]]]:
    """The `wanted(name, slot)` checkpoint entries grouped by the block (module name) that
    holds them, in checkpoint order; blocks with none are left out."""
    grouped: dict[str, list[tuple[str, Slot]]] = {}
    for name, slot in checkpoint_layout(model, model.config).items():
        if wanted(name, slot):
            match = BLOCK.match(slot.param)
            block = match[0] if match else slot.param.rpartition(".")[0]
            grouped.setdefault(block, []).append((name, slot))
    return list(grouped.items())


@contextmanager
def block_values(
    model, block: torch.nn.Module, tensors: dict, experts: bool = True
) -> Iterator[Values]:
    """Within the block, value(state-dict name) is that tensor of `block` whole, gathered
    once per name (moetune.model.gathering; collective when the model is sharded).
    `tensors`: the model's `state_dict(keep_vars=True)`, whose parameters are whole inside.
    `experts=False`: expert-parallel routed experts stay sharded (their adapters are whole)."""
    cache: dict[str, torch.Tensor] = {}
    with gathered(model, list(block.modules()), experts):

        def value(name: str) -> torch.Tensor:
            if name not in cache:
                cache[name] = whole(tensors[name]).detach()
            return cache[name]

        yield value


def trained_names(model) -> set[str]:
    """State-dict names an optimizer step can change: the trainable parameters, and the
    aux-free bias of every router whose weight trains."""
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    routers = [n.removesuffix("weight") for n in names if n.endswith(".gate.weight")]
    return names | {f"{router}e_score_correction_bias" for router in routers}


def adapted_expert_ids(model) -> dict[str, set[int]]:
    """Routed-experts module name -> the global ids of the experts its adapter covers (expert
    parallel: gathered over the ranks, collective)."""
    return {
        f"{name}.experts": set(adapted_experts(moe))
        for name, moe in model.named_modules()
        if isinstance(moe, MoE) and getattr(moe.experts, "lora", None) is not None
    }


def sources(name: str, slot: Slot, adapted: dict[str, set[int]]) -> set[str]:
    """The state-dict names an engine tensor is computed from (its adapter's included);
    `adapted`: adapted_expert_ids(model)."""
    if name.endswith(LORA_BASE):
        prefix = slot.param.removesuffix(LORA_BASE)
        return {slot.param, f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"}
    owner_name = slot.param.rpartition(".")[0]
    match = EXPERT_WEIGHT.search(name)
    if not match or int(match[1]) not in adapted.get(owner_name, ()):
        return {slot.param}
    proj = match[2]
    return {slot.param, f"{owner_name}.lora.{proj}_A", f"{owner_name}.lora.{proj}_B"}


def engine_tensor(name: str, slot: Slot, value: Values, modules: dict) -> torch.Tensor:
    """The tensor `name` as the engine loads it, from the block's whole tensors."""
    if name.endswith(LORA_BASE):  # a LoraLinear's base: W + s B A
        prefix = slot.param.removesuffix(LORA_BASE)
        lora_b, lora_a = value(f"{prefix}.lora_B.weight"), value(f"{prefix}.lora_A.weight")
        base = linear_weight(f"{prefix}.base_layer", value, modules, lora_b.dtype)
        return base + modules[prefix].scaling * (lora_b @ lora_a)
    owner_name = slot.param.rpartition(".")[0]
    if isinstance(modules[owner_name], FrozenFP8Linear):
        return linear_weight(owner_name, value, modules, None)
    if match := EXPERT_WEIGHT.search(name):
        return expert_weight(owner_name, slot, int(match[1]), match[2], value, modules)
    return slot_tensor({slot.param: value(slot.param)}, slot)


def linear_weight(path: str, value: Values, modules: dict, dtype) -> torch.Tensor:
    """A linear's dense weight: FrozenFP8Linear dequantised to its compute dtype (or `dtype`)."""
    linear = modules[path]
    if isinstance(linear, FrozenFP8Linear):
        weight, scale = value(f"{path}.weight"), value(f"{path}.weight_scale_inv")
        return dequantize_weight(weight, scale, dtype=dtype or linear.compute_dtype)
    weight = value(f"{path}.weight")
    return weight if dtype is None else weight.to(dtype)


def expert_weight(
    owner_name: str, slot: Slot, expert: int, proj: str, value: Values, modules: dict
) -> torch.Tensor:
    """Routed expert `expert`'s `proj` weight [out, in], dequantised if FP8, with its adapter
    folded in if it has one."""
    experts = modules[owner_name]
    weight = slot_tensor({slot.param: value(slot.param)}, slot)
    if weight.dtype == torch.float8_e4m3fn:
        scale = value(f"{owner_name}.{proj}_proj_scale_inv")[expert]
        weight = dequantize_weight(weight, scale, dtype=experts.compute_dtype)
    lora = experts.lora
    selected = [] if lora is None else lora.expert_ids.tolist()
    if expert not in selected:
        return weight
    i = selected.index(expert)
    lora_b, lora_a = (
        value(f"{owner_name}.lora.{proj}_B")[i],
        value(f"{owner_name}.lora.{proj}_A")[i],
    )
    return weight + lora.scaling * (lora_b @ lora_a)
