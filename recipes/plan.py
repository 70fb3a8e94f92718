"""`moetune plan RECIPE [key.sub=value ...] [--devices N] [--device-memory-gb G] [--json]`.

Builds the recipe's model on the meta device (no weights are read, nothing is allocated)
and prints its parameter counts as `moetune info` reports them, the trainable ones, the
memory each training device holds (weights in bf16 or FP8, gradients and optimizer states
at the recipe's ZeRO stage, activations with or without gradient checkpointing, logits)
and the verdict: fits, or how many devices would. A grpo recipe adds its rollout engines,
which run on devices of their own: weights per tensor-parallel rank plus the latent KV
cache of the sequences they sample at once, and the bytes each step's weight sync sends
to each engine. `moetune run RECIPE --dry-run` prints the same.

The recipe's `plan` section gives the device count, ZeRO stage and device memory;
--devices and --device-memory-gb override them (any key too: plan.zero_stage=3). Stage 0
is plain PyTorch (gradients and AdamW states in the parameters' dtype); stages 1-3 are
DeepSpeed ZeRO (float32 gradients, AdamW states and master weights, sharded from stage
1, 2 and 3 on; FSDP2 shards as stage 3). Buffers, such as a frozen FP8 base, are never
sharded; `model.expert_parallel: N` splits the routed experts over N devices. Each device
keeps 10% free (CUDA context, fragmentation, transients). --json prints bytes.

    moetune plan sft/deepseek_v2_lite_lora.yaml
    moetune plan sft/deepseek_v3_fp8_lora.yaml model.expert_parallel=32 --json
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

import torch

from moetune.config.build import RecipeError
from moetune.model.info import human
from moetune.recipes.loader import load_recipe
from moetune.training.memory_plan import (
    HEADROOM,
    MemoryPlan,
    RolloutPlan,
    format_parts,
    plan_memory,
    plan_rollout,
    usable_bytes,
)


@dataclass
class ParameterCounts:
    """Parameters of the recipe's model as `moetune info` counts them, and those it trains."""

    total: int  # without MTP, as `moetune info`
    active: int  # per token, without MTP
    mtp: int  # MTP modules as stored on disk
    trainable: int
    trainable_percent: float  # of the base model's parameters as held (MTP shares embedding, head)


@dataclass
class RolloutSizing:
    """Memory per device of one GRPO rollout engine, and the tensor parallelism it needs."""

    backend: str
    max_model_len: int
    device_share: float  # of each device an engine may take (vLLM's gpu_memory_utilization)
    own_devices: bool  # the engines run on devices of their own (else beside the trainer)
    memory: RolloutPlan
    usable: int  # bytes per device
    tensor_parallel_needed: int | None  # the smallest that fits; None: none does
    sync_bytes: int  # what one step's weight sync sends to each engine
    lora: bool
    adapter_only: bool  # the sync sends the LoRA adapter alone (the engines apply it)
    merged_sync_bytes: int  # the same sync as merged weights

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.usable


