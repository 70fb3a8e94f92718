"""LoRA adapters on disk in PEFT's format, with per-expert keys as vLLM loads them.

A folder holds `adapter_config.json` (PEFT LoraConfig fields), `adapter_model.safetensors`
and `moetune_adapter.json` (the LoraSpec that rebuilds the adapter layout). Keys:
  base_model.model.model.layers.{L}.self_attn.q_a_proj.lora_A.weight   [r, in]
  base_model.model.model.layers.{L}.mlp.experts.{E}.gate_proj.lora_B.weight   [out, r]
MTP blocks use their checkpoint index L = num_hidden_layers + k.

Loaders: moetune (`load_adapter`, `moetune merge`), vLLM (the keys, `r`, `lora_alpha`,
`rank_pattern`) and PEFT 0.21's `PeftModel.from_pretrained` on transformers 5's model, which
fuses each layer's experts (see `peft_targets`). PEFT gives a fused layer one adapter for
every expert: an expert-subset (ESFT) adapter does not fit it, and PEFT's load fails
("size mismatch for ...mlp.experts..."); moetune and vLLM load it. transformers' model has
no MTP block: PEFT leaves the MTP adapters out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from moetune.model.checkpoint import to_disk_name
from moetune.model.expert_parallel import expert_adapter, own_expert_adapter, sharded_layers
from moetune.model.gathering import gathered, whole
from moetune.model.lora import ExpertLora, LoraLinear, LoraSpec, adapted_expert_ids, apply_lora
from moetune.model.moe import MoE

PREFIX = "base_model.model."
EXPERT_PROJECTIONS = (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj"))
STACKED_ADAPTER = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.lora\.(gate|up|down)_([AB])")


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


# rank_pattern keys, matched as PEFT and vLLM match them (the first key that matches a suffix
# of the name from a "." on wins): against module names (vLLM; PEFT for attention) and
# `<module>.weight` (PEFT, for the MLP projections it wraps as parameters). The routed experts
# take the global `r`.
RANK_PATTERNS = {
    "attention": r"self_attn\.\w+",
    "dense_mlp": r"mlp\.(gate|up|down)_proj(\.weight)?",
    "shared_experts": r"shared_experts\.(gate|up|down)_proj(\.weight)?",
}
ROUTED_EXPERT = re.compile(r"(.*\.mlp\.experts)\.\d+\.(gate_proj|up_proj|down_proj)")


def component_of(module: str) -> str:
    if ROUTED_EXPERT.fullmatch(module):
        return "routed_experts"
    if ".self_attn." in module:
        return "attention"
    return "shared_experts" if ".shared_experts." in module else "dense_mlp"


def peft_targets(modules) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) for the adapted `modules` (full names without
    PEFT's prefix), for PEFT 0.21 on transformers 5, which fuses each MoE layer's experts.

    PEFT rewrites every `target_modules` entry named `gate_proj`/`up_proj`/`down_proj`, or
    ending in `.gate_proj` etc., as the fused experts `gate_up_proj`/`down_proj` of every MoE
    layer, and resolves a regex `target_modules` to such leaf names first: a regex or any
    name of a dense-MLP or shared-expert projection there would be dropped. So:
    - attention: their full module names (PEFT wraps exactly those);
    - dense MLP and shared experts: `target_parameters`, `<module>.weight` (PEFT wraps the
      same nn.Linear, same LoRA and keys);
    - routed experts: `model.layers.{L}.mlp.experts.{gate,up,down}_proj`, the per-layer
      name PEFT gives the pre-fusion experts. PEFT wraps the experts of every MoE layer;
      those of layers without adapters keep a zero lora_B (no effect, a missing-keys
      warning)."""
    target_modules, target_parameters = set(), set()
    for name in modules:
        component = component_of(name)
        if component == "routed_experts":
            match = ROUTED_EXPERT.fullmatch(name)
            target_modules.add(f"{match.group(1)}.{match.group(2)}")
        elif component == "attention":
            target_modules.add(name)
        else:
            target_parameters.add(f"{name}.weight")
    return sorted(target_modules), sorted(target_parameters)


def peft_config(spec: LoraSpec, base_path: str | None, modules) -> dict:
    """adapter_config.json for the adapted `modules` (full names without PEFT's prefix).

    `r` is the routed experts' rank: PEFT sizes its fused experts from the global `r`
    (2r for gate_up_proj, set when it loads); writing 2r into `rank_pattern` instead would
    make vLLM's max_lora_rank check see 2r. Every other component present has its rank in
    `rank_pattern`. One alpha: scaling = alpha / rank everywhere, as in moetune. vLLM reads
    `r`, `lora_alpha` and the patterns (the targets only need to be there; the tensor names
    say what loads) and ignores `target_parameters`. PEFT 0.21 warns that the dense-MLP and
    shared-expert rank_pattern keys "did not match any targeted module" (its check counts
    module targets, not parameter targets; its own `gate_up_proj` key gets the same
    warning): the ranks do apply."""
    target_modules, target_parameters = peft_targets(modules)
    present = {component_of(name) for name in modules}
    rank = spec.rank_of("routed_experts") if "routed_experts" in present else spec.rank
    rank_pattern = {
        pattern: spec.rank_of(component)
        for component, pattern in RANK_PATTERNS.items()
        if component in present
    }
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        "r": rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": target_modules,
        "target_parameters": target_parameters,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {},
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
    if write:
        write_adapter(tensors, spec, path, base_path)


def write_adapter(
    tensors: dict[str, torch.Tensor], spec: LoraSpec, path, base_path: str | None = None
) -> None:
    """Write an adapter folder from PEFT key -> tensor (CPU, contiguous); the weights file is
    replaced atomically."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    partial = path / ".adapter_model.safetensors.partial"
    save_file(tensors, partial, metadata={"format": "pt"})
    os.replace(partial, path / "adapter_model.safetensors")
    modules = sorted({key.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for key in tensors})
    config = peft_config(spec, base_path, modules)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (path / "moetune_adapter.json").write_text(json.dumps(dataclasses.asdict(spec), indent=2))


def peft_tensors(
    tensors: dict[str, torch.Tensor], spec: LoraSpec, num_experts: int
) -> dict[str, torch.Tensor]:
    """PEFT key -> tensor for adapter tensors under their checkpoint-layout names (as
    `moetune.rl.engine_weights.adapter_stream` yields them): a routed-expert adapter's stacked
    A/B rows become per-expert keys, for the experts `spec` adapts of `num_experts`."""
    peft = {}
    for name, tensor in tensors.items():
        match = STACKED_ADAPTER.fullmatch(name)
        if match is None:
            peft[PREFIX + name] = tensor
            continue
        owner, short, half = match.groups()
        proj = dict(EXPERT_PROJECTIONS)[short]
        experts = adapted_expert_ids(spec, int(owner.split(".")[2]), num_experts)
        for row, expert in enumerate(experts):
            peft[f"{PREFIX}{owner}.{expert}.{proj}.lora_{half}.weight"] = tensor[row]
    return peft


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
