"""Run an SFT recipe under `accelerate launch` and prove, inside every process, which engine
trains it: `python tests/sft_engine_check.py ENGINE RECIPE [key=value ...]` with ENGINE one of
ddp, zero2, zero3, fsdp2. Each process prints one `engine check:` line after the first step."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from moetune.finetune.sft import MoESFTTrainer, run_sft
from moetune.recipes.loader import load_recipe
from moetune.recipes.run import leave_process_group, resolve


class EngineCheck(TrainerCallback):
    """Asserts at the end of the first optimizer step that `engine` holds the model."""

    def __init__(self, trainer: MoESFTTrainer, engine: str):
        self.trainer, self.engine, self.done = trainer, engine, False

    def on_step_end(self, args, state, control, **kwargs):
        if self.done:
            return
        self.done = True
        trainer = self.trainer
        assert dist.get_world_size() == 2 and trainer.accelerator.num_processes == 2
        kind = str(trainer.accelerator.distributed_type).split(".")[-1]
        held, full = getattr(self, self.engine)(trainer, kind)
        assert held < full or self.engine == "ddp", (
            f"rank {dist.get_rank()} holds all {full} elements"
        )
        print(
            f"engine check: {self.engine} rank {dist.get_rank()}: {kind}, holds {held:,} of "
            f"{full:,} elements\n",
            end="",
            flush=True,
        )

    @staticmethod
    def ddp(trainer, kind):
        """A replica on each rank, wrapped in DDP; after a step on different rows the ranks'
        weights are still equal (the gradients were all-reduced)."""
        assert kind == "MULTI_CPU", kind
        assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        mine = torch.cat([p.detach().flatten() for p in params])
        theirs = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(theirs, mine)
        assert torch.equal(*theirs)
        total = sum(p.numel() for p in trainer.model.parameters())
        return total, total

    @staticmethod
    def zero2(trainer, kind):
        assert kind == "DEEPSPEED" and trainer.model_wrapped.zero_optimization_stage() == 2
        zero = trainer.model_wrapped.optimizer
        held = sum(p.numel() for p in zero.single_partition_of_fp32_groups)
        moments = [s["exp_avg"].numel() for s in zero.optimizer.state.values()]
        assert sum(moments) == held, (moments, held)
        return held, sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    @staticmethod
    def zero3(trainer, kind):
        assert kind == "DEEPSPEED" and trainer.model_wrapped.zero_optimization_stage() == 3
        params = list(trainer.model.parameters())
        assert all(hasattr(p, "ds_id") for p in params)
        # outside a forward, parameters above DeepSpeed's persistence threshold are empty
        partitioned = [p for p in params if not p.ds_persist]
        assert partitioned and all(p.numel() == 0 for p in partitioned)
        return sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)

    @staticmethod
    def fsdp2(trainer, kind):
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor, Shard

        assert kind == "FSDP" and isinstance(trainer.model, FSDPModule)
        params = list(trainer.model.parameters())
        assert all(isinstance(p, DTensor) and p.placements == (Shard(0),) for p in params)
        return sum(p.to_local().numel() for p in params), sum(p.numel() for p in params)


if __name__ == "__main__":
    engine, recipe, *overrides = sys.argv[1:]
    run_sft(load_recipe(resolve(recipe), overrides), [lambda t: EngineCheck(t, engine)])
    leave_process_group()  # as `moetune run` does: gloo's threads can abort an exiting process
