"""Building a model that no rank holds whole: every parameter keeps only this rank's share
from the moment its module is built, yet takes the values an unsharded build would give.

Two builds are known, one per sharding engine:
  - DeepSpeed ZeRO-3: `deepspeed.zero.Init` partitions each module's parameters as soon as
    its `__init__` returns; weight init gathers one module at a time (`whole_for_init`).
  - FSDP2: `ChunkedBuild` keeps each rank's dim-0 chunk (torch.chunk over the ranks, as
    FSDP2's Shard(0)) of every parameter and leaves the parameter itself on the meta
    device; once the model is `fully_shard`-ed, `fill_shards` allocates the shards and copies
    the chunks in.
Either way a module is whole on a rank only while its own weights are drawn, so the random
draws, their order and hence the weights are those of an unsharded build on the same seed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Self

import torch
from torch import nn

_active_build: ChunkedBuild | None = None  # the ChunkedBuild inside whose block a model is built


class ChunkedBuild:
    """Within the block, every module registered into a parent (that is, fully built) hands
    its parameters' values over: this rank's chunk of each [N, ...] parameter is kept,
    the parameter moves to the meta device. `shares(model)` then names the chunks."""

    def __init__(self, rank: int, world: int):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of {world} ranks")
        self.rank, self.world = rank, world
        self.chunks: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}  # id(param) -> chunk

    def __enter__(self) -> Self:
        global _active_build
        if _active_build is not None:
            raise RuntimeError("ChunkedBuild blocks do not nest")
        _active_build = self
        self.hook = nn.modules.module.register_module_module_registration_hook(
            lambda parent, name, child: self.keep_chunks(child)
        )
        return self

    def __exit__(self, *exc) -> None:
        global _active_build
        _active_build = None
        self.hook.remove()

    def keep_chunks(self, module: nn.Module, recurse: bool = True) -> None:
        """Keep this rank's chunk of each of `module`'s materialised parameters, which are
        replaced by parameters on the meta device."""
        for owner in module.modules() if recurse else (module,):
            for name, param in owner.named_parameters(recurse=False):
                if param.device.type != "meta":
                    chunk = rank_chunk(param.data, self.rank, self.world).clone()
                    meta = replace_parameter(owner, name, param.to("meta"))
                    self.chunks[id(meta)] = (meta, chunk)

    def shares(self, model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Parameter name -> this rank's chunk in `dtype`, for every parameter of the built
        `model` (its own direct parameters are handed over here)."""
        self.keep_chunks(model)
        return {
            name: self.chunks[id(param)][1].to(dtype) for name, param in model.named_parameters()
        }


def rank_chunk(tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank `rank`'s dim-0 chunk of `tensor` as FSDP2's Shard(0) cuts it (torch.chunk; ranks
    past the last chunk get an empty one)."""
    chunks = torch.chunk(tensor, world, dim=0)
    return chunks[rank] if rank < len(chunks) else tensor[:0]


def replace_parameter(module: nn.Module, name: str, tensor: torch.Tensor) -> nn.Parameter:
    """Put a parameter holding `tensor` in the place of `module`'s parameter `name`."""
    param = nn.Parameter(tensor, requires_grad=module._parameters[name].requires_grad)
    module._parameters[name] = param
    return param


@contextmanager
def whole_for_init(module: nn.Module):
    """Within the block, `module`'s own parameters are whole and writable, for weight init:
    ZeRO-3 ones gathered (rank 0's values kept), ones a ChunkedBuild holds materialised (the
    rank's chunk kept at exit). Plain parameters pass unchanged."""
    partitioned = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0):
            yield
        return
    build = _active_build
    chunked = [
        name
        for name, p in module.named_parameters(recurse=False)
        if build is not None and id(p) in build.chunks
    ]
    for name in chunked:
        meta = module._parameters[name]
        del build.chunks[id(meta)]
        # NaN: a parameter that weight init leaves undrawn shows (its build chunk is gone)
        replace_parameter(module, name, torch.full(meta.shape, torch.nan, dtype=meta.dtype))
    yield
    if chunked:
        build.keep_chunks(module, recurse=False)


def zero3_build(config: dict, dtype: torch.dtype):
    """`deepspeed.zero.Init` under a ZeRO-3 `config` (a DeepSpeed config dict): parameters
    created in `dtype` and partitioned module by module."""
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=config, dtype=dtype)


@torch.no_grad()
def fill_shards(model: nn.Module, shares: dict[str, torch.Tensor]) -> None:
    """Give a `fully_shard`-ed model built by ChunkedBuild its values: allocate every
    parameter's local shard (on the buffers' device) and copy this rank's chunk in. The
    buffers keep their values."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    device = next(iter(buffers.values())).device if buffers else torch.device("cpu")
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        if not hasattr(param, "to_local"):
            raise ValueError(
                f"{name}: not sharded by fully_shard; a ChunkedBuild model holds only "
                "its chunk of each parameter"
            )
        local = param.to_local()
        if local.shape != shares[name].shape:
            raise ValueError(
                f"{name}: local shard {tuple(local.shape)} but the build kept a chunk of "
                f"{tuple(shares[name].shape)} (FSDP2 must shard dim 0 over all ranks)"
            )
        local.copy_(shares[name])
    for name, buffer in model.named_buffers():
        buffer.copy_(buffers[name])
