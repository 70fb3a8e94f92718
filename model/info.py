"""`moetune info`: parameter counts and weight memory of a checkpoint's architecture.

Counts come from the modules actually built (on the meta device, so DeepSeek-V3's 671B
parameters cost no memory), not from a formula: total, activated per token (routed
experts count k/E of their parameters), MTP, a per-component breakdown, and weight bytes
in bf16 and in DeepSeek's FP8 layout (128x128-block float8 linears with float32 scales;
embeddings, head, norms and router kept in bf16, correction bias in float32).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

COMPONENTS = (
    "embedding",
    "attention",
    "dense_mlp",
    "router",
    "shared_experts",
    "routed_experts",
    "norms",
    "head",
)


@dataclass
class ParameterReport:
    total_params: int = 0  # without MTP
    active_params: int = 0  # per token, without MTP
    mtp_params: int = 0  # MTP modules as stored on disk (with their embedding/head copies)
    components: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COMPONENTS, 0))
    bf16_bytes: int = 0  # all tensors incl. MTP
    fp8_bytes: int = 0


def component_of(name: str) -> str:
    if "embed_tokens" in name:
        return "embedding"
    if name.startswith("lm_head"):
        return "head"
    if ".experts." in name:
        return "routed_experts"
    if ".shared_experts." in name:
        return "shared_experts"
    if ".mlp.gate." in name:
        return "router"
    if "self_attn" in name and "layernorm" not in name:
        return "attention"
    if ".mlp." in name:
        return "dense_mlp"
    return "norms"


def fp8_bytes(name: str, tensor: torch.Tensor) -> int:
    """Bytes of one tensor in DeepSeek's FP8 checkpoint layout."""
    quantized = ("attention", "dense_mlp", "shared_experts", "routed_experts")
    if tensor.dim() >= 2 and component_of(name) in quantized:
        rows, cols = tensor.shape[-2:]
        blocks = math.ceil(rows / 128) * math.ceil(cols / 128) * (tensor.numel() // (rows * cols))
        return tensor.numel() + 4 * blocks
    return tensor.numel() * (4 if tensor.dtype == torch.float32 and "bias" in name else 2)


def count_parameters(model: nn.Module) -> ParameterReport:
    config = model.config
    report = ParameterReport()
    top_k, experts = config.num_experts_per_tok or 0, config.n_routed_experts or 1
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if "e_score_correction_bias" in n)
    for name, tensor in tensors.items():
        n = tensor.numel()
        if ".mtp." in name:
            report.mtp_params += n
        else:
            report.total_params += n
            report.components[component_of(name)] += n
            report.active_params += n * top_k // experts if ".experts." in name else n
        report.bf16_bytes += n * 2
        report.fp8_bytes += fp8_bytes(name, tensor)
    shared = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    copies = config.num_nextn_predict_layers * shared  # each MTP layer stores both on disk
    report.mtp_params += copies
    report.bf16_bytes += 2 * copies
    report.fp8_bytes += 2 * copies
    return report


def build_on_meta(path: str):
    from moetune.model.config import load_config
    from moetune.model.transformer import DeepseekV3ForCausalLM

    config = load_config(path)
    with torch.device("meta"):
        return DeepseekV3ForCausalLM(config)


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def format_report(report: ParameterReport, path: str) -> str:
    with_mtp = report.total_params + report.mtp_params
    counts = [
        ("total parameters (without MTP)", report.total_params),
        ("activated per token", report.active_params),
        ("MTP parameters", report.mtp_params),
        ("total with MTP", with_mtp),
    ]
    lines = [path] + [f"  {label + ':':<32}{n:>18,} ({human(n)})" for label, n in counts]
    lines.append("  by component (without MTP):")
    for name, n in report.components.items():
        share = 100 * n / max(report.total_params, 1)
        lines.append(f"    {name:<16} {n:>18,} ({human(n):>8}, {share:5.1f}%)")
    lines += [
        f"  weights in bf16: {report.bf16_bytes / 1e9:,.1f} GB",
        f"  weights in FP8 (128x128 blocks): {report.fp8_bytes / 1e9:,.1f} GB",
    ]
    return "\n".join(lines)


def run(args) -> int:
    report = count_parameters(build_on_meta(args.path))
    print(json.dumps(asdict(report), indent=2) if args.json else format_report(report, args.path))
    return 0


def add_subcommand(subparsers) -> None:
    parser = subparsers.add_parser(
        "info",
        help="parameter counts and weight memory of a checkpoint or config.json",
        description="Build the model on the meta device from PATH (a checkpoint folder or a "
        "config.json) and print total, activated-per-token and MTP parameter "
        "counts, a per-component breakdown, and bf16/FP8 weight memory.",
    )
    parser.add_argument("path", help="checkpoint folder or config.json")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)
