"""Asynchronous GRPO: the rollout engines sample later steps while the trainer updates.

With `rollout.max_staleness: k` > 0, once step s has its groups the first rounds of steps
s+1 .. s+k are sent to the engines (`Lookahead.fill`) before the update of step s runs:
generation and update overlap. A round sent at step s is sampled by the weights the engines
hold then (version s-1: the update of step s-1), so step t learns from samples up to k
versions old; the policy loss corrects for that with the engine's own logprobs
(`algorithm.tis_cap`, `is_level`, `is_mode`: rl.algorithms.importance_weights).

The weight sync after an update waits for the generations in flight to finish
(RolloutPool.sync), unless `rollout.partial_rollouts`: then they go on with the new weights
from their next decoding step. Either way a sample's staleness at step t is the trainer's
version (t-1 unless steps were skipped) minus its oldest token's version; groups with a
sample staler than k are dropped and their prompts sampled again (rl.collector).

Prompts are taken from the stream in a fixed order (step s's refills, then step s+k's first
round), and every round's sampling seed is that of its step and round, so a run is
repeatable. A checkpoint holds the rounds sampled ahead (collected first: `state`), so a
resumed run learns from the very samples the uninterrupted one did.
"""

from __future__ import annotations

from moetune.rl.collector import Collector, Prefetched


class Lookahead:
    """The first rounds of up to `depth` later steps, sampled ahead through `collector`.
    `depth` 0: none (the synchronous loop)."""

    def __init__(self, collector: Collector, depth: int):
        self.collector, self.depth = collector, depth
        self.queue: dict[int, Prefetched] = {}  # step -> its first round, in step order

    def fill(self, step: int, last_step: int) -> None:
        """Send the first rounds of steps step+1 .. step+depth (none past `last_step`) not yet
        sent, in step order. Their prompts are taken from the stream first, so that a call
        repeated after EnginesNeedWeights takes none twice."""
        for later in range(step + 1, min(step + self.depth, last_step) + 1):
            if later not in self.queue:
                self.queue[later] = self.collector.prefetch(later)
        for prefetched in self.queue.values():
            if prefetched.generation is None and prefetched.rollouts is None:
                self.collector.submit(prefetched)

    def take(self, step: int) -> Prefetched | None:
        """`step`'s first round if it was sampled ahead (then removed from the queue)."""
        return self.queue.pop(step, None)

    def state(self) -> list[dict]:
        """The queue for a checkpoint: each round's step, problems and rollouts (waiting for
        the generations in flight)."""
        return [
            {"step": p.step, "problems": p.problems, "rollouts": self.collector.result(p)}
            for p in self.queue.values()
        ]

    def restore(self, state: list[dict]) -> None:
        """The queue `state` gave (its rollouts are checked for staleness when used)."""
        self.queue = {
            entry["step"]: Prefetched(entry["step"], entry["problems"], None, entry["rollouts"])
            for entry in state
        }
