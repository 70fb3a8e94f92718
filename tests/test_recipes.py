"""Recipe loading: typed sections, overrides, and errors that name the key path."""

import json
import subprocess
import sys

import pytest
from tiny_configs import v3_config

from moetune.config.build import RecipeError
from moetune.config.schema import AlgorithmSection, EvalRecipe
from moetune.model import DeepseekV3ForCausalLM
from moetune.model.char_tokenizer import char_tokenizer
from moetune.recipes.cli import main
from moetune.recipes.loader import load_recipe
from moetune.recipes.run import resolve, shipped_recipes

RECIPE = """\
recipe: eval
model:
  path: {model}
data:
  source: builtin:arithmetic
  limit: 3
rewards:
  - name: math_accuracy
  - name: format
    weight: 0.5
    on_error: zero
eval:
  n: 2
  max_new_tokens: 4
  output_dir: {out}
"""


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_eval_recipe_runs_with_overrides(tmp_path):
    model = DeepseekV3ForCausalLM(v3_config(num_nextn_predict_layers=0, eos_token_id=1))
    model.save_pretrained(tmp_path / "model")
    char_tokenizer().save(str(tmp_path / "model" / "tokenizer.json"))
    recipe = write(tmp_path, RECIPE.format(model=tmp_path / "model", out=tmp_path / "out"))
    assert main(["eval", str(recipe), "eval.n=3", "data.limit=2"]) == 0
    summary = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert summary["k"] == 3 and summary["problems"] == 2


def test_sections_are_typed_and_nested_entries_built(tmp_path):
    recipe = load_recipe(
        write(tmp_path, RECIPE.format(model="m", out="o")), ["eval.temperature=0"], EvalRecipe
    )
    assert recipe.eval.temperature == 0.0 and isinstance(recipe.eval.temperature, float)
    assert recipe.rewards[1].name == "format" and recipe.rewards[1].weight == 0.5
    assert recipe.rewards[1].on_error == "zero" and recipe.model.dtype == "float32"


