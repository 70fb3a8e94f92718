"""Inspecting GRPO: top-k overlap against a plain reference, the routers' own choice under
replay, router agreement of equal float32 weights, rollouts.jsonl on resume, and
`moetune rollouts show` (order, cutting, errors), the recipe keys."""

import json

import pytest
import torch
from test_routing_replay import own_routes, rollouts_of, tiny_model

from moetune.config.build import RecipeError
from moetune.model.routing_replay import (
    recording_choices,
    recording_routes,
    replaying_routes,
    route_overlap,
)
from moetune.recipes.cli import main
from moetune.recipes.loader import load_recipe
from moetune.recipes.run import resolve
from moetune.rl.inspection import Inspected, RouterAgreement, router_agreement, spread
from moetune.rl.policy_batch import build_batch, stack_routes, token_logprobs
from moetune.rl.rollout import Rollout
from moetune.rl.rollouts_file import cut
from moetune.training.metrics_file import MetricsFile


def test_route_overlap_and_agreement_match_a_plain_set_computation():
    layers, batch, length, k, experts = 3, 4, 7, 4, 12
    engine = torch.stack(
        [torch.randperm(experts)[:k] for _ in range(layers * batch * length)]
    ).view(layers, batch, length, k)
    trainer = torch.stack(
        [torch.randperm(experts)[:k] for _ in range(layers * batch * length)]
    ).view(layers, batch, length, k)
    trainer[0, 0, 0] = engine[0, 0, 0].flip(0)  # same set, another order: full overlap
    engine[:, 2, 5:] = -1  # not fed by the engine: left out
    engine[:, 3] = -1  # a sequence without routes: nan

    per_layer, per_row = router_agreement(engine, trainer)
    overlap = route_overlap(engine, trainer)
    sums = torch.zeros(layers), torch.zeros(batch)
    counts = torch.zeros(layers), torch.zeros(batch)
    for layer in range(layers):
        for row in range(batch):
            for t in range(length):
                if engine[layer, row, t, 0] < 0:
                    continue
                a, b = set(engine[layer, row, t].tolist()), set(trainer[layer, row, t].tolist())
                share = len(a & b) / k
                assert overlap[layer, row, t] == pytest.approx(share)
                sums[0][layer] += share
                sums[1][row] += share
                counts[0][layer] += 1
                counts[1][row] += 1
    assert overlap[0, 0, 0] == 1.0
    torch.testing.assert_close(per_layer, sums[0] / counts[0])
    torch.testing.assert_close(per_row[:3], sums[1][:3] / counts[1][:3])
    assert per_row[3].isnan()


