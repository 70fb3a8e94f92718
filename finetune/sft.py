"""Supervised fine-tuning on TRL's SFTTrainer, with moetune's MoE loss and bookkeeping.

TRL's SFTTrainer brings data formats and chat templates, completion-only loss, packing,
eval splits, gradient accumulation, LR schedules, checkpoints and resume, TensorBoard and
the progress bar. `MoESFTTrainer` changes what TRL cannot know about a DeepSeek MoE:
  - the loss is the model's own: LM + mtp_loss_weight * MTP + aux_loss_alpha * balance
    (TRL 1.16's default loss calls the backbone through a fused LM head, which skips
    MTP); each part is logged;
  - after every optimizer step the routers' expert load is summed over ranks, logged
    (coefficient of variation per layer), and moves the aux-free bias (moe.bias_update_gamma);
  - LoRA runs save and resume PEFT-format adapters (moetune.model.adapters), full runs
    moetune's checkpoint format.
Each logged step also lands in `metrics.jsonl`; `expert_load.png` is drawn at the end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from moetune.config.build import RecipeError
from moetune.config.schema import SFTRecipe, TemplateSection
from moetune.data.prompt_template import few_shot_examples, save_template, sft_row
from moetune.data.sft_data import load_sft_datasets
from moetune.data.sources import column_names
from moetune.model.adapters import load_adapter_weights, save_adapter
from moetune.model.checkpoint import load_weights
from moetune.model.expert_parallel import clip_grad_norm_, expert_parallel_size
from moetune.model.lora import LoraSpec
from moetune.model.moe import MoE
from moetune.model.sharded_build import fill_shards
from moetune.training.expert_load import ExpertLoadHistory
from moetune.training.launcher import check_launch, engage_fsdp, fsdp_launch
from moetune.training.metrics_file import MetricsFile
from moetune.training.model_loading import attach_lora, load_model, load_tokenizer

log = logging.getLogger(__name__)


class MoESFTTrainer(SFTTrainer):
    """SFTTrainer whose loss is the model's (LM + MTP + aux) and whose checkpoints hold
    LoRA adapters in PEFT format when `lora_spec` is given."""

    def __init__(
        self, *args, lora_spec: LoraSpec | None = None, base_path: str | None = None, **kwargs
    ):
        self.lora_spec = lora_spec
        self.base_path = base_path
        self.tokens_seen = 0  # this rank's training tokens
        super().__init__(*args, **kwargs)

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        self.is_fsdp_enabled = engage_fsdp(self.accelerator)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
            labels=labels,
        )
        loss = out.loss
        mode = "train" if model.training else "eval"
        if num_items_in_batch is not None:
            # A token-weighted mean over the whole accumulated (and, like TRL, all-rank) batch.
            targets = (labels[:, 1:] != -100).sum()
            loss = loss * targets / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes
        for name in ("lm_loss", "mtp_loss", "aux_loss"):
            part = getattr(out, name)
            if part is not None:
                self._metrics[mode][name].append(part.detach().item())
        if mode == "train":
            mask = inputs.get("attention_mask")
            self.tokens_seen += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        return (loss, out) if return_outputs else loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The whole model (or the adapters) in moetune's format, layer by layer: every rank
        takes part (ZeRO-3, FSDP2 and expert-parallel shards are gathered one block at a
        time), the main process writes."""
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        write = self.args.should_save
        if self.lora_spec is not None:  # expert parallel: the expert adapters are gathered
            save_adapter(model, self.lora_spec, output_dir, self.base_path, write=write)
        else:
            model.save_pretrained(output_dir, write=write)
        if write and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        prepared = super()._prepare_for_training(
            max_steps, train_dataloader, resume_from_checkpoint
        )
        self.fill_rank_shares()
        return prepared

    def fill_rank_shares(self) -> None:
        """A model built shard by shard for FSDP2 (`rank_shares`: this rank's chunks) gets its
        values once accelerate has sharded it, before they are first read or written."""
        model = self.accelerator.unwrap_model(self.model)
        shares = model.__dict__.pop("rank_shares", None)
        if shares is not None:
            fill_shards(model, shares)

    def _clip_grad_norm(self, model):
        if expert_parallel_size(model) == 1:
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()
        return clip_grad_norm_(model, self.args.max_grad_norm)  # each expert counted once

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if expert_parallel_size(self.model) > 1:  # each rank's Adam state for its own experts
            torch.save(self.optimizer.state_dict(), self.rank_optimizer_file(output_dir))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint and expert_parallel_size(self.model) > 1:
            file = self.rank_optimizer_file(checkpoint)
            if not file.exists():
                raise FileNotFoundError(
                    f"{file}: an expert-parallel run resumes on as many ranks "
                    "as saved the checkpoint, with the same model.expert_parallel"
                )
            self.optimizer.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))

    def rank_optimizer_file(self, folder: str) -> Path:
        return (
            Path(folder) / f"optimizer.rank{self.args.process_index}-of-{self.args.world_size}.pt"
        )

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_fsdp_enabled:  # the checkpoint's sharded (DCP) weights
            self.fill_rank_shares()  # (then overwritten: DCP needs allocated shards)
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = self.accelerator.unwrap_model(model or self.model)
        if self.lora_spec is not None:  # expert parallel: each rank reads its own experts'
            load_adapter_weights(model, resume_from_checkpoint)
        else:
            load_weights(model, resume_from_checkpoint)


