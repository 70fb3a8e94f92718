"""A recipe's `model` and `lora` sections -> a model, its tokenizer and its LoRA spec.

Shared by SFT, GRPO and `--dry-run`: the same section always builds the same model.
A model comes from a checkpoint folder (`model.path`) or, with fresh weights, from a config
(`model.config`: a config.json path or a name shipped in moetune/model/configs).
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import torch

from moetune.config.build import RecipeError
from moetune.config.schema import LoraSection, ModelSection
from moetune.model import DeepseekV3Config, DeepseekV3ForCausalLM, load_config
from moetune.model.expert_parallel import (
    ExpertParallelGroups,
    expert_parallel_groups,
    shard_experts,
)
from moetune.model.lora import LoraSpec, apply_lora
from moetune.model.sharded_build import ChunkedBuild, zero3_build
from moetune.training.launcher import fsdp_launch, zero3_init_config

SHIPPED_CONFIGS = Path(str(files("moetune.model") / "configs"))


def resolve_config(section: ModelSection) -> DeepseekV3Config:
    """The model's config (the checkpoint's, else `model.config`), with the section's loss
    weights applied. `model.config` beside `model.path` names the architecture for
    `--dry-run` before the checkpoint is on disk."""
    if section.path and Path(section.path).exists():
        source = section.path
    elif section.config:
        source = shipped_config(section.config)
    elif section.path:
        raise RecipeError(f"model.path: {section.path}: no such folder")
    else:
        raise RecipeError(
            "model: give model.path (a checkpoint folder) or model.config "
            "(a config.json or a shipped config name)"
        )
    try:
        config = load_config(source)
    except (FileNotFoundError, ValueError) as error:
        raise RecipeError(f"model: {error}") from None
    if section.mtp_loss_weight is not None:
        config.mtp_loss_weight = section.mtp_loss_weight
    if section.aux_loss_alpha is not None:
        config.aux_loss_alpha = section.aux_loss_alpha
    return config


def shipped_config(name: str) -> str:
    """A config path as given, or a shipped config by name (`tiny_arith` or `tiny_arith.json`)."""
    if Path(name).exists():
        return name
    shipped = SHIPPED_CONFIGS / (name if name.endswith(".json") else f"{name}.json")
    if shipped.exists():
        return str(shipped)
    names = sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.json"))
    raise RecipeError(
        f"model.config: {name!r} is neither a file nor a shipped config ({', '.join(names)})"
    )


def load_model(
    section: ModelSection, device: str | torch.device = "cpu", sharded: bool = False
) -> DeepseekV3ForCausalLM:
    """Load the checkpoint, or initialise fresh weights from the config (seeded). With
    `model.expert_parallel` N > 1 the routed experts are sharded over groups of N ranks: a
    checkpoint's are read by each rank for its own share alone; fresh ones are global rank
    0's, cut up. `sharded` (for a trainer that shards the model it is given): see
    `build_fresh`."""
    config = resolve_config(section)
    dtype = getattr(torch, section.dtype)
    groups = expert_parallel_groups_of(section.expert_parallel, config)
    if section.path:
        if not Path(section.path).exists():
            raise RecipeError(f"model.path: {section.path}: no such folder")
        return DeepseekV3ForCausalLM.from_pretrained(
            section.path,
            dtype=dtype,
            device=device,
            fp8=section.fp8,
            config=config,
            expert_parallel=groups,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(section.seed)
        model = build_fresh(config, dtype, device, sharded and not section.fp8)
    if section.fp8:
        from moetune.model.fp8 import to_fp8_training, to_frozen_fp8

        (to_frozen_fp8 if section.fp8 == "frozen" else to_fp8_training)(model)
    return shard_experts(model, groups) if groups is not None else model


def build_fresh(
    config: DeepseekV3Config, dtype: torch.dtype, device: str | torch.device, sharded: bool
) -> DeepseekV3ForCausalLM:
    """A model of fresh weights (drawn from the current RNG state). `sharded`, under a launch
    whose engine shards parameters no rank ever holds the whole model, and the weights are
    the unsharded build's all the same (moetune.model.sharded_build):
      - DeepSpeed ZeRO-3 with `zero3_init_flag` on: built under `deepspeed.zero.Init`
        (parameters are created in `dtype`: a bf16 build draws in bf16, not in float32);
      - FSDP2: parameters on the meta device, this rank's dim-0 chunks in `model.rank_shares`
        for `fill_shards` once `fully_shard` has run."""
    zero3 = zero3_init_config() if sharded else None
    if zero3 is not None:
        start_process_group()
        with zero3_build(zero3, dtype):
            return DeepseekV3ForCausalLM(config)
    if sharded and fsdp_launch():
        start_process_group()
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rank = torch.distributed.get_rank() if world > 1 else 0
        with ChunkedBuild(rank, world) as build:
            model = DeepseekV3ForCausalLM(config)
        model.rank_shares = build.shares(model, dtype)
        return model.to(dtype)  # (meta parameters: their dtype alone)
    return DeepseekV3ForCausalLM(config).to(device=device, dtype=dtype)


def start_process_group() -> None:
    """Under torchrun / accelerate launch, start the process group as the trainer would (nccl
    on GPUs, else gloo) if it is not yet."""
    if not torch.distributed.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        PartialState()


def check_expert_parallel(size: int, config: DeepseekV3Config) -> None:
    """`model.expert_parallel` N must be >= 1 and divide the routed experts and the process
    count (the initialised world's, else the launcher's WORLD_SIZE): a RecipeError naming
    the key otherwise."""
    if torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
    else:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    if size < 1:
        raise RecipeError(f"model.expert_parallel: {size} must be >= 1")
    if config.n_routed_experts % size:
        raise RecipeError(
            f"model.expert_parallel: expert parallel size {size} must divide n_routed_experts "
            f"{config.n_routed_experts}"
        )
    if size > 1 and world % size:
        raise RecipeError(
            f"model.expert_parallel: expert parallel size {size} must divide the world size "
            f"{world} (the launcher's process count)"
        )


def expert_parallel_groups_of(size: int, config: DeepseekV3Config) -> ExpertParallelGroups | None:
    """The process groups of `model.expert_parallel` N (None: 1, no sharding). Under torchrun
    / accelerate launch the process group is started here if it is not yet. Collective."""
    if size == 1:
        return None
    check_expert_parallel(size, config)
    start_process_group()
    try:
        return expert_parallel_groups(size)
    except (RuntimeError, ValueError) as error:
        raise RecipeError(f"model.expert_parallel: {error}") from None


def load_tokenizer(section: ModelSection):
    """A transformers PreTrainedTokenizerFast: `char`, a folder / tokenizer.json, or the
    checkpoint folder's own."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from moetune.model.char_tokenizer import char_tokenizer_fast

    source = section.tokenizer or section.path
    if source is None:
        raise RecipeError(
            "model.tokenizer: a model built from a config needs a tokenizer "
            "(`char`, a folder, or a tokenizer.json)"
        )
    if source == "char":
        return char_tokenizer_fast()
    path = Path(source)
    if path.is_file() and path.suffix == ".json":
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        key = "model.tokenizer" if section.tokenizer else "model.path"
        raise RecipeError(f"{key}: {source}: no tokenizer.json or tokenizer_config.json there")
    return AutoTokenizer.from_pretrained(str(path))


