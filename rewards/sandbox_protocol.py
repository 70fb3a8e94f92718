"""Framing and the value codec used across the sandbox boundary.

Frames are `b"<length>\\n" + payload` on raw file descriptors. Reading takes exactly one frame
and nothing more, so a process can read its first frame, fork, and leave later frames unread
in the pipe for someone else.

Values crossing from the untrusted program to the judge are plain data only: None, bool, int,
float, str, bytes, complex, list, tuple, dict, set and frozenset, checked by exact type. An
object that overrides `__eq__` (the classic "always equal" reward hack) cannot be sent, and
decoding builds nothing but these builtins.

Like `sandbox_supervisor` and `sandbox_judge`, this module runs inside the sandbox's own
interpreter (`python -I -S`), so it imports the standard library only.
"""

from __future__ import annotations

import os

MAX_FRAME_BYTES = 64 << 20
_MAX_HEADER_BYTES = 12


def read_frame(fd: int) -> bytes | None:
    """Read one frame from `fd`; None at end of file. Raises ValueError on a malformed frame."""
    size = read_frame_size(fd)
    if size is None:
        return None
    chunks, remaining = [], size
    while remaining:
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            raise ValueError("truncated frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def read_frame_size(fd: int) -> int | None:
    """Read a frame's header: the size of the payload that follows; None at end of file."""
    header = b""
    while not header.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            if header:
                raise ValueError("truncated frame header")
            return None
        header += byte
        if len(header) > _MAX_HEADER_BYTES:
            raise ValueError("frame header too long")
    size = int(header)
    if not 0 <= size <= MAX_FRAME_BYTES:
        raise ValueError(f"frame of {size} bytes exceeds the limit of {MAX_FRAME_BYTES}")
    return size


def write_frame(fd: int, payload: bytes) -> None:
    """Write `payload` as one frame to `fd`."""
    data = encode_frame(payload)
    while data:
        data = data[os.write(fd, data) :]


def encode_frame(payload: bytes) -> bytes:
    """The bytes of one frame, for callers that write through their own pipe object."""
    return b"%d\n" % len(payload) + payload


_SCALARS = (bool, int, float, str)
_TAGGED = {tuple: "tuple", set: "set", frozenset: "frozenset"}


def encode_value(value: object) -> object:
    """A JSON-ready tree for a plain-data value; TypeError for anything else."""
    kind = type(value)
    if value is None or kind in _SCALARS:
        return value
    if kind is list:
        return [encode_value(item) for item in value]
    if kind in _TAGGED:
        return {_TAGGED[kind]: [encode_value(item) for item in value]}
    if kind is dict:
        return {"dict": [[encode_value(k), encode_value(v)] for k, v in value.items()]}
    if kind is bytes:
        return {"bytes": value.hex()}
    if kind is complex:
        return {"complex": [value.real, value.imag]}
    raise TypeError(f"a {kind.__name__} cannot cross the sandbox boundary (plain data only)")


def decode_value(tree: object) -> object:
    """The inverse of `encode_value`; ValueError for anything it would not have produced."""
    if tree is None or type(tree) in _SCALARS:
        return tree
    if type(tree) is list:
        return [decode_value(item) for item in tree]
    if type(tree) is not dict or len(tree) != 1:
        raise ValueError("malformed value")
    ((tag, body),) = tree.items()
    if tag == "bytes" and type(body) is str:
        return bytes.fromhex(body)
    if type(body) is not list:
        raise ValueError(f"malformed {tag!r} value")
    if tag == "complex" and len(body) == 2 and all(type(x) in (int, float) for x in body):
        return complex(*body)
    if tag == "dict":
        if not all(type(pair) is list and len(pair) == 2 for pair in body):
            raise ValueError("malformed dict value")
        return {decode_value(k): decode_value(v) for k, v in body}
    for kind, name in _TAGGED.items():
        if tag == name:
            return kind(decode_value(item) for item in body)
    raise ValueError(f"unknown value tag {tag!r}")
