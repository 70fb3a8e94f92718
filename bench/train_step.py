"""Tokens/s of a full training step (forward + backward + fused AdamW): moetune vs transformers.

Both models are the same DeepSeek-V3 architecture with the same weights (moetune saves,
transformers loads the folder); transformers runs its defaults (grouped_mm experts, sdpa
attention). The losses of the first step are checked equal before timing.

    python bench/train_step.py  # CPU: a tiny model, batch 4 x 256 tokens, float32, fused AdamW
    python bench/train_step.py --gpu    # H200: 1.95B parameters, 2 x 4096 tokens, bf16, fused AdamW
    python bench/train_step.py --gpu --profile   # and the top GPU kernels of each step
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from profiling import print_top_kernels

from moetune.model import DeepseekV3Config, DeepseekV3ForCausalLM

CPU_SIZE = dict(
    num_key_value_heads=4,
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    kv_lora_rank=64,
    q_lora_rank=96,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
)
GPU_SIZE = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=16,
    kv_lora_rank=512,
    q_lora_rank=None,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    n_routed_experts=64,
    num_experts_per_tok=6,
    n_group=1,
    topk_group=1,
    n_shared_experts=2,
    first_k_dense_replace=1,
)


def train_step(model, optimizer, ids) -> None:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def time_steps(models, optimizers, ids, steps: int, sync, step=train_step) -> list[list[float]]:
    """Seconds per `step(model, optimizer, ids)` for each model, alternating models every step
    so that machine noise hits both alike; two warm-up rounds."""
    times = [[] for _ in models]
    for i in range(steps + 2):
        for model, optimizer, samples in zip(models, optimizers, times):
            sync()
            start = time.perf_counter()
            step(model, optimizer, ids)
            sync()
            if i >= 2:
                samples.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu", action="store_true", help="H200 size, bf16, cuda, fused AdamW")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument(
        "--profile", action="store_true", help="with --gpu: print each step's top kernels"
    )
    args = parser.parse_args()
    device, dtype = ("cuda", torch.bfloat16) if args.gpu else ("cpu", torch.float32)
    batch = args.batch or (2 if args.gpu else 4)
    seq = args.seq or (4096 if args.gpu else 256)
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    torch.manual_seed(0)
    config = DeepseekV3Config(
        **(GPU_SIZE if args.gpu else CPU_SIZE),
        num_nextn_predict_layers=0,
        max_position_embeddings=max(seq, 4096),
    )
    with torch.device(device):
        ours = DeepseekV3ForCausalLM(config).to(dtype).train()
    with tempfile.TemporaryDirectory() as folder:
        ours.save_pretrained(folder)
        theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(
            folder, dtype=dtype, device_map=device
        )
    theirs.train()
    params = sum(p.numel() for p in ours.parameters())
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    with torch.no_grad():
        loss_ours, loss_theirs = (
            ours(ids, labels=ids).loss.item(),
            theirs(input_ids=ids, labels=ids).loss.item(),
        )
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True) for m in (ours, theirs)]
    t_ours, t_theirs = map(
        statistics.median, time_steps([ours, theirs], optimizers, ids, args.steps, sync)
    )
    tokens = batch * seq
    print(
        f"train step (fwd+bwd+AdamW), {params / 1e6:.1f}M parameters, {batch} x {seq} tokens, "
        f"{dtype}, {device}"
    )
    print(f"  first loss: moetune {loss_ours:.5f}, transformers {loss_theirs:.5f}")
    print(f"  transformers: {t_theirs * 1e3:8.1f} ms/step, {tokens / t_theirs:10,.0f} tokens/s")
    print(f"  moetune:      {t_ours * 1e3:8.1f} ms/step, {tokens / t_ours:10,.0f} tokens/s")
    print(f"  speedup: {t_theirs / t_ours:.2f}x")
    if args.profile and args.gpu:
        for name, model, optimizer in zip(("moetune", "transformers"), (ours, theirs), optimizers):
            print_top_kernels(
                f"{name} train step", lambda m=model, o=optimizer: train_step(m, o, ids)
            )


if __name__ == "__main__":
    main()
