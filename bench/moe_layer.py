"""One DeepSeekMoE layer, forward + backward: moetune vs transformers' DeepseekV3MoE.

transformers runs with `_experts_implementation="grouped_mm"` (its fastest path); both get
the same weights and tokens, and the outputs are checked equal before timing.

    python bench/moe_layer.py                 # CPU size: hidden 512, 32 experts, top-4, 2048 tokens
    python bench/moe_layer.py --gpu  # H200 size: hidden 2048, 64 experts, top-6, 8192 tokens, bf16
    python bench/moe_layer.py --gpu --profile # and the top GPU kernels of each layer
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

sys.path.insert(0, str(Path(__file__).parent))
from profiling import print_top_kernels

from moetune.model.config import DeepseekV3Config
from moetune.model.moe import MoE


def layer_config(args) -> DeepseekV3Config:
    return DeepseekV3Config(
        hidden_size=args.hidden,
        moe_intermediate_size=args.intermediate,
        n_routed_experts=args.experts,
        num_experts_per_tok=args.top_k,
        n_group=args.groups,
        topk_group=args.topk_groups,
        n_shared_experts=args.shared,
        first_k_dense_replace=0,
    )


def copy_weights(ours: MoE, theirs: DeepseekV3MoE) -> None:
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.gate.weight)
        theirs.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
        theirs.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        theirs.experts.down_proj.copy_(ours.experts.down_proj)
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(theirs.shared_experts, name).weight.copy_(
                getattr(ours.shared_experts, name).weight
            )


def gradient_differences(ours: MoE, theirs: DeepseekV3MoE, x, grad) -> dict[str, float]:
    """|g_ours - g_theirs| / |g_theirs| for the input and the routed experts' weights after
    one backward each; fails loudly above 2e-2 (bf16 is about 4e-3 per op)."""
    grads = []
    for layer in (ours, theirs):
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)
        grads.append(
            {
                "input": x.grad.float(),
                "gate_up_proj": layer.experts.gate_up_proj.grad.float(),
                "down_proj": layer.experts.down_proj.grad.float(),
            }
        )
    x.grad = None
    diffs = {name: ((grads[0][name] - g).norm() / g.norm()).item() for name, g in grads[1].items()}
    if max(diffs.values()) > 2e-2:
        raise SystemExit(f"moetune's gradients differ from transformers': {diffs}")
    return diffs


def time_steps(layers, x, grad, repeats: int, sync) -> list[list[float]]:
    """ms per forward+backward for each layer, alternating layers every repeat so that
    machine noise hits both alike; two warm-up rounds."""
    times = [[] for _ in layers]
    for i in range(repeats + 2):
        for layer, samples in zip(layers, times):
            x.grad = None
            sync()
            start = time.perf_counter()
            layer(x).backward(grad)
            sync()
            if i >= 2:
                samples.append((time.perf_counter() - start) * 1e3)
    return times


def gemm_floor(layer: MoE, x: torch.Tensor, repeats: int, sync) -> float:
    """Median ms of just the layer's matrix products (routed grouped GEMMs with the layer's
    own routing, shared-expert and router GEMMs; forward and backward shapes), no other work."""
    tokens = x.reshape(-1, x.shape[-1]).detach()
    with torch.no_grad():
        expert_ids, _, _ = layer.gate(tokens)
    counts = torch.bincount(expert_ids.flatten(), minlength=layer.experts.num_experts)
    offsets = counts.cumsum(0).to(torch.int32)
    rows = tokens.index_select(0, expert_ids.flatten().argsort() // expert_ids.shape[-1])
    gate_up, down = layer.experts.gate_up_proj.detach(), layer.experts.down_proj.detach()
    shared = layer.shared_experts
    w_in = torch.cat((shared.gate_proj.weight, shared.up_proj.weight)).detach()
    w_out = shared.down_proj.weight.detach()

    def products():
        h = torch._grouped_mm(rows, gate_up.transpose(-2, -1), offs=offsets)
        act = h[:, : h.shape[1] // 2].contiguous()
        out = torch._grouped_mm(act, down.transpose(-2, -1), offs=offsets)
        torch._grouped_mm(out, down, offs=offsets)
        torch._grouped_mm(out.t(), act, offs=offsets)
        torch._grouped_mm(h, gate_up, offs=offsets)
        torch._grouped_mm(h.t(), rows, offs=offsets)
        sh = tokens @ w_in.T
        sa = sh[:, : sh.shape[1] // 2]
        so = sa @ w_out.T
        so @ w_out, so.T @ sa, sh @ w_in, sh.T @ tokens
        tokens @ layer.gate.weight.detach().T

    times = []
    for i in range(repeats + 2):
        sync()
        start = time.perf_counter()
        products()
        sync()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu", action="store_true", help="H200 sizes, bf16, on cuda")
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--experts", type=int)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--groups", type=int, default=1)
    parser.add_argument("--topk-groups", type=int, default=1)
    parser.add_argument("--shared", type=int)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument(
        "--profile", action="store_true", help="with --gpu: print each layer's top kernels"
    )
    args = parser.parse_args()
    sizes = (
        dict(tokens=8192, hidden=2048, intermediate=1408, experts=64, top_k=6, shared=2)
        if args.gpu
        else dict(tokens=2048, hidden=512, intermediate=256, experts=32, top_k=4, shared=1)
    )
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    device, dtype = ("cuda", torch.bfloat16) if args.gpu else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    torch.manual_seed(0)
    config = layer_config(args)
    ours = MoE(config)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    hf_config = transformers.DeepseekV3Config(
        **{
            k: v
            for k, v in config.to_dict().items()
            if k in transformers.DeepseekV3Config.__dataclass_fields__
        }
    )
    hf_config._experts_implementation = "grouped_mm"
    theirs = DeepseekV3MoE(hf_config)
    copy_weights(ours, theirs)
    ours, theirs = ours.to(device, dtype), theirs.to(device, dtype)
    x = torch.randn(1, args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    with torch.no_grad():
        diff = (ours(x) - theirs(x)).abs().max().item()
    grad_diffs = gradient_differences(ours, theirs, x, grad)
    ours_ms, theirs_ms = time_steps([ours, theirs], x, grad, args.repeats, sync)
    t_ours, t_theirs = statistics.median(ours_ms), statistics.median(theirs_ms)
    t_floor = gemm_floor(ours, x, args.repeats, sync)
    print(
        f"MoE layer fwd+bwd, {args.tokens} tokens, hidden {args.hidden}, {args.experts} experts "
        f"top-{args.top_k}, intermediate {args.intermediate}, {args.shared} shared, "
        f"{dtype}, {device}"
    )
    print(
        f"  output max abs diff: {diff:.2e}; gradients' relative difference: "
        + ", ".join(f"{name} {value:.2e}" for name, value in grad_diffs.items())
    )
    print(f"  transformers grouped_mm: {t_theirs:8.2f} ms (median of {args.repeats})")
    print(f"  moetune:                 {t_ours:8.2f} ms")
    print(f"  speedup: {t_theirs / t_ours:.2f}x")
    print(
        f"  its matrix products alone: {t_floor:8.2f} ms (no layer can beat this; "
        f"transformers / products = {t_theirs / t_floor:.2f}x)"
    )
    if args.profile and args.gpu:
        for name, layer in (("moetune", ours), ("transformers grouped_mm", theirs)):
            print_top_kernels(
                f"{name} MoE layer fwd+bwd", lambda layer=layer: layer(x).backward(grad)
            )


if __name__ == "__main__":
    main()
