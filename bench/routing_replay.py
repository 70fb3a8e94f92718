"""Routing replay: sampler/trainer mismatch with and without replaying the sampler's experts.

The sampler is moetune's native generate (absorbed-MLA decode over the latent cache); the
trainer is the training-path forward over prompt + completion, as GRPO computes it. In
bfloat16 the two paths round differently and some tokens flip experts; routing replay
forces the sampler's experts in the trainer's forward. Prints mismatch_kl (the k3 estimate
GRPO logs) and the share of (token, layer) routes that differ, each without and with replay.

    python bench/routing_replay.py [--model FOLDER] [--dtype bfloat16] [--prompts 32] [--n 8]
"""

from __future__ import annotations

import argparse
from importlib.resources import files

import torch

from moetune.model import DeepseekV3ForCausalLM, load_config
from moetune.model.routing_replay import recording_routes
from moetune.rl.algorithms import mismatch_kl
from moetune.rl.policy_batch import build_batch, token_logprobs
from moetune.rl.rollout import Rollout


def build(folder: str | None, dtype: torch.dtype) -> DeepseekV3ForCausalLM:
    if folder:
        return DeepseekV3ForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    torch.manual_seed(0)
    config = load_config(files("moetune.model") / "configs" / "tiny_arith.json")
    return DeepseekV3ForCausalLM(config).to(dtype).eval()


def sample(model, prompts: int, n: int, max_new_tokens: int) -> list[Rollout]:
    rollouts = []
    vocab = model.config.vocab_size
    for seed in range(prompts):
        prompt = torch.randint(
            3, vocab, (12,), generator=torch.Generator().manual_seed(seed)
        ).tolist()
        out = model.generate(
            [prompt] * n,
            max_new_tokens=max_new_tokens,
            temperature=1.0,
            record_routes=True,
            generator=torch.Generator().manual_seed(seed),
        )
        rollouts += [
            Rollout(prompt, ids, "", reason, logprobs, routes)
            for ids, logprobs, reason, routes in zip(
                out.sequences, out.logprobs, out.finish_reasons, out.routed_experts
            )
        ]
    return rollouts


def flipped_routes(model, batch) -> float:
    """Share of fed (token, layer) pairs whose trainer-path expert set differs from the
    sampler's."""
    with torch.no_grad(), recording_routes(model) as recorded:
        model(batch.input_ids, attention_mask=batch.attention_mask)
    mine = torch.stack([layer[0].view(*batch.input_ids.shape, -1) for layer in recorded])
    theirs = batch.routes
    fed = (theirs >= 0).all(-1)
    differ = (mine.sort(-1).values != theirs.sort(-1).values).any(-1)
    return float((differ & fed).sum() / fed.sum())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="checkpoint folder (default: tiny_arith with fresh weights)"
    )
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    model = build(args.model, getattr(torch, args.dtype))
    rollouts = sample(model, args.prompts, args.n, args.max_new_tokens)
    print(
        f"{len(rollouts)} samples ({args.prompts} prompts x {args.n}), {args.dtype}, "
        f"{sum(len(r.completion_ids) for r in rollouts)} completion tokens"
    )
    flips = flipped_routes(model, build_batch(rollouts, pad_id=0, with_routes=True))
    results = {}
    for replay in (False, True):
        batch = build_batch(rollouts, pad_id=0, with_routes=replay)
        with torch.no_grad():
            logprobs, _ = token_logprobs(model, batch)
        results[replay] = mismatch_kl(logprobs, batch.sampler_logprobs, batch.completion_mask)
    print(f"routes that differ between sampler and trainer: {flips:.2%} of (token, layer) pairs")
    print(f"mismatch_kl without replay  {results[False]:.3e}")
    print(
        f"mismatch_kl with replay     {results[True]:.3e}   "
        f"ratio {results[True] / results[False]:.3f}"
    )


if __name__ == "__main__":
    main()
