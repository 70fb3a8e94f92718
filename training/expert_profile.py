"""ESFT expert selection: profile which routed experts a task's tokens use, pick a subset.

`profile_experts` runs the model over task data and records, per MoE layer and expert,
the ESFT criteria (Wang et al. 2024, "Let the Expert Stick to His Last"):
  token_ratio[e] = fraction of tokens whose top-k includes e   (sums to k per layer)
  gate_score[e]  = mean over tokens of e's normalised affinity  (sums to 1 per layer)
`select_experts` keeps, per layer, the highest-scoring experts until their cumulative
score (normalised to sum 1) reaches top_p. The result feeds `LoraSpec.experts`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

CRITERIA = ("token", "gate")


@dataclass
class ExpertProfile:
    """Per MoE layer index: token_ratio [E] and gate_score [E], over `tokens` tokens."""

    token_ratio: dict[int, list[float]]
    gate_score: dict[int, list[float]]
    tokens: int

    def to_json(
        self, selected: dict[int, list[int]] | None = None, criterion: str = "", top_p: float = 0.0
    ) -> dict:
        return {
            "tokens": self.tokens,
            "criterion": criterion,
            "top_p": top_p,
            "token_ratio": self.token_ratio,
            "gate_score": self.gate_score,
            "selected": selected or {},
        }


@torch.no_grad()
def profile_experts(model, batches) -> ExpertProfile:
    """batches: iterable of (input_ids [B, S], attention_mask [B, S] or None)."""
    moe_layers = {
        i: layer.mlp for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")
    }
    counts = {
        i: torch.zeros(m.gate.num_experts, dtype=torch.float64) for i, m in moe_layers.items()
    }
    scores = {
        i: torch.zeros(m.gate.num_experts, dtype=torch.float64) for i, m in moe_layers.items()
    }
    current_mask: list[torch.Tensor | None] = [None]

    def recorder(layer_idx):
        def hook(router, inputs, output):
            expert_ids, _, affinity = output
            keep = current_mask[0]
            if keep is not None:
                expert_ids, affinity = expert_ids[keep], affinity[keep]
            counts[layer_idx] += torch.bincount(
                expert_ids.flatten(), minlength=len(counts[layer_idx])
            ).double()
            scores[layer_idx] += (affinity / affinity.sum(-1, keepdim=True)).sum(0).double()

        return hook

    handles = [m.gate.register_forward_hook(recorder(i)) for i, m in moe_layers.items()]
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        for input_ids, attention_mask in batches:
            current_mask[0] = (
                attention_mask.bool().flatten() if attention_mask is not None else None
            )
            tokens += (
                int(current_mask[0].sum()) if current_mask[0] is not None else input_ids.numel()
            )
            model(input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if tokens == 0:
        raise ValueError("expert profiling saw no tokens: the data is empty")
    return ExpertProfile(
        {i: (c / tokens).tolist() for i, c in counts.items()},
        {i: (s / tokens).tolist() for i, s in scores.items()},
        tokens,
    )


def select_experts(profile: ExpertProfile, criterion: str, top_p: float) -> dict[int, list[int]]:
    """Per layer: the fewest experts whose normalised criterion sums to at least top_p."""
    if criterion not in CRITERIA:
        raise ValueError(f"lora.experts.select: {criterion!r} is not one of {CRITERIA}")
    if not 0 < top_p <= 1:
        raise ValueError(f"lora.experts.top_p: {top_p} must be in (0, 1]")
    table = profile.token_ratio if criterion == "token" else profile.gate_score
    selected = {}
    for layer, values in table.items():
        score = torch.tensor(values)
        score = score / score.sum()
        ordered = score.argsort(descending=True)
        cumulative = score[ordered].cumsum(0)
        count = int((cumulative < top_p - 1e-9).sum()) + 1
        selected[layer] = sorted(ordered[:count].tolist())
    return selected


def read_token_batches(path: str, batch_size: int = 8, max_length: int = 1024, tokenizer=None):
    """Yield (input_ids, attention_mask) from a JSONL file of {"input_ids": [...]} rows, or
    {"text": ...} rows when a `tokenizers.Tokenizer` is given. Right-padded batches."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "input_ids" in record:
            ids = record["input_ids"]
        elif "text" in record and tokenizer is not None:
            ids = tokenizer.encode(record["text"]).ids
        else:
            raise ValueError(
                f"{path}:{number}: need an `input_ids` list"
                + ("" if tokenizer else " (or `text` with a tokenizer.json beside the model)")
            )
        rows.append(ids[:max_length])
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(r) for r in chunk)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, r in enumerate(chunk):
            input_ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        yield input_ids, mask


def run(args) -> int:
    from moetune.model import DeepseekV3ForCausalLM

    tokenizer = None
    tokenizer_file = Path(args.model) / "tokenizer.json"
    if tokenizer_file.exists():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
    model = DeepseekV3ForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    profile = profile_experts(
        model, read_token_batches(args.data, args.batch_size, args.max_length, tokenizer)
    )
    selected = select_experts(profile, args.select, args.top_p)
    Path(args.out).write_text(
        json.dumps(profile.to_json(selected, args.select, args.top_p), indent=1)
    )
    kept = sum(len(v) for v in selected.values())
    total = sum(len(v) for v in profile.token_ratio.values())
    print(
        f"profiled {profile.tokens} tokens; selected {kept} of {total} routed experts "
        f"({args.select} criterion, top_p {args.top_p}) -> {args.out}"
    )
    return 0


def add_subcommand(subparsers) -> None:
    parser = subparsers.add_parser("experts", help="expert profiling for expert-subset LoRA (ESFT)")
    actions = parser.add_subparsers(dest="experts_command", metavar="ACTION", required=True)
    profile = actions.add_parser(
        "profile",
        help="record per-expert token ratios and gate scores on task data",
        description="Run the model over --data and write, per MoE layer and routed expert, the "
        "ESFT criteria (token-selection ratio and mean gate score) plus the experts "
        "selected for the chosen criterion and top_p, to --out (JSON).",
    )
    profile.add_argument("--model", required=True, help="checkpoint folder")
    profile.add_argument(
        "--data",
        required=True,
        help="JSONL with `input_ids` lists (or `text`, given a tokenizer.json in --model)",
    )
    profile.add_argument("--out", required=True, help="output JSON file")
    profile.add_argument(
        "--select", choices=CRITERIA, default="gate", help="selection criterion (default: gate)"
    )
    profile.add_argument(
        "--top-p",
        type=float,
        default=0.2,
        help="cumulative score to cover per layer (default: 0.2)",
    )
    profile.add_argument("--batch-size", type=int, default=8)
    profile.add_argument("--max-length", type=int, default=1024)
    profile.set_defaults(func=run)


def read_profile(path: str) -> ExpertProfile:
    """The profile a `moetune experts profile` JSON holds (layer keys back to ints)."""
    raw = json.loads(Path(path).read_text())
    if "token_ratio" not in raw or "gate_score" not in raw:
        raise ValueError(f"{path}: not an expert profile (write it with `moetune experts profile`)")
    return ExpertProfile(
        {int(k): v for k, v in raw["token_ratio"].items()},
        {int(k): v for k, v in raw["gate_score"].items()},
        raw["tokens"],
    )
