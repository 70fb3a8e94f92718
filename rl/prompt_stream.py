"""The order in which GRPO draws its prompts: a seeded permutation per epoch, so a run (and a
resumed one, from `state`) sees the same problems in the same order. `PromptStream` holds the
problems in memory; `StreamedPrompts` reads a data set larger than memory as it goes."""

from __future__ import annotations

import itertools
import random

from moetune.config.build import RecipeError


class PromptStream:
    """Problems in a seeded order, reshuffled each epoch; `state` / `restore` keep the position
    (epoch, cursor: problems taken in that epoch) across a checkpoint."""

    def __init__(self, problems: list[dict], seed: int):
        self.problems, self.seed = problems, seed
        self.epoch, self.cursor = 0, 0

    def order(self) -> list[int]:
        return random.Random(f"{self.seed}:{self.epoch}").sample(
            range(len(self.problems)), len(self.problems)
        )

    def take(self, count: int) -> list[dict]:
        taken = []
        while len(taken) < count:
            if self.cursor == len(self.problems):
                self.epoch, self.cursor = self.epoch + 1, 0
            order = self.order()
            end = min(len(self.problems), self.cursor + count - len(taken))
            taken += [self.problems[i] for i in order[self.cursor : end]]
            self.cursor = end
        return taken

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def restore(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]

    @property
    def progress(self) -> float:
        """Epochs done, fractional: TRL's `trainer_state.epoch`."""
        return self.epoch + self.cursor / len(self.problems)


class StreamedPrompts:
    """Problems read from a `datasets.IterableDataset` as training takes them: this rank's
    shards (or every world_size-th row), shuffled in a buffer of `buffer_size` rows with `seed`
    and the epoch. `state` is (epoch, rows taken in it); `restore` replays the epoch's order up
    to there, so a resumed run draws what the uninterrupted one would."""

    def __init__(
        self, dataset, seed: int, rank: int = 0, world_size: int = 1, buffer_size: int = 10_000
    ):
        from datasets.distributed import split_dataset_by_node

        if world_size > 1:
            dataset = split_dataset_by_node(dataset, rank, world_size)
        self.dataset = dataset.shuffle(seed=seed, buffer_size=buffer_size)
        self.epoch, self.cursor = 0, 0
        self.rows = iter(self.dataset)

    def take(self, count: int) -> list[dict]:
        taken = []
        while len(taken) < count:
            row = next(self.rows, None)
            if row is None:
                if self.cursor == 0:
                    raise RecipeError("data: the streamed data set has no rows for this process")
                self.epoch, self.cursor = self.epoch + 1, 0
                self.rows = self.epoch_rows()
                continue
            taken.append(row)
            self.cursor += 1
        return taken

    def epoch_rows(self):
        self.dataset.set_epoch(self.epoch)
        return iter(self.dataset)

    def state(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def restore(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.rows = itertools.islice(self.epoch_rows(), self.cursor, None)

    @property
    def progress(self) -> float:
        """Epochs done (whole ones: a stream's length is not known)."""
        return float(self.epoch)
