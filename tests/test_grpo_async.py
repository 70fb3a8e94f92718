"""Asynchronous GRPO (rollout.max_staleness) on the tiny model with real native engines: k = 0
keeps the synchronous loop, k = 1 generates while the trainer updates and resumes exactly,
samples staler than k are dropped and resampled, partial rollouts take a sync mid-generation.
"""

import pytest
import torch
from safetensors.torch import load_file
from test_grpo import FRESH, REWARDS, rewards, rows

from moetune.recipes.cli import main

pytestmark = pytest.mark.integration

WEIGHTS = "model-00001-of-00001.safetensors"


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "test_rewards.py"  # test_grpo's reward functions
    path.write_text(REWARDS)
    return path


def run(out, reward_file, *overrides: str) -> list[dict]:
    common = [*FRESH, rewards(reward_file, "length"), "rollout.backend=native"]
    arguments = ["run", "grpo/arith_tiny", *common, "algorithm.dynamic_sampling=false"]
    assert main([*arguments, *overrides, f"training.output_dir={out}"]) == 0
    return rows(out)


def test_staleness_1_overlaps_resumes_exactly_and_drops_what_k_0_cannot_use(tmp_path, reward_file):
    sync = run(tmp_path / "k0", reward_file, "training.max_steps=2")
    both = ["training.max_steps=4", "training.save_steps=2"]
    first = run(tmp_path / "k1", reward_file, "rollout.max_staleness=1", *both)
    # k = 0: nothing generates during an update, every sample on-policy
    assert all(r["update_overlap_s"] == 0 and r["staleness_max"] == 0 for r in sync)
    # k = 1: step 1 samples what the synchronous loop samples (same weights, same seeds)...
    assert first[0]["reward_mean"] == sync[0]["reward_mean"]
    assert first[0]["loss"] == pytest.approx(sync[0]["loss"], abs=1e-7)
    # ... and steps 2-4 learn from samples one update old, generated while the trainer
    # updated on the step before (the last step sends nothing ahead)
    assert [r["staleness_max"] for r in first] == [0, 1, 1, 1]
    assert all(r["update_overlap_s"] > 0 for r in first[:3]) and first[3]["update_overlap_s"] == 0
    assert all(r["dropped_stale"] == 0 and 0 < r["tis_weight_mean"] <= 2 for r in first)
    samples = rows(tmp_path / "k1", "rollouts.jsonl")
    assert [r["policy_version"] for r in samples] == [0] * 32 + [1] * 16 + [2] * 16
    assert [r["staleness"] for r in samples] == [0] * 16 + [1] * 48

    # resumed from checkpoint-2, whose queue holds step 3's samples (of version 1)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    (resumed_dir / "checkpoint-2").symlink_to(tmp_path / "k1" / "checkpoint-2")
    resumed = run(
        resumed_dir,
        reward_file,
        "rollout.max_staleness=1",
        *both,
        "training.resume_from_checkpoint=true",
    )
    assert [r["step"] for r in resumed] == [3, 4]
    for x, y in zip(first[2:], resumed):
        assert y["reward_mean"] == x["reward_mean"] and y["staleness_max"] == x["staleness_max"]
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6)
    expected = load_file(tmp_path / "k1" / WEIGHTS)
    for name, tensor in load_file(resumed_dir / WEIGHTS).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-6, msg=name)

    # the same checkpoint resumed with k = 0: step 3's queued samples are one version too
    # old, so they are dropped and their prompts sampled again from the current weights
    strict_dir = tmp_path / "strict"
    strict_dir.mkdir()
    (strict_dir / "checkpoint-2").symlink_to(tmp_path / "k1" / "checkpoint-2")
    (strict,) = run(
        strict_dir, reward_file, "training.max_steps=3", "training.resume_from_checkpoint=true"
    )
    assert strict["dropped_stale"] == 16 and strict["staleness_max"] == 0
    assert strict["groups_used"] == 4
    kept = [(r["prompt"], r["staleness"]) for r in rows(strict_dir, "rollouts.jsonl")]
    queued = [r["prompt"] for r in samples if r["step"] == 3]
    assert kept == [(p, 0) for p in queued]  # the same prompts, in the same order


def test_partial_rollouts_take_a_sync_between_decoding_steps(tmp_path, reward_file):
    """k = 2: the engine works through the two rounds sent at step 1 while the trainer
    updates; the sync after the update reaches it mid-generation, and the tokens after it
    record the new version (generating 2 x 16 samples of ~24 tokens outlasts an update on
    16: ~4x)."""
    logged = run(
        tmp_path,
        reward_file,
        "rollout.max_staleness=2",
        "rollout.partial_rollouts=true",
        "algorithm.routing_replay=true",
        "rollout.max_new_tokens=24",
        "training.max_steps=3",
    )
    assert all(r["staleness_max"] <= 2 and r["grad_norm"] > 0 for r in logged)
    samples = rows(tmp_path, "rollouts.jsonl")
    assert all(r["policy_version"] <= r["version_max"] <= r["step"] - 1 for r in samples)
    assert all(r["staleness"] == r["step"] - 1 - r["policy_version"] for r in samples)
    mixed = [r for r in samples if r["policy_version"] < r["version_max"]]
    assert mixed, "no generation went on with the weights of a sync that landed mid-way"
