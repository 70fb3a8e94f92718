"""Per-device memory plans: exact weight/gradient/optimizer bytes, ZeRO sharding, buffers that
no stage shards, expert parallelism, LoRA, FP8, activation estimates against the tensors
autograd saves, rollout engines, device counts, and `moetune plan`."""

import json
import math
from importlib.resources import files

import pytest
import torch
from tiny_configs import v2_lite_config, v3_config

from moetune.model import DeepseekV3ForCausalLM, load_config
from moetune.model.fp8 import FP8RoutedExperts, to_frozen_fp8
from moetune.model.info import build_on_meta, count_parameters
from moetune.model.lora import LoraSpec, apply_lora
from moetune.recipes.cli import main
from moetune.recipes.loader import load_recipe
from moetune.recipes.run import resolve, shipped_recipes
from moetune.rl.engine_weights import adapter_stream, weight_stream
from moetune.rl.grpo import freeze_untrained
from moetune.training.memory_plan import (
    activation_bytes,
    block_activation_bytes,
    plan_memory,
    plan_rollout,
    usable_bytes,
)
from moetune.training.model_loading import attach_lora, load_model

V3_CONFIG = files("moetune.model") / "configs" / "deepseek_v3.json"
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


def plan_json(capsys, *argv) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def tiny_parameter_count() -> int:
    """v2_lite_config's parameters counted by hand: 3 layers (1 dense, 2 MoE), no MTP."""
    h, vocab, inter, moe_inter, heads, experts = 64, 128, 96, 32, 4, 8
    attention = (
        h * heads * (16 + 8)  # q_proj
        + h * (32 + 8)
        + 32  # kv_a_proj_with_mqa, kv_a_layernorm
        + 32 * heads * (16 + 12)  # kv_b_proj
        + heads * 12 * h
    )  # o_proj
    norms = 2 * h
    dense = 3 * h * inter
    moe = (
        experts * h + experts * 3 * moe_inter * h + 3 * h * 2 * moe_inter
    )  # router, routed, shared
    return 2 * vocab * h + 3 * (attention + norms) + dense + 2 * moe + h


def test_tiny_float32_adamw_bytes_are_exact():
    n = tiny_parameter_count()
    load_counters = 2 * 8 * 4  # each MoE router's float32 token counts per expert (a buffer)
    plan = plan_memory(on_meta(v2_lite_config()))
    assert (plan.weights, plan.buffers, plan.gradients, plan.optimizer) == (
        4 * n,
        load_counters,
        4 * n,
        8 * n,
    )
    assert plan_memory(on_meta(v2_lite_config()), optimizer="sgd").optimizer == 0


def test_bf16_parameters_with_and_without_float32_master():
    n = tiny_parameter_count()
    model = on_meta(v2_lite_config(), torch.bfloat16)
    plan = plan_memory(model)  # DeepSpeed: float32 gradients, 2 Adam states + master copy
    assert (plan.weights, plan.gradients, plan.optimizer) == (2 * n, 4 * n, 12 * n)
    plain = plan_memory(model, master_weights_fp32=False)  # torch AdamW: states in bf16
    assert (plain.gradients, plain.optimizer) == (2 * n, 4 * n)


def test_zero_stages_shard_optimizer_then_gradients_then_parameters_never_buffers():
    model = on_meta(v2_lite_config())
    full = plan_memory(model)
    largest_block = max(
        sum(p.numel() * 4 for p in layer.parameters()) for layer in model.model.layers
    )
    for stage, sharded in enumerate(
        [(), ("optimizer",), ("optimizer", "gradients"), ("optimizer", "gradients", "weights")]
    ):
        plan = plan_memory(model, devices=4, zero_stage=stage)
        for part in ("gradients", "optimizer"):
            whole = getattr(full, part)
            assert getattr(plan, part) == (math.ceil(whole / 4) if part in sharded else whole)
        gathered = math.ceil(full.weights / 4) + largest_block  # ZeRO-3 gathers one block
        assert plan.weights == (gathered if stage == 3 else full.weights)
        assert (plan.buffers, plan.activations, plan.logits) == (
            full.buffers,
            full.activations,
            full.logits,
        )