@dataclass
class RecipePlan:
    """`moetune plan`'s answer: memory per training device and the devices a recipe needs."""

    recipe: str  # sft | grpo
    model: str
    parameters: ParameterCounts
    micro_batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    device_memory_gb: float
    usable: int  # bytes per device
    memory: MemoryPlan
    devices_needed: int | None
    no_fit: str | None  # why no device count fits
    rollout: RolloutSizing | None

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.usable

    def as_dict(self) -> dict:
        memory = self.memory
        plan = {
            "recipe": self.recipe,
            "model": self.model,
            "parameters": asdict(self.parameters),
            "trainer": {
                "devices": memory.devices,
                "zero_stage": memory.zero_stage,
                "expert_parallel": memory.expert_parallel,
                "micro_batch_size": self.micro_batch_size,
                "seq_len": self.seq_len,
                "gradient_checkpointing": self.gradient_checkpointing,
                "device_memory_gb": self.device_memory_gb,
                "headroom": HEADROOM,
                "usable_bytes": self.usable,
                "bytes_per_device": memory.as_dict(),
                "fits": self.fits,
                "devices_needed": self.devices_needed,
                "no_fit": self.no_fit,
            },
            "rollout": None,
        }
        if self.rollout is not None:
            sizing, rollout = self.rollout, self.rollout.memory
            plan["rollout"] = {
                "backend": sizing.backend,
                "workers": rollout.workers,
                "tensor_parallel_size": rollout.tensor_parallel_size,
                "devices": rollout.devices,
                "sequences_per_worker": rollout.sequences,
                "max_model_len": sizing.max_model_len,
                "device_share": sizing.device_share,
                "usable_bytes": sizing.usable,
                "bytes_per_device": rollout.as_dict(),
                "fits": sizing.fits,
                "tensor_parallel_needed": sizing.tensor_parallel_needed,
                "sync_bytes_per_step": sizing.sync_bytes,
                "sync_adapter_only": sizing.adapter_only,
                "merged_sync_bytes_per_step": sizing.merged_sync_bytes,
            }
        return plan


def plan_recipe(recipe) -> RecipePlan:
    """The memory plan of an sft or grpo recipe (see the module docstring)."""
    from moetune.model import DeepseekV3ForCausalLM
    from moetune.model.info import count_parameters
    from moetune.training.model_loading import attach_lora, resolve_config

    if recipe.recipe not in ("sft", "grpo"):
        raise RecipeError(
            f"recipe: {recipe.recipe}: moetune plan sizes training recipes (sft, grpo)"
        )
    section, training, plan = recipe.model, recipe.training, recipe.plan
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(resolve_config(section)).to(getattr(torch, section.dtype))
        report = count_parameters(model)
        held = sum(p.numel() for p in model.parameters())
        if section.fp8:
            from moetune.model.fp8 import to_fp8_training, to_frozen_fp8

            (to_frozen_fp8 if section.fp8 == "frozen" else to_fp8_training)(model)
        spec = attach_lora(model, recipe.lora)
    if recipe.recipe == "sft":
        batch, seq_len = training.per_device_train_batch_size, recipe.data.max_length
        checkpointing, reference = training.gradient_checkpointing, False
    else:  # grpo: micro-batches of sampled sequences; a full fine-tune keeps a KL reference
        batch, seq_len = training.micro_batch_size, recipe.rollout.max_model_len
        checkpointing, reference = False, recipe.algorithm.beta > 0 and recipe.lora is None
    try:
        memory = plan_memory(
            model,
            devices=plan.devices,
            zero_stage=plan.zero_stage,
            expert_parallel=section.expert_parallel,
            micro_batch_size=batch,
            seq_len=seq_len,
            gradient_checkpointing=checkpointing,
            optimizer="sgd" if recipe.recipe == "sft" and training.optim == "sgd" else "adamw",
            master_weights_fp32=plan.zero_stage >= 1,
            train_mtp=recipe.recipe == "sft" or bool(recipe.algorithm.mtp_weight),
            reference_copy=reference,
        )
    except ValueError as error:
        raise RecipeError(f"plan: {error}") from None
    usable = usable_bytes(plan.device_memory_gb)
    needed, no_fit = None, None
    try:
        needed = memory.devices_needed(usable)
    except ValueError as error:
        no_fit = str(error)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    counts = ParameterCounts(
        total=report.total_params,
        active=report.active_params,
        mtp=report.mtp_params,
        trainable=trainable,
        trainable_percent=100 * trainable / held,
    )
    rollout = None
    if recipe.recipe == "grpo":
        from moetune.rl.grpo import freeze_untrained

        freeze_untrained(model, recipe.algorithm)  # what the syncs send follows
        rollout = size_rollout(recipe, model, spec)
    return RecipePlan(
        recipe=recipe.recipe,
        model=section.path or section.config,
        parameters=counts,
        micro_batch_size=batch,
        seq_len=seq_len,
        gradient_checkpointing=checkpointing,
        device_memory_gb=plan.device_memory_gb,
        usable=usable,
        memory=memory,
        devices_needed=needed,
        no_fit=no_fit,
        rollout=rollout,
    )


