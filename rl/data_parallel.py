"""Data-parallel GRPO: every rank holds the policy, its own rollout engines and its own share
of the prompts; gradients are summed across ranks before each optimizer step. With
`rollout.remote`, rank r of R samples from (and syncs weights to) remote[r::R] only.

Launched with `accelerate launch [--num_processes N] -m moetune.recipes run grpo/...` (or any
launcher that sets RANK / WORLD_SIZE); alone, a single rank of 1. Loss denominators (tokens
for `dapo`, sequences otherwise: rl.algorithms.policy_loss) are global, so the summed gradient
equals the gradient of one process holding the whole batch, and the replicas stay identical
step after step. Under DeepSpeed or FSDP2 (rl.policy_engine) the sharded engine reduces the
gradients instead; the prompt shares, metrics and checkpointed positions are the same.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

SUMMED = {"groups_used"}


@dataclass(frozen=True)
class DataParallel:
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_environment(cls) -> DataParallel:
        """Join the launcher's process group (gloo on CPU, NCCL on GPU) when WORLD_SIZE > 1."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def device(self) -> torch.device:
        """Where collective tensors live: NCCL reduces CUDA tensors only."""
        if self.world_size > 1 and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share: every world_size-th item from its rank."""
        return items[self.rank :: self.world_size]

    def sum(self, value: float) -> float:
        return self.reduce(value, dist.ReduceOp.SUM)

    def max(self, value: float) -> float:
        return self.reduce(value, dist.ReduceOp.MAX)

    def reduce(self, value: float, op) -> float:
        if self.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total, op=op)
        return float(total)

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Sum .grad over ranks in one flat buffer. A parameter with a gradient on some rank
        (an expert some token reached) gets the sum, counting zeros where it had none; one
        with a gradient on no rank keeps None, as in a single process (AdamW skips it)."""
        if self.world_size == 1:
            return
        has_grad = torch.tensor([float(p.grad is not None) for p in parameters], device=self.device)
        dist.all_reduce(has_grad)
        live = [p for p, count in zip(parameters, has_grad.tolist()) if count]
        if not live:
            return
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in live]
        )
        dist.all_reduce(flat)
        offset = 0
        for p in live:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def gather(self, value) -> list:
        """Every rank's `value` (any picklable object), in rank order."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def gather_to_main(self, value) -> list | None:
        """Every rank's `value` (any picklable object), in rank order, on the main process
        only (None elsewhere): per-sample logs need not reach every rank."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics of all ranks: `*_max` the max, counts and throughputs summed, the rest
        averaged."""
        every = self.gather(metrics)
        if self.world_size == 1:
            return metrics
        merged = {}
        for name in {k for m in every for k in m}:
            values = [m[name] for m in every if name in m]
            merged[name] = (
                max(values)
                if name.endswith("_max")
                else sum(values)
                if name in SUMMED or name.endswith("_per_second")
                else sum(values) / len(values)
            )
        return merged

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
