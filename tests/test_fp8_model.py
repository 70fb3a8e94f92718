"""Frozen FP8 bases: DeepSeek-style FP8 checkpoints held as stored, under LoRA."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_configs import v3_config

from moetune.kernels import dequantize_act, quantize_act, quantize_weight
from moetune.model import DeepseekV3ForCausalLM
from moetune.model.fp8 import FP8RoutedExperts, FrozenFP8Linear
from moetune.model.lora import LoraSpec, apply_lora


def tensor_bytes(model) -> int:
    return sum(
        t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
    )


@pytest.fixture
def fp8_checkpoint(tmp_path):
    """A tiny checkpoint quantised as DeepSeek ships V3: 2-D projection weights in
    float8_e4m3fn with 128x128 `weight_scale_inv`, and a quantization_config."""
    model = DeepseekV3ForCausalLM(v3_config(initializer_range=0.1))
    model.save_pretrained(tmp_path)
    file = next(tmp_path.glob("model-*.safetensors"))
    tensors = load_file(file)
    for name in [
        n for n in tensors if "_proj" in n and n.endswith(".weight") and "eh_proj" not in n
    ]:
        tensors[name], tensors[name + "_scale_inv"] = quantize_weight(tensors[name])
    save_file(tensors, file, metadata={"format": "pt"})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": dict.fromkeys(tensors, file.name)}))
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_frozen_fp8_holds_weights_as_stored_and_matches_the_dequantized_model(fp8_checkpoint):
    frozen = DeepseekV3ForCausalLM.from_pretrained(fp8_checkpoint, fp8="frozen")
    dense = DeepseekV3ForCausalLM.from_pretrained(fp8_checkpoint)
    attention = frozen.model.layers[0].self_attn
    assert isinstance(attention.kv_b_proj, FrozenFP8Linear)
    assert isinstance(frozen.model.layers[1].mlp.experts, FP8RoutedExperts)
    with safe_open(next(fp8_checkpoint.glob("model-*.safetensors")), "pt") as f:
        stored = f.get_tensor("model.layers.0.self_attn.kv_b_proj.weight")
        assert torch.equal(attention.kv_b_proj.weight.view(torch.uint8), stored.view(torch.uint8))
        stored = f.get_tensor("model.layers.1.mlp.experts.5.down_proj.weight_scale_inv")
        assert torch.equal(frozen.model.layers[1].mlp.experts.down_proj_scale_inv[5], stored)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ours, plain = frozen(ids).logits, dense(ids).logits
        # The only difference: the FP8 GEMMs see activations quantised per 1x128 tile. The
        # dense model with that quantisation applied to the same linears' and experts' GEMM
        # inputs must agree to float32 accumulation noise.
        frozen_modules = dict(frozen.named_modules())
        hooks = [
            module.register_forward_pre_hook(fake_quantize_input)
            for name, module in dense.named_modules()
            if isinstance(frozen_modules.get(name), FrozenFP8Linear)
        ]
        for name, module in dense.named_modules():
            if isinstance(frozen_modules.get(name), FP8RoutedExperts):
                module.forward = lambda x, ids, w, m=module: fp8_experts_reference(
                    x, ids, w, [m.gate_up_proj], m.down_proj
                )
        reference = dense(ids).logits
        for hook in hooks:
            hook.remove()
    assert (ours - reference).abs().max().item() <= 1e-4
    # against unquantised activations: e4m3 noise (~2.5% per GEMM input) through 3 random layers
    relative = ((ours - plain).norm() / plain.norm()).item()
    assert relative < 0.3, relative


def fake_quantize(t):
    """t rounded through 1x128 FP8 tiles along its last dim (zero-padded like the FP8 GEMM)."""
    width = t.shape[-1]
    padded = torch.nn.functional.pad(t, (0, -width % 128))
    return dequantize_act(*quantize_act(padded))[..., :width]


def fake_quantize_input(module, args):
    """A forward pre-hook rounding a linear's input through 1x128 FP8 tiles."""
    (x,) = args
    return (fake_quantize(x).to(x.dtype),)


