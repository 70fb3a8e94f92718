"""The GRPO policy's optimizer under each launcher.

- `LocalOptimizer`: AdamW on every rank's full replica, gradients summed over the
  data-parallel ranks (rl.data_parallel) before the step: one process, or
  `accelerate launch` with recipes/accelerate/ddp.yaml (or torchrun).
- `DeepSpeedOptimizer`: a DeepSpeed ZeRO-2/3 engine around the same AdamW, picked when the
  launcher says DeepSpeed (`accelerate launch --config_file recipes/accelerate/zero3.yaml`):
  optimizer states and gradients (ZeRO-2) and the parameters too (ZeRO-3) are sharded over
  the ranks. The ZeRO stage and offload come from the accelerate config; the clipping norm
  from the recipe's training.max_grad_norm.

The trainer asks the same of both. Its micro-batch losses are already this rank's share of
the global loss, so `backward` gives gradients whose sum over ranks is the whole batch's;
`step` clips, updates and returns the gradient norm (nan: the update was skipped);
`full_weights` makes the full parameters readable for a weight sync or a save; `save`/`load`
write and restore the optimizer state inside a checkpoint folder.

Under DeepSpeed every rank must run the same number of forwards and backwards (ZeRO gathers
parameters and reduces gradients collectively), so `lockstep` tells the trainer to pad a rank
that has fewer micro-batches with idle passes. NaN/inf: the local optimizer skips a step whose
gradient norm is not finite; DeepSpeed cannot take back a reduced gradient, so there a
micro-batch whose loss is NaN/inf on any rank is left out on every rank (the step is skipped
when none is left), and a non-finite norm after a step stops the run.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from moetune.recipes.schema import GRPOTrainingSection
from moetune.rl.data_parallel import DataParallel


def deepspeed_launch() -> bool:
    """True when the launcher (accelerate with a DeepSpeed config) asks for DeepSpeed."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def fsdp_launch() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


class LocalOptimizer:
    """AdamW with gradients summed over data-parallel ranks; `policy` is the model itself."""

    lockstep = False
    checkpoint_holds_weights = False  # `save` writes the optimizer state only

    def __init__(self, model: torch.nn.Module, adamw: torch.optim.AdamW,
                 training: GRPOTrainingSection, parallel: DataParallel):
        self.model, self.policy, self.adamw = model, model, adamw
        self.parameters = [p for group in adamw.param_groups for p in group["params"]]
        self.max_grad_norm, self.parallel = training.max_grad_norm, parallel

    def prepare_reference(self, reference: torch.nn.Module) -> torch.nn.Module:
        return reference

    def backward(self, loss: torch.Tensor) -> bool:
        loss.backward()
        return True

    def step(self) -> float:
        """Sum, clip and step; a NaN/inf gradient norm skips the step. The norm (nan if skipped)."""
        self.parallel.sum_gradients(self.parameters)
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        if torch.isfinite(norm):
            self.adamw.step()
        self.adamw.zero_grad(set_to_none=True)
        return float(norm) if torch.isfinite(norm) else float("nan")

    def full_weights(self):
        return nullcontext()

    def save(self, folder: Path) -> None:
        if self.parallel.is_main:
            torch.save(self.adamw.state_dict(), folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        self.adamw.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=False))


class DeepSpeedOptimizer:
    """A DeepSpeed ZeRO engine around `adamw` (accumulation left to the trainer: DeepSpeed's
    `managed_gradient_accumulation: false`); `policy` is the engine, which runs the forwards."""

    lockstep = True
    checkpoint_holds_weights = True  # DeepSpeed's checkpoint restores the trained weights too
    CHECKPOINT_TAG = "deepspeed"

    def __init__(self, model: torch.nn.Module, adamw: torch.optim.AdamW,
                 training: GRPOTrainingSection, parallel: DataParallel):
        import deepspeed

        self.model, self.adamw, self.parallel = model, adamw, parallel
        self.zero = zero_config()
        self.stage = int(self.zero.get("stage", 0))
        if self.stage not in (2, 3):
            raise ValueError(f"DeepSpeed ZeRO stage {self.stage}: GRPO trains under ZeRO-2 or "
                             "ZeRO-3 (recipes/accelerate/zero2.yaml, zero3.yaml), or DDP")
        config = {
            "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False, "gradient_clipping": training.max_grad_norm,
            "zero_optimization": self.zero, "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": model.dtype == torch.bfloat16}, "steps_per_print": 2**62,
        }
        self.policy, *_ = deepspeed.initialize(model=model, optimizer=adamw, config=config)
        self.world_size, self.backwards = parallel.world_size, 0

    def prepare_reference(self, reference: torch.nn.Module) -> torch.nn.Module:
        """Under ZeRO-3 the frozen reference is sharded too (an engine without optimizer)."""
        if self.stage < 3:
            return reference
        import deepspeed

        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": self.zero,
                  "bf16": {"enabled": reference.dtype == torch.bfloat16}}
        return deepspeed.initialize(model=reference, config=config)[0].eval()

    def backward(self, loss: torch.Tensor) -> bool:
        """Backward unless this or another rank's loss is NaN/inf (then no rank does)."""
        if self.parallel.sum(float(not torch.isfinite(loss.detach()))):
            return False
        # ZeRO averages gradients over ranks: scale up so that they add up instead.
        self.policy.backward(loss * self.world_size, scale_wrt_gas=False)
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
            raise RuntimeError(f"GRPO stopped: DeepSpeed applied a non-finite gradient (norm "
                               f"{norm}); resume from the last checkpoint")
        return norm

    @contextmanager
    def full_weights(self):
        """ZeRO-3: gather the sharded parameters on every rank for the block."""
        if self.stage < 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
            yield

    def save(self, folder: Path) -> None:
        """Every rank writes its shard of the optimizer state (DeepSpeed's own layout)."""
        self.policy.save_checkpoint(str(folder), tag=self.CHECKPOINT_TAG, save_latest=False,
                                    exclude_frozen_parameters=True)

    def load(self, folder: Path) -> None:
        self.policy.load_checkpoint(str(folder), tag=self.CHECKPOINT_TAG, load_module_strict=False,
                                    load_optimizer_states=True, load_lr_scheduler_states=False)


def zero_config() -> dict:
    """The `zero_optimization` section of the launcher's DeepSpeed config (accelerate's
    plugin reads its config file or environment), its "auto" values left to DeepSpeed."""
    from accelerate.utils import DeepSpeedPlugin

    def concrete(section: dict) -> dict:
        return {key: concrete(value) if isinstance(value, dict) else value
                for key, value in section.items() if value != "auto"}

    return concrete(DeepSpeedPlugin().deepspeed_config["zero_optimization"])


def policy_optimizer(model: torch.nn.Module, adamw: torch.optim.AdamW,
                     training: GRPOTrainingSection, parallel: DataParallel):
    """The optimizer the launcher asks for: DeepSpeed under a DeepSpeed config, else local."""
    if deepspeed_launch():
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        return DeepSpeedOptimizer(model, adamw, training, parallel)
    return LocalOptimizer(model, adamw, training, parallel)