class MoEBookkeeping(TrainerCallback):
    """After each optimizer step: sum the expert load over ranks, log its CV, move the
    router bias (full fine-tuning, gamma > 0), write metrics.jsonl rows, and plot the load
    at the end of training."""

    def __init__(self, trainer: MoESFTTrainer, gamma: float, metrics: MetricsFile):
        model = trainer.accelerator.unwrap_model(trainer.model)
        self.trainer = trainer
        self.gamma = 0.0 if trainer.lora_spec is not None else gamma
        self.history = ExpertLoadHistory(
            [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoE)]
        )
        self.metrics = metrics
        self.clock = (time.perf_counter(), 0)

    def on_step_end(self, args, state, control, **kwargs):
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        if not self.history.layer_ids:
            return
        model.sync_expert_load()
        for name, value in self.history.record(state.global_step, model.expert_load()).items():
            self.trainer._metrics["train"][name].append(value)
        if self.gamma:
            model.update_expert_bias(self.gamma)
        else:
            model.reset_expert_load()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now, tokens = time.perf_counter(), self.trainer.tokens_seen
        record = {"step": state.global_step}
        if "loss" in logs:
            started, before = self.clock
            # This rank's count times the ranks: data-parallel ranks see equal batches.
            processed = (tokens - before) * args.world_size
            record |= {
                "loss": logs["loss"],
                "lr": logs.get("learning_rate"),
                "tokens_per_second": processed / max(now - started, 1e-9),
            }
            self.clock = (now, tokens)
        record |= {
            k: v
            for k, v in logs.items()
            if k not in ("loss", "learning_rate") and isinstance(v, (int, float))
        }
        self.metrics.write(record)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            path = self.history.plot(Path(args.output_dir) / "expert_load.png")
            if path:
                log.info("expert load plot: %s", path)


def sft_config(recipe: SFTRecipe, chat: bool) -> SFTConfig:
    """TrainingArguments from `training`, SFT data options from `data`. chat: the rows are
    `messages`, whose loss is then limited to assistant turns (the chat template's
    {% generation %} blocks) rather than to completions."""
    training, data = recipe.training, recipe.data
    has_eval = bool(data.eval_source or data.eval_fraction)
    fields = dict(vars(training))
    fields.pop("resume_from_checkpoint")
    # metrics.jsonl is always written; transformers knows no `jsonl` integration
    fields["report_to"] = [name for name in training.report_to if name != "jsonl"] or "none"
    return SFTConfig(
        **fields,
        eval_strategy="steps" if has_eval and training.eval_steps else "no",
        logging_first_step=True,
        max_length=data.max_length,
        packing=data.packing,
        completion_only_loss=data.completion_only_loss,
        assistant_only_loss=data.completion_only_loss and chat,
        use_cpu=not torch.cuda.is_available(),
    )


