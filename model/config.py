"""DeepSeek-V3-family model configuration, with HF `config.json` field names unchanged.

`DeepseekV3Config` extends transformers' own `DeepseekV3Config` (every field, name and
default is theirs) with the fields DeepSeek's published configs carry and transformers
drops: `topk_method`, `scoring_func`, plus the training weights of the auxiliary losses.
`DeepseekV2Config` is the same schema with DeepSeek-V2 defaults (softmax scores, greedy
top-k) and `model_type: deepseek_v2`, so V2-family checkpoints load and save as V2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from huggingface_hub.dataclasses import strict
from transformers import DeepseekV3Config as HFDeepseekV3Config

TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SCORING_FUNCS = ("sigmoid", "softmax")


@strict
class DeepseekV3Config(HFDeepseekV3Config):
    """HF DeepseekV3Config plus DeepSeek's routing fields and loss weights.

    Extra fields (names as in DeepSeek's config.json where they exist):
      topk_method: "noaux_tc" (V3: sigmoid + correction bias + group top-2-sum selection),
        "greedy" (plain top-k), "group_limited_greedy" (V2: group max selection).
      scoring_func: "sigmoid" (V3) or "softmax" (V2).
      aux_loss_alpha: weight of the sequence-wise balance loss (0 disables).
      mtp_loss_weight: lambda, weight of the Multi-Token-Prediction loss.
      moe_layer_freq: an MoE layer every this many layers after the dense ones.
      quantization_config: {"quant_method": "fp8", "weight_block_size": [128, 128], ...}.
    """

    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    aux_loss_alpha: float = 0.0
    mtp_loss_weight: float = 0.3
    moe_layer_freq: int = 1
    quantization_config: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_moe()

    def validate_moe(self) -> None:
        """Fail on inconsistent MoE/attention fields, naming the field."""

        def fail(field: str, why: str):
            raise ValueError(f"config field `{field}`={getattr(self, field)!r}: {why}")

        if self.topk_method not in TOPK_METHODS:
            fail("topk_method", f"must be one of {TOPK_METHODS}")
        if self.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", f"must be one of {SCORING_FUNCS}")
        n_group = self.n_group or 1
        topk_group = self.topk_group or n_group
        if n_group < 1:
            fail("n_group", "must be >= 1")
        if self.n_routed_experts and self.n_routed_experts % n_group:
            fail("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
        if topk_group > n_group:
            fail("topk_group", f"must be <= n_group={n_group}")
        if self.num_experts_per_tok and self.n_routed_experts:
            if self.num_experts_per_tok > self.n_routed_experts:
                fail("num_experts_per_tok", f"must be <= n_routed_experts={self.n_routed_experts}")
            reachable = topk_group * (self.n_routed_experts // n_group)
            if self.topk_method != "greedy" and self.num_experts_per_tok > reachable:
                fail("num_experts_per_tok", f"exceeds the {reachable} experts in topk_group groups")
        if self.topk_method == "noaux_tc" and self.n_routed_experts // n_group < 2:
            fail(
                "n_group",
                "noaux_tc scores a group by its top-2 experts: need >= 2 experts per group",
            )
        if self.first_k_dense_replace is not None and self.first_k_dense_replace < 0:
            fail("first_k_dense_replace", "must be >= 0")
        if self.moe_layer_freq < 1:
            fail("moe_layer_freq", "must be >= 1")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even (rotary pairs)")
        quant = self.quantization_config
        if quant is not None:
            if quant.get("quant_method", "fp8") != "fp8":
                fail("quantization_config", "only quant_method fp8 is supported")
            if list(quant.get("weight_block_size", [128, 128])) != [128, 128]:
                fail("quantization_config", "weight_block_size must be [128, 128]")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: dense for the first `first_k_dense_replace` layers, then MoE
        every `moe_layer_freq` layers."""
        return (
            bool(self.n_routed_experts)
            and layer_idx >= (self.first_k_dense_replace or 0)
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def yarn(self) -> dict | None:
        """The YaRN rope parameters, or None for plain rope."""
        rope = self.rope_parameters or {}
        return rope if rope.get("rope_type", "default") == "yarn" else None


@strict
class DeepseekV2Config(DeepseekV3Config):
    """DeepSeek-V2 / V2-Lite / V2.5 schema: softmax scores, greedy top-k, no MTP."""

    model_type = "deepseek_v2"
    topk_method: str = "greedy"
    scoring_func: str = "softmax"
    norm_topk_prob: bool | None = False
    n_group: int | None = 1
    topk_group: int | None = 1
    num_mtp_layers: int = 0


def load_config(path: str | os.PathLike) -> DeepseekV3Config:
    """Read a checkpoint folder's config.json (or the file itself) into the matching class."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no config.json at {path}")
    raw = json.loads(file.read_text())
    return config_from_dict(raw, source=str(file))


def config_from_dict(raw: dict, source: str = "config") -> DeepseekV3Config:
    """Build the config class named by `model_type` (deepseek_v3, kimi_k2 or deepseek_v2)."""
    raw = dict(raw)
    model_type = raw.pop("model_type", "deepseek_v3")
    classes = {
        "deepseek_v3": DeepseekV3Config,
        "kimi_k2": DeepseekV3Config,
        "deepseek_v2": DeepseekV2Config,
    }
    if model_type not in classes:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not a DeepSeek-V3-family model "
            f"(expected one of {sorted(classes)})"
        )
    for key in ("architectures", "auto_map", "transformers_version", "torch_dtype", "dtype"):
        raw.pop(key, None)
    return classes[model_type](**raw)
