"""ESFT expert profiling and selection."""

import json

import torch
from tiny_configs import v3_config

from moetune.model import DeepseekV3ForCausalLM
from moetune.model.lora import LoraSpec, apply_lora
from moetune.recipes.cli import main
from moetune.training.expert_profile import (
    ExpertProfile,
    profile_experts,
    read_profile,
    select_experts,
)


def test_profile_counts_match_the_routing_it_observes():
    model = DeepseekV3ForCausalLM(v3_config(num_nextn_predict_layers=0))
    ids = torch.randint(0, 128, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # padding is not profiled
    profile = profile_experts(model, [(ids, mask)])
    assert profile.tokens == 26
    for layer in (1, 2):
        assert abs(sum(profile.token_ratio[layer]) - 4) < 1e-9  # top-4 per token
        assert abs(sum(profile.gate_score[layer]) - 1) < 1e-6  # float32 affinities
    # the training-mode load counter sees the same routing (no padding there)
    model.train()
    model(ids[:2])
    profile2 = profile_experts(model, [(ids[:2], None)])
    load = model.expert_load()[0].double()
    assert torch.allclose(torch.tensor(profile2.token_ratio[1], dtype=torch.float64) * 20, load)


def test_selection_takes_fewest_experts_reaching_top_p():
    profile = ExpertProfile(
        token_ratio={1: [0.1, 0.5, 0.2, 0.2]}, gate_score={1: [0.05, 0.6, 0.3, 0.05]}, tokens=10
    )
    assert select_experts(profile, "gate", 0.6) == {1: [1]}
    assert select_experts(profile, "gate", 0.61) == {1: [1, 2]}
    # token ratios normalise to [0.1, 0.5, 0.2, 0.2]: 0.5 + 0.2 reaches 0.7
    assert select_experts(profile, "token", 0.7) in ({1: [1, 2]}, {1: [1, 3]})
    assert select_experts(profile, "gate", 1.0) == {1: [0, 1, 2, 3]}


def test_profile_cli_writes_selection(tmp_path):
    model = DeepseekV3ForCausalLM(v3_config(num_nextn_predict_layers=0))
    model.save_pretrained(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"input_ids": torch.randint(0, 128, (12,)).tolist()}) for _ in range(5)
        )
    )
    assert (
        main(
            [
                "experts",
                "profile",
                "--model",
                str(tmp_path / "model"),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "experts.json"),
                "--top-p",
                "0.3",
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "experts.json").read_text())
    assert result["tokens"] == 60 and set(result["selected"]) == {"1", "2"}
    assert all(0 < len(ids) < 16 for ids in result["selected"].values())
    # the selection drives expert-subset LoRA: only selected experts get adapters
    selection = select_experts(
        read_profile(str(tmp_path / "experts.json")), result["criterion"], 0.3
    )
    assert {str(k): v for k, v in selection.items()} == result["selected"]
    apply_lora(model, LoraSpec(rank=8, components=("routed_experts",), experts=selection))
    for layer in (1, 2):
        lora = model.model.layers[layer].mlp.experts.lora
        assert lora.expert_ids.tolist() == selection[layer]
