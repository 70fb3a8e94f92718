"""SFT through `moetune run`: loss falls, metrics and plots are written, resume is exact,
LoRA trains adapters only, data formats and packing work, DDP, DeepSpeed ZeRO-2/3 and FSDP2
on 2 CPU processes match one process and resume."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
import transformers
from safetensors.torch import load_file

from moetune.config.build import RecipeError
from moetune.config.schema import ArithmeticSection, ModelSection, SFTDataSection
from moetune.data.sft_data import load_sft_datasets
from moetune.model import DeepseekV3ForCausalLM
from moetune.model.adapters import load_adapter
from moetune.recipes.cli import main
from moetune.training.model_loading import load_model

FAST = [
    "data.arithmetic.count=400",
    "data.eval_fraction=0",
    "training.per_device_train_batch_size=16",
    "training.disable_tqdm=true",
    "training.warmup_steps=2",
]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model-00001-of-00001.safetensors")


@pytest.mark.integration
def test_full_sft_learns_logs_plots_and_resumes_exactly(tmp_path):
    first = tmp_path / "first"
    args = [
        "run",
        "sft/arith_tiny",
        *FAST,
        "training.max_steps=24",
        "training.save_steps=12",
        "training.logging_steps=4",
        "training.learning_rate=3e-3",
    ]
    assert main([*args, f"training.output_dir={first}"]) == 0
    logged = [r for r in rows(first / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in logged] == [1, 4, 8, 12, 16, 20, 24]
    assert all(r["tokens_per_second"] > 0 and r["lr"] is not None for r in logged)
    assert logged[-1]["loss"] < 0.75 * logged[0]["loss"]  # 6.5 -> about 3.5
    assert {"lm_loss", "mtp_loss", "expert_load_cv", "expert_load_cv/layer_1"} <= logged[-1].keys()
    assert (first / "expert_load.png").stat().st_size > 10_000
    assert list((first / "runs").rglob("events.out.tfevents*")), "TensorBoard events"
    final = weights(first)
    bias = final["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.abs().max() > 0, "aux-free balancing moved the router bias"
    assert DeepseekV3ForCausalLM.from_pretrained(first).config.vocab_size == 128

    # Resume from the step-12 checkpoint in a fresh folder: the same steps 13..24 follow.
    # A later save that crashed half way (weights written, no trainer_state.json) is skipped.
    second = tmp_path / "second"
    second.mkdir()
    shutil.copytree(first / "checkpoint-12", second / "checkpoint-12")
    shutil.copytree(
        first / "checkpoint-12",
        second / "checkpoint-18",
        ignore=shutil.ignore_patterns("trainer_state.json", "optimizer.pt"),
    )
    assert (
        main([*args, f"training.output_dir={second}", "training.resume_from_checkpoint=true"]) == 0
    )
    resumed = [r for r in rows(second / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in resumed] == [16, 20, 24]
    for a, b in zip(logged[-3:], resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    for name, tensor in weights(second).items():
        torch.testing.assert_close(tensor, final[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.integration
def test_lora_sft_trains_adapters_only(tmp_path, capsys):
    out = tmp_path / "lora"
    assert (
        main(
            [
                "run",
                "sft/arith_tiny_lora",
                *FAST,
                "training.max_steps=6",
                f"training.output_dir={out}",
                "training.save_steps=100",
                "training.learning_rate=1e-2",
            ]
        )
        == 0
    )
    base = load_model(ModelSection(config="tiny_arith", mtp_loss_weight=0.3))
    total = sum(p.numel() for p in base.parameters())
    spec = load_adapter(base, out)
    adapters = {n: p for n, p in base.named_parameters() if "lora" in n or n.endswith(("_A", "_B"))}
    expected = sum(p.numel() for p in adapters.values())
    assert f"trainable parameters: {expected:,} of {total + expected:,}" in capsys.readouterr().out
    assert spec.ranks == {"routed_experts": 8}
    # The base stayed as built (fresh weights from the seed): only the adapters changed it.
    fresh = load_model(ModelSection(config="tiny_arith"))
    ids = torch.randint(3, 99, (2, 12))
    with torch.no_grad():
        adapted, plain = base.eval()(ids).logits, fresh.eval()(ids).logits
    assert not torch.allclose(adapted, plain, atol=1e-4)
    for name, tensor in fresh.state_dict().items():
        if name in base.state_dict() and "lora" not in name:
            torch.testing.assert_close(base.state_dict()[name], tensor, msg=name)


@pytest.mark.integration
def test_chat_rows_and_packing_train(tmp_path):
    chat = [
        {
            "messages": [
                {"role": "user", "content": f"{a}+{b}"},
                {"role": "assistant", "content": str(a + b)},
            ]
        }
        for a in range(20)
        for b in range(5)
    ]
    folder = tmp_path / "chat"
    datasets.Dataset.from_list(chat).save_to_disk(str(folder))
    for extra in (["data.packing=false"], ["data.packing=true"]):
        out = tmp_path / f"out_{extra[0][-4:]}"
        assert (
            main(
                [
                    "run",
                    "sft/arith_tiny",
                    *FAST,
                    f"data.source={folder}",
                    "training.max_steps=2",
                    "training.logging_steps=1",
                    f"training.output_dir={out}",
                    *extra,
                ]
            )
            == 0
        )
        assert rows(out / "metrics.jsonl")[0]["loss"] > 0


@pytest.mark.integration
@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_data_files_of_each_format(tmp_path, suffix):
    table = datasets.Dataset.from_list(
        [{"prompt": f"{i}+1=", "completion": str(i + 1), "id": i} for i in range(10)]
    )
    path = tmp_path / f"data.{suffix}"
    {"jsonl": table.to_json, "csv": table.to_csv, "parquet": table.to_parquet}[suffix](str(path))
    train, held_out = load_sft_datasets(SFTDataSection(source=str(path), eval_fraction=0.2), seed=0)
    assert train.column_names == ["prompt", "completion"]  # extra columns dropped
    assert (len(train), len(held_out)) == (8, 2)


def test_data_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1", "answer": "2"}) + "\n")
    with pytest.raises(
        RecipeError, match=r"data.source: rows of .*bad.jsonl have columns \['question', 'answer'\]"
    ):
        load_sft_datasets(SFTDataSection(source=str(bad)), seed=0)
    with pytest.raises(RecipeError, match="data.arithmetic: arithmetic.operations: '/'"):
        load_sft_datasets(
            SFTDataSection(
                source="builtin:arithmetic", arithmetic=ArithmeticSection(operations="/")
            ),
            seed=0,
        )


@pytest.mark.parametrize(
    "env,key",
    [
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "fsdp_config.fsdp_version: 1"),
        (
            {
                "ACCELERATE_USE_DEEPSPEED": "true",
                "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "nvme",
            },
            (
                "deepspeed_config.offload_param_device: nvme needs "
                "deepspeed_config.offload_param_nvme_path"
            ),
        ),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true"},
            "model.expert_parallel: sharded experts train under DDP",
        ),
    ],
)
def test_launch_configs_that_cannot_run_fail_before_training(
    tmp_path, monkeypatch, capsys, env, key
):
    """The environment `accelerate launch` sets from such a config: the run stops with the
    config key before building the model or writing anything."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    extra = ["model.expert_parallel=2"] if key.startswith("model.") else []
    assert main(["run", "sft/arith_tiny", *FAST, f"training.output_dir={out}", *extra]) == 2
    assert key in capsys.readouterr().err
    assert not out.exists()