def test_routers_record_their_own_choice_while_a_replay_overrides_it():
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 9))
    mine = own_routes(model, ids)
    forced = torch.stack([torch.randperm(16)[:4] for _ in range(mine.numel() // 4)]).view_as(mine)
    with (
        torch.no_grad(),
        replaying_routes(model, forced),
        recording_routes(model) as used,
        recording_choices(model) as chosen,
    ):
        model(ids)
    used, chosen = (torch.stack([layer[0].view(2, 9, -1) for layer in r]) for r in (used, chosen))
    assert torch.equal(used, forced)  # the forward ran the replayed experts
    assert torch.equal(chosen[0], mine[0])  # the first MoE layer's input is the same
    assert not torch.equal(chosen, forced)
    assert all(router.own_choices is None for router in model.routers())


def test_router_agreement_is_one_for_equal_float32_weights_over_micro_batches():
    """The sampler's routes (model.generate, the native engine's path) against the trainer's
    own choice in a batched teacher-forced forward of the same weights, two micro-batches."""
    model = tiny_model()
    rollouts = rollouts_of(model, [torch.randint(1, 128, (5,)).tolist() for _ in range(2)], n=2)
    batch = build_batch(rollouts, pad_id=0)
    agreement, old = RouterAgreement.of(rollouts), []
    for rows in (slice(0, 3), slice(3, 6)):  # as PolicyUpdater.logprobs: micro-batch by micro-batch
        with torch.no_grad(), recording_choices(model) as chosen:
            old.append(token_logprobs(model, batch.rows(rows))[0])
        agreement.add(rows, chosen, batch.input_ids.shape[1])
    inspected = Inspected.of(batch, torch.cat(old), torch.zeros(4), agreement)
    assert inspected.router_agreement == [1.0] * 4
    assert inspected.metrics([1, 2]) == {
        "router_agreement": 1.0,
        "router_agreement/layer_1": 1.0,
        "router_agreement/layer_2": 1.0,
    }
    assert max(inspected.logprob_gap_max) < 1e-4

    # another router than the engine's: the micro-batch sums equal one full-batch computation
    with torch.no_grad():
        model.routers()[0].weight.add_(torch.randn_like(model.routers()[0].weight))
    agreement = RouterAgreement.of(rollouts)
    for rows in (slice(0, 2), slice(2, 4)):
        with torch.no_grad(), recording_choices(model) as chosen:
            token_logprobs(model, batch.rows(rows))
        agreement.add(rows, chosen, batch.input_ids.shape[1])
    engine = stack_routes(rollouts, batch.input_ids.shape[1])
    per_layer, per_row = router_agreement(engine, own_routes(model, batch.input_ids))
    assert per_layer[0] < 0.9 and per_layer[1] < 1.0
    torch.testing.assert_close(torch.tensor(agreement.per_layer()), per_layer)
    torch.testing.assert_close(torch.tensor(agreement.per_row()), per_row)
    assert Inspected.of(batch, torch.cat(old), torch.zeros(4)).metrics([1, 2]) == {}
    assert RouterAgreement.of([*rollouts, Rollout([1], [2], "", "stop", [0.0])]) is None


def test_a_resumed_file_keeps_the_rows_up_to_the_step_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    rows = [{"step": s, "sample": i} for s in (1, 2, 3) for i in range(2)]
    MetricsFile(path).write_rows(rows)
    with open(path, "a") as f:
        f.write('{"step": 3, "sam')  # a crash mid-write
    MetricsFile(path, resume_step=2).write_rows([{"step": 3, "sample": 9}])
    read = [json.loads(line) for line in path.read_text().splitlines()]
    assert read == rows[:4] + [{"step": 3, "sample": 9}]
    assert spread(list(range(10)), 3) == [0, 3, 6] and spread([1, 2], True) == [1, 2]
    assert spread([1, 2], False) == [] and spread([1, 2], 5) == [1, 2]


def sample(step, group, index, reward, gap, text="x"):
    return {
        "step": step,
        "group": group,
        "sample": index,
        "prompt": "Compute: 1+1\n",
        "completion": text,
        "rewards": {"accuracy": reward},
        "reward": reward,
        "advantage": 0.0,
        "policy_version": step - 1,
        "staleness": 0,
        "finish_reason": "stop",
        "completion_tokens": 3,
        "logprob_gap": gap,
        "logprob_gap_max": None if gap is None else gap * 2,
        "router_agreement": 0.9,
    }


def test_show_orders_by_mismatch_then_best_and_worst_reward(tmp_path, capsys):
    rows = [
        sample(1, 0, 0, 0.0, 0.1),
        sample(2, 0, 0, 0.5, 0.002, "calm"),
        sample(2, 0, 1, 1.0, 0.3, "wild " + "long " * 100 + "end"),
        sample(2, 1, 0, 0.0, 0.05, "wrong"),
        sample(2, 1, 1, 0.8, None, "unscored"),
    ]
    (tmp_path / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["rollouts", "show", str(tmp_path), "--limit", "2", "--width", "40"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("step 2: 4 samples, reward mean 0.575, policy version 1, staleness 0")
    assert "step 1" not in out  # the last step by default
    lines = out.splitlines()

    def section(title):
        block = []
        for line in lines[lines.index(f" {title}:") + 1 :]:
            if not line.startswith("  "):
                break
            if line.startswith("  [group"):
                block.append(line.split("]")[0].strip() + "]")
        return block

    assert section("worst logprob mismatch") == ["[group 0 #1]", "[group 1 #0]"]
    assert section("best reward") == ["[group 0 #1]", "[group 1 #1]"]
    assert section("worst reward") == ["[group 1 #0]", "[group 0 #0]"]
    assert "completion: wild long long long lon ... ong long end" in out  # cut in the middle
    assert max(len(line.split(": ", 1)[-1]) for line in out.splitlines() if "tion:" in line) <= 40

    assert main(["rollouts", "show", str(tmp_path / "rollouts.jsonl"), "--step", "all"]) == 0
    assert capsys.readouterr().out.startswith("step 1: 1 samples")


def test_show_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["rollouts", "show", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moetune rollouts: {tmp_path / 'rollouts.jsonl'}: no such file")
    assert err.count("\n") == 1
    (tmp_path / "rollouts.jsonl").write_text(json.dumps(sample(1, 0, 0, 1.0, 0.1)) + "\n")
    assert main(["rollouts", "show", str(tmp_path), "--step", "7"]) == 2
    err = capsys.readouterr().err
    assert err == f"moetune rollouts: step 7 is not in {tmp_path / 'rollouts.jsonl'} (steps 1-1)\n"
    assert cut("a\nb", 20) == "a\\nb"


def test_recipe_keys_report_to_and_log_rollouts():
    path = resolve("grpo/arith_tiny")
    recipe = load_recipe(path, ["training.report_to=[wandb, tensorboard, jsonl]"])
    assert recipe.training.report_to == ["wandb", "tensorboard", "jsonl"]
    assert recipe.training.log_rollouts is True
    assert load_recipe(path, ["training.log_rollouts=4"]).training.log_rollouts == 4
    assert load_recipe(path, ["training.log_rollouts=false"]).training.log_rollouts is False
    with pytest.raises(RecipeError, match=r"training.report_to\[0\]: expected one of"):
        load_recipe(path, ["training.report_to=[mlflow]"])
    # SFT hands report_to to transformers, which has no `jsonl` (metrics.jsonl is written anyway)
    from moetune.finetune.sft import sft_config

    sft = resolve("sft/arith_tiny")
    both = load_recipe(sft, ["training.report_to=[jsonl, tensorboard]"])
    assert sft_config(both, chat=False).report_to == ["tensorboard"]
    only = load_recipe(sft, ["training.report_to=[jsonl]"])
    assert sft_config(only, chat=False).report_to == []
