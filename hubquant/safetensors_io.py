"""Tensor-at-a-time safetensors reading and writing, without torch and without a whole file in memory.

Large checkpoints (7.6 GB for Phi-3.5-mini) are read one tensor at a time with plain reads (no
memory map, so nothing stays resident after a tensor is used) and written one tensor at a time
after a header computed up front. The format is the published one: an 8-byte little-endian header
length, a JSON header of ``{name: {dtype, shape, data_offsets}}``, then the raw bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: safetensors dtype → numpy dtype of the stored bytes (bf16 is read as uint16 bit patterns).
STORED: dict[str, np.dtype] = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset
    nbytes: int


def read_header(path: Path) -> tuple[list[TensorEntry], dict[str, str]]:
    """The tensors of one file, in file order, and its ``__metadata__``."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    metadata = header.pop("__metadata__", None) or {}
    entries = [
        TensorEntry(
            name,
            info["dtype"],
            tuple(info["shape"]),
            8 + length + info["data_offsets"][0],
            info["data_offsets"][1] - info["data_offsets"][0],
        )
        for name, info in header.items()
    ]
    return sorted(entries, key=lambda e: e.start), metadata


def read_raw(path: Path, entry: TensorEntry) -> bytes:
    with open(path, "rb") as handle:
        return os.pread(handle.fileno(), entry.nbytes, entry.start)


def read_float32(path: Path, entry: TensorEntry, rows: tuple[int, int] | None = None) -> np.ndarray:
    """One tensor as float32 (bf16 and f16 widen exactly); with ``rows=(first, end)``, only those rows
    of its first axis are read."""
    if rows is None:
        stored = np.frombuffer(read_raw(path, entry), dtype=STORED[entry.dtype]).reshape(entry.shape)
    else:
        first, end = rows
        row_bytes = entry.nbytes // entry.shape[0]
        with open(path, "rb") as handle:
            raw = os.pread(handle.fileno(), (end - first) * row_bytes, entry.start + first * row_bytes)
        stored = np.frombuffer(raw, dtype=STORED[entry.dtype]).reshape((end - first, *entry.shape[1:]))
    if entry.dtype == "BF16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


class StreamingWriter:
    """Writes a safetensors file whose tensors' dtypes and shapes are declared before any data."""

    def __init__(
        self, path: Path, layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None
    ) -> None:
        header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self.expected: list[tuple[str, int]] = []
        for name, dtype, shape in layout:
            nbytes = int(np.prod(shape, dtype=np.int64)) * STORED[dtype].itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.expected.append((name, nbytes))
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.path = path
        self.handle = open(path, "wb")
        self.handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self.position = 0

    def write(self, name: str, data: bytes | bytearray | np.ndarray | Iterable[bytes]) -> None:
        """One tensor's bytes: a buffer, an array, or chunks in order (a tensor too big to hold)."""
        expected_name, nbytes = self.expected[self.position]
        if isinstance(data, np.ndarray):
            parts: Iterable = [memoryview(np.ascontiguousarray(data)).cast("B")]
        elif isinstance(data, (bytes, bytearray, memoryview)):
            parts = [data]
        else:
            parts = data
        written = 0
        if name == expected_name:
            for part in parts:
                written += self.handle.write(part)
        if name != expected_name or written != nbytes:
            raise ValueError(
                f"safetensors writer: got {name} ({written} bytes), expected {expected_name} ({nbytes} bytes)"
            )
        self.position += 1

    def close(self) -> None:
        self.handle.close()
        if self.position != len(self.expected):
            raise ValueError(f"safetensors writer: {len(self.expected) - self.position} tensors never written")


def checkpoint_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))
