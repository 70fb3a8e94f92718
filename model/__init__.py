"""moetune's native DeepSeek-V3-family model (MLA, DeepSeekMoE, MTP) and checkpoint I/O.

Imports with torch, safetensors and transformers alone.
"""

from moetune.model.config import DeepseekV2Config, DeepseekV3Config, load_config
from moetune.model.generation import GenerationOutput
from moetune.model.transformer import CausalLMOutput, DeepseekV3ForCausalLM

__all__ = [
    "CausalLMOutput",
    "DeepseekV2Config",
    "DeepseekV3Config",
    "DeepseekV3ForCausalLM",
    "GenerationOutput",
    "load_config",
]
