"""Checkpoint round trips, the HF/DeepSeek on-disk layout, FP8 dequantisation and errors."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_configs import v2_lite_config, v3_config

from moetune.kernels import dequantize_weight, quantize_weight
from moetune.model import DeepseekV3ForCausalLM, load_config


def make_model(config=None, dtype=torch.bfloat16):
    model = DeepseekV3ForCausalLM(config or v3_config()).to(dtype)
    for router in model.routers():
        router.e_score_correction_bias.normal_()
    return model


def test_sharded_round_trip_is_bit_identical(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # really sharded
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), name


def test_disk_layout_uses_deepseek_names(tmp_path):
    config = v3_config()
    make_model(config).save_pretrained(tmp_path)
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    mtp = f"model.layers.{config.num_hidden_layers}"
    for name in [
        "model.layers.1.mlp.experts.15.gate_proj.weight",
        "model.layers.1.mlp.experts.0.down_proj.weight",
        "model.layers.1.mlp.gate.e_score_correction_bias",
        "model.layers.1.mlp.shared_experts.up_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        f"{mtp}.eh_proj.weight",
        f"{mtp}.enorm.weight",
        f"{mtp}.hnorm.weight",
        f"{mtp}.shared_head.norm.weight",
        f"{mtp}.shared_head.head.weight",
        f"{mtp}.embed_tokens.weight",
        f"{mtp}.self_attn.kv_b_proj.weight",
        f"{mtp}.mlp.experts.3.up_proj.weight",
    ]:
        assert name in weight_map, name
    assert not any("gate_up_proj" in n or ".mtp." in n for n in weight_map)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["topk_method"] == "noaux_tc" and saved["scoring_func"] == "sigmoid"
    assert saved["architectures"] == ["DeepseekV3ForCausalLM"]
    assert saved["model_type"] == "deepseek_v3"


def test_v2_checkpoint_round_trip_keeps_v2_identity(tmp_path):
    model = DeepseekV3ForCausalLM(v2_lite_config())
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "deepseek_v2" and saved["scoring_func"] == "softmax"
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.topk_method == "greedy"
    ids = torch.randint(0, 128, (1, 9))
    assert torch.equal(model.eval()(ids).logits, loaded(ids).logits)


def test_v3_config_without_routing_fields_means_sigmoid_noaux_tc(tmp_path):
    raw = v3_config().to_dict()
    del raw["scoring_func"], raw["topk_method"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = load_config(tmp_path)
    assert (config.scoring_func, config.topk_method) == ("sigmoid", "noaux_tc")


def rewrite_shard(path, edit):
    file = next(path.glob("model-*.safetensors"))
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"] = dict.fromkeys(tensors, file.name)
    index_file.write_text(json.dumps(index))


@pytest.mark.parametrize(
    "problem, edit, message",
    [
        (
            "missing",
            lambda t: t.pop("model.layers.1.mlp.experts.7.up_proj.weight"),
            "missing tensor 'model.layers.1.mlp.experts.7.up_proj.weight' (model shape (32, 64))",
        ),
        (
            "extra",
            lambda t: t.__setitem__("model.layers.9.foo.weight", torch.zeros(2)),
            "unexpected tensor 'model.layers.9.foo.weight'",
        ),
        (
            "shape",
            lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.weight", torch.zeros(64, 40)),
            (
                "shape mismatch for 'model.layers.0.self_attn.o_proj.weight': "
                "checkpoint (64, 40), model (64, 48)"
            ),
        ),
    ],
)
def test_mismatched_checkpoint_fails_naming_the_tensor(tmp_path, problem, edit, message):
    make_model().save_pretrained(tmp_path)
    rewrite_shard(tmp_path, edit)
    with pytest.raises(ValueError) as error:
        DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    assert message in str(error.value)


def test_fp8_checkpoint_is_dequantized_on_load(tmp_path):
    model = make_model(dtype=torch.float32)
    model.save_pretrained(tmp_path)
    expected = {}

    def to_fp8(tensors):
        for name in [n for n in tensors if n.endswith("proj.weight") and tensors[n].dim() == 2]:
            w_q, scale = quantize_weight(tensors[name])
            tensors[name] = w_q
            tensors[name.removesuffix("weight") + "weight_scale_inv"] = scale
            expected[name] = dequantize_weight(w_q, scale, dtype=torch.float32)

    rewrite_shard(tmp_path, to_fp8)
    loaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert len(expected) > 50
    experts = loaded.model.layers[1].mlp.experts
    torch.testing.assert_close(
        experts.gate_up_proj[3, 32:],
        expected["model.layers.1.mlp.experts.3.up_proj.weight"],
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        loaded.model.layers[0].self_attn.o_proj.weight,
        expected["model.layers.0.self_attn.o_proj.weight"],
        rtol=0,
        atol=0,
    )
    # and the dequantised weights are close to the originals (e4m3: 3 mantissa bits)
    original = model.model.layers[0].self_attn.o_proj.weight
    assert (
        (loaded.model.layers[0].self_attn.o_proj.weight - original).abs()
        <= original.abs().amax() / 448 * 16
    ).all()


def test_save_is_atomic_and_leaves_no_partial_files(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    model = make_model()
    model.save_pretrained(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    from moetune.model.safetensors_stream import SafetensorsStream

    written = SafetensorsStream.write

    def crash(self, name, tensor):  # the disk fills up half way through the first shard
        if self.next == len(self.entries) // 2:
            raise OSError("disk full")
        written(self, name, tensor)

    monkeypatch.setattr(SafetensorsStream, "write", crash)
    with pytest.raises(OSError):
        make_model().save_pretrained(target, max_shard_bytes=2**16)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_bias_stays_float32_in_bf16_models(tmp_path):
    model = make_model(dtype=torch.bfloat16)
    assert model.routers()[0].e_score_correction_bias.dtype == torch.float32
    model.save_pretrained(tmp_path)
    file = next(tmp_path.glob("model-*.safetensors"))
    with safe_open(file, "pt") as f:
        assert (
            f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
        )
