"""Tiny DeepSeek-family configs for tests: seconds on 2 cores, every routing branch covered."""

from __future__ import annotations

from pathlib import Path

import torch

from moetune.model.config import DeepseekV2Config, DeepseekV3Config

TINY_ARITH = Path(__file__).parents[1] / "model" / "configs" / "tiny_arith.json"

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    max_position_embeddings=256,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def v3_config(**overrides) -> DeepseekV3Config:
    """V3-style: sigmoid, noaux_tc, 4 groups (2 kept), q_lora_rank set, one dense layer, MTP."""
    fields = dict(
        BASE,
        q_lora_rank=24,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        num_nextn_predict_layers=1,
    )
    return DeepseekV3Config(**(fields | overrides))


def v2_lite_config(**overrides) -> DeepseekV2Config:
    """V2-Lite-style: softmax, greedy top-k, q_lora_rank null, no top-k normalisation."""
    fields = dict(
        BASE,
        q_lora_rank=None,
        n_routed_experts=8,
        num_experts_per_tok=3,
        n_shared_experts=2,
        first_k_dense_replace=1,
        routed_scaling_factor=1.0,
        norm_topk_prob=False,
    )
    return DeepseekV2Config(**(fields | overrides))


def yarn_config(**overrides) -> DeepseekV3Config:
    """YaRN-scaled rope: original context 32, factor 4, sequences run past 32."""
    rope = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 32,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    }
    return v3_config(**({"rope_parameters": rope, "max_position_embeddings": 128} | overrides))


def deep_dense_config(**overrides) -> DeepseekV3Config:
    """first_k_dense_replace = 2 of 4 layers; no MTP."""
    return v3_config(
        **(
            {"num_hidden_layers": 4, "first_k_dense_replace": 2, "num_nextn_predict_layers": 0}
            | overrides
        )
    )


def save_biased_tiny_arith(path: Path, seed: int, head_scale: float = 1.0) -> Path:
    """tiny_arith (vLLM's CPU MLA dims) with seeded random weights, a non-zero router bias
    (the noaux_tc selection path) and the char tokenizer, saved to `path`. head_scale
    multiplies the output head: > 1 makes each next-token distribution peaked."""
    from moetune.model import DeepseekV3ForCausalLM, load_config
    from moetune.model.char_tokenizer import char_tokenizer_fast

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(load_config(TINY_ARITH))
    with torch.no_grad():
        for router in model.routers():
            router.e_score_correction_bias.normal_(0, 0.3)
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(path)
    char_tokenizer_fast().save_pretrained(path)
    return path
