"""Whole tensors of a model sharded over ranks, one block of modules at a time.

Three shardings are known: DeepSpeed ZeRO-3 (parameters partitioned, `ds_id` / `ds_shape`),
torch FSDP2 (parameters are DTensor shards) and moetune's expert parallelism (each MoE
layer's routed experts split over the ranks). `gathered(model, modules)` makes the direct
tensors of `modules` whole on every rank for the block, and `whole` reads one of them, so a
save can walk a model layer by layer without any rank holding all of it. Collective: every
rank makes the same calls in the same order. Plain tensors pass through unchanged.
"""

from __future__ import annotations

import ctypes
import functools
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from moetune.model.expert_parallel import (
    full_expert_adapters,
    full_experts,
    sharded_layers,
    stacked_tensors,
)
from moetune.model.moe import MoE


def full_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """The whole shape of every state_dict tensor, read without gathering anything."""
    shapes = {  # ZeRO-3 partitions keep the whole shape in ds_shape; DTensors in their shape
        name: torch.Size(getattr(tensor, "ds_shape", tensor.shape))
        for name, tensor in model.state_dict(keep_vars=True).items()
    }
    sharded = set(sharded_layers(model))
    for prefix, moe in ((n, m) for n, m in model.named_modules() if m in sharded):
        for name, tensor in stacked_tensors(moe.experts):
            shapes[f"{prefix}.experts.{name}"] = torch.Size(
                (moe.expert_parallel.total, *tensor.shape[1:])
            )
    return shapes


@contextmanager
def gathered(model: nn.Module, modules: list[nn.Module], experts: bool = True):
    """Within the block, the parameters and buffers that `modules` hold themselves (not their
    children's) are whole on every rank: ZeRO-3 parameters gathered, expert-parallel MoE
    layers' experts gathered (read DTensors with `whole`). `experts=False`: of those MoE
    layers, the routed-expert adapters alone (read-only: the layers must not compute)."""
    own = [p for m in modules for p in m.parameters(recurse=False)]
    with ExitStack() as stack:
        partitioned = [
            p for p in own if hasattr(p, "ds_id") and p.ds_status.name == "NOT_AVAILABLE"
        ]
        if partitioned:  # (persistent or already gathered ones are whole)
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None))
        moe_layers = [m for m in modules if isinstance(m, MoE) and m.expert_parallel is not None]
        if moe_layers:
            whole_layers = full_experts(model, moe_layers) if experts else None
            stack.enter_context(whole_layers or full_expert_adapters(moe_layers))
        yield
    sharded = partitioned or moe_layers or any(hasattr(p, "full_tensor") for p in own)
    block = own or [p for m in moe_layers for p in m.parameters()]
    if sharded and any(p.device.type == "cpu" for p in block):
        return_freed_host_memory()


def return_freed_host_memory() -> None:
    """Give the pages that glibc's heap holds free back to the OS (`malloc_trim(0)`; a no-op
    where the C library has none). Each gathered block of CPU shards allocates and frees a
    layer's worth; the heap keeps such frees fragmented, and without this a walk over the
    model (a weight sync, a save) grows the RSS with the model's depth."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl; Windows: TypeError)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's whole value inside `gathered`: an FSDP2 DTensor is all-gathered."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.data
