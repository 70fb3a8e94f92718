"""`moetune reward score`: score completions offline.

    moetune reward score --reward math_accuracy,format --input in.jsonl --output out.jsonl
    moetune reward score --reward trl.rewards:get_soft_overlong_punishment \
        --options '{"trl.rewards:get_soft_overlong_punishment": {"max_completion_len": 512,
                    "soft_punish_cache": 64}}' --input in.jsonl --output out.jsonl

Each input line is a JSON object with `prompt`, `completion` and any columns the rewards read
(`answer`, `tests`, `completion_ids`, ...); a conversational `prompt` is a list of
`{"role", "content"}` messages. Each output line is the input plus `rewards` (value per
function), `reward` (the weighted total) and, where a function called `log_extra`, `extra`.
A summary (mean reward, errors, timeouts, logged metrics) follows the progress bar.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_subcommand(subparsers) -> None:
    reward = subparsers.add_parser("reward", help="Work with reward functions.")
    actions = reward.add_subparsers(dest="reward_command", metavar="ACTION", required=True)
    parser = actions.add_parser("score", help="Score a JSONL file of completions.")
    parser.add_argument(
        "--reward",
        required=True,
        metavar="NAME[,NAME...]",
        help="registered names, entry points, package.module:function or path/to/file.py:function",
    )
    parser.add_argument(
        "--weights", metavar="W[,W...]", help="one weight per reward (default: 1 each)"
    )
    parser.add_argument(
        "--options",
        type=json.loads,
        default={},
        metavar="JSON",
        help="options per reward, as a JSON object: {NAME: {option: value}}",
    )
    parser.add_argument(
        "--on-error",
        choices=("raise", "zero"),
        default="raise",
        help="a failing sample stops scoring (raise) or scores 0 (zero)",
    )
    parser.add_argument("--input", required=True, type=Path, help="JSONL file to score")
    parser.add_argument("--output", required=True, type=Path, help="JSONL file to write")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per scoring call")
    parser.set_defaults(func=run_score)


def run_score(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from moetune.rewards.scoring import (
        RewardError,
        RewardSpec,
        RewardSpecError,
        resolve_rewards,
        score,
    )

    names = [name.strip() for name in args.reward.split(",") if name.strip()]
    weights = [float(w) for w in args.weights.split(",")] if args.weights else [1.0] * len(names)
    if len(weights) != len(names):
        print(f"error: {len(names)} rewards but {len(weights)} weights", file=sys.stderr)
        return 2
    unknown = sorted(set(args.options) - set(names))
    if unknown:
        print(f"error: --options names {', '.join(unknown)}, not among --reward", file=sys.stderr)
        return 2
    specs = [
        RewardSpec(name, weight, kwargs=args.options.get(name, {}), on_error=args.on_error)
        for name, weight in zip(names, weights)
    ]
    try:  # every name and option resolves before any row is scored
        resolve_rewards(specs)
    except RewardSpecError as error:
        print(f"moetune reward score: {error}", file=sys.stderr)
        return 2
    rows = _read_rows(args.input)
    summary = _Summary(names)
    with args.output.open("w") as output, tqdm(total=len(rows), unit="sample") as progress:
        for start in range(0, len(rows), args.batch_size):
            batch = rows[start : start + args.batch_size]
            keys = {key for row in batch for key in row} - {"prompt", "completion"}
            columns = {key: [row.get(key) for row in batch] for key in sorted(keys)}
            try:
                result = score(
                    specs, [r["prompt"] for r in batch], [r["completion"] for r in batch], columns
                )
            except RewardError as error:
                print(
                    f"error: {error} (in the batch starting at line {start + 1})", file=sys.stderr
                )
                return 1
            for i, row in enumerate(batch):
                rewards = {name: result.values[name][i] for name in names}
                extra = {column: values[i] for column, values in result.extra.items()}
                output.write(
                    json.dumps(
                        {**row, "rewards": rewards, "reward": result.totals[i]}
                        | ({"extra": extra} if extra else {}),
                        default=str,
                    )
                    + "\n"
                )
            summary.add(result)
            progress.update(len(batch))
    print(summary.render())
    return 0


def _read_rows(path: Path) -> list[dict]:
    rows = []
    with path.open() as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = {"prompt", "completion"} - set(row)
            if missing:
                raise SystemExit(f"error: {path}:{number} lacks {', '.join(sorted(missing))}")
            rows.append(row)
    return rows


class _Summary:
    def __init__(self, names: list[str]):
        self.names = names
        self.totals: list[float] = []
        self.values: dict[str, list[float]] = {name: [] for name in names}
        self.errors = dict.fromkeys(names, 0)
        self.timeouts = dict.fromkeys(names, 0)
        self.metrics: dict[str, list[float]] = {}

    def add(self, result) -> None:
        self.totals += result.totals
        for name, values in result.metrics.items():
            self.metrics.setdefault(name, []).extend(values)
        for name in self.names:
            self.values[name] += [v for v in result.values[name] if v is not None]
            self.errors[name] += result.errors[name]
            self.timeouts[name] += result.timeouts[name]

    def render(self) -> str:
        def mean(xs: list[float]) -> str:
            return f"{sum(xs) / len(xs):.4f}" if xs else "n/a"

        lines = [f"samples: {len(self.totals)}  mean reward: {mean(self.totals)}"]
        for name in self.names:
            lines.append(
                f"  {name}: mean {mean(self.values[name])} over "
                f"{len(self.values[name])} scored, errors {self.errors[name]}, "
                f"timeouts {self.timeouts[name]}"
            )
        lines += [f"  logged {name}: mean {mean(values)}" for name, values in self.metrics.items()]
        return "\n".join(lines)
