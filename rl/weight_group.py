"""Weights over torch.distributed from a trainer to one remote rollout engine.

The two form a process group of their own (trainer rank 0, engine rank 1), built directly on
a TCPStore that the trainer opens: never the default group, which the trainer may hold under
a launcher (accelerate, DeepSpeed) and vLLM holds for its own workers. gloo moves CPU
tensors, NCCL GPU tensors. Names, shapes and dtypes travel beside (`tensor_specs`, over the
request connection); the data goes as flat byte buckets of at most BUCKET_BYTES, packed in
the same order on both sides (`layout`).
"""

from __future__ import annotations

import math
from datetime import timedelta

import torch
import torch.distributed as dist

BUCKET_BYTES = 256 * 2**20
ALIGN = 64  # every tensor starts at a multiple of this many bytes: any dtype can view its slice

TensorSpec = tuple[str, tuple[int, ...], str]  # HF name, shape, dtype name ("bfloat16")


def open_store(timeout_s: float) -> dist.TCPStore:
    """The trainer's store, on a free port (`.port`) of every interface."""
    return dist.TCPStore(
        "0.0.0.0", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
    )


def connect_store(host: str, port: int, timeout_s: float) -> dist.TCPStore:
    """The engine's client of the trainer's store."""
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))


def join(
    store: dist.Store, prefix: str, rank: int, backend: str, timeout_s: float, local_host: str
):
    """This process's side of the two-rank group under `prefix` (fresh per connection).
    gloo binds to `local_host` (this end's address on the trainer-engine connection, so the
    peer can reach it) and blocks until the other rank has joined too."""
    store = dist.PrefixStore(prefix, store)
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":  # (the options overload torch's own gloo tests use to pick a device)
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
        return dist.ProcessGroupGloo(store, rank, 2, options)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, 2, options)


def device_of(backend: str) -> torch.device:
    """Where a rank's tensors travel from or to: the current GPU for NCCL, else the CPU."""
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def tensor_specs(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [
        (name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in tensors.items()
    ]


def layout(specs: list[TensorSpec]) -> list[tuple[int, list[tuple[TensorSpec, int]]]]:
    """The specs in order, packed into buckets of at most BUCKET_BYTES (a larger tensor goes
    alone): [(bucket bytes, [(spec, byte offset), ...]), ...]."""
    buckets, entries, size = [], [], 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * getattr(torch, spec[2]).itemsize
        if entries and size + nbytes > BUCKET_BYTES:
            buckets.append((size, entries))
            entries, size = [], 0
        entries.append((spec, size))
        size += -(-nbytes // ALIGN) * ALIGN
    if entries:
        buckets.append((size, entries))
    return buckets


def send(group, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
    """Broadcast `tensors` (from rank 0) in the order of `tensor_specs(tensors)`."""
    for size, entries in layout(tensor_specs(tensors)):
        flat = torch.empty(size, dtype=torch.uint8, device=device)
        for (name, _, _), offset in entries:
            data = tensors[name].detach().reshape(-1).view(torch.uint8)
            flat[offset : offset + data.numel()].copy_(data)
        group.broadcast(flat, 0).wait()


def receive(group, specs: list[TensorSpec], device: torch.device) -> dict[str, torch.Tensor]:
    """Rank 1's side of `send`: name -> tensor (views of the received buckets)."""
    tensors = {}
    for size, entries in layout(specs):
        flat = torch.empty(size, dtype=torch.uint8, device=device)
        group.broadcast(flat, 0).wait()
        for (name, shape, dtype), offset in entries:
            dtype = getattr(torch, dtype)
            nbytes = math.prod(shape) * dtype.itemsize
            tensors[name] = flat[offset : offset + nbytes].view(dtype).view(shape)
    return tensors