def test_frozen_fp8_memory_is_at_most_055x_of_bf16(fp8_checkpoint):
    frozen = DeepseekV3ForCausalLM.from_pretrained(
        fp8_checkpoint, dtype=torch.bfloat16, fp8="frozen"
    )
    bf16 = DeepseekV3ForCausalLM.from_pretrained(fp8_checkpoint, dtype=torch.bfloat16)
    ratio = tensor_bytes(frozen) / tensor_bytes(bf16)
    print(f"fp8 frozen / bf16 tensor bytes: {ratio:.3f}")
    assert ratio <= 0.55
    frozen.to(torch.bfloat16)  # a dtype move keeps the FP8 weights FP8
    assert frozen.model.layers[0].self_attn.o_proj.weight.dtype == torch.float8_e4m3fn


def saved_as_fp8(model, folder, **save_options):
    """Save `model`, load it back with fp8="frozen" (quantised on load), save that to
    folder / "fp8"; returns the frozen model."""
    model.save_pretrained(folder / "bf16")
    frozen = DeepseekV3ForCausalLM.from_pretrained(folder / "bf16", fp8="frozen")
    frozen.save_pretrained(folder / "fp8", **save_options)
    return frozen


def test_bf16_checkpoint_quantized_on_load_saves_a_deepseek_fp8_checkpoint(tmp_path):
    frozen = saved_as_fp8(DeepseekV3ForCausalLM(v3_config()), tmp_path)
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    weight_map = json.loads((tmp_path / "fp8" / "model.safetensors.index.json").read_text())[
        "weight_map"
    ]
    assert "model.layers.1.mlp.experts.3.gate_proj.weight_scale_inv" in weight_map
    assert "model.layers.0.self_attn.q_a_proj.weight_scale_inv" in weight_map
    reloaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "fp8")  # dequantised
    assert reloaded.config.quantization_config is None
    expected = frozen.model.layers[0].self_attn.q_a_proj.dequantized_weight(torch.float32)
    assert torch.equal(reloaded.model.layers[0].self_attn.q_a_proj.weight, expected)


def test_lora_trains_on_a_frozen_fp8_base(fp8_checkpoint):
    model = DeepseekV3ForCausalLM.from_pretrained(fp8_checkpoint, fp8="frozen").train()
    apply_lora(model, LoraSpec(rank=8))
    kv_b = model.model.layers[0].self_attn.kv_b_proj
    assert isinstance(kv_b.base_layer, FrozenFP8Linear) and kv_b.lora_A.weight.requires_grad
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 12))
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert all(b.grad is None for b in model.buffers())


def test_unknown_fp8_mode_is_refused(fp8_checkpoint):
    with pytest.raises(ValueError, match="fp8 must be one of"):
        DeepseekV3ForCausalLM.from_pretrained(fp8_checkpoint, fp8="fp4")


def fp8_linear_reference(x, weight):
    """What an FP8Linear computes, in plain torch: both operands rounded to their FP8 grids."""
    from moetune.kernels import dequantize_weight

    return fake_quantize(x) @ dequantize_weight(*quantize_weight(weight), dtype=torch.float32).T


@pytest.mark.parametrize("fp8_wgrad", [False, True])
def test_fp8_linear_forward_and_gradients(fp8_wgrad):
    from moetune.model.fp8 import FP8Linear

    linear = torch.nn.Linear(192, 80, bias=False)
    layer = FP8Linear.from_linear(linear, fp8_wgrad=fp8_wgrad)
    x = torch.randn(7, 192, requires_grad=True)
    grad = torch.randn(7, 80)
    out = layer(x)
    torch.testing.assert_close(
        out, fp8_linear_reference(x.detach(), linear.weight.detach()), rtol=1e-5, atol=1e-5
    )
    out.backward(grad)
    exact_x = grad @ linear.weight.detach()
    exact_w = grad.T @ x.detach()
    # e4m3 rounding of the operands: a few percent relative error, never more
    for ours, exact in ((x.grad, exact_x), (layer.weight.grad, exact_w)):
        assert ((ours - exact).norm() / exact.norm()) < 0.08


