"""Expert parallelism (EP): every MoE layer's routed experts sharded over a group of ranks.

The world splits into expert-parallel groups of N consecutive ranks; rank r of a group holds
experts [r L, (r+1) L) of every MoE layer (L = E / N) and everything else in full. The ranks
holding the same experts (one per EP group) form a data-parallel (DP) group. Per MoE layer,
each rank routes its own tokens (the router and shared experts are replicated), then:

  1. sorts its (token, expert) pairs by expert, which also groups them by destination rank;
  2. exchanges per-expert pair counts (all_to_all_single), then the pairs' rows and routing
     weights (a differentiable all_to_all);
  3. runs its local experts on the received rows: the experts module itself (grouped GEMMs,
     FP8 weights and expert LoRA alike), with the routing weight applied there as in one
     process;
  4. sends the results back (the reverse all_to_all) and sums each token's k rows.

The backward runs the same exchanges in reverse, so token and routing-weight gradients
reach their source rank and each rank's expert gradients cover every token its experts saw.

Gradients with data parallelism: DDP would average expert gradients across ranks that hold
different experts, so `shard_experts` has DDP skip the experts' parameters and buffers (wrap
the same model object in DDP, after sharding) and, in place of DDP's initial broadcast,
every rank takes its slice of global rank 0's experts. A hook on each expert parameter sums
its gradient over the DP group and divides it by the world size: expert gradients come out
as DDP leaves every other one, the mean over all ranks of each rank's loss gradient.
Gradient clipping must count every expert once: use `clip_grad_norm_` here. FSDP and
DeepSpeed do not know of the sharding: EP composes with DDP (or none) only.

Checkpoints: `save_pretrained` gathers one MoE layer's experts at a time itself, and
`save_adapter` the expert adapters alone (every rank calls them, one writes);
`from_pretrained(expert_parallel=groups)`, `load_weights` and `load_adapter_weights` read
each rank's own experts; `apply_lora` draws adapters for all experts and keeps the rank's
(collective). `with full_experts(model):` gives every rank every expert for the block.
Every forward is collective too: the ranks of an EP group run their forwards in step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import get_total_norm

from moetune.model.moe import MoE


@dataclass(frozen=True)
class ExpertParallelGroups:
    """This rank's expert-parallel group (`ep`, ranks sharing out the experts) and
    data-parallel group (`dp`, ranks holding the same experts)."""

    ep: dist.ProcessGroup | None
    dp: dist.ProcessGroup | None
    ep_size: int
    ep_rank: int
    dp_size: int
    world_size: int

    def __deepcopy__(self, memo):  # process groups are process-wide handles: never copied
        return self


def group_ranks(world_size: int, ep_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(EP groups, DP groups) as lists of global ranks. EP groups are blocks of consecutive
    ranks, so that the per-layer all_to_all stays within a machine when N <= its GPUs."""
    if ep_size < 1 or world_size % ep_size:
        raise ValueError(
            f"expert parallel size {ep_size} must be >= 1 and divide the world size {world_size}"
        )
    ep = [list(range(start, start + ep_size)) for start in range(0, world_size, ep_size)]
    dp = [list(range(position, world_size, ep_size)) for position in range(ep_size)]
    return ep, dp


def expert_parallel_groups(ep_size: int) -> ExpertParallelGroups:
    """Build the EP and DP groups of an initialised world. Collective: every rank calls it."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"expert parallel size {ep_size} needs torch.distributed: launch with "
            "torchrun or accelerate launch, then init_process_group"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    ep_ranks, dp_ranks = group_ranks(world, ep_size)
    ep = dp = None
    for ranks in ep_ranks:  # new_group is collective: every rank creates every group
        group = dist.new_group(ranks)
        if rank in ranks:
            ep = group
    for ranks in dp_ranks:
        group = dist.new_group(ranks)
        if rank in ranks:
            dp = group
    return ExpertParallelGroups(ep, dp, ep_size, rank % ep_size, world // ep_size, world)


class AllToAll(torch.autograd.Function):
    """Rows of x [sum(send), ...] go to the group's ranks in chunks of `send` rows; returns
    the received rows [sum(recv), ...]. The backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, send: list[int], recv: list[int], group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return exchange(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad):
        return exchange(grad, ctx.recv, ctx.send, ctx.group), None, None, None


