"""Typed recipe schemas, one dataclass per section. A recipe's `recipe:` key picks the schema.

Built so far: `recipe: eval`. SFT and GRPO recipes arrive with their trainers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moetune.rewards import RewardSpec


@dataclass
class ModelSection:
    path: str  # checkpoint folder (with tokenizer.json for generation)
    adapter: str | None = None  # LoRA adapter folder
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class DataSection:
    source: str  # builtin:arithmetic, builtin:humaneval, or a .jsonl/.json/.parquet file
    limit: int | None = None  # first N problems
    seed: int = 0


@dataclass
class EvalSection:
    n: int = 4  # samples per problem = k of pass@k
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    pass_threshold: float = 1.0  # weighted reward at which a sample passes
    output_dir: str = "eval_out"


@dataclass
class EvalRecipe:
    recipe: Literal["eval"]
    model: ModelSection
    data: DataSection
    rewards: list[RewardSpec]
    eval: EvalSection = field(default_factory=EvalSection)


SCHEMAS = {"eval": EvalRecipe}
