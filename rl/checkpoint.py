"""GRPO checkpoints (`checkpoint-N/`), from which a resumed run repeats the uninterrupted one.

A checkpoint folder holds the weights (or LoRA adapter), tokenizer and prompt template (what
the run's output folder holds at the end), the optimizer state in the engine's own layout
(rl.policy_engine; sharded engines: with the weights), `trainer.pt` (the LR schedule and each
rank's prompt position, torch/python RNG states and the rounds it sampled ahead for later
steps, rl.async_collector: their samples, not regenerated on resume) and
`trainer_state.json` (the step and the skipped-update counts).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from moetune.config.build import RecipeError
from moetune.config.schema import GRPORecipe
from moetune.data.prompt_template import save_template
from moetune.model.adapters import load_adapter_weights, save_adapter
from moetune.model.checkpoint import load_weights
from moetune.rl.async_collector import Lookahead
from moetune.rl.data_parallel import DataParallel
from moetune.rl.policy_update import PolicyUpdater
from moetune.rl.prompt_stream import PromptStream, StreamedPrompts


class Checkpointer:
    """Writes and restores the state of one GRPO run: the model (through `engine`), the
    `scheduler`, this rank's `stream`, RNGs and `lookahead` queue, and `updater`'s skip
    counts. Every rank calls
    `save`, `save_weights` and `load` (sharded engines gather or write collectively)."""

    def __init__(
        self,
        recipe: GRPORecipe,
        model,
        tokenizer,
        lora_spec,
        engine,
        scheduler,
        stream: PromptStream | StreamedPrompts | None,
        updater: PolicyUpdater,
        parallel: DataParallel,
        lookahead: Lookahead | None = None,
    ):
        self.recipe, self.model, self.tokenizer, self.lora_spec = (
            recipe,
            model,
            tokenizer,
            lora_spec,
        )
        self.engine, self.scheduler, self.stream, self.updater = engine, scheduler, stream, updater
        self.parallel, self.lookahead = parallel, lookahead

    def save(self, folder: Path, step: int) -> None:
        """Weights (or adapter) + tokenizer + optimizer + each rank's prompt position and RNG,
        written to a temporary folder (a sharded optimizer by every rank, the rest by the main
        process) and renamed into place."""
        ranks = self.parallel.gather(
            {
                "stream": self.stream.state() if self.stream is not None else None,
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
                "lookahead": self.lookahead.state() if self.lookahead else [],
            }
        )
        partial = folder.with_name(folder.name + ".partial")
        if self.parallel.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.parallel.barrier()
        self.save_weights(partial)
        self.engine.save(partial)
        self.parallel.barrier()
        if self.parallel.is_main:
            torch.save(
                {"scheduler": self.scheduler.state_dict(), "ranks": ranks}, partial / "trainer.pt"
            )
            state = {
                "step": step,
                "nonfinite_in_row": self.updater.nonfinite_in_row,
                "skipped_updates": self.updater.skipped_updates,
            }
            (partial / "trainer_state.json").write_text(json.dumps(state))
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(partial, folder)
        self.parallel.barrier()

    def save_weights(self, folder: Path) -> None:
        """The adapter (LoRA) or model, tokenizer and template; every rank calls it (ZeRO-3,
        FSDP2 and expert-parallel shards are gathered one block at a time), the main process
        writes."""
        write = self.parallel.is_main
        if self.lora_spec is not None:
            save_adapter(self.model, self.lora_spec, folder, self.recipe.model.path, write=write)
        else:
            self.model.save_pretrained(folder, write=write)
        if write:
            self.tokenizer.save_pretrained(str(folder))
            save_template(folder, self.recipe.template)

    def load(self, folder: Path) -> int:
        """Restore a checkpoint; returns its step."""
        if not self.engine.checkpoint_holds_weights:  # expert parallel: each rank its experts
            if self.lora_spec is not None:
                load_adapter_weights(self.model, folder)
            else:
                load_weights(self.model, folder)
        self.engine.load(folder)
        trainer = torch.load(folder / "trainer.pt", weights_only=False)
        self.scheduler.load_state_dict(trainer["scheduler"])
        if len(trainer["ranks"]) != self.parallel.world_size:
            raise RecipeError(
                f"training.resume_from_checkpoint: {folder} was written by "
                f"{len(trainer['ranks'])} data-parallel processes, this run has "
                f"{self.parallel.world_size}"
            )
        mine = trainer["ranks"][self.parallel.rank]
        torch.set_rng_state(mine["torch_rng"])
        random.setstate(mine["python_rng"])
        if self.stream is not None:  # (a shared pool's follower has none)
            self.stream.restore(mine["stream"])
        if self.lookahead is not None:
            self.lookahead.restore(mine.get("lookahead", []))
        state = json.loads((folder / "trainer_state.json").read_text())
        self.updater.nonfinite_in_row = state["nonfinite_in_row"]
        self.updater.skipped_updates = state["skipped_updates"]
        return state["step"]


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The highest-numbered complete `checkpoint-N` folder in output_dir (None: none)."""
    found = sorted(output_dir.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None