def resume_checkpoint(recipe: SFTRecipe) -> str | None:
    """The checkpoint folder to resume from: a path, or the latest complete one in
    output_dir. The trainer writes trainer_state.json last, after the weights and every
    rank's optimizer shard, so a folder without it is a save that crashed half way: skipped,
    the last good checkpoint before it is taken."""
    value = recipe.training.resume_from_checkpoint
    if not value:
        return None
    if isinstance(value, str):
        return value
    complete = []
    for folder in Path(recipe.training.output_dir).glob("checkpoint-*"):
        step = folder.name.removeprefix("checkpoint-")
        if not step.isdigit():
            continue
        if (folder / "trainer_state.json").exists():
            complete.append((int(step), str(folder)))
        else:
            log.warning(
                "%s: no trainer_state.json (a save that did not finish): not resumed from", folder
            )
    return max(complete)[1] if complete else None


def run_sft(
    recipe: SFTRecipe, callbacks: Sequence[Callable[[MoESFTTrainer], TrainerCallback]] = ()
) -> dict:
    """Train per the recipe; returns {"output_dir", "final_loss", "steps"}. `callbacks` build
    further trainer callbacks from the trainer."""
    check_launch(recipe.model.expert_parallel)
    if recipe.data.streaming and recipe.training.max_steps <= 0:
        raise RecipeError(
            "training.max_steps: a streamed data set (data.streaming) has no "
            "length to count epochs in; set the number of steps"
        )
    tokenizer = load_tokenizer(recipe.model)
    # No rank builds the whole model under ZeRO-3 or FSDP2, save FSDP2 with LoRA: FSDP2's
    # sharded build leaves the base on the meta device, where adapters cannot be drawn.
    model = load_model(recipe.model, sharded=recipe.lora is None or not fsdp_launch())
    spec = attach_lora(model, recipe.lora, recipe.training.seed)
    sizes = {p: getattr(p, "ds_numel", p.numel()) for p in model.parameters()}  # ZeRO-3: whole
    trainable = sum(size for p, size in sizes.items() if p.requires_grad)
    total = sum(sizes.values())
    train, evaluation = load_sft_datasets(recipe.data, recipe.training.seed)
    train, evaluation = (apply_template(d, recipe) for d in (train, evaluation))
    resume = resume_checkpoint(recipe)
    trainer = MoESFTTrainer(
        model=model,
        args=sft_config(recipe, "messages" in column_names(train)),
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        lora_spec=spec,
        base_path=recipe.model.path,
    )
    main_process = trainer.is_world_process_zero()
    if main_process:
        print(
            f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
            + (" - LoRA adapters only" if spec else "")
        )
    resume_step = trainer_state_step(resume) if resume else None
    metrics = MetricsFile(Path(recipe.training.output_dir) / "metrics.jsonl", resume_step)
    trainer.add_callback(MoEBookkeeping(trainer, recipe.moe.bias_update_gamma, metrics))
    for callback in callbacks:
        trainer.add_callback(callback(trainer))
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(recipe.training.output_dir)
    if main_process:
        save_template(recipe.training.output_dir, recipe.template)
    if main_process:
        print(
            f"finished {result.global_step} steps, mean training loss "
            f"{result.training_loss:.4f}; {'adapter' if spec else 'model'}, metrics.jsonl and "
            f"expert_load.png in {recipe.training.output_dir}"
        )
    return {
        "output_dir": recipe.training.output_dir,
        "final_loss": result.training_loss,
        "steps": result.global_step,
    }


def apply_template(dataset, recipe: SFTRecipe):
    """Prompt + completion rows shown through the recipe's template (chat turns, system
    prompt, few-shot examples); other row formats and the default template pass unchanged."""
    if (
        dataset is None
        or "prompt" not in column_names(dataset)
        or recipe.template == TemplateSection()
    ):
        return dataset
    import datasets

    from moetune.data.arithmetic import arithmetic_spec

    shots = few_shot_examples(
        recipe.template, recipe.data.source, arithmetic_spec(recipe.data.arithmetic)
    )
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.map(lambda row: sft_row(row, recipe.template, shots))
    return datasets.Dataset.from_list([sft_row(row, recipe.template, shots) for row in dataset])


def trainer_state_step(checkpoint: str) -> int:
    import json

    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"]
