"""`metrics.jsonl`: one JSON object per logged step, appended as the run goes.

A resumed run first drops the rows logged after the step it resumes from, so the file
reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsFile:
    """A run's metrics.jsonl at `path`; `resume_step` keeps the rows up to that step."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None or not self.path.exists():
            self.path.write_text("")
            return
        rows = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= resume_step
        ]
        self.path.write_text("".join(row + "\n" for row in rows))

    def write(self, record: dict) -> None:
        """Append `record` (numbers, strings, bools; NaN/inf written as null)."""
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
