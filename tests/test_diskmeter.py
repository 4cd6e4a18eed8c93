"""The peak disk of a build (hubquant.diskmeter): what it counts, and that a peak between two
progress lines is caught without relying on the sampling thread's timing."""

from __future__ import annotations

import os
from pathlib import Path

from hubquant.diskmeter import DiskMeter, allocated_bytes

MIB = 1024 * 1024


def test_allocated_bytes_counts_each_file_once(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "weights.bin").write_bytes(os.urandom(MIB))
    os.link(tmp_path / "a" / "weights.bin", tmp_path / "a" / "again.bin")  # one inode, two names
    with open(tmp_path / "sparse.bin", "wb") as handle:  # 64 MiB long, nothing written: no blocks held
        handle.truncate(64 * MIB)
    held = allocated_bytes([tmp_path / "a", tmp_path / "sparse.bin", tmp_path])
    assert MIB <= held < 2 * MIB
    assert allocated_bytes([tmp_path / "missing"]) == 0


def test_meter_keeps_the_peak_seen_at_a_progress_line(tmp_path: Path) -> None:
    work, lines = tmp_path / "work", []
    work.mkdir()
    with DiskMeter([work], interval=3600) as meter:  # the thread never samples: only the progress lines do
        say = meter.wrap(lines.append)
        (work / "intermediate.gguf").write_bytes(os.urandom(2 * MIB))
        say("quantizing")
        (work / "intermediate.gguf").unlink()
        (work / "variant.gguf").write_bytes(os.urandom(MIB))
    assert lines == ["quantizing"]
    assert 2 * MIB <= meter.peak < 3 * MIB
    assert allocated_bytes([work]) < meter.peak
