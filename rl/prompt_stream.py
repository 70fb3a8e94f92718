"""The order in which GRPO draws its prompts: a seeded permutation per epoch, so a run (and a
resumed one, from `state`) sees the same problems in the same order."""

from __future__ import annotations

import random


class PromptStream:
    """Problems in a seeded order, reshuffled each epoch; `state` / `restore` keep the position
    (epoch, cursor: problems taken in that epoch) across a checkpoint."""

    def __init__(self, problems: list[dict], seed: int):
        self.problems, self.seed = problems, seed
        self.epoch, self.cursor = 0, 0

    def order(self) -> list[int]:
        return random.Random(f"{self.seed}:{self.epoch}").sample(range(len(self.problems)),
                                                                  len(self.problems))

    def take(self, count: int) -> list[dict]:
        taken = []
        while len(taken) < count:
            if self.cursor == len(self.problems):
                self.epoch, self.cursor = self.epoch + 1, 0
            order = self.order()
            end = min(len(self.problems), self.cursor + count - len(taken))
            taken += [self.problems[i] for i in order[self.cursor:end]]
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
