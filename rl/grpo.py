"""GRPO: rollout workers sample groups, rule-based rewards score them, the policy learns.

`run_grpo` sets a run up (model, rollout engines, resume) and loops `GRPOTrainer.step`:
  1. collect (rl.collector): prompts from the stream (rl.prompt_stream), `group_size`
     completions each from the RolloutPool, scored by the recipe's rewards; dynamic sampling
     drops groups whose rewards all agree and refills.
  2. update (rl.policy_update): group advantages, then `mu` passes of the policy loss
     (rl.algorithms) over micro-batches through the launcher's engine (rl.policy_engine:
     replicated/DDP, DeepSpeed ZeRO-2/3 or FSDP2).
  3. MoE care: the router is frozen unless `algorithm.update_router` (then the aux-free bias
     moves too); the expert load of the update's forwards is logged per layer (CV). The MTP
     modules, which the policy loss never reaches, are frozen.
  4. `pool.sync` streams the tensors the step changed (LoRA merged) to the workers, one
     block gathered at a time; engines that apply the adapters themselves (native; vLLM
     per `rollout.lora_sync`, moetune.rl.vllm_lora) get the LoRA tensors alone.
  5. inspection (rl.inspection): router agreement logged beside the expert load, and the
     step's samples appended to rollouts.jsonl (`moetune rollouts show` reads them).
With `rollout.max_staleness` k > 0 the engines sample the first rounds of the next k steps
while 2-4 run (rl.async_collector): the samples are then up to k weight versions old.
Under `accelerate launch` every process does this on its share of the prompts.
Checkpoints (rl.checkpoint) let a resumed run repeat the uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from moetune.config.build import RecipeError
from moetune.config.schema import GRPORecipe
from moetune.data.problems import load_problems, stream_problems
from moetune.data.prompt_template import warn_on_mismatch
from moetune.model.expert_parallel import expert_parallel_size
from moetune.model.moe import MoE
from moetune.model.speculative import check_speculative_tokens
from moetune.rl import vllm_lora
from moetune.rl.async_collector import Lookahead
from moetune.rl.checkpoint import Checkpointer, latest_checkpoint
from moetune.rl.collector import Collector
from moetune.rl.data_parallel import DataParallel
from moetune.rl.engine_weights import adapter_stream, weight_stream
from moetune.rl.inspection import number_groups, sample_records, spread
from moetune.rl.policy_engine import policy_engine
from moetune.rl.policy_update import PolicyUpdater
from moetune.rl.pool_share import PoolShare
from moetune.rl.prompt_stream import PromptStream, StreamedPrompts
from moetune.rl.rollout import EnginesNeedWeights, RolloutPool
from moetune.rl.rollout_remote import parse_address
from moetune.training.expert_load import ExpertLoadHistory
from moetune.training.metrics_file import MetricsFile
from moetune.training.model_loading import (
    attach_lora,
    load_model,
    load_tokenizer,
    lora_spec,
    resolve_config,
)
from moetune.training.reporting import Reporters

log = logging.getLogger(__name__)


class GRPOTrainer:
    """One GRPO run's training state on this rank, and its step.

    Holds the policy `model` and its `engine` (rl.policy_engine: backward, optimizer step,
    full weights; `engine.policy` runs the forwards), the LR `scheduler`, the `collector`
    (this rank's shard of the training problems in a PromptStream, sampled through `pool`
    and scored), the `updater` (the policy update and its skip counts), the `checkpointer`,
    the expert-load `history` and the held-out `eval_problems` (None: no periodic eval).

    `step(n)`: collector.collect -> Groups for this rank's share of training.prompts_per_step
    (none kept on any rank: logged, no update); the `lookahead` sends the first rounds of the
    next rollout.max_staleness steps to the engines; updater.update on the groups (mu
    optimizer steps); the expert load logged (and the aux-free bias moved when the router
    trains); the changed weights synced to the rollout engines; the LR scheduler stepped.
    Returns the step's metrics merged over ranks; beside the update's and the groups' ones:
      trainer_idle_s    seconds the trainer waited for generations (collect, and a sync
                        waiting for those in flight)
      engine_idle_s     seconds of the step an engine was not generating (mean over engines;
                        a generation counts in the step whose end reads its answer)
      update_overlap_s  seconds of the update an engine was generating (mean over engines)
      staleness_mean / staleness_max, dropped_stale: see rl.collector.Groups
    `policy_version` is the version of the trainer's weights: the last step whose update they
    hold (the engines': `pool.version`).
    """

    def __init__(
        self,
        recipe: GRPORecipe,
        model,
        tokenizer,
        lora_spec,
        pool: RolloutPool | None,
        parallel: DataParallel | None = None,
        share: PoolShare | None = None,
    ):
        parallel = parallel or DataParallel()
        share = share or PoolShare.of(parallel, 1)
        self.recipe, self.model, self.pool, self.lora_spec, self.parallel = (
            recipe,
            model,
            pool,
            lora_spec,
            parallel,
        )
        self.share = share  # a follower of a shared pool (not `share.leads`) has no engines
        algorithm, training = recipe.algorithm, recipe.training
        if training.prompts_per_step % parallel.world_size:
            raise RecipeError(
                f"training.prompts_per_step: {training.prompts_per_step} is not "
                f"divisible by the {parallel.world_size} data-parallel processes"
            )
        freeze_untrained(model, algorithm)
        reference = None
        if algorithm.beta > 0 and lora_spec is None:
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        # The forwards run through `engine.policy` (a DeepSpeed engine under DeepSpeed, else
        # the model, FSDP-sharded under FSDP2); the model's own methods (routers, expert load)
        # through `self.model`, which syncs and saves read block by block.
        self.engine = policy_engine(model, training, parallel)
        if reference is not None:
            reference = self.engine.prepare_reference(reference)
        warmup = max(training.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.engine.adamw, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        eos = model.config.eos_token_id
        stop_ids = eos if isinstance(eos, list) else [eos]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
        data = recipe.data
        # The pool's leader samples for its `share.size` processes (alone: share.index is the
        # rank, share.pools the world size); its followers have no stream of their own.
        stream = self.collector = self.lookahead = None
        if share.leads and data.streaming:
            stream = StreamedPrompts(
                stream_problems(data, "data", "train", data.limit, training.seed, data.arithmetic),
                training.seed,
                share.index,
                share.pools,
            )
        elif share.leads:
            problems = load_problems(
                data, "data", "train", data.limit, training.seed, data.arithmetic
            )
            stream = PromptStream(share.shard(problems), training.seed + parallel.rank)
        if share.leads:
            self.collector = Collector(
                recipe,
                tokenizer,
                pool,
                stream,
                training.prompts_per_step // parallel.world_size * share.size,
                parallel.rank,
                stop_ids,
            )
            self.lookahead = Lookahead(self.collector, recipe.rollout.max_staleness)
        self.updater = PolicyUpdater(
            recipe, model, self.engine, reference, lora_spec, parallel, pad_id
        )
        self.checkpointer = Checkpointer(
            recipe,
            model,
            tokenizer,
            lora_spec,
            self.engine,
            self.scheduler,
            stream,
            self.updater,
            parallel,
            self.lookahead,
        )
        self.eval_problems = None  # this pool's share of the held-out problems (followers: [])
        if recipe.eval.every:
            held_out = load_problems(
                recipe.eval, "eval", "test", recipe.eval.limit, 0, data.arithmetic
            )
            self.eval_problems = share.shard(held_out) if share.leads else []
        self.history = ExpertLoadHistory(
            [i for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoE)]
        )
        # The policy's weight version (the last step whose update it holds); `rollouts` is the
        # main process's rollouts.jsonl (None: not logged).
        self.policy_version = 0
        self.rollouts: MetricsFile | None = None
        # A restarted engine is streamed the current weights on the spot where this rank holds
        # them whole; sharded (ZeRO-3, FSDP2, expert parallel) every rank streams them together
        # (`with_engines`). Every rank streams the same kind: the adapters alone if the engines
        # apply them (native; vLLM per rollout.lora_sync), else merged weights.
        if pool is not None and self.engine.holds_full_weights:
            pool.weight_source = lambda: self.weight_stream(everything=True)
        self.tokenizer = pool.tokenizer if pool is not None else tokenizer.backend_tokenizer
        self.adapter_sync = adapter_sync_everywhere(parallel, pool)

    def step(self, step: int) -> dict[str, float]:
        started = time.monotonic()
        waited = self.pool.waited_seconds if self.pool is not None else 0.0
        metrics: dict[str, float] = {}
        first = self.lookahead.take(step) if self.lookahead is not None else None
        groups = self.with_engines(lambda: self.collector.collect(step, self.policy_version, first))
        if self.share.leads:  # (a shared pool's followers: their share comes from its leader)
            metrics = groups.metrics(time.monotonic() - started)
        if self.recipe.rollout.speculative_tokens and self.pool is not None:
            acceptance = self.pool.acceptance_rate()  # None: the engines do not report it
            if acceptance is not None:
                metrics["acceptance_rate"] = acceptance
        # the engines sample the next steps' first rounds while this one trains
        self.with_engines(lambda: self.lookahead.fill(step, self.recipe.training.max_steps))
        groups = self.share.scatter(groups)
        if not self.parallel.sum(len(groups.problems)):
            log.warning("step %d: every group's rewards agreed; nothing to learn from", step)
            metrics["skipped_all_filtered"] = 1.0
            return self.parallel.mean_metrics(metrics | self.idle(started, None, waited))
        trained = time.monotonic()
        metrics |= self.updater.update(groups)
        update = (trained, time.monotonic())
        self.policy_version = step
        metrics |= self.inspect(step, groups)
        train_tokens = sum(
            len(r.prompt_ids) + len(r.completion_ids) for group in groups.rollouts for r in group
        )
        metrics["train_tokens_per_second"] = (
            train_tokens * self.recipe.algorithm.mu / max(time.monotonic() - trained, 1e-9)
        )
        metrics |= self.balance(step)
        metrics["sync_seconds"] = self.sync_rollout_weights()
        if self.pool is not None:
            metrics["sync_megabytes"] = self.pool.synced_bytes / 2**20
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        metrics["skipped_updates"] = float(self.updater.skipped_updates)
        return self.parallel.mean_metrics(metrics | self.idle(started, update, waited))

    def idle(
        self, started: float, update: tuple[float, float] | None, waited: float
    ) -> dict[str, float]:
        """trainer_idle_s, engine_idle_s and update_overlap_s (see the class) of a step that
        began at `started` (time.monotonic()) and ran its update over `update` (None: none);
        `waited`: the pool's waited_seconds when it began. (None on a shared pool's follower.)"""
        if self.pool is None:
            return {}
        busy, workers = self.pool.take_busy(), max(len(self.pool.pids), 1)

        def generating(start: float, end: float) -> float:
            return sum(max(0.0, min(b, end) - max(a, start)) for _, a, b in busy) / workers

        ended = time.monotonic()
        return {
            "trainer_idle_s": self.pool.waited_seconds - waited,
            "engine_idle_s": ended - started - generating(started, ended),
            "update_overlap_s": generating(*update) if update else 0.0,
        }

    def weight_stream(self, everything: bool):
        """What the engines load (moetune.rl.engine_weights), block by block: the tensors an
        optimizer step can change, or `everything`; to engines that apply the LoRA adapters
        themselves, the adapters alone. Sharded (ZeRO-3, FSDP2): every rank reads it."""
        if self.adapter_sync:
            return adapter_stream(self.model, trained_only=not everything)
        speculating = self.recipe.rollout.speculative_tokens > 0  # the engines draft with MTP
        return weight_stream(self.model, trained_only=not everything, mtp=speculating)

    def sync_rollout_weights(self, everything: bool = False) -> float:
        """Stream the tensors the step changed (`everything`: all) to this rank's engines, as
        weight version `policy_version`; seconds. Every rank calls it."""
        seconds = self.send(self.weight_stream(everything), version=self.policy_version)
        self.resync_stale()
        return seconds

    def send(self, stream, **options) -> float:
        """pool.sync(stream, **options): seconds. A shared pool's follower, which has no
        engines, reads the stream only if the policy is sharded (its gathers are collective)."""
        if self.pool is not None:
            return self.pool.sync(stream, **options)
        started = time.perf_counter()
        if not self.engine.holds_full_weights:
            for _ in stream:
                pass
        return time.perf_counter() - started

    def with_engines(self, request):
        """request() on this rank's engines (a shared pool's follower: None, request not run).
        With a sharded policy an engine restarted meanwhile is streamed the current weights by
        every rank together, and request runs again on the ranks where it failed. Every rank
        calls it."""
        if not self.resync_together:  # (a restarted engine resyncs from weight_source)
            return request() if self.share.leads else None
        result, done = None, not self.share.leads
        while True:
            if not done:
                try:
                    result, done = request(), True
                except EnginesNeedWeights:
                    pass
            if not self.parallel.max(float(not done)):
                return result
            self.send(self.weight_stream(everything=True), stale_only=True)

    @property
    def resync_together(self) -> bool:
        """Whether every rank streams the weights to a restarted engine together: the pool has
        no weight source (a sharded policy); on a shared pool's follower, whose leader's pool
        does not say, the same test on the policy engine."""
        if self.pool is not None:
            return self.pool.weight_source is None
        return not self.engine.holds_full_weights

    def resync_stale(self) -> None:
        """Give engines restarted during a sync the whole weights (every rank together)."""
        if not self.resync_together:
            return
        if self.parallel.max(float(self.pool is not None and self.pool.stale)):
            self.send(self.weight_stream(everything=True), stale_only=True)

    def inspect(self, step: int, groups) -> dict[str, float]:
        """Router agreement of the update's first forward; the samples (every rank's) appended
        to rollouts.jsonl by the main process, as `training.log_rollouts` says."""
        inspected = self.updater.inspected
        metrics = inspected.metrics(self.history.layer_ids) if inspected else {}
        keep = self.recipe.training.log_rollouts
        if keep is not False:

            def decode(ids):  # the prompt as the model saw it, special tokens too
                return self.tokenizer.decode(ids, skip_special_tokens=False)

            rows = sample_records(step, groups, inspected, decode)
            every = self.parallel.gather_to_main(rows)
            if self.rollouts is not None:
                self.rollouts.write_rows(spread(number_groups(every), keep))
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
        """Greedy accuracy on the held-out problems, each rank's share through its rollout
        engines. Every rank calls it."""
        problems, collector = self.eval_problems, self.collector
        correct = 0.0
        if problems:
            groups = self.with_engines(
                lambda: self.pool.generate(
                    collector.encode(problems), 1, collector.sampling(0, 0, greedy=True)
                )
            )
            totals, _, _ = collector.rewards(problems, groups, step)
            correct = float((totals.flatten() >= self.recipe.eval.pass_threshold).sum())
        else:
            self.with_engines(lambda: None)  # (joins a resync of the other ranks' engines)
        total = self.parallel.sum(len(problems))
        return {"eval/accuracy": self.parallel.sum(correct) / max(total, 1)}


def freeze_untrained(model, algorithm) -> None:
    """Freeze what GRPO does not train: the routers unless `algorithm.update_router`, the MTP
    modules unless `algorithm.mtp_weight` (the policy loss never reaches them; with it they
    train on the MTP loss, the drafter of speculative rollouts)."""
    if not algorithm.update_router:
        for router in model.routers():
            router.weight.requires_grad_(False)
    if not algorithm.mtp_weight:
        model.model.mtp.requires_grad_(False)
        return
    if not len(model.model.mtp):
        raise RecipeError(
            f"algorithm.mtp_weight={algorithm.mtp_weight}: the model has no MTP "
            "module (num_nextn_predict_layers=0) to train; set it to 0"
        )
    if not model.config.mtp_loss_weight:
        model.config.mtp_loss_weight = 1.0  # the forward computes the MTP loss
    if not algorithm.update_router:
        for module in model.model.mtp:
            if isinstance(module.block.mlp, MoE):
                module.block.mlp.gate.weight.requires_grad_(False)


def rollout_source(recipe: GRPORecipe, model, tokenizer, output: Path, write: bool = True) -> Path:
    """The folder the rollout engines start from: the checkpoint itself when it holds a
    tokenizer.json, else the policy's current weights written (by the process with `write`;
    expert parallel: gathered one layer at a time by every rank) to output/rollout_model."""
    if (
        recipe.model.path
        and (Path(recipe.model.path) / "tokenizer.json").exists()
        and recipe.model.fp8 is None
    ):
        return Path(recipe.model.path)
    folder = output / "rollout_model"
    if not write and expert_parallel_size(model) == 1:
        return folder
    with torch.no_grad():
        merged = copy.deepcopy(model)
        if recipe.lora is not None:
            from moetune.model.lora import merge_lora

            merge_lora(merged)  # (expert parallel: each rank's own experts)
        merged.save_pretrained(folder, write=write)
    if write:
        tokenizer.save_pretrained(str(folder))
    return folder


def check_lora_sync(recipe: GRPORecipe) -> None:
    """RecipeError, before any work, where `rollout.lora_sync: adapter` asks local vLLM engines
    for an adapter they cannot apply (moetune.rl.vllm_lora.refusal)."""
    rollout = recipe.rollout
    if not (
        recipe.lora is not None
        and rollout.lora_sync == "adapter"
        and rollout.backend == "vllm"
        and not rollout.remote
    ):
        return
    config = resolve_config(recipe.model)
    spec = lora_spec(recipe.lora, config.num_hidden_layers + config.num_nextn_predict_layers)
    cuda = torch.cuda.is_available()
    try:
        vllm_lora.adapter_sync(
            "adapter", [vllm_lora.refusal(spec, config, cuda, rollout.speculative_tokens)]
        )
    except ValueError as error:
        raise RecipeError(str(error)) from None


def adapter_sync_everywhere(parallel: DataParallel, pool: RolloutPool | None) -> bool:
    """Whether every process streams the LoRA adapters alone (its pool's engines apply them)
    rather than merged weights; the same answer on every rank (a shared pool's followers,
    `pool` None, follow). RecipeError on every rank where the pools disagree: each process
    streams one kind to its engines, in step with the others."""
    alone = parallel.max(float(pool is not None and pool.adapter is not None))
    merged = parallel.max(float(pool is not None and pool.adapter is None))
    if alone and merged:
        raise RecipeError(
            "rollout.remote: some processes' engines apply the LoRA adapter themselves and "
            "others take merged weights (native and vLLM engines mixed, or vLLM engines that "
            "cannot apply it); serve one backend, or set rollout.lora_sync: merged"
        )
    return bool(alone)


def run_grpo(recipe: GRPORecipe) -> dict:
    """Train per the recipe; returns {"output_dir", "steps", "final_reward"}. Under a
    multi-process launcher every rank trains on its share of the prompts with its own
    rollout engines (rl.data_parallel), the policy engine replicated, DeepSpeed ZeRO or FSDP2
    as the launcher says (rl.policy_engine); the main process writes metrics and
    checkpoints."""
    rollout = recipe.rollout
    if (
        recipe.algorithm.routing_replay
        and rollout.backend == "vllm"
        and not rollout.remote
        and not torch.cuda.is_available()
    ):
        raise RecipeError(
            "algorithm.routing_replay: vLLM on CPU cannot return routed experts; "
            "set rollout.backend: native (or run on a GPU)"
        )
    check_lora_sync(recipe)
    parallel = DataParallel.from_environment()
    share = PoolShare.of(parallel, rollout.processes_per_pool)
    remote = remote_engines(rollout.remote, share)
    torch.manual_seed(recipe.training.seed)
    random.seed(recipe.training.seed)
    output = Path(recipe.training.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model)
    spec = attach_lora(model, recipe.lora, recipe.training.seed)
    try:  # before any engine starts
        check_speculative_tokens(
            rollout.speculative_tokens, model.config, recipe.model.path or recipe.model.config
        )
    except ValueError as error:
        raise RecipeError(str(error)) from None
    if recipe.model.path and parallel.is_main:
        warn_on_mismatch(recipe.model.path, recipe.template)
    source = rollout_source(recipe, model, tokenizer, output, write=parallel.is_main)
    if torch.cuda.is_available():  # the policy trains on this rank's GPU
        model.to(torch.cuda.current_device())
    parallel.barrier()  # the main process has written it before any engine reads it
    pool = None  # a shared pool's follower: the leader holds the engines
    if share.leads:
        pool = RolloutPool(
            source,
            backend=rollout.backend,
            workers=rollout.workers,
            tensor_parallel_size=rollout.tensor_parallel_size,
            dtype=rollout.dtype,
            max_model_len=rollout.max_model_len,
            timeout_s=rollout.timeout_s,
            seed=recipe.training.seed + parallel.rank,
            return_routed_experts=recipe.algorithm.routing_replay,
            remote=remote,
            adapter=spec,
            lora_sync=rollout.lora_sync,
            sync_bucket_mb=rollout.sync_bucket_mb,
            speculative_tokens=rollout.speculative_tokens,
            partial_rollouts=rollout.partial_rollouts,
        )
    with pool or contextlib.nullcontext():
        if rollout.partial_rollouts and pool is not None and "vllm" in pool.engine_backends:
            raise RecipeError(
                "rollout.partial_rollouts: vLLM engines (here the remote ones) cannot swap "
                "weights in the middle of a generation; serve native engines or set it false"
            )
        trainer = GRPOTrainer(recipe, model, tokenizer, spec, pool, parallel, share)
        resume = recipe.training.resume_from_checkpoint
        checkpoint = (
            Path(resume)
            if isinstance(resume, str)
            else (latest_checkpoint(output) if resume else None)
        )
        first = 1
        if checkpoint is not None:
            first = trainer.checkpointer.load(checkpoint) + 1
        trainer.policy_version = first - 1
        if checkpoint is not None or rollout.remote:  # remote engines start from their own
            trainer.sync_rollout_weights(everything=True)
        main = parallel.is_main
        resumed = first - 1 if checkpoint else None
        metrics_file = MetricsFile(output / "metrics.jsonl", resumed) if main else None
        if main and recipe.training.log_rollouts is not False:
            trainer.rollouts = MetricsFile(output / "rollouts.jsonl", resumed)
        reporters = Reporters(recipe.training.report_to, output, recipe) if main else None
        trainable = sum(
            getattr(p, "ds_numel", p.numel()) for p in trainer.engine.parameters
        )  # ZeRO-3: a shard
        if main:
            print(
                f"GRPO: {trainable:,} trainable parameters, {parallel.world_size} process(es), "
                f"{'remote' if remote else rollout.backend} rollouts x {len(pool.pids)} per "
                f"{share.size} process(es), "
                f"{recipe.training.max_steps} steps from step {first}"
            )
        metrics: dict[str, float] = {}
        bar = tqdm(
            range(first, recipe.training.max_steps + 1),
            desc="grpo",
            unit="step",
            disable=recipe.training.disable_tqdm or not main,
        )
        for step in bar:
            metrics = trainer.step(step)
            if trainer.eval_problems is not None and step % recipe.eval.every == 0:
                metrics |= trainer.evaluate(step)
            if main and (
                step % recipe.training.logging_steps == 0 or step == recipe.training.max_steps
            ):
                metrics_file.write({"step": step, **metrics})
                reporters.log(metrics, step)
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}")
            if step % recipe.training.save_steps == 0:
                trainer.checkpointer.save(output / f"checkpoint-{step}", step)
        trainer.checkpointer.save_weights(output)
        if main:
            reporters.close()
            trainer.history.plot(output / "expert_load.png")
            print(
                f"finished step {recipe.training.max_steps}: "
                f"reward {metrics.get('reward_mean', 0):.3f}; "
                f"{'adapter' if spec else 'model'}, metrics.jsonl"
                f"{', rollouts.jsonl' if trainer.rollouts else ''} and expert_load.png in {output}"
            )
        parallel.barrier()
    return {
        "output_dir": str(output),
        "steps": recipe.training.max_steps,
        "final_reward": metrics.get("reward_mean"),
    }


def remote_engines(addresses: list[str], share: PoolShare) -> list[str] | None:
    """This process's pool's share of `rollout.remote` (None: none given, or a shared pool's
    follower): every pools-th address from the pool's index, so each pool syncs its own
    engines and no two share one."""
    if not addresses:
        return None
    for address in addresses:
        try:
            parse_address(address)
        except ValueError as error:
            raise RecipeError(str(error)) from None
    if len(addresses) < share.pools:
        raise RecipeError(
            f"rollout.remote: {len(addresses)} engine(s) for {share.pools} rollout pools "
            f"(trainer processes / rollout.processes_per_pool); each pool needs one of its own"
        )
    return share.shard(addresses) if share.leads else None
