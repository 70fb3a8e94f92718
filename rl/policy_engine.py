"""The GRPO policy's training engine under each launcher: what owns the policy's backward,
optimizer step, weight gathering and optimizer checkpoint (`policy_engine` picks one).

- `ReplicatedEngine`: AdamW on every rank's full replica, gradients summed over the
  data-parallel ranks (rl.data_parallel) before the step: one process, or
  `accelerate launch` with recipes/accelerate/ddp.yaml (or torchrun). With
  `model.expert_parallel` N the routed experts are sharded instead (moetune.model.
  expert_parallel): each rank holds and steps its own experts, whose gradients the experts'
  hooks have already reduced; the rest is replicated as without.
- `DeepSpeedZeroEngine`: a DeepSpeed ZeRO-2/3 engine around the same AdamW, picked when the
  launcher says DeepSpeed (`accelerate launch --config_file recipes/accelerate/zero3.yaml`):
  optimizer states and gradients (ZeRO-2) and the parameters too (ZeRO-3) are sharded over
  the ranks. The ZeRO stage and offload come from the accelerate config.
- `FSDP2Engine`: torch's FSDP2 (`fully_shard` per decoder layer) and AdamW on the shards,
  picked under recipes/accelerate/fsdp2.yaml (its reshard and offload settings apply).
The clipping norm is always the recipe's training.max_grad_norm.

The trainer asks the same of all three. Its micro-batch losses are normalised by the whole
batch's denominators (rl.algorithms.policy_loss), so `backward` gives gradients whose sum over
micro-batches and ranks is the whole batch's; `step` clips, updates and returns the gradient
norm (nan: the update was skipped); `holds_full_weights` says whether this rank holds every
weight whole (else weight syncs and saves gather one block at a time on every rank:
moetune.rl.engine_weights, moetune.model.gathering); `save`/`load` write and restore the
optimizer state (sharded: and the weights) inside a checkpoint folder.

Sharded, every rank must run the same number of forwards and backwards (parameters are
gathered and gradients reduced collectively), so `lockstep` tells the trainer to pad a rank
that has fewer micro-batches with idle passes. NaN/inf: the replicated and FSDP2 engines skip a
step whose gradient norm is not finite; DeepSpeed cannot take back a reduced gradient, so there
a micro-batch whose loss is NaN/inf on any rank is left out on every rank (the step is skipped
when none is left), and a non-finite norm after a step stops the run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from moetune.config.build import RecipeError
from moetune.config.schema import GRPOTrainingSection
from moetune.model.expert_parallel import (
    clip_grad_norm_,
    expert_parallel_size,
    local_expert_parameters,
)
from moetune.rl.data_parallel import DataParallel
from moetune.training.launcher import deepspeed_launch, fsdp_launch, zero_config


def new_adamw(model: torch.nn.Module, training: GRPOTrainingSection) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=training.learning_rate,
        weight_decay=training.weight_decay,
    )


def finite_norm_step(adamw: torch.optim.AdamW, clip: Callable[[], torch.Tensor]) -> float:
    """Clip (`clip()` clips the gradients and returns their norm) and step unless the norm
    is NaN/inf; the norm (nan when skipped)."""
    norm = clip()
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
    if math.isfinite(norm):
        adamw.step()
    adamw.zero_grad(set_to_none=True)
    return norm if math.isfinite(norm) else float("nan")


class ReplicatedEngine:
    """AdamW on this rank's full replica, gradients summed over data-parallel ranks; `policy`
    is the model itself. Expert parallel: the routed experts are this rank's shard, every
    forward is collective (`lockstep`), syncs and saves gather one layer at a time (no rank
    holds every expert: not `holds_full_weights`) and each rank saves its own optimizer
    state."""

    checkpoint_holds_weights = False  # `save` writes the optimizer state only

    def __init__(
        self, model: torch.nn.Module, training: GRPOTrainingSection, parallel: DataParallel
    ):
        self.model, self.policy, self.adamw = model, model, new_adamw(model, training)
        self.parameters = [p for group in self.adamw.param_groups for p in group["params"]]
        self.max_grad_norm, self.parallel = training.max_grad_norm, parallel
        own = {id(p) for p in local_expert_parameters(model)}
        self.own_experts = [p for p in self.parameters if id(p) in own]
        self.replicated = [p for p in self.parameters if id(p) not in own]
        self.expert_parallel = expert_parallel_size(model) > 1
        self.lockstep = self.expert_parallel
        self.holds_full_weights = not self.expert_parallel

    def prepare_reference(self, reference: torch.nn.Module) -> torch.nn.Module:
        return reference

    def backward(self, loss: torch.Tensor) -> bool:
        loss.backward()
        return True

    def step(self) -> float:
        """Sum, clip and step; a NaN/inf gradient norm skips the step. The norm (nan if skipped)."""
        self.parallel.sum_gradients(self.replicated)
        for p in self.own_experts:  # reduced by their hooks as DDP would: to the mean over
            if p.grad is not None:  # ranks; the trainer's losses add up over ranks
                p.grad.mul_(self.parallel.world_size)
        return finite_norm_step(self.adamw, lambda: clip_grad_norm_(self.model, self.max_grad_norm))

    def save(self, folder: Path) -> None:
        if self.expert_parallel or self.parallel.is_main:
            torch.save(self.adamw.state_dict(), self.optimizer_file(folder))

    def load(self, folder: Path) -> None:
        file = self.optimizer_file(folder)
        if not file.exists():
            raise RecipeError(
                f"training.resume_from_checkpoint: {folder} has no {file.name}: an "
                "expert-parallel run resumes with the world size and model.expert_parallel "
                "that saved it"
            )
        self.adamw.load_state_dict(torch.load(file, weights_only=False))

    def optimizer_file(self, folder: Path) -> Path:
        """optimizer.pt; expert parallel: each rank's (its experts' moments are its own)."""
        if not self.expert_parallel:
            return folder / "optimizer.pt"
        return folder / f"optimizer.rank{self.parallel.rank}-of-{self.parallel.world_size}.pt"


class DeepSpeedZeroEngine:
    """A DeepSpeed ZeRO engine around `adamw` (accumulation left to the trainer: DeepSpeed's
    `managed_gradient_accumulation: false`); `policy` is DeepSpeed's engine, which runs the
    forwards."""

    lockstep = True
    checkpoint_holds_weights = True  # DeepSpeed's checkpoint restores the trained weights too
    CHECKPOINT_TAG = "deepspeed"

    def __init__(
        self, model: torch.nn.Module, training: GRPOTrainingSection, parallel: DataParallel
    ):
        import deepspeed

        self.model, self.adamw, self.parallel = model, new_adamw(model, training), parallel
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.zero = zero_config()
        self.stage = int(self.zero.get("stage", 0))
        self.holds_full_weights = self.stage < 3  # ZeRO-3 partitions the parameters
        if self.stage not in (2, 3):
            raise RecipeError(
                f"accelerate config: DeepSpeed zero_stage {self.stage}: GRPO trains "
                "under ZeRO-2 or ZeRO-3 (recipes/accelerate/zero2.yaml, zero3.yaml)"
            )
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,
            "gradient_clipping": training.max_grad_norm,
            "zero_optimization": self.zero,
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": model.dtype == torch.bfloat16},
            "steps_per_print": 2**62,
        }
        self.policy, *_ = deepspeed.initialize(model=model, optimizer=self.adamw, config=config)
        self.backwards = 0  # since the last step

    def prepare_reference(self, reference: torch.nn.Module) -> torch.nn.Module:
        """Under ZeRO-3 the frozen reference is sharded too (an engine without optimizer)."""
        if self.stage < 3:
            return reference
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": self.zero,
            "bf16": {"enabled": reference.dtype == torch.bfloat16},
        }
        engine = deepspeed.initialize(model=reference, config=config)[0]
        engine.eval()  # (DeepSpeedEngine.eval returns None)
        return engine

    def backward(self, loss: torch.Tensor) -> bool:
        """Backward unless this or another rank's loss is NaN/inf (then no rank does)."""
        if self.parallel.sum(float(not torch.isfinite(loss.detach()))):
            return False
        # ZeRO averages gradients over ranks: scale up so that they add up instead.
        self.policy.backward(loss * self.parallel.world_size, scale_wrt_gas=False)
        self.backwards += 1
        return True

    def step(self) -> float:
        if not self.backwards:
            return float("nan")
        self.backwards = 0
        self.policy.step()
        norm = self.policy.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if not norm >= 0 or norm == float("inf"):  # DeepSpeed reports -1 for NaN/inf
            raise RuntimeError(
                f"GRPO stopped: DeepSpeed applied a non-finite gradient (norm "
                f"{norm}); resume from the last checkpoint"
            )
        return norm

    def save(self, folder: Path) -> None:
        """Every rank writes its shard of the optimizer state (DeepSpeed's own layout)."""
        self.policy.save_checkpoint(
            str(folder), tag=self.CHECKPOINT_TAG, save_latest=False, exclude_frozen_parameters=True
        )

    def load(self, folder: Path) -> None:
        self.policy.load_checkpoint(
            str(folder),
            tag=self.CHECKPOINT_TAG,
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )


