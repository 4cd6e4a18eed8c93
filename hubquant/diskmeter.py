"""The peak disk a format's build takes: the bytes its folders hold (intermediates and the variants
being written), sampled by a thread and at every progress line.

A CI runner's disk is the resource a large model runs out of first, and the preflight's figure is an
estimate; this is the measured one, written to each manifest (``peak_disk_bytes``), to MLflow and to
the job summary. Counted: allocated blocks of every file under the watched folders (a sparse or
half-written file counts what it really holds, a hard link once). Not counted: the source snapshot,
which is on disk before the run starts. A peak shorter than the sampling interval between two
progress lines can be missed; the intermediates that set the peak live for minutes at real sizes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Self

#: Seconds between two samples of the watching thread.
INTERVAL = 0.5


def allocated_bytes(folders: Iterable[Path]) -> int:
    """Bytes allocated to the files under ``folders`` (each inode once); vanished files are skipped."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder in folders:
        for root, _dirs, names in os.walk(folder):
            for name in names:
                try:
                    stat = os.lstat(os.path.join(root, name))
                except OSError:
                    continue  # deleted between the listing and the stat
                if (stat.st_dev, stat.st_ino) in seen:
                    continue
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_blocks * 512
    return total


class Watcher:
    """A ``with`` block during which a daemon thread calls :meth:`look` every ``interval`` seconds;
    :meth:`look` also runs on entering and (``final=True``) on leaving without an error."""

    thread_name = "hubquant-watcher"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def look(self, *, final: bool = False) -> None:
        raise NotImplementedError

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self.look()

    def __enter__(self) -> Self:
        self.look()
        self._thread = threading.Thread(target=self._watch, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if exc_type is None:
            self.look(final=True)


class DiskMeter(Watcher):
    """Watches ``folders`` while in its ``with`` block; ``peak`` is the largest sample."""

    thread_name = "hubquant-diskmeter"

    def __init__(self, folders: Iterable[Path], *, interval: float = INTERVAL) -> None:
        super().__init__(interval)
        self.folders = [Path(folder) for folder in folders]
        self.peak = 0
        self._lock = threading.Lock()

    def sample(self) -> int:
        """Measure now; return the bytes held."""
        held = allocated_bytes(self.folders)
        with self._lock:
            self.peak = max(self.peak, held)
        return held

    def look(self, *, final: bool = False) -> None:
        self.sample()

    def wrap(self, progress: Callable[[str], None]) -> Callable[[str], None]:
        """A progress callback that also samples: every stage boundary is a measured point."""

        def say(line: str) -> None:
            self.sample()
            progress(line)

        return say
