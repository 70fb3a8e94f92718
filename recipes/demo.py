"""`moetune demo` (`make demo`): the main job on the embedded default, end to end.

Builds the tiny DeepSeek-V3 from its shipped config, SFTs it on builtin:arithmetic
(sft/arith_tiny.yaml) from a flawed demonstrator (most negative answers lose their minus
sign, `sign_slip`), measures greedy held-out accuracy, runs GRPO with rollout workers
and the math_accuracy + format rewards (grpo/arith_tiny.yaml), measures again on the same
held-out split, and prints `held-out accuracy: SFT X% -> GRPO Y%`. Writes report.json and
PNG plots (reward curve, accuracy, expert load) to --output.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from pathlib import Path

from moetune.recipes.loader import load_recipe
from moetune.recipes.run import resolve

SIGN_SLIP = 0.7  # share of negative SFT answers written without their minus sign


def held_out_accuracy(model_dir: Path, run, limit: int, output: Path) -> float:
    """Greedy pass@1 (math_accuracy) on the first `limit` held-out problems of the GRPO run
    `run`, through `moetune eval`'s own path: `moetune eval --model DIR --reward
    math_accuracy` with the run's recipe.yaml gives the same figure."""
    from moetune.recipes.held_out import held_out_recipe
    from moetune.rewards import RewardSpec
    from moetune.rl.evaluation import evaluate_recipe

    recipe = held_out_recipe(
        run, str(model_dir), [RewardSpec("math_accuracy")], limit=limit, output_dir=str(output)
    )
    return evaluate_recipe(recipe).pass_at_1


def eval_command(grpo_dir: Path, run, limit: int) -> str:
    """The `moetune eval` command that reproduces the demo's GRPO figure."""
    flags = "" if limit == run.eval.limit else f" --limit {limit}"
    return (
        f"moetune eval --model {shlex.quote(str(grpo_dir))} --reward math_accuracy --n 1 "
        f"--temperature 0{flags}"
    )


def plot_report(
    output: Path, grpo_dir: Path, sft_accuracy: float, grpo_accuracy: float
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (grpo_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(steps, [r["reward_mean"] for r in rows], label="mean reward (weighted total)")
    for name in sorted(k for k in rows[0] if k.startswith("reward/")):
        axis.plot(steps, [r.get(name, 0.0) for r in rows], label=name.split("/", 1)[1], alpha=0.7)
    axis.set(xlabel="GRPO step", ylabel="reward", title="GRPO reward per step (rollout samples)")
    axis.legend()
    figure.tight_layout()
    reward_png = output / "reward_curve.png"
    figure.savefig(reward_png, dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 4))
    evals = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    axis.plot(
        [0] + [s for s, _ in evals] + [steps[-1]],
        [sft_accuracy] + [a for _, a in evals] + [grpo_accuracy],
        marker="o",
    )
    axis.set(
        xlabel="GRPO step (0 = after SFT)",
        ylabel="greedy held-out accuracy",
        ylim=(0, 1),
        title=f"Held-out accuracy: SFT {sft_accuracy:.0%} -> GRPO {grpo_accuracy:.0%}",
    )
    figure.tight_layout()
    accuracy_png = output / "accuracy.png"
    figure.savefig(accuracy_png, dpi=100)
    plt.close(figure)
    expert_png = output / "expert_load.png"
    shutil.copyfile(grpo_dir / "expert_load.png", expert_png)
    return [reward_png, accuracy_png, expert_png]


def run(args) -> int:
    from moetune.recipes.run import execute

    started = time.perf_counter()
    output = Path(args.output)
    sft_dir, grpo_dir = output / "sft", output / "grpo"
    # The SFT demonstrations drop the minus sign of most negative answers: a flawed
    # demonstrator whose habit imitation learns and a verifier reward can correct.
    sft = load_recipe(
        resolve("sft/arith_tiny.yaml"),
        [
            f"training.output_dir={sft_dir}",
            f"data.arithmetic.sign_slip={SIGN_SLIP}",
            *args.sft_overrides,
        ],
    )
    execute(sft)
    grpo = load_recipe(
        resolve("grpo/arith_tiny.yaml"),
        [f"model.path={sft_dir}", f"training.output_dir={grpo_dir}", *args.grpo_overrides],
    )
    sft_accuracy = held_out_accuracy(sft_dir, grpo, args.held_out, output / "eval_sft")
    print(f"held-out accuracy after SFT: {sft_accuracy:.1%}")
    execute(grpo)
    grpo_accuracy = held_out_accuracy(grpo_dir, grpo, args.held_out, output / "eval_grpo")
    seconds = time.perf_counter() - started
    plots = plot_report(output, grpo_dir, sft_accuracy, grpo_accuracy)
    report = {
        "sft_accuracy": sft_accuracy,
        "grpo_accuracy": grpo_accuracy,
        "held_out_problems": args.held_out,
        "seconds": round(seconds, 1),
        "sft_checkpoint": str(sft_dir),
        "grpo_checkpoint": str(grpo_dir),
        "plots": [str(p) for p in plots],
    }
    (output / "report.json").write_text(json.dumps(report, indent=2))
    print(
        f"held-out accuracy: SFT {sft_accuracy:.1%} -> GRPO {grpo_accuracy:.1%}  "
        f"({seconds / 60:.1f} min; report {output / 'report.json'})"
    )
    print(f"check the GRPO figure: {eval_command(grpo_dir, grpo, args.held_out)}")
    return 0


def add_subcommand(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="SFT then GRPO on the tiny model; held-out accuracy before and after",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument(
        "--output", default="runs/demo", help="folder for checkpoints, report, plots"
    )
    parser.add_argument(
        "--held-out",
        type=int,
        default=100,
        help="held-out problems (default 100 of the 112 in the test split)",
    )
    parser.add_argument(
        "--sft",
        dest="sft_overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides of sft/arith_tiny.yaml",
    )
    parser.add_argument(
        "--grpo",
        dest="grpo_overrides",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="overrides of grpo/arith_tiny.yaml",
    )
    parser.set_defaults(func=run)