def size_rollout(recipe, model, spec) -> RolloutSizing:
    """GRPO's engines: vLLM samples every prompt of its pool's processes at once (split over
    the workers); the native engine one prompt's group at a time, on one device. On devices
    of their own (`plan.rollout_own_devices`) vLLM takes 0.9 of each, else half of the
    trainer's. Each step's weight sync: the trainable LoRA tensors to engines that apply the
    adapter themselves (`adapter_only_sync`), else every tensor a step changes (LoRA merged)
    in the engines' dtype."""
    from moetune.rl.engine_weights import sync_bytes
    from moetune.rl.rollout import GPU_MEMORY_UTILIZATION
    from moetune.rl.rollout_server import SERVED_GPU_MEMORY_UTILIZATION

    rollout, training = recipe.rollout, recipe.training
    vllm = rollout.backend == "vllm"
    group = recipe.algorithm.group_size
    pools = max(recipe.plan.devices // rollout.processes_per_pool, 1)
    per_pool = math.ceil(training.prompts_per_step / pools)  # prompts a pool samples a step
    sequences = math.ceil(per_pool / rollout.workers) * group if vllm else group
    memory = plan_rollout(
        model,
        backend=rollout.backend,
        workers=rollout.workers,
        tensor_parallel_size=rollout.tensor_parallel_size,
        dtype_bytes=getattr(torch, rollout.dtype).itemsize,
        sequences=sequences,
        max_model_len=rollout.max_model_len,
        speculative=rollout.speculative_tokens > 0,
    )
    if recipe.plan.rollout_own_devices:
        share = SERVED_GPU_MEMORY_UTILIZATION if vllm else 1.0
    else:
        share = GPU_MEMORY_UTILIZATION if vllm else 1.0
    usable = usable_bytes(recipe.plan.device_memory_gb, share)
    if vllm:
        needed = memory.tensor_parallel_needed(usable, model.config.num_attention_heads)
    else:
        needed = 1 if memory.total <= usable else None
    adapter_only = adapter_only_sync(recipe.rollout, spec, model.config)
    mtp, dtype = rollout.speculative_tokens > 0, getattr(torch, rollout.dtype)
    merged = sync_bytes(model, adapter=False, mtp=mtp, dtype=dtype)
    return RolloutSizing(
        backend=rollout.backend,
        max_model_len=rollout.max_model_len,
        device_share=share,
        own_devices=recipe.plan.rollout_own_devices,
        memory=memory,
        usable=usable,
        tensor_parallel_needed=needed,
        sync_bytes=sync_bytes(model, adapter=True, mtp=mtp, dtype=dtype)
        if adapter_only
        else merged,
        lora=recipe.lora is not None,
        adapter_only=adapter_only,
        merged_sync_bytes=merged,
    )


def adapter_only_sync(rollout, spec, config) -> bool:
    """Whether the engines of a run on GPUs get the LoRA adapter (LoraSpec `spec`; None: no
    LoRA) alone, per rollout.lora_sync (moetune.rl.vllm_lora)."""
    from moetune.rl import vllm_lora

    if spec is None:
        return False
    refusal = None
    if rollout.backend == "vllm":
        refusal = vllm_lora.refusal(
            spec, config, cuda=True, speculative_tokens=rollout.speculative_tokens
        )
    try:
        return vllm_lora.adapter_sync(rollout.lora_sync, [refusal])
    except ValueError as error:
        raise RecipeError(str(error)) from None


def count(n: int) -> str:
    return f"{n:,} ({human(n)})"


def format_plan(plan: RecipePlan, name: str) -> str:
    memory, counts = plan.memory, plan.parameters
    parallel = f", expert parallel {memory.expert_parallel}" if memory.expert_parallel > 1 else ""
    checkpointing = "on" if plan.gradient_checkpointing else "off"
    needed = str(plan.devices_needed) if plan.no_fit is None else f"none: {plan.no_fit}"
    lines = [
        f"{name}: recipe {plan.recipe}, model {plan.model}",
        (
            f"parameters: {count(counts.total)} without MTP  active per token: "
            f"{count(counts.active)}  MTP: {count(counts.mtp)}  trainable: "
            f"{count(counts.trainable)} ({counts.trainable_percent:.3f}%)"
        ),
        (
            f"trainer memory per device ({memory.devices} devices, ZeRO-{memory.zero_stage}"
            f"{parallel}, micro-batch {plan.micro_batch_size} x {plan.seq_len} tokens, "
            f"gradient checkpointing {checkpointing}):"
        ),
        memory.table(),
        (
            f"{'fits' if plan.fits else 'does NOT fit'} in {plan.device_memory_gb:g} GB per device "
            f"({plan.usable / 1e9:,.1f} GB usable with {HEADROOM:.0%} headroom); devices needed "
            f"at ZeRO-{memory.zero_stage}: {needed}"
        ),
    ]
    if plan.rollout is not None:
        sizing, rollout = plan.rollout, plan.rollout.memory
        tp = sizing.tensor_parallel_needed
        where = "of their own" if sizing.own_devices else "beside the trainer's"
        needed = (
            f"{rollout.workers * tp} (tensor_parallel_size {tp})"
            if tp
            else "none: shorten rollout.max_model_len or sample fewer sequences at once"
        )
        lines += [
            (
                f"rollout memory per device ({rollout.workers} {sizing.backend} engine(s) per "
                f"pool x tensor_parallel_size {rollout.tensor_parallel_size} = "
                f"{rollout.devices} device(s) {where}; {rollout.sequences} sequences x "
                f"{sizing.max_model_len} tokens cached per engine):"
            ),
            format_parts(rollout.as_dict()),
            (
                f"{'fits' if sizing.fits else 'does NOT fit'} in {sizing.device_share:g} x "
                f"{plan.device_memory_gb:g} GB per device ({sizing.usable / 1e9:,.1f} GB usable); "
                f"rollout devices needed: {needed}"
            ),
            f"weight sync per step and engine: {sync_line(sizing)}",
        ]
    return "\n".join(lines)


def sync_line(sizing: RolloutSizing) -> str:
    megabytes = f"{sizing.sync_bytes / 1e6:,.1f} MB"
    if sizing.adapter_only:
        ratio = sizing.merged_sync_bytes / max(sizing.sync_bytes, 1)
        return (
            f"{megabytes}, the LoRA adapter alone (merged weights would be "
            f"{sizing.merged_sync_bytes / 1e6:,.1f} MB, {ratio:,.0f}x)"
        )
    merged = " with the LoRA adapter merged" if sizing.lora else ""
    return f"{megabytes} of the weights a step changes{merged}"


def run(args) -> int:
    from moetune.recipes.run import check_files, resolve

    overrides = list(args.overrides)
    if args.devices is not None:
        overrides.append(f"plan.devices={args.devices}")
    if args.device_memory_gb is not None:
        overrides.append(f"plan.device_memory_gb={args.device_memory_gb}")
    recipe = load_recipe(resolve(args.recipe), overrides)
    check_files(recipe, dry_run=True)
    plan = plan_recipe(recipe)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else format_plan(plan, args.recipe))
    return 0


def add_subcommand(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="memory per device and devices needed for a recipe (sft, grpo)",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="a recipe YAML file, or a shipped recipe name")
    parser.add_argument("overrides", nargs="*", help="key.sub=value (values parsed as YAML)")
    parser.add_argument("--devices", type=int, help="training devices (overrides plan.devices)")
    parser.add_argument(
        "--device-memory-gb",
        type=float,
        help="memory of one device in GB (overrides plan.device_memory_gb)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=run)