class FSDP2Engine:
    """FSDP2: every decoder layer (and the rest, at the root) sharded with `fully_shard`, AdamW
    on the shards; `policy` is the sharded model. Checkpoints are
    torch.distributed.checkpoint folders (every rank writes its shards) holding the weights
    and the optimizer."""

    lockstep = True
    checkpoint_holds_weights = True
    holds_full_weights = False

    def __init__(
        self, model: torch.nn.Module, training: GRPOTrainingSection, parallel: DataParallel
    ):
        import torch.distributed as dist
        from accelerate.utils import FullyShardedDataParallelPlugin

        if (
            not dist.is_initialized()
        ):  # a one-process launch: fully_shard needs a group all the same
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        plugin = FullyShardedDataParallelPlugin()
        self.options = {"reshard_after_forward": plugin.reshard_after_forward}
        if plugin.cpu_offload:
            self.options["offload_policy"] = plugin.cpu_offload
        self.model = self.policy = self.shard(model)
        self.adamw = new_adamw(model, training)  # on the sharded parameters
        self.parameters = [p for group in self.adamw.param_groups for p in group["params"]]
        self.max_grad_norm, self.world_size = training.max_grad_norm, parallel.world_size

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import fully_shard

        for layer in [*model.model.layers, *model.model.mtp]:
            fully_shard(layer, **self.options)
        return fully_shard(model, **self.options)

    def prepare_reference(self, reference: torch.nn.Module) -> torch.nn.Module:
        return self.shard(reference)

    def backward(self, loss: torch.Tensor) -> bool:
        (loss * self.world_size).backward()  # FSDP averages gradients over ranks: sum them
        return True

    def step(self) -> float:
        return finite_norm_step(
            self.adamw, lambda: torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        )

    def save(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        weights, optimizer = get_state_dict(self.model, self.adamw)
        dcp.save({"model": weights, "optimizer": optimizer}, checkpoint_id=str(folder / "fsdp"))

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        weights, optimizer = get_state_dict(self.model, self.adamw)
        state = {"model": weights, "optimizer": optimizer}
        dcp.load(state, checkpoint_id=str(folder / "fsdp"))
        set_state_dict(
            self.model,
            self.adamw,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )


def policy_engine(model: torch.nn.Module, training: GRPOTrainingSection, parallel: DataParallel):
    """The engine the launcher asks for: DeepSpeed ZeRO or FSDP2 under their accelerate
    configs, else replicated."""
    if deepspeed_launch():
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return DeepSpeedZeroEngine(model, training, parallel)
    if fsdp_launch():
        return FSDP2Engine(model, training, parallel)
    return ReplicatedEngine(model, training, parallel)
