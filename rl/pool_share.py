"""Trainer processes sharing one rollout pool (`rollout.processes_per_pool: N`).

The world's ranks split into pools of N consecutive ranks. The first rank of a pool (its
leader) holds the pool's engines and samples, scores and filters the prompts of all N: its
prompt stream is the pool's share of the problems and a step takes N processes' worth from
it. It then sends every member its share of the step's groups (every N-th group), and each
process updates on its own share as in plain data parallelism. A weight sync is streamed by
every rank (the gathers of a sharded policy are collective) and sent by the leader alone.

Expert parallelism over 32 GPUs thus needs the engines of 32 / N pools, not of 32 processes:
`processes_per_pool: 8` puts one pool on each 8-GPU machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from moetune.config.build import RecipeError
from moetune.rl.collector import Groups
from moetune.rl.data_parallel import DataParallel


@dataclass(frozen=True)
class PoolShare:
    """This rank's pool: `size` ranks, the pool's number `index` of `pools`, this rank's
    place `member` in it (0: the leader) and the pool's process group (None: size 1)."""

    size: int
    index: int
    pools: int
    member: int
    group: dist.ProcessGroup | None = None

    @classmethod
    def of(cls, parallel: DataParallel, size: int) -> PoolShare:
        """Split the world into pools of `size` (collective when size > 1)."""
        world, rank = parallel.world_size, parallel.rank
        if size < 1 or world % size:
            raise RecipeError(
                f"rollout.processes_per_pool: {size} must be >= 1 and divide the "
                f"{world} trainer processes"
            )
        group = None
        if size > 1:
            for start in range(0, world, size):  # new_group is collective: every rank makes all
                made = dist.new_group(list(range(start, start + size)))
                if start <= rank < start + size:
                    group = made
        return cls(size, rank // size, world // size, rank % size, group)

    @property
    def leads(self) -> bool:
        """Whether this rank holds the pool's engines and samples for it."""
        return self.member == 0

    def shard(self, items: list) -> list:
        """The pool's share of `items`: every pools-th item from its index."""
        return items[self.index :: self.pools]

    def scatter(self, groups: Groups | None) -> Groups:
        """The leader's `groups` of the step -> this rank's share (every size-th group from
        its place). Every member calls it; only the leader's `groups` is read."""
        if self.size == 1:
            return groups
        shares = (
            [groups.share(part, self.size) for part in range(self.size)] if self.leads else None
        )
        received = [None]
        leader = dist.get_global_rank(self.group, 0)
        dist.scatter_object_list(received, shares, src=leader, group=self.group)
        return received[0]