SCALE_OUT = [
    *FAST,
    "training.max_steps=4",
    "training.save_steps=2",
    "training.logging_steps=1",
    "training.learning_rate=3e-3",
    "data.max_length=64",
]
LORA = "lora={rank: 8, alpha: 16, components: [attention, shared_experts, routed_experts]}"


def launch(config: str, out: Path, *overrides: str) -> list[dict]:
    """`accelerate launch --config_file recipes/accelerate/{config}.yaml --num_processes 2` of
    sft/arith_tiny on CPU (gloo; DeepSpeed with DS_ACCELERATOR=cpu, and no ACCELERATE_USE_CPU,
    which would turn every config into plain DDP). tests/sft_engine_check.py runs the recipe
    and asserts inside each process, after the first step, that the config's engine holds
    the model; the logged loss rows."""
    engine = config
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_CPU", None)
    accelerate = Path(sys.executable).parent / "accelerate"
    done = subprocess.run(
        [
            str(accelerate),
            "launch",
            "--config_file",
            f"recipes/accelerate/{config}.yaml",
            "--num_processes",
            "2",
            "--main_process_port",
            "29517",
            "tests/sft_engine_check.py",
            engine,
            "sft/arith_tiny",
            *SCALE_OUT,
            "training.per_device_train_batch_size=4",
            f"training.output_dir={out}",
            *overrides,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("finished 4 steps") == 1  # printed by the main process only
    checks = [line for line in done.stdout.splitlines() if line.startswith("engine check:")]
    assert len(checks) == 2, done.stdout[-2000:]  # one per process
    return [r for r in rows(out / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, Path]:
    """Full and LoRA runs of one process x 8 rows per step: their output folders."""
    outputs = {}
    for kind, extra in (("full", []), ("lora", [LORA])):
        outputs[kind] = tmp_path_factory.mktemp(f"single_{kind}")
        assert (
            main(
                [
                    "run",
                    "sft/arith_tiny",
                    *SCALE_OUT,
                    "training.per_device_train_batch_size=8",
                    f"training.output_dir={outputs[kind]}",
                    *extra,
                ]
            )
            == 0
        )
    return outputs


def trained(folder: Path) -> dict[str, torch.Tensor]:
    """A run's final tensors: the whole model, or the adapters of a LoRA run."""
    adapter = folder / "adapter_model.safetensors"
    return load_file(adapter) if adapter.exists() else weights(folder)


@pytest.mark.integration
@pytest.mark.parametrize(
    "config,kind",
    [
        ("ddp", "full"),
        ("zero2", "full"),
        ("zero3", "full"),
        ("fsdp2", "full"),
        ("ddp", "lora"),
        ("zero2", "lora"),
        ("zero3", "lora"),
        ("fsdp2", "lora"),
    ],
)
def test_two_processes_match_one_with_the_same_global_batch_and_resume(
    tmp_path, config, kind, one_process
):
    """DDP, DeepSpeed ZeRO-2/3 and FSDP2, full fine-tuning and LoRA, on 2 CPU processes x 4
    rows (the engine asserted inside the run) give the losses and final weights of one
    process x 8 rows on the same seed and data (float32: losses within rel 1e-5, weights
    within 1e-5); the final model loads in transformers with moetune's logits. With sharded
    weights (ZeRO-3, FSDP2), a run resumed from checkpoint-2 repeats steps 3-4 exactly and
    ends on the same weights (DDP and ZeRO-2 skip it to keep the suite short; ZeRO-2 resumes
    through DeepSpeed's checkpoint as ZeRO-3 does)."""
    extra = [LORA] if kind == "lora" else []
    single = one_process[kind]
    out = tmp_path / config
    logged = launch(config, out, *extra)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    expected = [r["loss"] for r in rows(single / "metrics.jsonl") if "loss" in r]
    assert [r["loss"] for r in logged] == pytest.approx(expected, rel=1e-5)
    final = trained(out)
    for name, tensor in trained(single).items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    if kind == "full":
        ours = DeepseekV3ForCausalLM.from_pretrained(out).eval()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ids = torch.randint(3, 99, (2, 12))
        with torch.no_grad():
            torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
    if config in ("ddp", "zero2"):
        return
    resumed_dir = tmp_path / f"{config}-resumed"
    resumed_dir.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed_dir / "checkpoint-2")
    resumed = launch(config, resumed_dir, *extra, "training.resume_from_checkpoint=true")
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in logged[2:]]
    for name, tensor in trained(resumed_dir).items():
        torch.testing.assert_close(tensor, final[name], rtol=0, atol=0, msg=name)
