"""`moetune reward score` end to end on a small JSONL file."""

import argparse
import json

from moetune.rewards.cli import add_subcommand


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="moetune")
    add_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_reward_score(tmp_path, capsys):
    rows = [
        {
            "prompt": "1+1?",
            "completion": "<think>easy</think><answer>\\boxed{2}</answer>",
            "answer": "2",
        },
        {"prompt": "2+2?", "completion": "it is 5", "answer": "4"},
        {
            "prompt": "sum",
            "completion": "```python\nprint(sum(map(int, input().split())))\n```",
            "answer": None,
            "tests": {"inputs": ["1 2"], "outputs": ["3"]},
        },
    ]
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = [
        "reward",
        "score",
        "--reward",
        "math_accuracy,format,code_tests",
        "--weights",
        "1,0.5,1",
        "--input",
        str(source),
        "--output",
        str(target),
    ]
    assert run_cli(argv) == 0
    scored = [json.loads(line) for line in target.read_text().splitlines()]
    assert [row["rewards"] for row in scored] == [
        {"math_accuracy": 1.0, "format": 1.0, "code_tests": None},
        {"math_accuracy": 0.0, "format": 0.0, "code_tests": None},
        {"math_accuracy": None, "format": 0.0, "code_tests": 1.0},
    ]
    assert [row["reward"] for row in scored] == [1.5, 0.0, 1.0]
    assert scored[0]["answer"] == "2"  # input fields are kept
    summary = capsys.readouterr().out
    assert "samples: 3  mean reward: 0.8333" in summary
    assert "math_accuracy: mean 0.5000 over 2 scored, errors 0, timeouts 0" in summary


def test_reward_score_reports_a_failing_reward(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    argv = [
        "reward",
        "score",
        "--reward",
        "math_accuracy",
        "--input",
        str(source),
        "--output",
        str(tmp_path / "out.jsonl"),
    ]
    assert run_cli(argv) == 1
    assert "'math_accuracy' failed on sample 0" in capsys.readouterr().err
