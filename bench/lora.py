"""LoRA training step: moetune's expert-aware LoRA vs its frozen base, and vs PEFT.

Same tiny DeepSeek-V3 model and tokens for all three; one step = forward + backward +
AdamW on the trainable parameters. Adapters (rank 16) sit on the attention projections,
the dense MLP, the shared experts and every routed expert. PEFT adapts transformers'
fused expert tensors through `target_parameters`, rebuilding delta-W every forward.

    python bench/lora.py
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
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).parent))
from train_step import CPU_SIZE

from moetune.model import DeepseekV3Config, DeepseekV3ForCausalLM
from moetune.model.lora import LoraSpec, apply_lora

RANK = 16
ATTENTION = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def step_times(models, ids, steps: int) -> list[list[float]]:
    """Seconds per step for each model, alternating models every step; two warm-up rounds."""
    optimizers = []
    for model in models:
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizers.append(torch.optim.AdamW(trainable, lr=1e-4, fused=True) if trainable else None)
    times = [[] for _ in models]
    for i in range(steps + 2):
        for model, optimizer, samples in zip(models, optimizers, times):
            start = time.perf_counter()
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(optimizer is None)
            loss = forward_loss(model, ids, embeds if optimizer is None else None)
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if i >= 2:
                samples.append(time.perf_counter() - start)
    return times


def forward_loss(model, ids, embeds):
    """LM loss; the frozen base gets gradients through its input embeddings instead."""
    if embeds is None:
        return model(input_ids=ids, labels=ids).loss
    from moetune.model.transformer import next_token_loss

    base = model.model
    hook = base.embed_tokens.register_forward_hook(lambda *_: embeds)
    try:
        hidden = base(ids)[0]
    finally:
        hook.remove()
    return next_token_loss(model.lm_head(hidden), ids, shift=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--experts", type=int, default=CPU_SIZE["n_routed_experts"],
                        help="routed experts per MoE layer")
    parser.add_argument("--top-k", type=int, default=CPU_SIZE["num_experts_per_tok"])
    args = parser.parse_args()
    torch.manual_seed(0)
    size = CPU_SIZE | {"n_routed_experts": args.experts, "num_experts_per_tok": args.top_k}
    config = DeepseekV3Config(**size, num_nextn_predict_layers=0)
    base = DeepseekV3ForCausalLM(config).train()
    with tempfile.TemporaryDirectory() as folder:
        base.save_pretrained(folder)
        ours = DeepseekV3ForCausalLM.from_pretrained(folder).train()
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    base.requires_grad_(False)
    ours_trainable = apply_lora(ours, LoraSpec(rank=RANK, alpha=2 * RANK))
    peft_model = get_peft_model(hf, LoraConfig(
        r=RANK, lora_alpha=2 * RANK, target_modules=ATTENTION + ["gate_proj", "up_proj", "down_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq))
    t_base, t_ours, t_peft = map(statistics.median, step_times([base, ours, peft_model], ids, args.steps))
    print(f"LoRA step (fwd+bwd+AdamW), rank {RANK}, {args.experts} experts top-{args.top_k}, "
          f"{args.batch} x {args.seq} tokens, float32, cpu")
    print(f"  trainable parameters: moetune {ours_trainable:,}, PEFT {peft_trainable:,}")
    print(f"  frozen base (fwd+bwd to the inputs): {t_base * 1e3:8.1f} ms")
    print(f"  moetune expert LoRA:                 {t_ours * 1e3:8.1f} ms  ({t_ours / t_base:.2f}x base)")
    print(f"  PEFT target_parameters on transformers: {t_peft * 1e3:8.1f} ms")
    print(f"  moetune vs PEFT: {t_peft / t_ours:.2f}x faster")


if __name__ == "__main__":
    main()