def test_zero3_optimizer_bytes_scale_as_one_over_devices():
    model = on_meta(v3_config(), torch.bfloat16)
    whole = plan_memory(model, zero_stage=3).optimizer
    for devices in (2, 4, 8, 64):
        assert plan_memory(model, devices=devices, zero_stage=3).optimizer == math.ceil(
            whole / devices
        )


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
    load_counters = (
        4
        * config.n_routed_experts
        * sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers + 1))
    )
    assert plan.weights + plan.buffers == report.fp8_bytes - 2 * shared_copies + load_counters
    assert (
        abs(plan.weights + plan.buffers - 690 * GB) < 0.02 * 690 * GB
    )  # DeepSeek-V3's FP8 release
    # The FP8 linears and experts are buffers: ZeRO-3 shards the bf16 rest only.
    sharded = plan_memory(v3_fp8, devices=16, zero_stage=3)
    assert sharded.buffers == plan.buffers > 680 * GB and sharded.weights < plan.weights


def test_expert_parallel_splits_the_routed_experts(v3_fp8):
    experts = sum(
        t.numel() * t.element_size()
        for m in v3_fp8.modules()
        if isinstance(m, FP8RoutedExperts)
        for t in m.buffers()
    )  # MTP's too
    whole = plan_memory(v3_fp8, devices=8, zero_stage=3)
    split = plan_memory(v3_fp8, devices=8, zero_stage=3, expert_parallel=8)
    assert whole.buffers - split.buffers == experts - math.ceil(experts / 8)
    with pytest.raises(ValueError, match="must divide devices=12"):
        plan_memory(v3_fp8, devices=12, expert_parallel=8)


def test_checkpointing_keeps_block_inputs_and_one_block():
    layers, tokens = 8, 256
    config = v3_config(
        num_hidden_layers=layers, first_k_dense_replace=0, num_nextn_predict_layers=0
    )
    model = on_meta(config, torch.bfloat16)
    full = activation_bytes(model, tokens, checkpointing=False, mtp=False)
    checkpointed = activation_bytes(model, tokens, checkpointing=True, mtp=False)
    block = block_activation_bytes(config, 0, tokens, 2, frozen=False)  # every block is MoE
    block_inputs = layers * tokens * config.hidden_size * 2
    assert full - checkpointed == layers * block - (block_inputs + block)
    assert checkpointed < full / 5
    v3 = on_meta(load_config(V3_CONFIG), torch.bfloat16)
    assert (
        activation_bytes(v3, 4096, True, mtp=False)
        < activation_bytes(v3, 4096, False, mtp=False) / 10
    )
    plan = plan_memory(v3, seq_len=4096, gradient_checkpointing=True)
    assert plan.activations < plan_memory(v3, seq_len=4096).activations


@pytest.mark.parametrize(
    "make_config,lora,fp8",
    [
        (v3_config, None, False),
        (v2_lite_config, None, False),
        (v3_config, ("attention", "shared_experts", "routed_experts"), True),
    ],
)
def test_activation_estimate_is_within_15_percent_of_saved_tensors(make_config, lora, fp8):
    """Measured: the distinct storages autograd saves in a bf16 forward with labels (MTP
    included), parameters and buffers left out; the estimate adds the forward's float32
    log-probabilities (half of `logits`). Full fine-tuning lands within 1%, LoRA over a
    frozen FP8 base within 3%."""
    config = make_config(
        hidden_size=128,
        intermediate_size=384,
        moe_intermediate_size=64,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        vocab_size=256,
    )
    model = DeepseekV3ForCausalLM(config).to(torch.bfloat16).train()
    if fp8:
        to_frozen_fp8(model)
    if lora:
        apply_lora(model, LoraSpec(rank=8, components=lora))
    held = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in held:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, config.vocab_size, (2, 32))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids)
    plan = plan_memory(model, micro_batch_size=2, seq_len=32)
    estimate = plan.activations + plan.logits / 2
    print(f"activation estimate / saved: {estimate / sum(saved.values()):.3f}")
    assert 0.85 < estimate / sum(saved.values()) < 1.15