def test_fp8_training_ends_within_2_percent_of_high_precision(tmp_path):
    """The same run twice, float32 and FP8 (`fp8="train"`), 150 steps on a learnable
    sequence task: final losses within 2% (DeepSeek-V3 reports < 0.25% at scale).
    (The high-precision side is float32: bf16 GEMMs crawl on this CPU.)"""
    DeepseekV3ForCausalLM(v3_config(num_nextn_predict_layers=0)).save_pretrained(tmp_path)
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 64, (150, 8, 1), generator=generator)
    batches = (starts + torch.arange(24)) % 128  # counting sequences: predictable

    def final_loss(fp8):
        torch.manual_seed(0)
        model = DeepseekV3ForCausalLM.from_pretrained(tmp_path, fp8=fp8).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for ids in batches:
            loss = model(ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        return sum(losses[-10:]) / 10, losses[0]

    high, first = final_loss(None)
    low, _ = final_loss("train")
    print(f"final loss float32 {high:.4f}, fp8 {low:.4f} (first {first:.4f})")
    assert high < 0.5 * first  # it learned
    assert abs(low - high) / high < 0.02


class FakeQuantizeGrad(torch.autograd.Function):
    """Identity forward; the backward rounds the gradient through 1x128 FP8 tiles."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return fake_quantize(grad)


def assert_close_but_for_rounding_flips(actual, expected, what: str) -> None:
    """Equal to float32 noise (1e-5), token row by token row, but for FP8 rounding flips: a
    value on a rounding boundary in one computation (the module's GEMMs) but not in the other
    (the per-pair loop's) rounds to the neighbouring e4m3 value, which turns float32 noise
    into a whole FP8 step in that token's row. At most one row in 12 may differ, by under 1%
    of the tensor's largest entry."""
    off = ~torch.isclose(actual, expected, rtol=1e-5, atol=1e-5).all(dim=-1)
    assert int(off.sum()) <= len(off) // 12, f"{what}: {int(off.sum())} of {len(off)} rows differ"
    bound = 0.01 * float(expected.abs().max())
    torch.testing.assert_close(
        actual[off], expected[off], rtol=0, atol=bound, msg=lambda text: f"{what}: {text}"
    )


def fp8_experts_reference(x, expert_ids, weights, gate_up_parts, down):
    """What FP8 experts compute, as a per-(token, slot) loop in plain float32 autograd:
    GEMM inputs rounded to 1x128 FP8 tiles (straight through), gradients entering each
    input-gradient GEMM rounded the same way; weights are the dequantised FP8 weights,
    gate_up in its stored parts."""
    straight_through = lambda t: t + (fake_quantize(t) - t).detach()
    out = torch.zeros_like(x)
    for token in range(x.shape[0]):
        for slot in range(expert_ids.shape[1]):
            e = expert_ids[token, slot]
            row = straight_through(x[token])
            h = torch.cat([FakeQuantizeGrad.apply(row @ part[e].T) for part in gate_up_parts])
            gate, up = h.chunk(2)
            act = weights[token, slot] * torch.nn.functional.silu(gate) * up
            out[token] = out[token] + FakeQuantizeGrad.apply(straight_through(act) @ down[e].T)
    return out


@pytest.mark.parametrize("mode", ["frozen", "train"])
def test_fp8_routed_experts_equal_a_per_expert_reference(mode):
    """Both FP8 expert modules run the grouped FP8 GEMM; forward and input gradients equal
    the plain reference to float32 noise (hidden 192 and intermediate 160: partial 128-blocks,
    gate/up blocks straddling in train mode). Under training the master weights get
    gradients close to the unquantised ones (e4m3 rounding only)."""
    from moetune.kernels import dequantize_weight
    from moetune.model.experts import RoutedExperts
    from moetune.model.fp8 import FP8TrainingExperts

    E, hidden, inter, tokens, k = 6, 192, 160, 24, 3
    dense = RoutedExperts(E, hidden, inter)
    torch.nn.init.normal_(dense.gate_up_proj, std=0.1)
    torch.nn.init.normal_(dense.down_proj, std=0.1)
    x = torch.randn(tokens, hidden, requires_grad=True)
    expert_ids = torch.rand(tokens, E - 1).argsort(-1)[:, :k]  # expert E-1 gets no tokens
    weights = torch.rand(tokens, k, requires_grad=True)
    if mode == "frozen":
        module = FP8RoutedExperts(dense)
        parts = [
            dequantize_weight(*module.stored(n), dtype=torch.float32)
            for n in ("gate_proj", "up_proj")
        ]
        down = dequantize_weight(*module.stored("down_proj"), dtype=torch.float32)
    else:
        module = FP8TrainingExperts.from_experts(dense)
        parts = [
            dequantize_weight(*quantize_weight(dense.gate_up_proj.detach()), dtype=torch.float32)
        ]
        down = dequantize_weight(*quantize_weight(dense.down_proj.detach()), dtype=torch.float32)
    ours = module(x, expert_ids, weights)
    reference = fp8_experts_reference(x, expert_ids, weights, parts, down)
    assert_close_but_for_rounding_flips(ours, reference, "output")
    grad = torch.randn_like(ours)
    ours.backward(grad)
    reference_grads = torch.autograd.grad(reference, (x, weights), grad)
    for ours_grad, reference_grad, what in zip(
        (x.grad, weights.grad), reference_grads, ("x.grad", "weights.grad")
    ):
        assert_close_but_for_rounding_flips(ours_grad, reference_grad, what)
    if mode == "train":
        assert module.gate_up_proj is dense.gate_up_proj
        exact = torch.autograd.grad(dense(x, expert_ids, weights), dense.parameters(), grad)
        for master, exact_grad in zip(dense.parameters(), exact):
            assert ((master.grad - exact_grad).norm() / exact_grad.norm()) < 0.08
    else:
        assert not any(b.requires_grad for b in module.buffers())


def test_read_tensors_dequantizes_with_scales_from_other_shards(tmp_path):
    from moetune.model.checkpoint import disk_tensors, locate_tensors, read_tensors

    saved_as_fp8(
        DeepseekV3ForCausalLM(v3_config()), tmp_path, max_shard_bytes=20_000
    )  # small shards
    weight_map = locate_tensors(tmp_path / "fp8")
    assert (
        weight_map["model.layers.1.mlp.experts.3.gate_proj.weight"]
        != weight_map["model.layers.1.mlp.experts.3.gate_proj.weight_scale_inv"]
    )
    dense = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "fp8")  # dequantised on load
    expected = dict(disk_tensors(dense, dense.config))
    names = [n for n in weight_map if not n.endswith("_scale_inv")]
    read = dict(read_tensors(tmp_path / "fp8", names, dequantize_to=torch.float32))
    assert read.keys() == expected.keys()
    for name, tensor in read.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name]), name
    del weight_map["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    with pytest.raises(ValueError, match="o_proj.weight' has no"):
        list(
            read_tensors(
                tmp_path / "fp8",
                ["model.layers.0.self_attn.o_proj.weight"],
                weight_map,
                dequantize_to=torch.float32,
            )
        )


def test_frozen_fp8_linear_input_gradient_goes_through_the_fp8_gemm():
    """dgrad = (gradient rounded to 1x128 FP8 tiles) @ W, W's FP8 blocks used transposed;
    200 outputs: a partial 128-block on the gradient's K."""
    from moetune.kernels import dequantize_weight

    frozen = FrozenFP8Linear.from_linear(torch.nn.Linear(192, 200, bias=False))
    x = torch.randn(5, 3, 192, requires_grad=True)
    grad = torch.randn(5, 3, 200)
    frozen(x).backward(grad)
    weight = dequantize_weight(frozen.weight, frozen.weight_scale_inv, dtype=torch.float32)
    torch.testing.assert_close(x.grad, fake_quantize(grad) @ weight, rtol=1e-5, atol=1e-5)


def test_fp8_checkpoint_saved_by_moetune_loads_in_transformers(tmp_path):
    """transformers reads the saved FP8 checkpoint (its fine-grained FP8 loader; without a GPU
    it dequantises on load) and computes moetune's logits of the same dequantised weights
    (FP8 values read without their scales would be off by orders of magnitude)."""
    import transformers

    model = DeepseekV3ForCausalLM(v3_config(initializer_range=0.1))
    with torch.no_grad():
        for router in model.routers():
            router.e_score_correction_bias.normal_(0, 0.3)
    saved_as_fp8(model, tmp_path)
    ours = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "fp8")  # dequantised, float32
    theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(
        tmp_path / "fp8", dtype=torch.float32
    )
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        difference = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    assert difference <= 1e-4, difference
