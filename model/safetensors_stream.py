"""A safetensors file written one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
byte offsets) and the tensors' bytes. When every tensor's name, dtype and shape are known
ahead, the header can go first and each tensor's bytes follow as it becomes available, so
a writer never holds more than the tensor in hand (`safetensors.torch.save_file` needs all
of them at once).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file, as declared in its header."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


class SafetensorsStream:
    """Writes `entries` to `path` in their order: the header on opening, then `write` each
    tensor in turn; `close` checks that all came."""

    def __init__(
        self, path: Path, entries: list[TensorEntry], metadata: dict[str, str] | None = None
    ):
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for entry in entries:
            header[entry.name] = {
                "dtype": DTYPE_NAMES[entry.dtype],
                "shape": list(entry.shape),
                "data_offsets": [offset, offset + entry.nbytes],
            }
            offset += entry.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # as safetensors pads it: the data start 8-byte aligned
        self.entries, self.next = entries, 0
        self.file = open(path, "wb")  # noqa: SIM115 -- open across write() calls
        self.file.write(struct.pack("<Q", len(text)) + text)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        entry = self.entries[self.next]
        if (name, tensor.dtype, tuple(tensor.shape)) != (entry.name, entry.dtype, entry.shape):
            raise ValueError(
                f"expected {entry.name} {entry.dtype} {list(entry.shape)}, got "
                f"{name} {tensor.dtype} {list(tensor.shape)}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self.file.write(memoryview(data.numpy()))
        self.next += 1

    def close(self) -> None:
        self.file.close()
        if self.next != len(self.entries):
            raise ValueError(
                f"{self.file.name}: {len(self.entries) - self.next} tensors never written "
                f"(next: {self.entries[self.next].name})"
            )