def exchange(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


@dataclass(eq=False)
class ExpertShard:
    """One MoE layer's share: this rank holds experts [first, first + count) of `total`."""

    groups: ExpertParallelGroups
    first: int
    count: int
    total: int

    def dispatch(
        self, experts: nn.Module, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """x [T, hidden], expert_ids [T, k] (global ids), weights [T, k] ->
        sum_k weights * expert(x) [T, hidden], the experts living on the EP group's ranks."""
        watch_gradients(experts, self.groups)
        group, ranks = self.groups.ep, self.groups.ep_size
        tokens, k = expert_ids.shape
        flat_ids = expert_ids.flatten()
        order = flat_ids.argsort(stable=True)  # pairs by expert, hence by destination rank
        sent = torch.bincount(flat_ids, minlength=self.total)  # [E]: pairs for each expert
        received = torch.empty_like(sent)  # [N * L]: from each rank, pairs for each local expert
        dist.all_to_all_single(received, sent, group=group)
        # rows to send to / receive from each rank (one host sync)
        send, recv = torch.stack((sent, received)).view(2, ranks, self.count).sum(2).tolist()
        # The routing weight travels as one more column of its row: a single exchange.
        pairs = torch.cat(
            (
                x.index_select(0, order // k),
                weights.flatten().index_select(0, order).to(x.dtype)[:, None],
            ),
            1,
        )
        rows = AllToAll.apply(pairs, send, recv, group)
        local_ids = torch.arange(self.count, device=x.device).repeat(ranks)
        local_ids = local_ids.repeat_interleave(received)
        out = experts(rows[:, :-1], local_ids[:, None], rows[:, -1:])
        back = AllToAll.apply(out, recv, send, group)  # [T k, hidden] in `order`
        return back.index_select(0, order.argsort()).view(tokens, k, -1).sum(1)


def sharded_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE) and m.expert_parallel is not None]


def local_expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters this rank holds alone: its experts' and their adapters'. DDP skips
    them and their gradients come out already averaged over the world (`reduce_expert_grad`):
    a hand-written data-parallel all-reduce must skip them too."""
    return [p for moe in sharded_layers(model) for p in moe.experts.parameters()]


def expert_parallel_size(model: nn.Module) -> int:
    """N when the model's experts are sharded over N ranks, else 1."""
    groups = expert_parallel_groups_of_model(model)
    return groups.ep_size if groups is not None else 1


def expert_parallel_groups_of_model(model: nn.Module) -> ExpertParallelGroups | None:
    """The groups the model's experts are sharded over (None: not sharded)."""
    layers = sharded_layers(model)
    return layers[0].expert_parallel.groups if layers else None


def everyone_done(groups: ExpertParallelGroups | None, done: bool) -> bool:
    """Whether every rank of the expert-parallel group is `done` decoding (this rank's flag).
    Each forward dispatches tokens to every rank of the group, so a decoding loop runs until
    all are done, a finished rank feeding forwards whose output it ignores. Collective for a
    sharded model (`expert_parallel_groups_of_model`); `done` itself for None."""
    if groups is None:
        return done
    flag = torch.tensor([0 if done else 1], device=collective_device(groups.ep))
    dist.all_reduce(flag, group=groups.ep)  # the ranks still decoding
    return int(flag) == 0


def shard_experts(
    model: nn.Module, groups: ExpertParallelGroups, broadcast: bool = True
) -> nn.Module:
    """Keep only this rank's slice of every MoE layer's routed experts (and of their expert
    LoRA adapters) and make the layers dispatch tokens over `groups.ep`. In place; collective
    (every rank calls it) unless `broadcast` is False: then each rank keeps its slice of its
    own experts (a model on the meta device, about to be filled from a checkpoint).
    Returns the model."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if any(m.expert_parallel is not None for m in layers):
        raise ValueError("shard_experts: the experts are already sharded")
    for moe in layers:
        if moe.experts.num_experts % groups.ep_size:
            raise ValueError(
                f"expert parallel size {groups.ep_size} must divide n_routed_experts "
                f"{moe.experts.num_experts}"
            )
    for moe in layers:
        count = moe.experts.num_experts // groups.ep_size
        shard = ExpertShard(groups, groups.ep_rank * count, count, moe.experts.num_experts)
        keep_slice(moe, shard, broadcast)
    hide_from_ddp(model)
    return model


def keep_slice(moe: MoE, shard: ExpertShard, broadcast: bool = True) -> None:
    """Cut a full MoE layer's experts (and expert adapters) down to `shard`: this rank's
    slice of global rank 0's tensors, so that all ranks start from one model, as DDP makes
    them (adapters or weights made apart on each rank may differ). Collective, unless not
    `broadcast`: then the slice of this rank's own experts."""
    experts, first, end = moe.experts, shard.first, shard.first + shard.count
    for name, tensor in stacked_tensors(experts):
        if tensor.shape[0] != shard.total:
            raise ValueError(
                f"cannot shard {type(experts).__name__}.{name} {tuple(tensor.shape)}: "
                f"not stacked per expert ({shard.total} first)"
            )
    for _, tensor in stacked_tensors(experts):
        tensor.data = (from_rank0(tensor.data) if broadcast else tensor.data)[first:end].clone()
    experts.num_experts = shard.count
    if getattr(experts, "lora", None) is not None:
        keep_adapter_slice(experts.lora, shard)
    moe.expert_parallel = shard


def keep_adapter_slice(lora: nn.Module, shard: ExpertShard) -> None:
    """Cut a routed-expert adapter (ExpertLora, global expert ids) made for all `shard.total`
    experts down to the slots of the shard's experts: global rank 0's values, local ids.
    Collective."""
    first, end = shard.first, shard.first + shard.count
    slots = ((lora.expert_ids >= first) & (lora.expert_ids < end)).nonzero().flatten()
    for _, tensor in stacked_tensors(lora):
        tensor.data = from_rank0(tensor.data).index_select(0, slots.to(tensor.device))
    lora.expert_ids = lora.expert_ids[slots] - first
    lora.all_experts = len(slots) == shard.count


def gather_slices(moe: MoE) -> ExpertShard:
    """Undo `keep_slice`: all_gather the layer's experts (and adapters) over its EP group."""
    shard, experts = moe.expert_parallel, moe.experts
    group = shard.groups.ep
    for _, tensor in stacked_tensors(experts):
        tensor.data = gather_rows(tensor.data, group)
    experts.num_experts = shard.total
    lora = getattr(experts, "lora", None)
    if lora is not None:
        for _, tensor in stacked_tensors(lora):
            tensor.data = gather_rows(tensor.data, group)
        lora.expert_ids = gather_rows(lora.expert_ids + shard.first, group)
        lora.all_experts = len(lora.expert_ids) == shard.total
    moe.expert_parallel = None
    return shard


def expert_adapter(moe: MoE) -> tuple[list[int], dict[str, torch.Tensor]]:
    """The layer's routed-expert adapter (ExpertLora) as global expert ids [S] and its stacked
    tensors (name -> [S, ...]); under expert parallelism gathered over the EP group, the
    adapter alone and never the experts' weights (collective: every rank calls it)."""
    lora, shard = moe.experts.lora, moe.expert_parallel
    tensors = {name: t.detach() for name, t in stacked_tensors(lora)}
    if shard is None:
        return lora.expert_ids.tolist(), tensors
    group = shard.groups.ep
    return adapted_experts(moe), {name: gather_rows(t, group) for name, t in tensors.items()}


def adapted_experts(moe: MoE) -> list[int]:
    """Global ids of the experts the layer's routed-expert adapter covers, in its slot order
    (gathered over the EP group when sharded: collective)."""
    lora, shard = moe.experts.lora, moe.expert_parallel
    if shard is None:
        return lora.expert_ids.tolist()
    return gather_rows(lora.expert_ids + shard.first, shard.groups.ep).tolist()


def own_expert_adapter(moe: MoE) -> tuple[list[int], dict[str, torch.Tensor]]:
    """This rank's part of the layer's routed-expert adapter: the global ids [S_rank] of the
    adapted experts it holds and the stacked tensors (name -> [S_rank, ...], the parameters
    themselves). Local: no collective."""
    lora, shard = moe.experts.lora, moe.expert_parallel
    first = 0 if shard is None else shard.first
    return (lora.expert_ids + first).tolist(), dict(stacked_tensors(lora))


@contextmanager
def full_expert_adapters(layers: list[MoE]):
    """Within the block the routed-expert adapters of `layers` are whole on every rank (global
    expert ids), the experts' weights left sharded: for reading the adapters (the layers must
    not compute inside). Collective: every rank enters."""
    saved = []
    for moe in layers:
        lora, shard = moe.experts.lora, moe.expert_parallel
        if lora is None or shard is None:
            continue
        saved.append((lora, lora.expert_ids, {n: t.data for n, t in stacked_tensors(lora)}))
        for _, tensor in stacked_tensors(lora):
            tensor.data = gather_rows(tensor.data, shard.groups.ep)
        lora.expert_ids = gather_rows(lora.expert_ids + shard.first, shard.groups.ep)
    try:
        yield
    finally:
        for lora, ids, data in saved:
            for name, tensor in stacked_tensors(lora):
                tensor.data = data[name]
            lora.expert_ids = ids


def stacked_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The module's own parameters and buffers (not its children's): stacked per expert in
    RoutedExperts, FP8RoutedExperts and ExpertLora (whose `expert_ids` buffer is handled
    apart)."""
    yield from module.named_parameters(recurse=False)
    yield from ((n, b) for n, b in module.named_buffers(recurse=False) if n != "expert_ids")


@contextmanager
def full_experts(model: nn.Module, layers: list[MoE] | None = None):
    """Within the block every rank holds every expert (and expert adapter) of `layers` (all
    sharded MoE layers by default) and those layers compute alone: for saving, loading,
    attaching LoRA. On exit each rank keeps its slice of rank 0's tensors as they then are
    (so weights loaded and adapters attached inside are kept); parameters keep their
    identity, so optimizer state stays valid. Collective: every rank enters. No-op on an
    unsharded model."""
    layers = sharded_layers(model) if layers is None else layers
    shards = [gather_slices(moe) for moe in layers]
    try:
        yield model
    finally:
        for moe, shard in zip(layers, shards):
            keep_slice(moe, shard)
        if shards:
            hide_from_ddp(model)


def hide_from_ddp(model: nn.Module) -> None:
    """Have DDP (wrapping this model object) skip the sharded experts' parameters and buffers."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, MoE) and module.expert_parallel is not None:
            prefix = f"{name}.experts." if name else "experts."
            names += [prefix + sub for sub, _ in module.experts.named_parameters()]
            names += [prefix + sub for sub, _ in module.experts.named_buffers()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def watch_gradients(experts: nn.Module, groups: ExpertParallelGroups) -> None:
    """Hook each trainable expert parameter (once) with `reduce_expert_grad`. Done at every
    forward, so parameters unfrozen or adapters attached after sharding are covered."""
    for param in experts.parameters():
        if param.requires_grad and not hasattr(param, "expert_parallel_hook"):
            param.expert_parallel_hook = param.register_hook(
                partial(reduce_expert_grad, groups=groups)
            )


def reduce_expert_grad(grad: torch.Tensor, groups: ExpertParallelGroups) -> torch.Tensor:
    """An expert parameter's gradient as DDP would leave it: summed over the ranks holding
    the same experts and divided by the world size (the EP ranks' tokens already
    contributed through the all_to_all backward)."""
    grad = grad / groups.world_size
    if groups.dp_size > 1:
        dist.all_reduce(grad, group=groups.dp)
    return grad


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over all of an expert-parallel model's parameters:
    the norm counts each rank's local experts once and the replicated parameters once, so
    every rank computes the same norm and clips by the same factor. Collective."""
    params = [p for p in model.parameters() if p.grad is not None]
    layers = sharded_layers(model)
    if not layers:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    group = layers[0].expert_parallel.groups.ep
    device = collective_device(group)
    local = {id(p) for p in local_expert_parameters(model)}
    replicated = get_total_norm([p.grad for p in params if id(p) not in local]).to(device)
    experts = get_total_norm([p.grad for p in params if id(p) in local]).to(device).square()
    dist.all_reduce(experts, group=group)
    total = (replicated.square() + experts).sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Global rank 0's value of t (a broadcast over the world)."""
    data = t.contiguous().to(collective_device(None), copy=True)
    dist.broadcast(as_bytes(data), src=0)
    return data.to(t.device)


def gather_rows(t: torch.Tensor, group) -> torch.Tensor:
    """Every rank's t [n_rank, ...] concatenated along dim 0 in rank order (n may differ)."""
    device = collective_device(group)
    size = torch.tensor([t.shape[0]], device=device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    padded = t.new_zeros((max(sizes), *t.shape[1:]), device=device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather([as_bytes(p) for p in parts], as_bytes(padded), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(t.device)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A byte view of a contiguous tensor (gloo has no float8)."""
    return t.view(torch.uint8) if t.dim() else t.view(1).view(torch.uint8)


def collective_device(group) -> torch.device:
    """Where the group's collectives take tensors: the current GPU under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