def test_logits_count_each_trained_head():
    config = v3_config()  # one MTP layer: its logits count in SFT, not in GRPO
    model = on_meta(config)
    assert plan_memory(model, micro_batch_size=2, seq_len=32).logits == 64 * 128 * 4 * 2 * 2
    assert (
        plan_memory(model, micro_batch_size=2, seq_len=32, train_mtp=False).logits
        == 64 * 128 * 4 * 2
    )
    plan = plan_memory(model, reference_copy=True)
    assert plan.reference_model == plan.weights + plan.buffers
    assert plan.total == sum(plan.as_dict()[part] for part in plan.PARTS)
    assert "buffers" in plan.table() and plan.table().count("GB") == len(plan.PARTS) + 1


def test_rollout_engines_hold_fp8_weights_over_tp_ranks_and_a_replicated_latent_cache(v3_fp8):
    config = v3_fp8.config
    plan = plan_rollout(
        v3_fp8,
        backend="vllm",
        workers=2,
        tensor_parallel_size=8,
        dtype_bytes=2,
        sequences=64,
        max_model_len=4096,
    )
    assert plan.kv_cache == 64 * 4096 * config.num_hidden_layers * (512 + 64) * 2
    assert plan.devices == 16 and 670 * GB < plan.engine_weights < 680 * GB  # no MTP block
    assert plan.weights == math.ceil(plan.engine_weights / 8)
    # vLLM takes half of each 141 GB H200: 8 ranks hold 84 GB of weights each, 16 fit.
    assert plan.tensor_parallel_needed(usable_bytes(141, 0.5), config.num_attention_heads) == 16
    native = plan_rollout(
        v3_fp8,
        backend="native",
        workers=1,
        tensor_parallel_size=1,
        dtype_bytes=2,
        sequences=8,
        max_model_len=4096,
    )
    assert native.engine_weights > 1.9 * plan.engine_weights  # dequantised to bf16, with MTP


def test_devices_needed_for_deepseek_v3_fp8_lora_on_80gb():
    model = on_meta(
        load_config(V3_CONFIG),
        torch.bfloat16,
        fp8=True,
        lora=LoraSpec(rank=16, components=("attention", "shared_experts")),
    )
    usable = usable_bytes(80)
    assert usable == 72 * GB  # 10% headroom
    zero3 = plan_memory(model, devices=32, zero_stage=3, seq_len=4096, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="never shards buffers"):
        zero3.devices_needed(usable)
    plan = plan_memory(
        model,
        devices=32,
        zero_stage=3,
        expert_parallel=32,
        seq_len=4096,
        gradient_checkpointing=True,
    )
    assert plan.total <= usable and plan.devices_needed(usable) == 32
    fewer = plan_memory(
        model, devices=8, zero_stage=3, expert_parallel=8, seq_len=4096, gradient_checkpointing=True
    )  # 82 GB of FP8 experts per device
    with pytest.raises(ValueError, match="buffers"):
        fewer.devices_needed(usable)
    assert fewer.replan(64).total > usable  # more devices shard the bf16 rest, not the experts


def test_bad_arguments_are_named():
    model = on_meta(v2_lite_config())
    assert plan_memory(model).devices_needed(GB) == 1
    with pytest.raises(ValueError, match="optimizer 'lion'"):
        plan_memory(model, optimizer="lion")
    with pytest.raises(ValueError, match="zero_stage=4"):
        plan_memory(model, zero_stage=4)


def test_moetune_plan_json_counts_as_moetune_info(capsys):
    plan = plan_json(capsys, "sft/arith_tiny.yaml")
    report = count_parameters(
        build_on_meta(str(files("moetune.model") / "configs" / "tiny_arith.json"))
    )
    counts = plan["parameters"]
    assert (counts["total"], counts["active"], counts["mtp"]) == (
        report.total_params,
        report.active_params,
        report.mtp_params,
    )
    trainer = plan["trainer"]
    assert trainer["fits"] and trainer["devices_needed"] == 1 and plan["rollout"] is None
    assert (trainer["micro_batch_size"], trainer["seq_len"]) == (32, 96)
    parts = trainer["bytes_per_device"]
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    assert main(["plan", "sft/arith_tiny.yaml"]) == 0
    text = capsys.readouterr().out
    assert f"parameters: {report.total_params:,}" in text and "devices needed at ZeRO-0: 1" in text


