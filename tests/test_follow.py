"""Hashing files while they are written (hubquant.follow): a digest is used only when it is the file's.

The follower's thread never looks here (interval of an hour): each test calls ``look()`` between writes,
so what the follower saw is fixed, not a matter of timing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from hubquant.artifact import write_manifest
from hubquant.follow import CHUNK_BYTES, PREFIX_BYTES, FollowHasher

MIB = 1024 * 1024


def _manifest_digests(folder: Path, known: dict) -> dict[str, str]:
    manifest = write_manifest(
        folder,
        variant={"format": "mlx", "precision": "4bit", "options": {}},
        source={"path": "src", "name": "src", "model_type": "phi3", "architecture": "Phi3ForCausalLM"},
        tools={},
        key="k",
        export_seconds=0.0,
        shared_seconds=0.0,
        warnings=[],
        known=known,
    )
    return {entry.path: entry.sha256 for entry in manifest.files}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_files_written_in_order_are_hashed_as_they_grow_and_after_a_move(tmp_path: Path) -> None:
    work, final = tmp_path / "work", tmp_path / "final"
    work.mkdir()
    final.mkdir()
    parts = [os.urandom(CHUNK_BYTES + 12345), os.urandom(3 * MIB), os.urandom(77)]
    with FollowHasher([work, final], interval=3600) as follower:
        with open(work / "model.safetensors", "wb") as handle:
            for part in parts:  # the follower looks after each write
                handle.write(part)
                handle.flush()
                follower.look()
        (work / "config.json").write_text('{"a": 1}\n')
        (work / "model.safetensors").rename(final / "model.safetensors")  # the exporter moves it into place
        (work / "config.json").rename(final / "config.json")
    known = follower.digests()
    stat = (final / "model.safetensors").stat()
    size, mtime, digest = known[(stat.st_dev, stat.st_ino)]
    assert (size, mtime) == (stat.st_size, stat.st_mtime_ns)
    assert digest == hashlib.sha256(b"".join(parts)).hexdigest()
    assert _manifest_digests(final, known) == {
        name: _sha(final / name) for name in ("config.json", "model.safetensors")
    }


def test_a_writer_that_goes_back_or_rewrites_gets_hashed_from_disk(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    with FollowHasher([work], interval=3600) as follower:
        with open(work / "patched.gguf", "wb") as handle:  # placeholder header, data, then the real header
            handle.write(b"\0" * 64 + os.urandom(2 * MIB))
            handle.flush()
            follower.look()
            handle.seek(0)
            handle.write(b"GGUF" + os.urandom(60))
        (work / "config.json").write_text('{"long": "' + "x" * 1000 + '"}\n')
        follower.look()
        (work / "config.json").write_text('{"short": 1}\n')  # truncated and rewritten
        (work / "late.bin").write_bytes(os.urandom(PREFIX_BYTES + 10))  # written after the last look
    known = follower.digests()
    with open(work / "late.bin", "ab") as handle:  # ... and changed once the follower had finished
        handle.write(b"!")
    patched, late = (work / "patched.gguf").stat(), (work / "late.bin").stat()
    assert (patched.st_dev, patched.st_ino) not in known  # its first bytes changed: no digest kept
    assert known[(late.st_dev, late.st_ino)][0] == late.st_size - 1  # kept, but no longer the file's size
    digests = _manifest_digests(work, known)
    assert digests == {name: _sha(work / name) for name in ("config.json", "late.bin", "patched.gguf")}
