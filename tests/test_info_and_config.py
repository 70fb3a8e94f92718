"""`moetune info` on DeepSeek-V3's published config, and config validation."""

import json
import subprocess
import sys
from importlib.resources import files

import pytest

from moetune.model import DeepseekV3Config
from moetune.model.info import build_on_meta, count_parameters
from moetune.recipes.cli import main

V3_CONFIG = str(files("moetune.model") / "configs" / "deepseek_v3.json")


def test_deepseek_v3_counts_671b_total_37b_active_685b_with_mtp():
    report = count_parameters(build_on_meta(V3_CONFIG))
    assert round(report.total_params / 1e9) == 671
    assert round((report.total_params + report.mtp_params) / 1e9) == 684  # "685B" on the model card
    assert 37e9 <= report.active_params <= 38e9
    assert sum(report.components.values()) == report.total_params
    assert 680e9 <= report.fp8_bytes <= 700e9  # DeepSeek-V3's FP8 weights are about 690 GB


def test_info_counts_match_the_built_model_exactly():
    from tiny_configs import v3_config

    from moetune.model import DeepseekV3ForCausalLM

    config = v3_config()
    model = DeepseekV3ForCausalLM(config)
    report = count_parameters(model)
    params = dict(model.named_parameters())
    mtp = sum(p.numel() for n, p in params.items() if ".mtp." in n)
    experts = sum(p.numel() for n, p in params.items() if ".experts." in n and ".mtp." not in n)
    biases = 2 * config.n_routed_experts  # e_score_correction_bias of the 2 main MoE layers
    assert report.total_params == sum(p.numel() for p in params.values()) - mtp + biases
    assert report.active_params == report.total_params - experts + experts * 4 // 16
    assert report.mtp_params == mtp + config.n_routed_experts + 2 * 128 * 64


def test_info_cli_json(capsys):
    assert main(["info", V3_CONFIG, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"total_params", "active_params", "mtp_params"} <= report.keys()


def test_console_script_help_explains_itself():
    out = subprocess.run(
        [sys.executable, "-m", "moetune.recipes", "info", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "meta device" in out and "--json" in out


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"n_routed_experts": 10, "n_group": 4}, "n_group"),
        ({"n_group": 2, "topk_group": 3}, "topk_group"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"topk_method": "random"}, "topk_method"),
        ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
        (
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}},
            "quantization_config",
        ),
    ],
)
def test_inconsistent_config_names_the_field(fields, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        DeepseekV3Config(**fields)
