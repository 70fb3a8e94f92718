"""LoRA training step: moetune's expert-aware LoRA vs its frozen base, and vs PEFT.

Same tiny DeepSeek-V3 model and tokens for all three; one step = forward + backward +
AdamW on the trainable parameters. Adapters (rank 16) sit on the attention projections,
the dense MLP, the shared experts and every routed expert. PEFT adapts transformers'
fused expert tensors through `target_parameters`, rebuilding delta-W every forward.

    python bench/lora.py                # CPU: tiny model, 4 x 256 tokens, float32
    python bench/lora.py --gpu --fp8    # H200: the 1.95B train_step model, 2 x 4096 tokens, bf16,
                                        # plus moetune's LoRA on a frozen FP8 base
    python bench/lora.py --gpu --fp8 --profile   # and the top GPU kernels of each step
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).parent))
from profiling import print_top_kernels
from train_step import CPU_SIZE, GPU_SIZE, time_steps

from moetune.model import DeepseekV3Config, DeepseekV3ForCausalLM
from moetune.model.lora import LoraSpec, apply_lora

RANK = 16
ATTENTION = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def optimizer_for(model):
    """AdamW over the trainable parameters; None for the frozen base."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=1e-4, fused=True) if trainable else None


def lora_step(model, optimizer, ids) -> None:
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(optimizer is None)
    forward_loss(model, ids, embeds if optimizer is None else None).backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--gpu", action="store_true", help="the H200 size of bench/train_step.py, bf16, cuda"
    )
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="also time moetune's LoRA on a frozen FP8 base (fp8='frozen')",
    )
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--experts", type=int, help="routed experts per MoE layer")
    parser.add_argument("--top-k", type=int)
    parser.add_argument(
        "--profile", action="store_true", help="with --gpu: print each step's top kernels"
    )
    args = parser.parse_args()
    device, dtype = ("cuda", torch.bfloat16) if args.gpu else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    size = GPU_SIZE if args.gpu else CPU_SIZE
    size = size | {
        "n_routed_experts": args.experts or size["n_routed_experts"],
        "num_experts_per_tok": args.top_k or size["num_experts_per_tok"],
    }
    batch, seq = args.batch or (2 if args.gpu else 4), args.seq or (4096 if args.gpu else 256)
    torch.manual_seed(0)
    config = DeepseekV3Config(
        **size, num_nextn_predict_layers=0, max_position_embeddings=max(seq, 4096)
    )
    with torch.device(device):
        base = DeepseekV3ForCausalLM(config).to(dtype)
    names, models = ["frozen base (fwd+bwd to the inputs)", "moetune expert LoRA"], [base]
    with tempfile.TemporaryDirectory() as folder:
        base.save_pretrained(folder)
        models.append(DeepseekV3ForCausalLM.from_pretrained(folder, dtype=dtype, device=device))
        if args.fp8:
            names.append("moetune expert LoRA, frozen FP8 base")
            models.append(
                DeepseekV3ForCausalLM.from_pretrained(
                    folder, dtype=dtype, device=device, fp8="frozen"
                )
            )
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(
            folder, dtype=dtype, device_map=device
        )
    base.requires_grad_(False)
    ours_trainable = [
        apply_lora(model, LoraSpec(rank=RANK, alpha=2 * RANK)) for model in models[1:]
    ]
    names.append("PEFT target_parameters on transformers")
    models.append(
        get_peft_model(
            hf,
            LoraConfig(
                r=RANK,
                lora_alpha=2 * RANK,
                target_modules=ATTENTION + ["gate_proj", "up_proj", "down_proj"],
                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
            ),
        )
    )
    peft_trainable = sum(p.numel() for p in models[-1].parameters() if p.requires_grad)
    models = [model.train() for model in models]
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    with torch.no_grad():  # LoRA B starts at zero: every model computes its base
        losses = [forward_loss(model, ids, None).item() for model in models]
    optimizers = [optimizer_for(model) for model in models]
    times = [
        statistics.median(t)
        for t in time_steps(models, optimizers, ids, args.steps, sync, step=lora_step)
    ]
    print(
        f"LoRA step (fwd+bwd+AdamW), rank {RANK}, {size['n_routed_experts']} experts "
        f"top-{size['num_experts_per_tok']}, {batch} x {seq} tokens, {dtype}, {device}"
    )
    print(f"  trainable parameters: moetune {ours_trainable[0]:,}, PEFT {peft_trainable:,}")
    print(
        "  first losses: " + ", ".join(f"{loss:.5f}" for loss in losses) + " (in the order below)"
    )
    for name, seconds in zip(names, times):
        print(f"  {name + ':':42s} {seconds * 1e3:8.1f} ms  ({seconds / times[0]:.2f}x base)")
    for name, seconds in zip(names[1:-1], times[1:-1]):
        print(f"  {name}: {times[-1] / seconds:.2f}x the speed of PEFT")
    if args.profile and args.gpu:
        for name, model, optimizer in zip(names, models, optimizers):
            print_top_kernels(name, lambda m=model, o=optimizer: lora_step(m, o, ids))


if __name__ == "__main__":
    main()
