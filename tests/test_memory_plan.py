"""Per-device memory plans: exact weight/gradient/optimizer bytes, ZeRO sharding, LoRA,
FP8, activation estimates against measured saved tensors, and device counts."""

import math
from importlib.resources import files

import pytest
import torch
from tiny_configs import v2_lite_config, v3_config

from moetune.finetune.memory_plan import activation_bytes, plan_memory
from moetune.model import DeepseekV3ForCausalLM, load_config
from moetune.model.fp8 import to_frozen_fp8
from moetune.model.info import count_parameters
from moetune.model.lora import LoraSpec, apply_lora

V3_CONFIG = files("moetune.recipes") / "configs" / "deepseek_v3.json"
GB = 10**9


def on_meta(config, dtype=torch.float32, fp8=False, lora=None):
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(config).to(dtype)
        if fp8:
            to_frozen_fp8(model)
        if lora is not None:
            apply_lora(model, lora)
    return model


@pytest.fixture(scope="module")
def v3_fp8():
    return on_meta(load_config(V3_CONFIG), torch.bfloat16, fp8=True)


def tiny_parameter_count() -> int:
    """v2_lite_config's parameters counted by hand: 3 layers (1 dense, 2 MoE), no MTP."""
    h, vocab, inter, moe_inter, heads, experts = 64, 128, 96, 32, 4, 8
    attention = (h * heads * (16 + 8)  # q_proj
                 + h * (32 + 8) + 32  # kv_a_proj_with_mqa, kv_a_layernorm
                 + 32 * heads * (16 + 12)  # kv_b_proj
                 + heads * 12 * h)  # o_proj
    norms = 2 * h
    dense = 3 * h * inter
    moe = experts * h + experts * 3 * moe_inter * h + 3 * h * 2 * moe_inter  # router, routed, shared
    return 2 * vocab * h + 3 * (attention + norms) + dense + 2 * moe + h


def test_tiny_float32_adamw_bytes_are_exact():
    n = tiny_parameter_count()
    load_counters = 2 * 8 * 4  # each MoE router's float32 token counts per expert
    plan = plan_memory(on_meta(v2_lite_config()))
    assert (plan.weights, plan.gradients, plan.optimizer) == (4 * n + load_counters, 4 * n, 8 * n)
    assert plan_memory(on_meta(v2_lite_config()), optimizer="sgd").optimizer == 0


def test_bf16_parameters_with_float32_master_follow_deepspeed():
    n = tiny_parameter_count()
    model = on_meta(v2_lite_config(), torch.bfloat16)
    plan = plan_memory(model)  # bf16 weights, float32 gradients, 2 Adam states + master copy
    assert (plan.weights, plan.gradients, plan.optimizer) == (2 * n + 64, 4 * n, 12 * n)
    plain = plan_memory(model, master_weights_fp32=False)
    assert (plain.gradients, plain.optimizer) == (2 * n, 8 * n)


def test_zero_stages_shard_optimizer_then_gradients_then_weights():
    model = on_meta(v2_lite_config())
    full = plan_memory(model)
    for stage, sharded in enumerate([(), ("optimizer",), ("optimizer", "gradients"),
                                     ("optimizer", "gradients", "weights")]):
        plan = plan_memory(model, devices=3, zero_stage=stage)
        for part in ("weights", "gradients", "optimizer"):
            whole = getattr(full, part)
            assert getattr(plan, part) == (math.ceil(whole / 3) if part in sharded else whole)
        assert (plan.activations, plan.logits) == (full.activations, full.logits)


def test_lora_gradients_and_optimizer_follow_the_adapters_only():
    spec = LoraSpec(rank=8, components=("attention",))
    small = on_meta(v3_config(), lora=spec)
    big = on_meta(v3_config(n_routed_experts=32, moe_intermediate_size=64), lora=spec)
    adapters = sum(p.numel() for p in small.parameters() if p.requires_grad)
    assert adapters == sum(p.numel() for p in big.parameters() if p.requires_grad)
    plans = plan_memory(small), plan_memory(big)
    assert [(p.gradients, p.optimizer) for p in plans] == [(4 * adapters, 8 * adapters)] * 2
    assert plans[1].weights > plans[0].weights


