"""`moetune rollouts show RUN [--step N] [--limit K]`: a GRPO run's samples, readable.

Every GRPO step appends its samples to <output_dir>/rollouts.jsonl (rl.inspection; off with
training.log_rollouts: false), one JSON object per sample:
  step, group, sample, rank     where it came from (group: index in the step, over ranks)
  prompt, completion            decoded (the prompt as the model saw it, template included)
  rewards {name: value}, reward each reward function's value, and the weighted total
  advantage                     the group advantage the update used
  policy_version, staleness     the step whose weights the engine sampled with (0: the
                                initial ones; the oldest, if a sync landed mid-generation);
                                how many updates the trainer's weights were ahead of those
                                when it learned from the sample (0: on-policy)
  version_max                   the newest weights that sampled one of its tokens
  finish_reason, completion_tokens
  logprob_gap, logprob_gap_max  mean and max |trainer logprob - engine logprob| over the
                                completion tokens (the trainer's before its update)
  router_agreement              mean |engine top-k & trainer top-k| / k over the sequence's
                                tokens and MoE layers (null: the engine reported no routes)

For each step shown: the samples with the worst logprob mismatch first, then those with the
best and the worst reward; long text is cut in the middle.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from moetune.config.build import RecipeError

FILE = "rollouts.jsonl"


def rollouts_path(run: str | Path) -> Path:
    """RUN: a GRPO output folder or its rollouts.jsonl."""
    path = Path(run)
    if path.is_dir():
        path = path / FILE
    if not path.is_file():
        raise RecipeError(
            f"{path}: no such file (GRPO runs write {FILE} into training.output_dir "
            "unless training.log_rollouts is false)"
        )
    return path


def read_steps(path: Path, step: int | None = None) -> dict[int, list[dict]]:
    """{step: rows} of the file (only `step` when given); a torn last line is skipped."""
    steps: dict[int, list[dict]] = {}
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if step is None or row.get("step") == step:
                steps.setdefault(row.get("step"), []).append(row)
    return steps


def cut(text: str, width: int) -> str:
    """One line: newlines shown as \\n, the middle cut out past `width` characters."""
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    if len(text) <= width:
        return text
    head = (width - 5) * 2 // 3
    tail = width - 5 - head
    return f"{text[:head]} ... {text[-tail:] if tail else ''}"


def number(value, digits: int = 3, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def gap(value) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3g}"


def describe(row: dict, width: int) -> list[str]:
    rewards = ", ".join(f"{name} {number(v)}" for name, v in row.get("rewards", {}).items())
    head = (
        f"  [group {row.get('group')} #{row.get('sample')}] reward {number(row.get('reward'))}"
        + (f" ({rewards})" if rewards else "")
        + f"  advantage {number(row.get('advantage'), sign=True)}"
        + f"  logprob gap {gap(row.get('logprob_gap'))} (max {gap(row.get('logprob_gap_max'))})"
    )
    if row.get("router_agreement") is not None:
        head += f"  router agreement {number(row['router_agreement'])}"
    head += f"  {row.get('finish_reason')}, {row.get('completion_tokens')} tokens"
    return [
        head,
        f"    prompt:     {cut(row.get('prompt', ''), width)}",
        f"    completion: {cut(row.get('completion', ''), width)}",
    ]


def ranked(rows: list[dict], key: str, highest: bool, limit: int) -> list[dict]:
    """The `limit` rows with the highest (or lowest) `key` (rows without a value left out)."""
    present = [r for r in rows if isinstance(r.get(key), (int, float)) and not math.isnan(r[key])]
    return sorted(present, key=lambda r: r[key], reverse=highest)[:limit]


def format_step(step: int, rows: list[dict], limit: int, width: int) -> str:
    """A step's summary line, then its worst-mismatch, best- and worst-reward samples."""
    rewards = [r["reward"] for r in rows if r.get("reward") is not None]
    agreement = [r["router_agreement"] for r in rows if r.get("router_agreement") is not None]
    first = rows[0]
    lines = [
        f"step {step}: {len(rows)} samples, reward mean "
        f"{number(sum(rewards) / len(rewards) if rewards else None)}, policy version "
        f"{first.get('policy_version')}, staleness {first.get('staleness')}"
        + (f", router agreement {number(sum(agreement) / len(agreement))}" if agreement else "")
    ]
    for title, key, highest in (
        ("worst logprob mismatch", "logprob_gap", True),
        ("best reward", "reward", True),
        ("worst reward", "reward", False),
    ):
        chosen = ranked(rows, key, highest, limit)
        if chosen:
            lines.append(f" {title}:")
            for row in chosen:
                lines += describe(row, width)
    return "\n".join(lines)


def show(run: str, step: str | None, limit: int, width: int) -> str:
    path = rollouts_path(run)
    wanted = None if step in (None, "all", "last") else parse_step(step)
    steps = read_steps(path, wanted)
    if wanted is not None and wanted not in steps:
        logged = sorted(read_steps(path))
        span = f"steps {logged[0]}-{logged[-1]}" if logged else "no steps"
        raise RecipeError(f"step {wanted} is not in {path} ({span})")
    if not steps:
        raise RecipeError(f"{path}: no samples logged yet")
    if step in (None, "last"):
        last = max(steps)
        steps = {last: steps[last]}
    return "\n\n".join(format_step(s, steps[s], limit, width) for s in sorted(steps))


def parse_step(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise RecipeError(f"--step: expected a step number, last or all, got {value!r}") from None


def run(args) -> int:
    if args.limit < 1 or args.width < 20:
        raise RecipeError("--limit must be >= 1 and --width >= 20")
    print(show(args.run, args.step, args.limit, args.width))
    return 0


def add_subcommand(subparsers) -> None:
    parser = subparsers.add_parser("rollouts", help="inspect a GRPO run's logged samples")
    commands = parser.add_subparsers(dest="rollouts_command", metavar="COMMAND", required=True)
    show_parser = commands.add_parser(
        "show",
        help="a step's samples: worst logprob mismatch, best and worst reward",
        description="Print a GRPO run's logged samples (RUN/rollouts.jsonl) readably."
        + " Per step: the samples whose trainer and engine logprobs differ most, then the "
        "best and the worst rewarded; long prompts and completions are cut in the middle.",
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show_parser.add_argument("run", metavar="RUN", help="a GRPO output_dir, or its rollouts.jsonl")
    show_parser.add_argument(
        "--step", help="the step to show: a number, last (default) or all (every logged step)"
    )
    show_parser.add_argument(
        "--limit", type=int, default=3, help="samples in each list (default 3)"
    )
    show_parser.add_argument(
        "--width", type=int, default=160, help="characters of a prompt or completion (default 160)"
    )
    show_parser.set_defaults(func=run)
