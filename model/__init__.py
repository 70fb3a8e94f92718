"""moetune's native DeepSeek-V3-family model (MLA, DeepSeekMoE, MTP) and checkpoint I/O.

Imports with torch, safetensors and transformers alone. Names load on first use, so the
command line (whose subcommands live in this package) starts without importing transformers.
"""

import importlib

_EXPORTS = {
    "CausalLMOutput": "moetune.model.transformer",
    "DeepseekV2Config": "moetune.model.config",
    "DeepseekV3Config": "moetune.model.config",
    "DeepseekV3ForCausalLM": "moetune.model.transformer",
    "GenerationOutput": "moetune.model.generation",
    "load_config": "moetune.model.config",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moetune.model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