def test_deepseek_v3_fp8_weights_are_the_published_checkpoint_size(v3_fp8):
    plan = plan_memory(v3_fp8)
    # The FP8 checkpoint (688.6 GB per `moetune info`) stores embedding and head again in
    # each MTP layer; in memory MTP shares them. Add the routers' float32 load counters.
    config = v3_fp8.config
    report = count_parameters(on_meta(load_config(V3_CONFIG)))  # before FP8 conversion
    shared_copies = 2 * config.num_nextn_predict_layers * config.vocab_size * config.hidden_size
    load_counters = 4 * config.n_routed_experts * sum(
        config.is_moe_layer(i) for i in range(config.num_hidden_layers + 1))
    assert plan.weights == report.fp8_bytes - 2 * shared_copies + load_counters
    assert 684 * GB < plan.weights < 690 * GB
    sharded = plan_memory(v3_fp8, devices=16, zero_stage=3)
    assert sharded.weights == math.ceil(plan.weights / 16)


def test_checkpointing_keeps_layer_inputs_and_one_layer():
    config = load_config(V3_CONFIG)
    full = activation_bytes(config, 4096, 2, checkpointing=False)
    checkpointed = activation_bytes(config, 4096, 2, checkpointing=True)
    assert checkpointed < full / 5
    assert activation_bytes(config, 8192, 2, checkpointing=True) == 2 * checkpointed
    plan = plan_memory(on_meta(v3_config()), seq_len=64, gradient_checkpointing=True)
    assert plan.activations < plan_memory(on_meta(v3_config()), seq_len=64).activations


@pytest.mark.parametrize("make_config", [v3_config, v2_lite_config])
def test_activation_estimate_is_within_30_percent_of_saved_tensors(make_config):
    """Measured: the distinct storages autograd saves in a bf16 forward (parameters left out)."""
    config = make_config(hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                         kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                         v_head_dim=32, vocab_size=512)
    model = DeepseekV3ForCausalLM(config).to(torch.bfloat16).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (2, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    plan = plan_memory(model, micro_batch_size=2, seq_len=64)
    estimate = plan.activations + plan.logits / 2  # the forward's float32 logits
    assert 0.7 < estimate / sum(saved.values()) < 1.3


def test_logits_and_rollout_cache():
    config = v3_config()  # one MTP layer: its logits count too
    plan = plan_memory(on_meta(config), micro_batch_size=2, seq_len=32, rollout_tokens=1000)
    assert plan.logits == 64 * config.vocab_size * 4 * 2 * 2
    assert plan.rollout_kv_cache == 1000 * config.num_hidden_layers * (32 + 8) * 2
    assert plan.total == sum(getattr(plan, part) for part in plan.PARTS)
    table = plan.table()
    assert "rollout_kv_cache" in table and "total" in table and table.count("GB") == 7


def test_devices_needed_for_deepseek_v3_fp8_lora_on_80gb():
    model = on_meta(load_config(V3_CONFIG), torch.bfloat16, fp8=True,
                    lora=LoraSpec(rank=16, components=("attention", "shared_experts")))
    plan = plan_memory(model, zero_stage=3, seq_len=4096, gradient_checkpointing=True)
    needed = plan.devices_needed(80 * GB)
    assert 9 <= needed <= 16
    assert plan_memory(model, devices=needed, zero_stage=3, seq_len=4096,
                       gradient_checkpointing=True).total <= 80 * GB
    assert plan.replan(needed - 1).total > 80 * GB


def test_devices_needed_refuses_what_sharding_cannot_fit(v3_fp8):
    assert plan_memory(on_meta(v2_lite_config())).devices_needed(GB) == 1
    with pytest.raises(ValueError, match="ZeRO-0"):
        plan_memory(v3_fp8, zero_stage=0).devices_needed(80 * GB)


def test_bad_arguments_are_named():
    model = on_meta(v2_lite_config())
    with pytest.raises(ValueError, match="optimizer 'lion'"):
        plan_memory(model, optimizer="lion")
    with pytest.raises(ValueError, match="zero_stage=4"):
        plan_memory(model, zero_stage=4)
