"""GRPO: rollout workers sample groups, rule-based rewards score them, the policy learns.

One step (`GRPOTrainer.step`):
  1. `collect`: draw prompts, sample `group_size` completions each from the RolloutPool,
     score them with the recipe's rewards; with dynamic sampling, drop groups whose rewards
     all agree and refill with new prompts (at most `max_refills` more rounds).
  2. `update`: group advantages, then `mu` passes of the policy loss (rl.algorithms) over
     micro-batches, with the sampler's logprobs for truncated importance sampling and a k3
     KL to the reference (LoRA: the adapter-disabled base; full: a frozen copy). A NaN/inf
     loss or gradient skips the update; `max_nonfinite_in_row` of them stop the run.
  3. MoE care: the router is frozen unless `algorithm.update_router` (then the aux-free bias
     moves too); the expert load of the update's forwards is logged per layer (CV). The MTP
     modules, which the policy loss never reaches, are frozen.
  4. `pool.sync` pushes the changed (LoRA-merged) tensors to the workers.
Under `accelerate launch` every process does this on its share of the prompts, and the
optimizer is the launcher's: DDP, DeepSpeed ZeRO-2/3 or FSDP2 (rl.policy_optimizer).
`mismatch_kl` compares the trainer's logprobs of the sampled tokens with the sampler's.
Checkpoints (`checkpoint-N/`) hold the weights (or adapter), the optimizer, the prompt
order and the RNG states: a resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from moetune.config.build import RecipeError
from moetune.config.schema import GRPORecipe
from moetune.data.arithmetic import arithmetic_spec
from moetune.data.problems import load_problems
from moetune.data.prompt_template import (
    few_shot_examples,
    render,
    save_template,
    warn_on_mismatch,
)
from moetune.model.adapters import load_adapter_weights, save_adapter
from moetune.model.lora import adapters_disabled
from moetune.model.moe import MoE
from moetune.rewards import TrainerState, score
from moetune.rl import algorithms
from moetune.rl.data_parallel import DataParallel
from moetune.rl.policy_batch import PolicyBatch, build_batch, token_logprobs
from moetune.rl.policy_optimizer import policy_optimizer
from moetune.rl.rollout import Rollout, RolloutPool, SamplingSpec, sync_weights
from moetune.rl.rollout_remote import parse_address
from moetune.training.expert_load import ExpertLoadHistory
from moetune.training.metrics_file import MetricsFile
from moetune.training.model_loading import attach_lora, load_model, load_tokenizer

log = logging.getLogger(__name__)


class PromptStream:
    """Problems in a seeded order, reshuffled each epoch; `state` restores the position."""

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


@dataclass
class Groups:
    """What one step learns from: G groups of n rollouts and their rewards."""

    problems: list[dict]
    rollouts: list[list[Rollout]]  # [G][n]
    rewards: torch.Tensor  # [G, n] weighted total per sample (after overlong shaping)
    per_function: dict[str, list[float]]  # reward name -> values of the kept samples
    generated_groups: int
    zero_std_groups: int
    rounds: int
    logged: dict[str, list[float]] = field(default_factory=dict)  # log_metric calls, all rounds


class GRPOTrainer:
    def __init__(self, recipe: GRPORecipe, model, tokenizer, lora_spec, pool: RolloutPool,
                 parallel: DataParallel | None = None):
        parallel = parallel or DataParallel()
        self.recipe, self.model, self.tokenizer, self.lora_spec, self.pool, self.parallel = \
            recipe, model, tokenizer, lora_spec, pool, parallel
        algorithm, training = recipe.algorithm, recipe.training
        if training.prompts_per_step % parallel.world_size:
            raise RecipeError(f"training.prompts_per_step: {training.prompts_per_step} is not "
                              f"divisible by the {parallel.world_size} data-parallel processes")
        self.local_prompts = training.prompts_per_step // parallel.world_size
        if not algorithm.update_router:
            for router in model.routers():
                router.weight.requires_grad_(False)
        model.model.mtp.requires_grad_(False)  # the policy loss never reaches the MTP modules
        reference = None
        if algorithm.beta > 0 and lora_spec is None:
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        # The forwards run through `self.policy` (a DeepSpeed engine under DeepSpeed, else the
        # model, FSDP-sharded under FSDP); the model's own methods (routers, expert load)
        # through `self.model`; syncs and saves read `self.optimizer.full_weights()`.
        self.optimizer = policy_optimizer(model, training, parallel)
        self.policy, self.parameters = self.optimizer.policy, self.optimizer.parameters
        self.reference = None if reference is None else self.optimizer.prepare_reference(reference)
        warmup = max(training.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.adamw, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
        eos = model.config.eos_token_id
        self.stop_ids = eos if isinstance(eos, list) else [eos]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        data = recipe.data
        problems = load_problems(data, "data", "train", data.limit, training.seed, data.arithmetic)
        self.stream = PromptStream(parallel.shard(problems), training.seed + parallel.rank)
        self.shots = few_shot_examples(recipe.template, data.source, arithmetic_spec(data.arithmetic))
        self.eval_problems = None
        if recipe.eval.every:
            self.eval_problems = load_problems(recipe.eval, "eval", "test", recipe.eval.limit, 0,
                                               data.arithmetic)
        self.history = ExpertLoadHistory([i for i, layer in enumerate(model.model.layers)
                                          if isinstance(layer.mlp, MoE)])
        self.nonfinite_in_row = 0
        self.skipped_updates = 0

    # 1. Rollouts and rewards ------------------------------------------------------------
    def sampling(self, step: int, round_: int, greedy: bool = False) -> SamplingSpec:
        rollout = self.recipe.rollout
        seed = (((self.recipe.training.seed * 100_003 + step) * 17 + round_) * 1_009
                + self.parallel.rank) * 1_000_003
        return SamplingSpec(temperature=0.0 if greedy else rollout.temperature,
                            top_p=rollout.top_p, top_k=rollout.top_k,
                            max_new_tokens=rollout.max_new_tokens,
                            stop_token_ids=self.stop_ids, seed=seed % 2**31)

    def encode(self, problems: list[dict]) -> list[list[int]]:
        """Token ids of each problem's prompt shown through the recipe's template."""
        texts = [render(p["prompt"], self.recipe.template, self.tokenizer, self.shots) for p in problems]
        return [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]

    def trainer_state(self, completed: int) -> TrainerState:
        """Progress as TRL gives it to reward functions: `completed` optimizer steps."""
        stream = self.stream
        return TrainerState(global_step=completed, max_steps=self.recipe.training.max_steps,
                            epoch=stream.epoch + stream.cursor / len(stream.problems))

    def rewards_of(self, problems: list[dict], rollouts: list[list[Rollout]], completed: int):
        """(totals [G, n], {name: [G*n values]}, {logged metric: [values]}) for the flattened
        groups."""
        n = len(rollouts[0])
        flat = [r for group in rollouts for r in group]
        columns = {key: [p.get(key) for p in problems for _ in range(n)]
                   for key in sorted({k for p in problems for k in p} - {"prompt", "completion"})}
        result = score(self.recipe.rewards, [p["prompt"] for p in problems for _ in range(n)],
                       [r.text for r in flat], columns,
                       completion_ids=[r.completion_ids for r in flat],
                       trainer_state=self.trainer_state(completed))
        totals = torch.tensor(result.totals, dtype=torch.float32)
        algorithm = self.recipe.algorithm
        if algorithm.overlong == "soft":
            lengths = torch.tensor([len(r.completion_ids) for r in flat])
            totals += algorithms.soft_overlong_penalty(
                lengths, self.recipe.rollout.max_new_tokens, algorithm.overlong_buffer)
        values = {metric_name(name): [0.0 if v is None else float(v) for v in vals]
                  for name, vals in result.values.items()}
        return totals.view(len(problems), n), values, result.metrics

    def collect(self, step: int) -> Groups:
        algorithm = self.recipe.algorithm
        wanted, n = self.local_prompts, algorithm.group_size
        kept_problems, kept_rollouts, kept_rewards = [], [], []
        per_function: dict[str, list[float]] = {}
        logged: dict[str, list[float]] = {}
        generated = zero_std = rounds = 0
        while len(kept_problems) < wanted and rounds <= algorithm.max_refills:
            problems = self.stream.take(wanted - len(kept_problems))
            rollouts = self.pool.generate(self.encode(problems), n, self.sampling(step, rounds))
            totals, values, round_logged = self.rewards_of(problems, rollouts, step - 1)
            for name, logged_values in round_logged.items():
                logged.setdefault(name, []).extend(logged_values)
            rounds += 1
            generated += len(problems)
            flat = algorithms.zero_std_groups(totals.flatten(), n)
            zero_std += int(flat.sum())
            for g, problem in enumerate(problems):
                if algorithm.dynamic_sampling and flat[g]:
                    continue
                kept_problems.append(problem)
                kept_rollouts.append(rollouts[g])
                kept_rewards.append(totals[g])
                for name, vals in values.items():
                    per_function.setdefault(name, []).extend(vals[g * n:(g + 1) * n])
            if not algorithm.dynamic_sampling:
                break
        rewards = torch.stack(kept_rewards) if kept_rewards else torch.zeros(0, n)
        return Groups(kept_problems, kept_rollouts, rewards, per_function, generated, zero_std,
                      rounds, logged)

    # 2. Policy update -------------------------------------------------------------------
    def update(self, groups: Groups) -> dict[str, float]:
        """mu optimizer steps on this rank's groups. Loss denominators are global, so with
        data parallelism the summed gradient is that of one process holding every group (a
        rank left with no group contributes zeros)."""
        algorithm, rollout = self.recipe.algorithm, self.recipe.rollout
        flat = [r for group in groups.rollouts for r in group]
        batch = build_batch(flat, self.pad_id, with_routes=algorithm.routing_replay) if flat else None
        if batch is not None and algorithm.overlong == "mask":
            truncated = algorithms.overlong_mask([r.finish_reason for r in flat])
            batch.completion_mask[truncated] = 0
        total_tokens = max(self.parallel.sum(batch.completion_tokens if batch else 0), 1)
        total_rows = self.parallel.sum(len(flat))
        device = next(self.model.parameters()).device
        batch = batch.to(device) if batch is not None else None
        parts = self.micro_batches(len(flat))
        metrics, stats, entropies, loss = {}, [], [], 0.0
        with torch.no_grad():
            old = self.logprobs(self.policy, batch, parts)
            reference = None
            if algorithm.beta > 0:
                with adapters_disabled(self.model) if self.lora_spec else nullcontext():
                    reference = self.logprobs(self.reference if self.reference is not None
                                              else self.policy, batch, parts)
        if batch is not None:
            advantages = algorithms.group_advantages(groups.rewards.flatten(), algorithm.group_size,
                                                     algorithm.advantage).to(device)
            metrics["mismatch_kl"] = algorithms.mismatch_kl(old, batch.sampler_logprobs,
                                                            batch.completion_mask)
        for iteration in range(algorithm.mu):
            for part in parts:
                if part is None:
                    self.idle_pass(self.policy, backward=True)
                    continue
                micro = batch.rows(part)
                self.policy.train()
                logprobs, entropy = token_logprobs(self.policy, micro, rollout.temperature,
                                                   with_entropy=iteration == 0)
                micro_loss, stat = algorithms.policy_loss(
                    algorithm.loss, logprobs, old[part], advantages[part], micro.completion_mask,
                    epsilon_low=algorithm.epsilon_low, epsilon_high=algorithm.epsilon_high,
                    ref_logprobs=None if reference is None else reference[part], beta=algorithm.beta,
                    sampler_logprobs=micro.sampler_logprobs if algorithm.tis_cap else None,
                    tis_cap=algorithm.tis_cap, max_completion_length=rollout.max_new_tokens)
                share = (micro.completion_tokens / total_tokens if algorithm.loss == "dapo"
                         else micro.input_ids.shape[0] / total_rows)
                if self.optimizer.backward(micro_loss * share):
                    loss += float(micro_loss.detach()) * share
                stats.append(stat)
                if entropy is not None:
                    entropies.append(entropy)
            metrics["grad_norm"] = self.optimizer_step()
        metrics["loss"] = self.parallel.sum(loss) / algorithm.mu
        if stats:
            metrics["entropy"] = mean(entropies)
            metrics["policy_clip_fraction"] = mean([s.clip_fraction for s in stats])
        kl = [s.kl for s in stats if s.kl is not None]
        if kl:
            metrics["kl"] = mean(kl)
        tis = [s.tis_weight_mean for s in stats if s.tis_weight_mean is not None]
        if tis:
            metrics["tis_weight_mean"] = mean(tis)
        return metrics

    def micro_batches(self, rows: int) -> list[slice | None]:
        """This rank's micro-batches (row slices). Sharded (DeepSpeed, FSDP), every rank runs as
        many as the rank with the most: the missing ones are None, idle passes."""
        size = self.recipe.training.micro_batch_size
        parts: list[slice | None] = [slice(start, start + size) for start in range(0, rows, size)]
        if self.optimizer.lockstep:
            parts += [None] * (int(self.parallel.max(len(parts))) - len(parts))
        return parts

    def logprobs(self, model, batch: PolicyBatch | None, parts: list[slice | None]) -> torch.Tensor | None:
        """[B, L-1] token logprobs of the batch in eval mode, micro-batch by micro-batch."""
        model.eval()
        found = []
        for part in parts:
            if part is None:
                self.idle_pass(model)
            else:
                found.append(token_logprobs(model, batch.rows(part), self.recipe.rollout.temperature)[0])
        return torch.cat(found) if found else None

    def idle_pass(self, model, backward: bool = False) -> None:
        """A forward (and backward) of one token that changes nothing: it keeps this rank in
        step with ranks that have more micro-batches. Eval mode leaves the expert load alone."""
        was_training = model.training
        model.eval()
        token = torch.full((1, 1), self.pad_id, device=next(self.model.parameters()).device)
        logits = model(token).logits
        if backward:
            self.optimizer.backward(logits.sum() * 0.0)
        model.train(was_training)

    def optimizer_step(self) -> float:
        """Clip and step; a skipped step (NaN/inf, see rl.policy_optimizer) is counted, and
        `max_nonfinite_in_row` of them in a row stop the run. Returns the gradient norm (nan
        when skipped)."""
        norm = self.optimizer.step()
        if not math.isnan(norm):
            self.nonfinite_in_row = 0
            return norm
        self.nonfinite_in_row += 1
        self.skipped_updates += 1
        limit = self.recipe.training.max_nonfinite_in_row
        log.warning("non-finite loss or gradient: update skipped (%d in a row)", self.nonfinite_in_row)
        if self.nonfinite_in_row >= limit:
            raise RuntimeError(f"GRPO stopped: {self.nonfinite_in_row} updates in a row had a "
                               f"NaN/inf loss or gradient (training.max_nonfinite_in_row={limit})")
        return norm

    # 3-4. One step ----------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        started = time.perf_counter()
        groups = self.collect(step)
        rollout_seconds = time.perf_counter() - started
        metrics = self.rollout_metrics(groups, rollout_seconds)
        if not self.parallel.sum(len(groups.problems)):
            log.warning("step %d: every group's rewards agreed; nothing to learn from", step)
            metrics["skipped_all_filtered"] = 1.0
            return self.parallel.mean_metrics(metrics)
        trained = time.perf_counter()
        metrics |= self.update(groups)
        train_tokens = sum(len(r.prompt_ids) + len(r.completion_ids)
                           for group in groups.rollouts for r in group)
        metrics["train_tokens_per_second"] = train_tokens * self.recipe.algorithm.mu / max(
            time.perf_counter() - trained, 1e-9)
        metrics |= self.balance(step)
        metrics["sync_seconds"] = self.sync_rollout_weights(self.pool.weights)
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        metrics["skipped_updates"] = float(self.skipped_updates)
        return self.parallel.mean_metrics(metrics)

    def sync_rollout_weights(self, previous: dict | None) -> float:
        """Push the tensors changed since `previous` (all: None) to this rank's engines."""
        with self.optimizer.full_weights() as model:
            changed = sync_weights(model, previous)
        return self.pool.sync(changed)

    def rollout_metrics(self, groups: Groups, seconds: float) -> dict[str, float]:
        flat = [r for group in groups.rollouts for r in group]
        lengths = [len(r.completion_ids) for r in flat] or [0]
        rewards = groups.rewards.flatten()
        metrics = {
            "reward_mean": float(rewards.mean()) if len(rewards) else 0.0,
            "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "zero_std_fraction": groups.zero_std_groups / max(groups.generated_groups, 1),
            "groups_used": float(len(groups.problems)), "refill_rounds": float(groups.rounds - 1),
            "completion_length_mean": sum(lengths) / len(lengths),
            "completion_length_max": float(max(lengths)),
            "clipped_fraction": sum(r.finish_reason == "length" for r in flat) / max(len(flat), 1),
            "rollout_tokens_per_second": sum(lengths) / max(seconds, 1e-9),
        }
        metrics |= {f"reward/{name}": mean(values) for name, values in groups.per_function.items()}
        metrics |= {f"reward_metric/{name}": mean(values) for name, values in groups.logged.items()}
        return metrics

    def balance(self, step: int) -> dict[str, float]:
        """Log the update's expert load; move the aux-free bias only if the router trains."""
        if not self.history.layer_ids:
            return {}
        self.model.sync_expert_load()  # over data-parallel ranks (a no-op alone)
        metrics = self.history.record(step, self.model.expert_load())
        gamma = self.recipe.moe.bias_update_gamma
        if self.recipe.algorithm.update_router and gamma and self.lora_spec is None:
            self.model.update_expert_bias(gamma)
        else:
            self.model.reset_expert_load()
        return metrics

    def evaluate(self, step: int) -> dict[str, float]:
        """Greedy accuracy on the held-out problems, through the rollout engines."""
        problems = self.eval_problems
        groups = self.pool.generate(self.encode(problems), 1, self.sampling(0, 0, greedy=True))
        totals, _, _ = self.rewards_of(problems, groups, step)
        threshold = self.recipe.eval.pass_threshold
        return {"eval/accuracy": float((totals.flatten() >= threshold).float().mean())}

    # Checkpoints ------------------------------------------------------------------------
    def save(self, folder: Path, step: int) -> None:
        """Weights (or adapter) + tokenizer + optimizer + each rank's prompt position and RNG,
        written to a temporary folder (a sharded optimizer by every rank, the rest by the main
        process) and renamed into place."""
        ranks = self.parallel.gather({"stream": self.stream.state(), "torch_rng": torch.get_rng_state(),
                                      "python_rng": random.getstate()})
        partial = folder.with_name(folder.name + ".partial")
        if self.parallel.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.parallel.barrier()
        self.save_weights(partial)
        self.optimizer.save(partial)
        self.parallel.barrier()
        if self.parallel.is_main:
            torch.save({"scheduler": self.scheduler.state_dict(), "ranks": ranks}, partial / "trainer.pt")
            state = {"step": step, "nonfinite_in_row": self.nonfinite_in_row,
                     "skipped_updates": self.skipped_updates}
            (partial / "trainer_state.json").write_text(json.dumps(state))
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(partial, folder)
        self.parallel.barrier()

    def save_weights(self, folder: Path) -> None:
        """The adapter (LoRA) or model, tokenizer and template; every rank calls it (ZeRO-3
        gathers the weights), the main process writes."""
        with self.optimizer.full_weights() as model:
            if not self.parallel.is_main:
                return
            if self.lora_spec is not None:
                save_adapter(model, self.lora_spec, folder, self.recipe.model.path)
            else:
                model.save_pretrained(folder)
        self.tokenizer.save_pretrained(str(folder))
        save_template(folder, self.recipe.template)

    def load(self, folder: Path) -> int:
        """Restore a checkpoint; returns its step."""
        if not self.optimizer.checkpoint_holds_weights:
            if self.lora_spec is not None:
                load_adapter_weights(self.model, folder)
            else:
                saved = type(self.model).from_pretrained(folder, dtype=self.model.dtype,
                                                         config=self.model.config)
                self.model.load_state_dict(saved.state_dict())
        self.optimizer.load(folder)
        trainer = torch.load(folder / "trainer.pt", weights_only=False)
        self.scheduler.load_state_dict(trainer["scheduler"])
        if len(trainer["ranks"]) != self.parallel.world_size:
            raise RecipeError(f"training.resume_from_checkpoint: {folder} was written by "
                              f"{len(trainer['ranks'])} data-parallel processes, this run has "
                              f"{self.parallel.world_size}")
        mine = trainer["ranks"][self.parallel.rank]
        torch.set_rng_state(mine["torch_rng"])
        random.setstate(mine["python_rng"])
        self.stream.epoch, self.stream.cursor = mine["stream"]["epoch"], mine["stream"]["cursor"]
        state = json.loads((folder / "trainer_state.json").read_text())
        self.nonfinite_in_row, self.skipped_updates = state["nonfinite_in_row"], state["skipped_updates"]
        return state["step"]


