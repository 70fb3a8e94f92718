"""How synced weights reach local engine processes: safetensors files in /dev/shm.

A sync writes the changed tensors as one file that every local engine loads; a restarted
engine starts from a file of every tensor synced so far. (Remote engines take tensors over
their weight group instead: moetune.rl.weight_group.)
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


class WeightFiles:
    """A private folder in /dev/shm (else the temporary folder) for weight files."""

    def __init__(self):
        shm = Path("/dev/shm")
        self.folder = Path(
            tempfile.mkdtemp(prefix="moetune-rollout-", dir=shm if shm.is_dir() else None)
        )

    @contextmanager
    def written(self, tensors: dict[str, torch.Tensor], name: str) -> Iterator[str]:
        """The path of `tensors` written as `name`.safetensors, removed when the block ends."""
        path = self.folder / f"{name}.safetensors"
        save_file(tensors, path)
        try:
            yield str(path)
        finally:
            path.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
