"""Asynchronous GRPO: samples/s and held-out accuracy at rollout.max_staleness 0 (the
synchronous loop: the baseline), 1 and 4.

The demo's GRPO half on CPU: from `make demo`'s SFT model (trained once and cached in --work
by bench/grpo_vs_trl.py's recipe, or --sft-model DIR), grpo/arith_tiny.yaml as the demo runs
it (16 prompts x 8 samples, <= 64 new tokens, DAPO, lr 2e-5, math_accuracy + 0.2 x format,
dynamic sampling with one refill round, TIS cap 2) with one native rollout engine. Each run is
a subprocess with OMP_NUM_THREADS=1 and torch.set_num_threads(1): the trainer and its engine
process take one thread each, a core each of a 2-core machine.

Per run: samples/s = the samples the updates learned from (groups used x 8) over the wall
time from the start of step 1 to the end of the last step (no start-up; from step 1, since
an asynchronous run's first step sends the next k steps' generations, which a later start
would leave out); the trainer's and the engine's idle shares of that time (trainer_idle_s,
engine_idle_s);
greedy accuracy on the first --held-out held-out problems after the last step (the demo's
`moetune eval` path). Seeds are training.seed (prompt order, sampling). One JSON line per
max_staleness, means over the seeds, each seed's figures beside them, and the ratio of
samples/s against max_staleness 0 (mean of the per-seed ratios); then the goal check:
>= 1.3x samples/s with accuracy within 3 points of the synchronous runs'.

    .venv/bin/python bench/async_grpo.py [--steps 10] [--seeds 0 1 2] [--staleness 0 1 4]
                                         [--held-out 112] [--sft-model runs/demo/sft]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from grpo_vs_trl import sft_checkpoint


def run_side(model_dir: Path, out: Path, steps: int, seed: int, staleness: int, held_out: int):
    """One GRPO run (in this process): step end times, metrics, held-out accuracy."""
    import torch

    torch.set_num_threads(1)
    from moetune.recipes.demo import held_out_accuracy
    from moetune.recipes.loader import load_recipe
    from moetune.recipes.run import execute, resolve
    from moetune.rl import grpo

    starts, ends, step = [], [], grpo.GRPOTrainer.step

    def stamped_step(self, number):
        starts.append(time.perf_counter())
        metrics = step(self, number)
        ends.append(time.perf_counter())
        return metrics

    grpo.GRPOTrainer.step = stamped_step
    recipe = load_recipe(
        resolve("grpo/arith_tiny.yaml"),
        [
            f"model.path={model_dir}",
            "rollout.backend=native",
            f"rollout.max_staleness={staleness}",
            f"training.max_steps={steps}",
            f"training.seed={seed}",
            "training.save_steps=1000000",
            "training.disable_tqdm=true",
            "training.report_to=[]",
            "training.log_rollouts=false",
            "eval.every=0",
            f"training.output_dir={out}",
        ],
    )
    execute(recipe)  # writes recipe.yaml beside the weights, as `moetune run` does
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracy = held_out_accuracy(out, recipe, held_out, out / "held_out")
    return {"starts": starts, "ends": ends, "rows": rows, "accuracy": accuracy}


def summary(result: dict, group: int) -> dict:
    rows = result["rows"]
    wall = result["ends"][-1] - result["starts"][0]
    return {
        "samples_per_s": sum(r["groups_used"] for r in rows) * group / wall,
        "trainer_idle": sum(r["trainer_idle_s"] for r in rows) / wall,
        "engine_idle": sum(r["engine_idle_s"] for r in rows) / wall,
        "staleness_mean": statistics.fmean(r["staleness_mean"] for r in rows),
        "dropped_stale": sum(r["dropped_stale"] for r in rows),
        "accuracy": result["accuracy"],
        "s_per_step": wall / len(rows),
    }


def uptime() -> str:
    return subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="GRPO steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 4])
    parser.add_argument("--held-out", type=int, default=112, help="held-out problems scored")
    parser.add_argument("--work", type=Path, default=Path("/tmp/moetune-bench-async"))
    parser.add_argument("--sft-model", type=Path, help="start from this SFT checkpoint")
    parser.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--model", "--out", "--result", "--seed", "--k"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:  # a child: one run, its results as JSON
        result = run_side(
            Path(args.model), Path(args.out), args.steps, int(args.seed), int(args.k), args.held_out
        )
        Path(args.result).write_text(json.dumps(result))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.sft_model or sft_checkpoint(args.work)
    print(json.dumps({"start": uptime()}), flush=True)
    runs: dict[int, list[dict]] = {k: [] for k in args.staleness}
    environment = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for seed in args.seeds:
        for k in args.staleness:
            out = args.work / f"k{k}_seed{seed}"
            result = args.work / f"k{k}_seed{seed}.json"
            command = [sys.executable, __file__, "--side", "--model", str(model_dir)]
            command += ["--out", str(out), "--result", str(result), "--seed", str(seed)]
            command += ["--k", str(k), "--steps", str(args.steps), "--held-out", str(args.held_out)]
            load = uptime()
            subprocess.run(command, check=True, env=environment)
            runs[k].append(summary(json.loads(result.read_text()), 8) | {"uptime": load})
    base = runs[args.staleness[0]]
    verdicts = []
    for k, results in runs.items():
        line = {"max_staleness": k, "baseline": f"max_staleness {args.staleness[0]}"}
        for key in ("samples_per_s", "trainer_idle", "engine_idle", "accuracy", "s_per_step"):
            line[key] = statistics.fmean(r[key] for r in results)
        line["ratio"] = statistics.fmean(
            r["samples_per_s"] / b["samples_per_s"] for r, b in zip(results, base)
        )
        line["accuracy_points_vs_baseline"] = 100 * (
            line["accuracy"] - statistics.fmean(b["accuracy"] for b in base)
        )
        line["per_seed"] = {seed: r for seed, r in zip(args.seeds, results)}
        print(json.dumps(line), flush=True)
        if k != args.staleness[0]:
            verdicts.append(
                f"max_staleness {k}: {line['ratio']:.2f}x samples/s "
                f"({'meets' if line['ratio'] >= 1.3 else 'misses'} 1.3x), accuracy "
                f"{line['accuracy_points_vs_baseline']:+.1f} points "
                f"({'within' if abs(line['accuracy_points_vs_baseline']) <= 3 else 'outside'} 3)"
            )
    print(json.dumps({"end": uptime(), "goal": verdicts}), flush=True)


if __name__ == "__main__":
    main()
