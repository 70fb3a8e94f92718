"""`metrics.jsonl` (and GRPO's `rollouts.jsonl`): one JSON object per row, appended as the
run goes, each with the `step` it belongs to.

A resumed run first drops the rows logged after the step it resumes from (and a last line
torn by a crash mid-write), so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsFile:
    """A run's JSON-lines file at `path`; `resume_step` keeps the rows up to that step
    (None: starts the file afresh)."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None or not self.path.exists():
            self.path.write_text("")
            return
        # Line by line into a sibling file, then swapped in: rollouts.jsonl can be large.
        kept = self.path.with_name(self.path.name + ".resume")
        with open(self.path) as source, open(kept, "w") as target:
            for line in source:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # blank, or torn by a crash mid-write
                if row.get("step", 0) <= resume_step:
                    target.write(line if line.endswith("\n") else line + "\n")
        os.replace(kept, self.path)

    def write(self, record: dict) -> None:
        """Append `record` (numbers, strings, bools; NaN/inf written as null)."""
        self.write_rows([record])

    def write_rows(self, records: list[dict]) -> None:
        """Append every record, one line each."""
        with open(self.path, "a") as f:
            f.writelines(json.dumps(clean(record)) + "\n" for record in records)


def clean(value):
    """NaN/inf floats -> None, inside mappings and lists too (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value
