"""Where a GRPO run's metrics go besides metrics.jsonl (always written): `training.report_to`.

  tensorboard  event files in <output_dir>/runs
  wandb        a Weights & Biases run, its local files in <output_dir>/wandb; the project
               is $WANDB_PROJECT (default `moetune`), the run named after the output folder,
               the recipe as its config. WANDB_MODE=offline keeps it off the network
               (`wandb sync <output_dir>/wandb/offline-run-*` uploads it later).
  jsonl        metrics.jsonl, which every run writes anyway (accepted for symmetry)

SFT hands `report_to` to transformers' TrainingArguments, whose integrations cover the
same names.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from moetune.config.build import RecipeError

REPORTERS = ("tensorboard", "wandb", "jsonl", "none")


class Reporters:
    """The report_to targets of one run (the main process's): `log(metrics, step)`, `close()`."""

    def __init__(self, report_to: list[str], output: str | Path, recipe=None):
        output = Path(output)
        unknown = sorted(set(report_to) - set(REPORTERS))
        if unknown:
            raise RecipeError(f"training.report_to: {unknown} not among {list(REPORTERS)}")
        self.tensorboard = self.wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(output / "runs"))
        if "wandb" in report_to:
            self.wandb = wandb_run(output, recipe)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for name, value in metrics.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(dict(metrics), step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def wandb_run(output: Path, recipe):
    """A W&B run writing under output/wandb (its folder made first, as wandb wants)."""
    try:
        import wandb
    except ImportError:
        raise RecipeError(
            "training.report_to: wandb needs the wandb package (pip install 'moetune[train]')"
        ) from None
    (output / "wandb").mkdir(parents=True, exist_ok=True)
    config = dataclasses.asdict(recipe) if dataclasses.is_dataclass(recipe) else None
    return wandb.init(
        project=os.environ.get("WANDB_PROJECT", "moetune"),
        name=output.resolve().name,
        dir=str(output),
        config=config,
        reinit="finish_previous",
    )
