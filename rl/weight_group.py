"""Weights over torch.distributed from a trainer to one rollout engine, local or remote.

The two form a process group of their own (trainer rank 0, engine rank 1), built directly on
a TCPStore that the trainer opens: never the default group, which the trainer may hold under
a launcher (accelerate, DeepSpeed) and vLLM holds for its own workers. gloo moves CPU
tensors, NCCL GPU tensors. `buckets` packs a stream of tensors into flat byte buckets of a
bounded size; a bucket's names, shapes and dtypes go over the request connection
(moetune.rl.rollout_worker.push_bucket), then `push` sends its bytes over the group, which
`receive` unpacks in the same order (`layout`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

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


def layout(specs: list[TensorSpec]) -> tuple[int, list[tuple[TensorSpec, int]]]:
    """The bucket's size in bytes and each spec's byte offset in it, in order."""
    entries, size = [], 0
    for spec in specs:
        entries.append((spec, size))
        size += aligned(math.prod(spec[1]) * getattr(torch, spec[2]).itemsize)
    return size, entries


def aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


class Bucket(NamedTuple):
    """Tensors packed into one flat byte buffer as `layout(specs)` places them."""

    specs: list[TensorSpec]
    data: torch.Tensor  # uint8 [layout(specs)[0]]

    @property
    def nbytes(self) -> int:
        return sum(
            math.prod(shape) * getattr(torch, dtype).itemsize for _, shape, dtype in self.specs
        )


def buckets(tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Consecutive runs of `tensors` packed into CPU buckets of at most `bucket_bytes` (a larger
    tensor alone), each copied in as it is read: the stream's tensors need only live until
    the next is asked for. One buffer serves every bucket that fits it: use a bucket before
    asking for the next."""
    buffer = torch.empty(0, dtype=torch.uint8)
    specs: list[TensorSpec] = []
    size = 0
    for name, tensor in tensors:
        nbytes = aligned(tensor.numel() * tensor.element_size())
        if specs and size + nbytes > bucket_bytes:
            yield Bucket(specs, buffer[:size])
            specs, size = [], 0
        if size + nbytes > buffer.numel():
            grown = torch.empty(max(bucket_bytes, size + nbytes), dtype=torch.uint8)
            grown[:size].copy_(buffer[:size])
            buffer = grown
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        buffer[size : size + data.numel()].copy_(data)
        specs.append((name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")))
        size += nbytes
    if specs:
        yield Bucket(specs, buffer[:size])


def push(group, bucket: Bucket, device: torch.device) -> None:
    """Broadcast `bucket`'s bytes from rank 0 (the engine, told its specs, is receiving)."""
    group.broadcast(bucket.data.to(device), 0).wait()


def receive(group, specs: list[TensorSpec], device: torch.device) -> dict[str, torch.Tensor]:
    """Rank 1's side of `push`: name -> tensor (views of the received bucket)."""
    size, entries = layout(specs)
    flat = torch.empty(size, dtype=torch.uint8, device=device)
    group.broadcast(flat, 0).wait()
    tensors = {}
    for (name, shape, dtype), offset in entries:
        dtype = getattr(torch, dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        tensors[name] = flat[offset : offset + nbytes].view(dtype).view(shape)
    return tensors
