"""The shipped DeepSeek-V2-Lite and Moonlight-16B-A3B configs give their published sizes.

Published figures are rounded and count "activated" differently: DeepSeek-V2-Lite's
"2.4B activated" leaves out the input embedding (2.45B; 2.66B with it), Moonlight's
"A3B" keeps it (2.91B; 2.58B without).
"""

import json
from importlib.resources import files

import pytest

from moetune.model import load_config
from moetune.recipes.cli import main

CONFIGS = files("moetune.model") / "configs"


def info_json(name: str, capsys) -> dict:
    assert main(["info", str(CONFIGS / name), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def close(value: float, published: float, tolerance: float = 0.02) -> bool:
    return abs(value - published) <= tolerance * published


def test_deepseek_v2_lite_is_15_7b_total_2_4b_activated(capsys):
    report = info_json("deepseek_v2_lite.json", capsys)
    assert close(report["total_params"], 15.7e9)
    activated_without_embedding = report["active_params"] - report["components"]["embedding"]
    assert close(activated_without_embedding, 2.4e9, tolerance=0.025)  # 2.45B
    assert report["mtp_params"] == 0


def test_moonlight_16b_is_16b_total_3b_activated(capsys):
    report = info_json("moonlight_16b.json", capsys)
    assert close(report["total_params"], 16e9)  # 15.96B
    assert close(report["active_params"], 3e9, tolerance=0.03)  # 2.91B, "A3B"
    assert report["mtp_params"] == 0


@pytest.mark.parametrize(
    "name, model_type, routing",
    [
        ("deepseek_v2_lite.json", "deepseek_v2", ("greedy", "softmax", False, 1.0)),
        ("moonlight_16b.json", "deepseek_v3", ("noaux_tc", "sigmoid", True, 2.446)),
    ],
)
def test_shipped_configs_load_as_their_family(name, model_type, routing):
    config = load_config(CONFIGS / name)
    assert config.model_type == model_type
    assert (
        config.topk_method,
        config.scoring_func,
        config.norm_topk_prob,
        config.routed_scaling_factor,
    ) == routing
    assert config.q_lora_rank is None and config.kv_lora_rank == 512
    assert (config.yarn is not None) == (model_type == "deepseek_v2")