def lora_spec(section: LoraSection, num_blocks: int) -> LoraSpec:
    """The LoraSpec of a recipe's `lora` section; an expert selection reads its profile."""
    experts = None
    if section.experts != "all":
        from moetune.training.expert_profile import read_profile, select_experts

        selection = section.experts
        if not Path(selection.profile).exists():
            raise RecipeError(
                f"lora.experts.profile: {selection.profile}: no such file "
                "(write it with `moetune experts profile`)"
            )
        try:
            profile = read_profile(selection.profile)
            experts = select_experts(profile, selection.select, selection.top_p)
        except ValueError as error:
            raise RecipeError(f"lora.experts: {error}") from None
    layers = tuple(section.layers) if section.layers is not None else None
    if layers is not None and (len(layers) != 2 or not 0 <= layers[0] < layers[1] <= num_blocks):
        raise RecipeError(
            f"lora.layers: {list(layers)} must be [first, last) with "
            f"0 <= first < last <= {num_blocks}"
        )
    try:
        return LoraSpec(
            rank=section.rank,
            alpha=section.alpha,
            dropout=section.dropout,
            components=tuple(section.components),
            ranks=dict(section.ranks),
            layers=layers,
            experts=experts,
        )
    except ValueError as error:
        raise RecipeError(str(error)) from None


def attach_lora(
    model: DeepseekV3ForCausalLM, section: LoraSection | None, seed: int = 0
) -> LoraSpec | None:
    """Freeze the model and add adapters per the section (their A matrices drawn with
    `seed`: the same in every run and on every rank); None leaves it fully trainable."""
    if section is None:
        return None
    spec = lora_spec(section, len(model.model.layers) + len(model.model.mtp))
    with torch.random.fork_rng(devices=[]):  # (expert parallel: each rank its experts' share)
        torch.manual_seed(seed)
        apply_lora(model, spec)
    return spec
