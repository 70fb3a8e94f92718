"""Expert-aware LoRA against a naive per-expert loop, and its invariants."""

import pytest
import torch
import torch.nn.functional as F
from tiny_configs import v3_config

from moetune.model import DeepseekV3ForCausalLM
from moetune.model.experts import RoutedExperts
from moetune.model.lora import (
    COMPONENTS,
    ExpertLora,
    LoraLinear,
    LoraSpec,
    apply_lora,
    merge_lora,
)


def randomize(module, std=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


def randomize_adapters(model, std=0.05):
    """Give every adapter non-zero weights (B starts at zero)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, std)


def reference_lora_experts(x, experts, lora, expert_ids, weights):
    """Token by token, expert by expert, adapters as explicit x A^T B^T."""
    out = torch.zeros_like(x)
    inter = experts.intermediate_size
    slot_of = {e: i for i, e in enumerate(lora.expert_ids.tolist())}
    s = lora.scaling
    for t in range(x.shape[0]):
        for k in range(expert_ids.shape[1]):
            e = expert_ids[t, k].item()
            gate = experts.gate_up_proj[e, :inter] @ x[t]
            up = experts.gate_up_proj[e, inter:] @ x[t]
            if e in slot_of:
                i = slot_of[e]
                gate = gate + s * lora.gate_B[i] @ (lora.gate_A[i] @ x[t])
                up = up + s * lora.up_B[i] @ (lora.up_A[i] @ x[t])
            act = weights[t, k] * F.silu(gate) * up
            y = experts.down_proj[e] @ act
            if e in slot_of:
                y = y + s * lora.down_B[slot_of[e]] @ (lora.down_A[slot_of[e]] @ act)
            out[t] = out[t] + y
    return out


def check_expert_lora(selected):
    experts = RoutedExperts(num_experts=6, hidden_size=16, intermediate_size=8)
    randomize(experts)
    experts.requires_grad_(False)
    experts.lora = ExpertLora(experts, selected, rank=4, scaling=2.0)
    randomize(experts.lora)
    x = torch.randn(11, 16, requires_grad=True)
    expert_ids = torch.stack([torch.randperm(6)[:3] for _ in range(11)])
    weights = torch.rand(11, 3)
    grad = torch.randn(11, 16)
    params = [x] + list(experts.lora.parameters())
    ours = experts(x, expert_ids, weights)
    ref = reference_lora_experts(x, experts, experts.lora, expert_ids, weights)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(
        torch.autograd.grad(ours, params, grad), torch.autograd.grad(ref, params, grad)
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_expert_lora_all_experts_matches_reference():
    check_expert_lora(selected=list(range(6)))


def test_expert_lora_on_a_subset_matches_reference():
    check_expert_lora(selected=[1, 4])


def test_zero_b_leaves_logits_unchanged_and_only_adapters_train():
    model = DeepseekV3ForCausalLM(v3_config()).eval()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    spec = LoraSpec(rank=4, alpha=8, ranks={"routed_experts": 8}, experts={1: [0, 3, 5]})
    trainable = apply_lora(model, spec)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    c = model.config
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora" in n or "_A" in n or "_B" in n for n in names)
    # by hand: attention (q_a, q_b, kv_a, kv_b, o) + dense MLP + shared experts, rank 4;
    # routed experts rank 8 on 3 experts in layer 1 and 16 in layer 2 and the MTP block.
    h, q, kv, heads = c.hidden_size, c.q_lora_rank, c.kv_lora_rank, c.num_attention_heads
    qk, v, rope, inter = (
        c.qk_nope_head_dim + c.qk_rope_head_dim,
        c.v_head_dim,
        c.qk_rope_head_dim,
        c.moe_intermediate_size,
    )
    attention = 4 * (
        (h + q)
        + (q + heads * qk)
        + (h + kv + rope)
        + (kv + heads * (qk - rope + v))
        + (heads * v + h)
    )
    dense = 4 * 3 * (h + c.intermediate_size)
    shared = 4 * 3 * (h + inter)
    routed_per_expert = 8 * 3 * (h + inter)
    blocks = 4  # 3 layers + 1 MTP block
    expected = blocks * attention + dense + 3 * shared + routed_per_expert * (3 + 16 + 16)
    assert trainable == expected == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".gate.weight" in n)


def test_lora_training_step_moves_only_adapters():
    model = DeepseekV3ForCausalLM(v3_config()).train()
    apply_lora(model, LoraSpec(rank=4))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 12))
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name


def test_merge_equals_base_plus_adapter():
    model = DeepseekV3ForCausalLM(v3_config()).eval()
    apply_lora(model, LoraSpec(rank=4, experts={1: [2, 7]}))
    randomize_adapters(model)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        adapted = model(ids).logits
        merge_lora(model)
        merged = model(ids).logits
    assert not any(isinstance(m, (LoraLinear, ExpertLora)) for m in model.modules())
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


def test_misaligned_expert_rank_fails_clearly():
    model = DeepseekV3ForCausalLM(v3_config()).to(torch.bfloat16)
    with pytest.raises(ValueError, match="rank 4 in torch.bfloat16.*multiple of 8"):
        apply_lora(model, LoraSpec(rank=4))


def test_adapter_saves_in_peft_format_and_reloads_to_identical_logits(tmp_path):
    import json

    from safetensors import safe_open

    from moetune.model.adapters import load_adapter, save_adapter

    spec = LoraSpec(rank=4, ranks={"routed_experts": 8}, experts={1: [2, 7]})
    model = DeepseekV3ForCausalLM(v3_config()).eval()
    model.save_pretrained(tmp_path / "base")
    apply_lora(model, spec)
    randomize_adapters(model)
    save_adapter(model, spec, tmp_path / "adapter", base_path=str(tmp_path / "base"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8  # the routed experts' rank
    assert config["rank_pattern"]["self_attn\\.\\w+"] == 4
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.1.mlp.experts.7.up_proj.lora_B.weight" in keys
    assert "base_model.model.model.layers.1.mlp.experts.3.up_proj.lora_B.weight" not in keys
    assert "base_model.model.model.layers.3.self_attn.kv_b_proj.lora_A.weight" in keys  # MTP
    reloaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "base")
    load_adapter(reloaded, tmp_path / "adapter")
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


PEFT_RANKS = {"attention": 6, "dense_mlp": 3, "shared_experts": 2, "routed_experts": 8}


@pytest.fixture(scope="module")
def peft_base(tmp_path_factory):
    """A tiny V3 checkpoint (dense layer 0, MoE layers 1-2, one MTP block) for PEFT, input ids
    and the base model's logits on them."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("peft") / "base"
    model = DeepseekV3ForCausalLM(v3_config()).eval()
    model.save_pretrained(path)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        return path, ids, model(ids).logits


def peft_on_transformers(base, adapter):
    """PEFT's own loader on transformers' model of the same checkpoint, float32."""
    import peft
    import transformers

    theirs = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(theirs.eval(), adapter).eval()


@pytest.mark.parametrize(
    "components, layers",
    [
        (("attention",), None),
        (("dense_mlp",), None),
        (("shared_experts",), None),
        (("routed_experts",), None),
        (COMPONENTS, None),
        (("attention", "routed_experts"), (2, 4)),  # PEFT: zero adapters on layer 1's experts
    ],
)
def test_peft_loads_each_component_on_transformers_model(peft_base, tmp_path, components, layers):
    """PEFT's PeftModel.from_pretrained on transformers' DeepseekV3ForCausalLM reproduces
    moetune's adapted logits for each component, its own rank each, and for all together."""
    from moetune.model.adapters import save_adapter

    path, ids, base = peft_base
    ranks = {c: PEFT_RANKS[c] for c in components}
    spec = LoraSpec(rank=4, alpha=5.0, components=components, ranks=ranks, layers=layers)
    model = DeepseekV3ForCausalLM.from_pretrained(path).eval()
    apply_lora(model, spec)
    randomize_adapters(model)
    save_adapter(model, spec, tmp_path / "adapter", base_path=str(path))
    theirs = peft_on_transformers(path, tmp_path / "adapter")
    with torch.no_grad():
        ours, peft_logits = model(ids).logits, theirs(ids).logits
    assert (ours - base).abs().max() > 1e-2  # a dropped adapter would give `base`
    torch.testing.assert_close(peft_logits, ours, rtol=1e-5, atol=1e-5)


def test_peft_refuses_an_expert_subset_adapter(peft_base, tmp_path):
    """ESFT adapters (some experts of a layer) do not fit PEFT's fused experts, whose adapter
    covers every expert of the layer: PEFT's load fails, naming the layer."""
    from moetune.model.adapters import save_adapter

    path = peft_base[0]
    spec = LoraSpec(rank=4, components=("routed_experts",), experts={1: [2, 7]})
    model = DeepseekV3ForCausalLM.from_pretrained(path)
    apply_lora(model, spec)
    save_adapter(model, spec, tmp_path / "adapter", base_path=str(path))
    with pytest.raises(RuntimeError, match=r"size mismatch for \S*layers\.1\.mlp\.experts\."):
        peft_on_transformers(path, tmp_path / "adapter")


def test_merge_cli_writes_a_checkpoint_equal_to_base_plus_adapter(tmp_path):
    from moetune.model.adapters import save_adapter
    from moetune.recipes.cli import main

    spec = LoraSpec(rank=4, ranks={"routed_experts": 8})
    model = DeepseekV3ForCausalLM(v3_config()).eval()
    model.save_pretrained(tmp_path / "base")
    apply_lora(model, spec)
    randomize_adapters(model)
    save_adapter(model, spec, tmp_path / "adapter")
    assert (
        main(
            [
                "merge",
                "--base",
                str(tmp_path / "base"),
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(tmp_path / "merged"),
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    merged = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_merge_cli_fp8_writes_a_deepseek_fp8_checkpoint(tmp_path):
    import json

    from safetensors import safe_open

    from moetune.model.adapters import save_adapter
    from moetune.recipes.cli import main

    spec = LoraSpec(rank=4, ranks={"routed_experts": 8})
    model = DeepseekV3ForCausalLM(v3_config(hidden_size=128, moe_intermediate_size=128)).eval()
    model.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer.json").write_text("{}")
    apply_lora(model, spec)
    randomize_adapters(model)
    save_adapter(model, spec, tmp_path / "adapter")
    assert (
        main(
            [
                "merge",
                "--base",
                str(tmp_path / "base"),
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(tmp_path / "merged"),
                "--dtype",
                "float32",
                "--fp8",
            ]
        )
        == 0
    )
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    with safe_open(tmp_path / "merged" / "model-00001-of-00001.safetensors", "pt") as f:
        name = "model.layers.1.mlp.experts.3.gate_proj.weight"
        assert f.get_tensor(name).dtype == torch.float8_e4m3fn and f"{name}_scale_inv" in f.keys()
    # The file holds exactly the FP8 quantisation of base + adapter: loading it (dequantised)
    # computes what the merged model does with FP8 weights in memory.
    from moetune.model.fp8 import to_frozen_fp8

    merge_lora(model)
    to_frozen_fp8(model)
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "merged", fp8="frozen")
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_save_pretrained_refuses_unmerged_adapters(tmp_path):
    model = DeepseekV3ForCausalLM(v3_config())
    apply_lora(model, LoraSpec(rank=4))
    with pytest.raises(ValueError, match="carries LoRA adapters"):
        model.save_pretrained(tmp_path)


def test_expert_subset_ids_are_checked():
    model = DeepseekV3ForCausalLM(v3_config())
    with pytest.raises(ValueError, match="distinct expert ids in \\[0, 16\\)"):
        apply_lora(model, LoraSpec(rank=8, experts={1: [3, 16]}))


def test_recipe_adapters_are_drawn_from_the_seed_alone():
    """attach_lora (SFT and GRPO recipes) draws the same adapters for the same seed whatever
    the global RNG state, and leaves that state alone."""
    from moetune.config.schema import LoraSection
    from moetune.training.model_loading import attach_lora

    def adapters(seed: int, noise: int) -> dict[str, torch.Tensor]:
        model = DeepseekV3ForCausalLM(v3_config())
        torch.manual_seed(noise)
        before = torch.random.get_rng_state()
        attach_lora(model, LoraSection(rank=4), seed=seed)
        assert torch.equal(torch.random.get_rng_state(), before)
        return {k: v.clone() for k, v in model.state_dict().items() if "lora" in k}

    first, again, other = adapters(0, noise=1), adapters(0, noise=2), adapters(1, noise=1)
    assert first.keys() == again.keys() and any("experts" in k for k in first)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if "_A" in k)
