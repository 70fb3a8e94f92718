"""LoRA adapters on disk in PEFT's format, with per-expert keys as vLLM loads them.

A folder holds `adapter_config.json` (PEFT LoraConfig fields), `adapter_model.safetensors`
and `moetune_adapter.json` (the LoraSpec that rebuilds the adapter layout). Keys:
  base_model.model.model.layers.{L}.self_attn.q_a_proj.lora_A.weight   [r, in]
  base_model.model.model.layers.{L}.mlp.experts.{E}.gate_proj.lora_B.weight   [out, r]
MTP blocks use their checkpoint index L = num_hidden_layers + k.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from moetune.model.checkpoint import to_disk_name
from moetune.model.expert_parallel import expert_adapter, own_expert_adapter, sharded_layers
from moetune.model.gathering import gathered, whole
from moetune.model.lora import ExpertLora, LoraLinear, LoraSpec, apply_lora
from moetune.model.moe import MoE

PREFIX = "base_model.model."
EXPERT_PROJECTIONS = (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))


def adapter_tensors(model, own: bool = False) -> dict[str, torch.Tensor]:
    """PEFT key -> tensor for every adapter in the model. Routed-expert adapters sharded by
    expert parallelism are gathered over their group, the adapters alone (every rank calls
    it then); the experts' weights stay sharded. `own`: this rank's expert adapters only,
    views of its parameters (no collective)."""
    layers = model.config.num_hidden_layers
    tensors = {}
    for name, module in model.named_modules():
        disk = to_disk_name(name, layers)
        if isinstance(module, LoraLinear):
            tensors[f"{PREFIX}{disk}.lora_A.weight"] = whole(module.lora_A.weight)
            tensors[f"{PREFIX}{disk}.lora_B.weight"] = whole(module.lora_B.weight)
        elif isinstance(module, MoE) and getattr(module.experts, "lora", None) is not None:
            expert_ids, stacked = (own_expert_adapter if own else expert_adapter)(module)
            for slot, expert in enumerate(expert_ids):
                for short, proj in EXPERT_PROJECTIONS:
                    for half in ("A", "B"):
                        key = f"{PREFIX}{disk}.experts.{expert}.{proj}.lora_{half}.weight"
                        tensors[key] = whole(stacked[f"{short}_{half}"])[slot]
    return tensors


def every_rank_keys(model, keys) -> set[str]:
    """The adapter keys of every rank of this rank's expert-parallel group (collective when
    the experts are sharded): the keys of the whole adapter."""
    layers = sharded_layers(model)
    if not layers:
        return set(keys)
    group = layers[0].expert_parallel.groups.ep
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, sorted(keys), group=group)
    return set().union(*every)


def adapter_modules(model) -> list[torch.nn.Module]:
    """The modules that hold the adapter tensors themselves (not the base weights)."""
    held = []
    for module in model.modules():
        if isinstance(module, LoraLinear):
            held += [module.lora_A, module.lora_B]
        elif isinstance(module, ExpertLora):
            held.append(module)
    return held


def peft_config(spec: LoraSpec, base_path: str | None) -> dict:
    targets = sorted(
        {"q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
        if "attention" in spec.components
        else set()
    )
    if set(spec.components) & {"dense_mlp", "shared_experts", "routed_experts"}:
        targets += ["down_proj", "gate_proj", "up_proj"]
    rank_pattern = {}
    patterns = {
        "attention": r"self_attn\.\w+",
        "shared_experts": r"shared_experts\.\w+",
        "routed_experts": r"experts\.\d+\.\w+",
        "dense_mlp": r"mlp\.(gate|up|down)_proj",
    }
    for component, rank in spec.ranks.items():
        rank_pattern[patterns[component]] = rank
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict.fromkeys(rank_pattern, spec.alpha),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
    }


def save_adapter(
    model, spec: LoraSpec, path, base_path: str | None = None, write: bool = True
) -> None:
    """Write the adapter folder (the weights file replaced atomically). A model sharded by
    ZeRO-3 or FSDP2: every rank calls it (the adapters are gathered); the rank with `write`
    writes."""
    with gathered(model, adapter_modules(model)):
        tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_tensors(model).items()}
    if not write:
        return
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    partial = path / ".adapter_model.safetensors.partial"
    save_file(tensors, partial, metadata={"format": "pt"})
    os.replace(partial, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps(peft_config(spec, base_path), indent=2))
    (path / "moetune_adapter.json").write_text(json.dumps(dataclasses.asdict(spec), indent=2))


def read_spec(path) -> LoraSpec:
    raw = json.loads((Path(path) / "moetune_adapter.json").read_text())
    raw["components"] = tuple(raw["components"])
    if raw.get("layers") is not None:
        raw["layers"] = tuple(raw["layers"])
    if raw.get("experts") is not None:
        raw["experts"] = {int(k): v for k, v in raw["experts"].items()}
    return LoraSpec(**raw)


def load_adapter(model, path) -> LoraSpec:
    """Attach the adapters saved at `path` to `model` (frozen) and load their weights."""
    spec = read_spec(path)
    apply_lora(model, spec)
    load_adapter_weights(model, path)
    return spec


@torch.no_grad()
def load_adapter_weights(model, path) -> None:
    """Copy the adapter weights saved at `path` into the model's existing adapters. Fails
    naming any missing, unexpected or mis-shaped adapter tensor. Experts sharded by expert
    parallelism: every rank calls it and loads its own experts' adapters."""
    expected = adapter_tensors(model, own=True)
    known = every_rank_keys(model, expected.keys())
    saved = load_file(Path(path) / "adapter_model.safetensors")
    problems = [f"missing adapter tensor {k!r}" for k in sorted(known - saved.keys())]
    problems += [f"unexpected adapter tensor {k!r}" for k in sorted(saved.keys() - known)]
    for key in sorted(expected.keys() & saved.keys()):
        if expected[key].shape != saved[key].shape:
            problems.append(
                f"shape mismatch for {key!r}: adapter {tuple(saved[key].shape)}, "
                f"model {tuple(expected[key].shape)}"
            )
        else:
            expected[key].copy_(saved[key])
    if problems:
        raise ValueError(f"adapter {path} does not fit the model:\n  " + "\n  ".join(problems[:20]))
