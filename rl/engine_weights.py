"""The weights a rollout engine serves, read from the policy being trained.

`merged_tensors(model)` yields every decoder tensor under its HF name as an engine loads it:
LoRA folded in (W + s B A; routed experts per selected expert), FP8 weights dequantised.
`sync_weights(model, previous)` keeps those that changed since `previous` (the pool's copy of
what it synced), the payload of `RolloutPool.sync`. With `mtp=True` (speculative decoding:
the engines draft with them) the MTP modules go along, under their HF names
(`model.layers.{num_hidden_layers + k}.*`).
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
def merged_tensors(model, mtp: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every tensor of the decoder as an engine loads it: LoRA folded in
    (W + s B A; for routed experts, per selected expert), FP8 weights dequantised to their
    compute dtype. FP8 scales are left out, and the MTP modules unless `mtp` (the engines
    draft with them). The model is not modified; unchanged tensors are views of it."""
    modules = dict(model.named_modules())
    params = model.state_dict()
    for name, slot in checkpoint_layout(model, model.config).items():
        if (
            (slot.param.startswith("model.mtp.") and not mtp)
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
def sync_weights(
    model, previous: dict[str, torch.Tensor] | None = None, mtp: bool = False
) -> dict[str, torch.Tensor]:
    """The tensors to push after an optimizer step: HF name -> contiguous CPU copy of each
    `merged_tensors(model, mtp)` entry that differs from `previous` (all of them when it is
    None; a name missing from it counts as changed). Typical use:
    `pool.sync(sync_weights(model, pool.weights))`."""
    changed = {}
    for name, tensor in merged_tensors(model, mtp):
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
