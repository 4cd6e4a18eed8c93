"""The ONNX builder reading the prequantized checkpoint through a memory map instead of into memory.

The 0.18 builder loads a prequantized (``olive``) checkpoint with ``safetensors.torch.load_file``:
every tensor copied into anonymous memory, held for the whole build while the ONNX graph is made
and then serialised once more for the quantizer (``to_nbits`` → ``ir.to_proto``). For Phi-4 that
came to 20 GiB of anonymous memory. :func:`load_mapped` returns the same tensors (same dtypes,
shapes and bytes) as views of a private, copy-on-write map of the file: their pages belong to the
page cache, which the kernel can drop and read again under pressure, instead of to the process.
A tensor the builder writes to gets its own copy of just the pages written (``MAP_PRIVATE``), so
the file never changes.

:func:`install` puts it in place of ``load_file`` in the builder's loader module; the launcher calls
it with ``python -m hubquant._launch --mapped-weights onnxruntime_genai.models.builder …``, which
hubquant runs for its own prequantized checkpoint (a test compares the ONNX files with and without
it: byte-identical).
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Any

#: The maps stay open for the process's life: every tensor returned is a view of one.
_MAPS: list[mmap.mmap] = []


def load_mapped(filename: str | Path, device: str = "cpu") -> dict[str, Any]:
    """``safetensors.torch.load_file`` with every tensor a view of a private map of the file."""
    import torch

    dtypes = {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }
    with open(filename, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    _MAPS.append(mapped)
    header.pop("__metadata__", None)
    tensors = {}
    for name, info in header.items():
        dtype = dtypes[info["dtype"]]
        start, end = info["data_offsets"]
        if end == start:
            tensors[name] = torch.empty(info["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(mapped, dtype=dtype, count=(end - start) // dtype.itemsize, offset=8 + length + start)
        tensors[name] = flat.reshape(info["shape"]) if device == "cpu" else flat.reshape(info["shape"]).to(device)
    return tensors


def install() -> None:
    """Use :func:`load_mapped` where the builder's checkpoint loader calls ``load_file``."""
    import warnings

    from onnxruntime_genai.models.loaders import base

    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    base.load_file = load_mapped
