"""`moetune demo` end to end at toy size: SFT, held-out accuracy, GRPO, accuracy, report."""

import json
from pathlib import Path

import pytest

from moetune.recipes.cli import main

pytestmark = pytest.mark.integration  # the whole demo


def test_demo_writes_the_report_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    assert (
        main(
            [
                "demo",
                "--output",
                str(out),
                "--held-out",
                "4",
                "--sft",
                "training.max_steps=3",
                "data.arithmetic.count=200",
                "data.eval_fraction=0",
                "training.per_device_train_batch_size=8",
                "training.disable_tqdm=true",
                "--grpo",
                "training.max_steps=2",
                "rollout.backend=native",
                "eval.every=1",
                "eval.limit=4",
                "training.prompts_per_step=2",
                "algorithm.group_size=2",
                "algorithm.dynamic_sampling=false",
                "rollout.max_new_tokens=8",
                "training.disable_tqdm=true",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert {
        "sft_accuracy",
        "grpo_accuracy",
        "seconds",
        "sft_checkpoint",
        "grpo_checkpoint",
    } <= report.keys()
    assert 0 <= report["sft_accuracy"] <= 1 and 0 <= report["grpo_accuracy"] <= 1
    for folder in (report["sft_checkpoint"], report["grpo_checkpoint"]):
        assert (Path(folder) / "config.json").exists() and (
            Path(folder) / "tokenizer.json"
        ).exists()
    for png in ("reward_curve.png", "accuracy.png", "expert_load.png"):
        assert (out / png).stat().st_size > 5_000, png
    out_text = capsys.readouterr().out
    assert "held-out accuracy: SFT" in out_text
    # the printed command reproduces the GRPO figure through moetune eval from the run's recipe
    command = out_text.split("check the GRPO figure: ")[1].splitlines()[0].split()
    assert command[:3] == ["moetune", "eval", "--model"]
    assert main([*command[1:], "--output", str(tmp_path / "check")]) == 0
    check = json.loads((tmp_path / "check" / "eval.json").read_text())
    assert check["pass@1"] == report["grpo_accuracy"] and check["problems"] == 4