def test_moetune_plan_of_deepseek_v3_fp8_lora(capsys):
    plan = plan_json(capsys, "sft/deepseek_v3_fp8_lora", "--device-memory-gb", "141")
    assert (
        plan["parameters"]["total"] == count_parameters(build_on_meta(str(V3_CONFIG))).total_params
    )
    assert 671.0e9 < plan["parameters"]["total"] < 671.1e9
    trainer = plan["trainer"]
    assert trainer["device_memory_gb"] == 141 and trainer["devices"] == 32 and trainer["fits"]
    zero3 = plan_json(
        capsys, "sft/deepseek_v3_fp8_lora", "model.expert_parallel=1", "plan.zero_stage=3"
    )
    assert not zero3["trainer"]["fits"] and "never shards buffers" in zero3["trainer"]["no_fit"]


def test_moetune_plan_grpo_sizes_the_rollout_engines(capsys):
    plan = plan_json(capsys, "grpo/arith_tiny", "rollout.workers=2", "--devices", "2")
    rollout, config = (
        plan["rollout"],
        load_config(files("moetune.model") / "configs" / "tiny_arith.json"),
    )
    # 16 prompts a step over 2 processes, each its own pool of 2 workers: 4 prompts x 8 each
    assert (rollout["backend"], rollout["devices"], rollout["sequences_per_worker"]) == (
        "vllm",
        2,
        4 * 8,
    )
    assert (
        rollout["bytes_per_device"]["kv_cache"]
        == 32 * 96 * config.num_hidden_layers * (512 + 64) * 4
    )
    shared = plan_json(capsys, "grpo/arith_tiny", "rollout.processes_per_pool=2", "--devices", "2")[
        "rollout"
    ]
    assert shared["sequences_per_worker"] == 16 * 8  # one pool samples both processes' prompts
    assert rollout["fits"] and rollout["tensor_parallel_needed"] == 1
    assert plan["trainer"]["devices"] == 2 and plan["trainer"]["seq_len"] == 96


@pytest.mark.parametrize(
    "lora,backend,adapter_only",
    [
        (None, "vllm", False),
        ("[attention, routed_experts]", "vllm", False),  # vLLM's MLA ignores kv_b_proj's LoRA
        ("[shared_experts, routed_experts]", "vllm", True),  # vLLM on GPUs applies them
        ("[attention, routed_experts]", "native", True),
    ],
    ids=["full", "lora-merged", "lora-vllm-adapter", "lora-native-adapter"],
)
def test_moetune_plan_reports_the_bytes_a_sync_sends(capsys, lora, backend, adapter_only):
    """The plan's sync bytes (shapes on the meta device) are what a real step's sync streams
    to each engine: the trained weights (LoRA merged, float32 engines) or the adapter alone."""
    overrides = ["model.path=null", "model.config=tiny_arith", "model.tokenizer=char"]
    overrides += [f"rollout.backend={backend}"]
    if lora:
        overrides += ["lora.rank=8", f"lora.components={lora}"]
    plan = plan_json(capsys, "grpo/arith_tiny", *overrides)["rollout"]
    recipe = load_recipe(resolve("grpo/arith_tiny"), overrides)
    model = load_model(recipe.model)
    attach_lora(model, recipe.lora)
    freeze_untrained(model, recipe.algorithm)  # as the GRPO trainer does
    stream = adapter_stream if adapter_only else weight_stream
    sent = sum(t.numel() * t.element_size() for _, t in stream(model, trained_only=True))
    assert plan["sync_bytes_per_step"] == sent and plan["sync_adapter_only"] == (
        stream is adapter_stream
    )
    if lora:
        assert plan["merged_sync_bytes_per_step"] > (sent if adapter_only else 0)


def test_moetune_plan_errors_exit_2(capsys):
    assert main(["plan", "no/such_recipe.yaml"]) == 2
    assert main(["plan", "sft/arith_tiny", "model.expert_parallel=3"]) == 2
    assert "plan: expert_parallel=3 must divide" in capsys.readouterr().err


@pytest.mark.parametrize("name", [name for name, _ in shipped_recipes()])
def test_every_shipped_recipe_plans(name, capsys):
    plan = plan_json(capsys, name)
    assert plan["parameters"]["trainable"] > 0 and plan["trainer"]["bytes_per_device"]["total"] > 0
    assert (plan["rollout"] is not None) == name.startswith("grpo/")
