"""Hashing an export's files while its tool writes them, off the critical path.

Every manifest lists each file's sha256. Read back after the tool has finished, a multi-GB variant costs
a second or more per 1.5 GB on the run's critical path, on top of the conversion. For a tool that writes
each file front to back and never goes back (mlx's safetensors writer: the header, then every tensor in
order), :class:`FollowHasher` follows the files from a thread as they grow and hashes the bytes as they
land — on another core, while the tool is still writing the rest.

A file is known by its inode, so a folder the exporter moves into place keeps its digests. A digest is
used only when nothing can have changed behind the follower's back: the file's size and modification
time are still the ones it finished with, it never shrank or was replaced, and its first
:data:`PREFIX_BYTES` hash the same when read again at the end (the place a writer that goes back —
to patch a header — would change). Any doubt and the file is hashed again from disk, as before.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubquant.diskmeter import Watcher

#: Bytes read per step while following.
CHUNK_BYTES = 8 << 20
#: Leading bytes hashed again at the end: a writer that patches its header would change them.
PREFIX_BYTES = 1 << 20
#: Seconds between looks at the folders.
INTERVAL = 0.05


@dataclass
class _Followed:
    path: Path
    digest: Any = field(default_factory=hashlib.sha256)
    prefix: Any = field(default_factory=hashlib.sha256)
    offset: int = 0
    broken: bool = False


#: A file's identity: (device, inode).
FileId = tuple[int, int]
#: (size, mtime_ns, sha256) of each file followed to its end, by identity.
Digests = dict[FileId, tuple[int, int, str]]


class FollowHasher(Watcher):
    """Hashes every file that appears under ``folders`` while in its ``with`` block.

    After the block, :meth:`digests` maps each file's identity to ``(size, mtime_ns, sha256)``;
    :func:`hubquant.artifact.write_manifest` takes it as ``known``.
    """

    thread_name = "hubquant-follow-hash"

    def __init__(self, folders: Iterable[Path], *, interval: float = INTERVAL) -> None:
        super().__init__(interval)
        self.folders = [Path(folder) for folder in folders]
        self._files: dict[FileId, _Followed] = {}
        self._done: Digests = {}

    def digests(self) -> Digests:
        """(size, mtime_ns, sha256) of every file followed to its end, by (device, inode)."""
        return dict(self._done)

    def look(self, *, final: bool = False) -> None:
        """Hash what has been written since the last look; the last one also checks every file."""
        for folder in self.folders:
            for path in _files(folder):
                try:
                    stat = path.stat()
                except OSError:
                    continue
                key = (stat.st_dev, stat.st_ino)
                state = self._files.setdefault(key, _Followed(path))
                state.path = path  # the exporter may have moved it into place
                if not state.broken:
                    self._read(state, stat.st_size, final=final)
                if self._stop.is_set() and not final:
                    return
        if final:
            self._done = {key: result for key, state in self._files.items() if (result := self._finish(state))}

    def _read(self, state: _Followed, size: int, *, final: bool) -> None:
        if size < state.offset:  # truncated: rewritten from the start
            state.broken = True
            return
        try:
            with open(state.path, "rb") as handle:
                while state.offset < size and (final or not self._stop.is_set()):
                    block = os.pread(handle.fileno(), min(CHUNK_BYTES, size - state.offset), state.offset)
                    if not block:
                        break
                    if state.offset < PREFIX_BYTES:
                        state.prefix.update(block[: PREFIX_BYTES - state.offset])
                    state.digest.update(block)
                    state.offset += len(block)
        except OSError:
            state.broken = True

    def _finish(self, state: _Followed) -> tuple[int, int, str] | None:
        """The file's digest, when the bytes followed are still the file's bytes."""
        if state.broken:
            return None
        try:
            stat = state.path.stat()
            with open(state.path, "rb") as handle:
                head = handle.read(PREFIX_BYTES)
        except OSError:
            return None
        if stat.st_size != state.offset or hashlib.sha256(head).hexdigest() != state.prefix.hexdigest():
            return None
        return stat.st_size, stat.st_mtime_ns, state.digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.rglob("*") if p.is_file())
    except OSError:  # the folder is being moved or emptied
        return []