@pytest.mark.parametrize(
    "edit, overrides, message",
    [
        (
            ("  n: 2", "  temprature: 2"),
            [],
            "unknown key 'eval.temprature'; did you mean 'eval.temperature'?",
        ),
        (("  n: 2", "  n: two"), [], "eval.n: expected int, got str 'two'"),
        (
            ("    weight: 0.5", "    wieght: 0.5"),
            [],
            "unknown key 'rewards[1].wieght'; did you mean 'rewards[1].weight'?",
        ),
        (("recipe: eval", "recipe: grpo"), [], "recipe: expected one of ['eval'], got 'grpo'"),
        (
            ("data:\n  source: builtin:arithmetic\n  limit: 3\n", ""),
            [],
            "missing required key 'data'",
        ),
        (
            ("", ""),
            ["eval.max_new_tokens=lots"],
            "eval.max_new_tokens: expected int, got str 'lots'",
        ),
        (("", ""), ["modle.path=x"], "unknown key 'modle'; did you mean 'model'?"),
    ],
)
def test_recipe_errors_name_the_key(tmp_path, edit, overrides, message):
    text = RECIPE.format(model="m", out="o")
    if edit[0]:
        text = text.replace(*edit)
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path, text), overrides, EvalRecipe)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rollout.max_staleness=-1"], "rollout.max_staleness: -1: must be >= 0"),
        (["algorithm.is_mode=clip"], "algorithm.is_mode"),
        (["algorithm.is_level=word"], "algorithm.is_level"),
        (["rollout.max_staleness=1", "algorithm.tis_cap=null"], "algorithm.tis_cap: null"),
        (
            ["rollout.partial_rollouts=true", "rollout.backend=native"],
            "needs rollout.max_staleness",
        ),
        (["rollout.partial_rollouts=true", "rollout.max_staleness=1"], "partial_rollouts: vLLM"),
        (
            [
                "rollout.partial_rollouts=true",
                "rollout.max_staleness=1",
                "rollout.backend=native",
                "rollout.speculative_tokens=1",
            ],
            "rollout.partial_rollouts: speculative decoding",
        ),
    ],
)
def test_async_grpo_keys_are_checked(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(resolve("grpo/arith_tiny"), overrides)
    with pytest.raises(RecipeError, match="algorithm.is_mode: 'clip'"):
        AlgorithmSection(is_mode="clip")  # built in code, not from YAML


def test_cli_prints_recipe_errors_without_traceback_and_exits_2(tmp_path):
    missing = tmp_path / "nope.yaml"
    run = subprocess.run(
        [sys.executable, "-m", "moetune.recipes", "eval", str(missing)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert f"recipe {missing}: no such file" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("name", [name for name, _ in shipped_recipes()])
def test_every_shipped_recipe_passes_dry_run(name, capsys):
    assert main(["run", name, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "trainable:" in out and "total" in out and "devices needed" in out


def test_dry_run_of_deepseek_v3_fp8_lora_counts_the_full_model(capsys):
    assert main(["run", "sft/deepseek_v3_fp8_lora", "--dry-run"]) == 0
    out = capsys.readouterr().out
    total = int(out.split("parameters: ")[1].split()[0].replace(",", ""))
    trainable = int(out.split("trainable: ")[1].split()[0].replace(",", ""))
    # 671B without MTP, as `moetune info` counts; only the adapters train.
    assert 671.0e9 < total < 671.1e9 and trainable < 0.01 * total
    # Expert parallel over 32 GPUs fits; ZeRO-3 would shard parameters, never the FP8 base
    # (buffers).
    assert "expert parallel 32" in out and "fits in 80 GB" in out
    assert (
        main(
            [
                "run",
                "sft/deepseek_v3_fp8_lora",
                "model.expert_parallel=1",
                "plan.zero_stage=3",
                "--dry-run",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "ZeRO-3" in out and "does NOT fit in 80 GB" in out and "never shards buffers" in out


def test_dry_run_prints_moetune_plan(capsys):
    assert main(["run", "sft/arith_tiny", "--dry-run"]) == 0
    dry_run = capsys.readouterr().out
    assert main(["plan", "sft/arith_tiny"]) == 0
    assert capsys.readouterr().out == dry_run


def test_moetune_recipes_lists_shipped_recipes(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in (
        "sft/arith_tiny.yaml",
        "sft/arith_tiny_lora.yaml",
        "sft/deepseek_v2_lite_lora.yaml",
        "sft/moonlight_16b_lora.yaml",
        "sft/deepseek_v3_fp8_lora.yaml",
    ):
        assert name in out


@pytest.mark.parametrize(
    "arguments, message",
    [
        (
            ["training.lerning_rate=1e-3"],
            "unknown key 'training.lerning_rate'; did you mean 'training.learning_rate'?",
        ),
        (["training.max_steps=many"], "training.max_steps: expected int, got str 'many'"),
        (
            ["data.source=/no/such/data.jsonl"],
            "data.source: /no/such/data.jsonl: no such file or folder",
        ),
        (
            ["lora.experts={profile: /no/experts.json}"],
            "lora.experts.profile: /no/experts.json: no such file or folder",
        ),
        (
            ["model.config=tiny_nope"],
            "model.config: 'tiny_nope' is neither a file nor a shipped config",
        ),
    ],
)
def test_run_errors_exit_2_naming_the_key_without_traceback(arguments, message, capsys, tmp_path):
    """In process (the CLI's own process is checked by test_cli_prints_recipe_errors_...)."""
    recipe = "sft/arith_tiny_lora" if "lora" in arguments[0] else "sft/arith_tiny"
    assert main(["run", recipe, *arguments, f"training.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_dry_run_resolves_every_reward(tmp_path, capsys):
    """A misspelt reward, a broken reward file or a missing option fails the dry run."""
    broken = tmp_path / "broken.py"
    broken.write_text("def f(prompts, completions:\n    pass\n")
    cases = [
        (
            "{name: math_acuracy}",
            (
                "rewards[0] (math_acuracy): unknown reward "
                "'math_acuracy'. Did you mean 'math_accuracy'?"
            ),
        ),
        (f"{{name: '{broken}:f'}}", f"rewards[0] ({broken}:f): SyntaxError: '(' was never"),
        (
            "{name: soft_overlong, kwargs: {cache_length: 4}}",
            "rewards[0] (soft_overlong): reward 'soft_overlong' needs the option 'max_length'",
        ),
    ]
    for reward, message in cases:
        assert main(["run", "grpo/arith_tiny", f"rewards=[{reward}]", "--dry-run"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
