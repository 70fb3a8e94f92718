"""The engine a run trains under, as `accelerate launch` asks for it.

accelerate reads its config file into environment variables for each process; the trainer's
`Accelerator` turns them into DDP, DeepSpeed ZeRO or FSDP. Two things need help here:
  - `check_launch` refuses, before any work starts, a config that cannot run (FSDP1,
    DeepSpeed NVMe offload without a path, expert parallelism inside DeepSpeed or FSDP),
    naming the accelerate config key;
  - on a machine without GPUs accelerate runs gloo data parallelism (MULTI_CPU) and never
    engages FSDP, although torch's `fully_shard` runs on CPU: `engage_fsdp` switches the
    accelerator's state to FSDP so that `accelerator.prepare` shards the model as on GPUs.
"""

from __future__ import annotations

import os

from moetune.config.build import RecipeError


def launch_env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).lower()


def deepspeed_launch() -> bool:
    """True when the launcher (accelerate with a DeepSpeed config) asks for DeepSpeed."""
    return launch_env("ACCELERATE_USE_DEEPSPEED", "false") == "true"


def fsdp_launch() -> bool:
    """True when the launcher (accelerate with an FSDP config) asks for FSDP."""
    return launch_env("ACCELERATE_USE_FSDP", "false") == "true"


def check_launch(expert_parallel: int) -> None:
    """Refuse a launch config that moetune cannot train under, naming its key."""
    if fsdp_launch() and launch_env("FSDP_VERSION", "1") != "2":
        raise RecipeError(
            f"accelerate config: fsdp_config.fsdp_version: {launch_env('FSDP_VERSION', '1')}"
            ": FSDP1 is not supported; use fsdp_version: 2 (recipes/accelerate/fsdp2.yaml)"
        )
    if deepspeed_launch():
        for what in ("optimizer", "param"):
            device = launch_env(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what.upper()}_DEVICE", "none")
            path = launch_env(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what.upper()}_NVME_PATH", "none")
            if device == "nvme" and path in ("", "none"):
                raise RecipeError(
                    f"accelerate config: deepspeed_config.offload_{what}_device: nvme needs "
                    f"deepspeed_config.offload_{what}_nvme_path (a folder on an NVMe drive)"
                )
    if expert_parallel > 1 and (deepspeed_launch() or fsdp_launch()):
        raise RecipeError(
            "model.expert_parallel: sharded experts train under DDP "
            "(recipes/accelerate/ddp.yaml or torchrun), not DeepSpeed or FSDP"
        )


def engage_fsdp(accelerator) -> bool:
    """Under an FSDP launch on CPU processes (gloo), make `accelerator` an FSDP2 one, as it is
    on GPUs; True when it is FSDP now. accelerate's state only takes FSDP from its multi-GPU
    branch, so its MULTI_CPU state is switched after the fact (the process group is gloo's)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if state.distributed_type == DistributedType.FSDP:
        return True
    if not fsdp_launch() or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    assert AcceleratorState._shared_state["distributed_type"] == DistributedType.FSDP
    return True


def zero_config() -> dict:
    """The `zero_optimization` section of the launcher's DeepSpeed config (accelerate's
    plugin reads its config file or environment), its "auto" values left to DeepSpeed."""
    from accelerate.utils import DeepSpeedPlugin

    def concrete(section: dict) -> dict:
        return {
            key: concrete(value) if isinstance(value, dict) else value
            for key, value in section.items()
            if value != "auto"
        }

    return concrete(DeepSpeedPlugin().deepspeed_config["zero_optimization"])


def zero3_init_config() -> dict | None:
    """Under a DeepSpeed ZeRO-3 launch whose config keeps `zero3_init_flag` on (accelerate's
    default for stage 3), the DeepSpeed config to build the model under `deepspeed.zero.Init`
    with; else None."""
    if not deepspeed_launch():
        return None
    from accelerate.utils import DeepSpeedPlugin

    if not DeepSpeedPlugin().zero3_init_flag:
        return None
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero_config(),
    }
