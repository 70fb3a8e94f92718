"""GRPO's policy update on one step's groups: group advantages (a batch-wide kind over every
rank's groups: `batch_advantages`), then `mu` passes of the policy loss (rl.algorithms) over
micro-batches, each pass one optimizer step of the engine (rl.policy_engine).

The loss gets the sampler's logprobs for truncated importance sampling and a k3 KL to the
reference (LoRA: the adapter-disabled base; full: a frozen copy). Its denominators are the
whole batch's, over every micro-batch and data-parallel rank, so the summed gradient is that
of one process holding every group (a rank left with no group contributes zeros). A NaN/inf
loss or gradient skips the update; `max_nonfinite_in_row` of them in a row stop the run.
`mismatch_kl` compares the trainer's logprobs of the sampled tokens with the sampler's;
`inspected` keeps, per sequence, what rl.inspection makes of them (advantage, logprob gap,
router agreement: the routers' own top-k in that forward against the engine's routes).
With `algorithm.mtp_weight` > 0 the MTP loss on the sampled completions (the model's own,
as SFT trains it), weighted by each micro-batch's share of the batch's completion tokens, is
added to the policy loss: the rollout engines draft with the MTP modules (speculative
decoding), and this keeps them predicting the policy's tokens.
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from statistics import fmean

import torch

from moetune.config.schema import GRPORecipe
from moetune.model.lora import adapters_disabled
from moetune.model.routing_replay import recording_choices
from moetune.rl import algorithms
from moetune.rl.collector import Groups
from moetune.rl.data_parallel import DataParallel
from moetune.rl.inspection import Inspected, RouterAgreement
from moetune.rl.policy_batch import PolicyBatch, build_batch, policy_forward, token_logprobs

log = logging.getLogger(__name__)


class PolicyUpdater:
    """Updates the policy through `engine` (its `policy` runs the forwards; `model`, the
    unwrapped model, gives the device and the LoRA switch); `reference` is the frozen copy
    for the KL (None: LoRA's adapter-disabled policy, or no KL at beta 0). Counts the skipped
    (non-finite) updates: `nonfinite_in_row`, `skipped_updates`."""

    def __init__(
        self,
        recipe: GRPORecipe,
        model,
        engine,
        reference,
        lora_spec,
        parallel: DataParallel,
        pad_id: int,
    ):
        self.recipe, self.model, self.engine, self.reference = recipe, model, engine, reference
        self.lora_spec, self.parallel, self.pad_id = lora_spec, parallel, pad_id
        self.nonfinite_in_row = 0
        self.skipped_updates = 0
        self.inspected: Inspected | None = None  # the last update's, per sequence

    def update(self, groups: Groups) -> dict[str, float]:
        """mu optimizer steps on this rank's groups; the update's metrics (loss: the whole
        batch's, summed over ranks, averaged over the mu passes)."""
        algorithm, rollout = self.recipe.algorithm, self.recipe.rollout
        policy = self.engine.policy
        flat = [r for group in groups.rollouts for r in group]
        self.inspected = None
        batch = (
            build_batch(flat, self.pad_id, with_routes=algorithm.routing_replay) if flat else None
        )
        if batch is not None and algorithm.overlong == "mask":
            truncated = algorithms.overlong_mask([r.finish_reason for r in flat])
            batch.completion_mask[truncated] = 0
        global_tokens = int(self.parallel.sum(batch.completion_tokens if batch else 0))
        global_rows = int(self.parallel.sum(len(flat)))
        device = next(self.model.parameters()).device
        batch = batch.to(device) if batch is not None else None
        parts = self.micro_batches(len(flat))
        metrics, stats, entropies, mtp_losses, loss = {}, [], [], [], 0.0
        mtp_weight = algorithm.mtp_weight or 0.0
        agreement = RouterAgreement.of(flat)  # None: the engine reported no routes
        with torch.no_grad():
            old = self.logprobs(policy, batch, parts, agreement)
            reference = None
            if algorithm.beta > 0:
                with adapters_disabled(self.model) if self.lora_spec else nullcontext():
                    reference = self.logprobs(
                        self.reference if self.reference is not None else policy, batch, parts
                    )
        tokens = batch.completion_mask.sum(1) if batch is not None else torch.zeros(0)
        advantages = batch_advantages(groups.rewards.flatten(), tokens, algorithm, self.parallel)
        if batch is not None:
            advantages = advantages.to(device)
            metrics["mismatch_kl"] = algorithms.mismatch_kl(
                old, batch.sampler_logprobs, batch.completion_mask
            )
            self.inspected = Inspected.of(batch, old, advantages, agreement)
        for iteration in range(algorithm.mu):
            for part in parts:
                if part is None:
                    self.idle_pass(policy, backward=True)
                    continue
                micro = batch.rows(part)
                policy.train()
                logprobs, entropy, mtp_loss = policy_forward(
                    policy,
                    micro,
                    rollout.temperature,
                    with_entropy=iteration == 0,
                    with_mtp=mtp_weight > 0,
                )
                micro_loss, stat = algorithms.policy_loss(
                    algorithm.loss,
                    logprobs,
                    old[part],
                    advantages[part],
                    micro.completion_mask,
                    epsilon_low=algorithm.epsilon_low,
                    epsilon_high=algorithm.epsilon_high,
                    clip_ratio_c=algorithm.clip_ratio_c,
                    tau_pos=algorithm.tau_pos,
                    tau_neg=algorithm.tau_neg,
                    ref_logprobs=None if reference is None else reference[part],
                    beta=algorithm.beta,
                    sampler_logprobs=micro.sampler_logprobs if algorithm.tis_cap else None,
                    tis_cap=algorithm.tis_cap,
                    is_level=algorithm.is_level,
                    is_mode=algorithm.is_mode,
                    max_completion_length=rollout.max_new_tokens,
                    global_tokens=global_tokens,
                    global_rows=global_rows,
                )
                if mtp_loss is not None:  # keeps the drafter up with the policy
                    share = micro.completion_tokens / max(global_tokens, 1)
                    micro_loss = micro_loss + mtp_weight * share * mtp_loss
                    if iteration == 0:
                        mtp_losses.append(float(mtp_loss.detach()))
                if self.engine.backward(micro_loss):
                    loss += float(micro_loss.detach())
                stats.append(stat)
                if entropy is not None:
                    entropies.append(entropy)
            metrics["grad_norm"] = self.step()
        metrics["loss"] = self.parallel.sum(loss) / algorithm.mu
        if stats:
            metrics["entropy"] = fmean(entropies)
            metrics["policy_clip_fraction"] = fmean([s.clip_fraction for s in stats])
        kl = [s.kl for s in stats if s.kl is not None]
        if kl:
            metrics["kl"] = fmean(kl)
        dual = [s.dual_clip_fraction for s in stats if s.dual_clip_fraction is not None]
        if dual:
            metrics["policy_dual_clip_fraction"] = fmean(dual)
        if mtp_losses:
            metrics["mtp_loss"] = fmean(mtp_losses)
        tis = [s.tis_weight_mean for s in stats if s.tis_weight_mean is not None]
        if tis:
            metrics["tis_weight_mean"] = fmean(tis)
        masked = [s.is_masked_fraction for s in stats if s.is_masked_fraction is not None]
        if masked:
            metrics["is_masked_fraction"] = fmean(masked)
        return metrics

    def micro_batches(self, rows: int) -> list[slice | None]:
        """This rank's micro-batches (row slices). Sharded (DeepSpeed, FSDP), every rank runs as
        many as the rank with the most: the missing ones are None, idle passes."""
        size = self.recipe.training.micro_batch_size
        parts: list[slice | None] = [slice(start, start + size) for start in range(0, rows, size)]
        if self.engine.lockstep:
            parts += [None] * (int(self.parallel.max(len(parts))) - len(parts))
        return parts

    def logprobs(
        self,
        model,
        batch: PolicyBatch | None,
        parts: list[slice | None],
        agreement: RouterAgreement | None = None,
    ) -> torch.Tensor | None:
        """[B, L-1] token logprobs of the batch in eval mode, micro-batch by micro-batch; each
        forward's own routes (before any replay) added to `agreement` when given."""
        model.eval()
        found = []
        for part in parts:
            if part is None:
                self.idle_pass(model)
                continue
            recording = recording_choices(self.model) if agreement is not None else nullcontext()
            with recording as chosen:
                found.append(
                    token_logprobs(model, batch.rows(part), self.recipe.rollout.temperature)[0]
                )
            if agreement is not None:
                agreement.add(part, chosen, batch.input_ids.shape[1])
        return torch.cat(found) if found else None

    def idle_pass(self, model, backward: bool = False) -> None:
        """A forward (and backward) of one token that changes nothing: it keeps this rank in
        step with ranks that have more micro-batches. Eval mode leaves the expert load alone."""
        was_training = model.training
        model.eval()
        token = torch.full((1, 1), self.pad_id, device=next(self.model.parameters()).device)
        logits = model(token).logits
        if backward:
            self.engine.backward(logits.sum() * 0.0)
        model.train(was_training)

    def step(self) -> float:
        """Clip and step; a skipped step (NaN/inf, see rl.policy_engine) is counted, and
        `max_nonfinite_in_row` of them in a row stop the run. Returns the gradient norm (nan
        when skipped)."""
        norm = self.engine.step()
        if not math.isnan(norm):
            self.nonfinite_in_row = 0
            return norm
        self.nonfinite_in_row += 1
        self.skipped_updates += 1
        limit = self.recipe.training.max_nonfinite_in_row
        log.warning(
            "non-finite loss or gradient: update skipped (%d in a row)", self.nonfinite_in_row
        )
        if self.nonfinite_in_row >= limit:
            raise RuntimeError(
                f"GRPO stopped: {self.nonfinite_in_row} updates in a row had a "
                f"NaN/inf loss or gradient (training.max_nonfinite_in_row={limit})"
            )
        return norm


def batch_advantages(
    rewards: torch.Tensor, tokens: torch.Tensor, algorithm, parallel: DataParallel
) -> torch.Tensor:
    """Advantages [G*n] of this rank's rewards [G*n] (tokens [G*n]: each sequence's counted
    tokens). Group-wise kinds read this rank's groups alone; a batch-wide kind
    (`reinforce_pp`) is computed on every rank's rewards and tokens, gathered in rank order,
    and this rank's slice is kept, so R ranks get the advantages one process holding all the
    groups would (a rank without groups still joins the gather)."""
    n, kind = algorithm.group_size, algorithm.advantage
    if kind not in algorithms.BATCH_ADVANTAGE_KINDS:
        if not len(rewards):
            return rewards
        return algorithms.group_advantages(rewards, n, kind, k=algorithm.pass_at_k)
    every = parallel.gather((rewards.tolist(), tokens.tolist()))
    start = sum(len(r) for r, _ in every[: parallel.rank])
    all_rewards = torch.tensor([x for r, _ in every for x in r], dtype=rewards.dtype)
    all_tokens = torch.tensor([x for _, t in every for x in t], dtype=torch.float64)
    advantages = algorithms.group_advantages(all_rewards, n, kind, tokens=all_tokens)
    return advantages[start : start + len(rewards)]