def metric_name(reward: str) -> str:
    """A reward's name in metrics: `pkg.module:fn` and `path/file.py:fn` shorten to `fn`."""
    return reward.rsplit(":", 1)[-1]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted(output_dir.glob("checkpoint-*[0-9]"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def rollout_source(recipe: GRPORecipe, model, tokenizer, output: Path, write: bool = True) -> Path:
    """The folder the rollout engines start from: the checkpoint itself when it holds a
    tokenizer.json, else the policy's current weights written (unless `write` is False) to
    output/rollout_model."""
    if recipe.model.path and (Path(recipe.model.path) / "tokenizer.json").exists() \
            and recipe.model.fp8 is None:
        return Path(recipe.model.path)
    folder = output / "rollout_model"
    if not write:
        return folder
    with torch.no_grad():
        merged = copy.deepcopy(model)
        if recipe.lora is not None:
            from moetune.model.lora import merge_lora

            merge_lora(merged)
        merged.save_pretrained(folder)
    tokenizer.save_pretrained(str(folder))
    return folder


def run_grpo(recipe: GRPORecipe) -> dict:
    """Train per the recipe; returns {"output_dir", "steps", "final_reward"}. Under a
    multi-process launcher every rank trains on its share of the prompts with its own
    rollout engines (rl.data_parallel), the optimizer local, DeepSpeed's or FSDP's as the
    launcher says (rl.policy_optimizer); the main process writes metrics and checkpoints."""
    rollout = recipe.rollout
    if (recipe.algorithm.routing_replay and rollout.backend == "vllm" and not rollout.remote
            and not torch.cuda.is_available()):
        raise RecipeError("algorithm.routing_replay: vLLM on CPU cannot return routed experts; "
                          "set rollout.backend: native (or run on a GPU)")
    parallel = DataParallel.from_environment()
    remote = remote_engines(rollout.remote, parallel)
    torch.manual_seed(recipe.training.seed)
    random.seed(recipe.training.seed)
    output = Path(recipe.training.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model)
    spec = attach_lora(model, recipe.lora, recipe.training.seed)
    if recipe.model.path and parallel.is_main:
        warn_on_mismatch(recipe.model.path, recipe.template)
    source = rollout_source(recipe, model, tokenizer, output, write=parallel.is_main)
    if torch.cuda.is_available():  # the policy trains on this rank's GPU
        model.to(torch.cuda.current_device())
    parallel.barrier()  # the main process has written it before any engine reads it
    pool = RolloutPool(source, backend=rollout.backend, workers=rollout.workers,
                       tensor_parallel_size=rollout.tensor_parallel_size, dtype=rollout.dtype,
                       max_model_len=rollout.max_model_len, timeout_s=rollout.timeout_s,
                       seed=recipe.training.seed + parallel.rank,
                       return_routed_experts=recipe.algorithm.routing_replay,
                       remote=remote)
    with pool:
        trainer = GRPOTrainer(recipe, model, tokenizer, spec, pool, parallel)
        resume = recipe.training.resume_from_checkpoint
        checkpoint = Path(resume) if isinstance(resume, str) else (
            latest_checkpoint(output) if resume else None)
        first = 1
        if checkpoint is not None:
            first = trainer.load(checkpoint) + 1
        if checkpoint is not None or remote:  # remote engines start from their own weights
            trainer.sync_rollout_weights(None)
        main = parallel.is_main
        metrics_file = MetricsFile(output / "metrics.jsonl", first - 1 if checkpoint else None) if main else None
        writer = tensorboard_writer(recipe, output) if main else None
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.parameters)  # ZeRO-3: a shard
        if main:
            print(f"GRPO: {trainable:,} trainable parameters, {parallel.world_size} process(es), "
                  f"{'remote' if remote else rollout.backend} rollouts x {len(pool.pids)} each, "
                  f"{recipe.training.max_steps} steps from step {first}")
        metrics: dict[str, float] = {}
        bar = tqdm(range(first, recipe.training.max_steps + 1), desc="grpo", unit="step",
                   disable=recipe.training.disable_tqdm or not main)
        for step in bar:
            metrics = trainer.step(step)
            if trainer.eval_problems and step % recipe.eval.every == 0 and main:
                metrics |= trainer.evaluate(step)
            if main and (step % recipe.training.logging_steps == 0 or step == recipe.training.max_steps):
                metrics_file.write({"step": step, **metrics})
                if writer:
                    for name, value in metrics.items():
                        writer.add_scalar(name, value, step)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}")
            if step % recipe.training.save_steps == 0:
                trainer.save(output / f"checkpoint-{step}", step)
        trainer.save_weights(output)
        if main:
            if writer:
                writer.close()
            trainer.history.plot(output / "expert_load.png")
            print(f"finished step {recipe.training.max_steps}: reward {metrics.get('reward_mean', 0):.3f}; "
                  f"{'adapter' if spec else 'model'}, metrics.jsonl and expert_load.png in {output}")
        parallel.barrier()
    return {"output_dir": str(output), "steps": recipe.training.max_steps,
            "final_reward": metrics.get("reward_mean")}


def remote_engines(addresses: list[str], parallel: DataParallel) -> list[str] | None:
    """This process's share of `rollout.remote` (None: none given): every world_size-th
    address from its rank, so each data-parallel process syncs its own engines and no two
    share one."""
    if not addresses:
        return None
    for address in addresses:
        try:
            parse_address(address)
        except ValueError as error:
            raise RecipeError(str(error)) from None
    if len(addresses) < parallel.world_size:
        raise RecipeError(f"rollout.remote: {len(addresses)} engine(s) for {parallel.world_size} "
                          f"data-parallel processes; each process needs one of its own")
    return parallel.shard(addresses)


def tensorboard_writer(recipe: GRPORecipe, output: Path):
    if "tensorboard" not in recipe.training.report_to:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(output / "runs"))
