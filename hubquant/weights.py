"""Weights that cannot be right: non-finite values (NaN, ±Inf) in the source, found before any work.

A converter copies NaN and Inf into the artifact without a word and every runtime then produces
garbage; a reference with them has nothing to compare against. Each safetensors file is streamed
in chunks of at most :data:`CHUNK_BYTES` (plain reads: nothing stays resident) and checked with
vectorised bit tests — for bf16/f16 a value is non-finite exactly when its exponent bits are all
ones. A source that passed is remembered by its fingerprint, so a re-run does not read it again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hubquant.errors import SourceError
from hubquant.paths import cache_root
from hubquant.safetensors_io import read_header

if TYPE_CHECKING:
    from hubquant.source import SourceModel

CHUNK_BYTES = 64 << 20
#: dtype → (stored numpy dtype, exponent mask) for the 16-bit floats; float32/64 use numpy's isfinite.
_EXPONENT = {"BF16": (np.uint16, 0x7F80), "F16": (np.uint16, 0x7C00)}
_FLOATS = {"F32": np.float32, "F64": np.float64}


def _non_finite(chunk: bytes, dtype: str) -> int:
    if dtype in _EXPONENT:
        stored, mask = _EXPONENT[dtype]
        values = np.frombuffer(chunk, dtype=stored)
        return int(np.count_nonzero((values & mask) == mask))
    return int(np.count_nonzero(~np.isfinite(np.frombuffer(chunk, dtype=_FLOATS[dtype]))))


def non_finite_tensors(path: Path) -> list[tuple[str, int]]:
    """(tensor name, how many values are NaN or ±Inf) for every float tensor of one safetensors file."""
    found = []
    entries, _ = read_header(path)
    with open(path, "rb") as handle:
        for entry in entries:
            if entry.dtype not in _EXPONENT and entry.dtype not in _FLOATS:
                continue
            item = 2 if entry.dtype in _EXPONENT else np.dtype(_FLOATS[entry.dtype]).itemsize
            step = max(item, CHUNK_BYTES - CHUNK_BYTES % item)
            bad = 0
            for offset in range(0, entry.nbytes, step):
                bad += _non_finite(
                    os.pread(handle.fileno(), min(step, entry.nbytes - offset), entry.start + offset), entry.dtype
                )
            if bad:
                found.append((entry.name, bad))
    return found


def check_finite(source: SourceModel) -> bool:
    """Refuse a source whose weights hold NaN or ±Inf; return False when it was checked before.

    Raises:
        SourceError: naming the tensors (up to five) and how many values each holds.
    """
    marker = cache_root() / "finite" / source.fingerprint
    if marker.is_file():
        return False
    bad = [
        (name, tensor, count)
        for name in source.weight_files
        for tensor, count in non_finite_tensors(source.path / name)
    ]
    if bad:
        listed = ", ".join(f"{tensor} ({count} in {name})" for name, tensor, count in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise SourceError(
            f"{source.name} has weights that are NaN or infinite: {listed}{more}",
            path=source.path,
            hint="the checkpoint is corrupt or was saved after a diverged training step: use an intact copy",
        )
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("finite\n")
    return True
