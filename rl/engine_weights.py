"""The weights a rollout engine serves, read from the policy being trained.

`merged_tensors(model)` yields every decoder tensor under its HF name as an engine loads it:
LoRA folded in (W + s B A; routed experts per selected expert), FP8 weights dequantised.
`sync_weights(model, previous)` keeps those that changed since `previous` (the pool's copy of
what it synced), the payload of `RolloutPool.sync`. Engines that apply adapters themselves
(the native engine) are sent `adapter_tensors(model)` instead: the LoRA tensors alone.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from moetune.kernels import dequantize_weight
from moetune.model.checkpoint import checkpoint_layout, slot_tensor
from moetune.model.fp8 import FrozenFP8Linear, dense_weight

ADAPTER_TENSOR = re.compile(r"\.lora_[AB]\.|\.lora\.")
EXPERT_WEIGHT = re.compile(r"\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


@torch.no_grad()
def merged_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of the decoder as an engine loads it: LoRA folded in
    (W + s B A; for routed experts, per selected expert), FP8 weights dequantised to their
    compute dtype. MTP modules (not used for generation) and FP8 scales are left out. The
    model is not modified; unchanged tensors are views of it."""
    modules = dict(model.named_modules())
    params = model.state_dict()
    for name, slot in checkpoint_layout(model, model.config).items():
        if (
            slot.param.startswith("model.mtp.")
            or name.endswith("_scale_inv")
            or ADAPTER_TENSOR.search(slot.param)
        ):
            continue
        owner = modules[slot.param.rpartition(".")[0]]
        if name.endswith(".base_layer.weight"):  # a LoraLinear's base: W + s B A
            lora_linear = modules[slot.param.removesuffix(".base_layer.weight")]
            yield name.replace(".base_layer", ""), lora_linear.dense_weight()
        elif isinstance(owner, FrozenFP8Linear):
            yield name, dense_weight(owner)
        elif match := EXPERT_WEIGHT.search(name):
            yield name, expert_weight(owner, slot_tensor(params, slot), int(match[1]), match[2])
        else:
            yield name, slot_tensor(params, slot)


def adapter_tensors(model, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """HF name -> every LoRA tensor of `model` (each adapted linear's lora_A/lora_B, each
    routed-expert adapter's stacked gate/up/down A and B; MTP modules' included), or only
    those that train (`trainable_only`: what an optimizer step can have changed): what an
    engine holding the same frozen base and adapters needs. Views of the model;
    `RolloutPool.sync` copies them."""
    params = model.state_dict()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {
        name: slot_tensor(params, slot)
        for name, slot in checkpoint_layout(model, model.config).items()
        if ADAPTER_TENSOR.search(slot.param) and (not trainable_only or slot.param in trainable)
    }


def expert_weight(experts, weight: torch.Tensor, expert: int, proj: str) -> torch.Tensor:
    """Routed expert `expert`'s `proj` ("gate", "up", "down") weight [out, in], dequantised if
    FP8, with its adapter folded in if it has one."""
    if weight.dtype == torch.float8_e4m3fn:
        scale = getattr(experts, f"{proj}_proj_scale_inv")[expert]
        weight = dequantize_weight(weight, scale, dtype=experts.compute_dtype)
    lora = experts.lora
    selected = [] if lora is None else lora.expert_ids.tolist()
    if expert not in selected:
        return weight
    slot = selected.index(expert)
    return weight + lora.scaling * (
        getattr(lora, f"{proj}_B")[slot] @ getattr(lora, f"{proj}_A")[slot]
    )


@torch.no_grad()
def sync_weights(model, previous: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors to push after an optimizer step: HF name -> contiguous CPU copy of each
    `merged_tensors` entry that differs from `previous` (all of them when it is None; a name
    missing from it counts as changed).
    Typical use: `pool.sync(sync_weights(model, pool.weights))`."""
    changed = {}
    for name, tensor in merged_tensors(model):
        current = tensor.detach().to("cpu")
        old = None if previous is None else previous.get(name)
        if (
            old is None
            or old.dtype != current.dtype
            or old.shape != current.shape
            or not torch.equal(old, current)
        ):
            changed[name] = torch.clone(current, memory_format=torch.contiguous_format)
    return changed
