"""One export call's variants and what they share: the jobs, and intermediates built once on first need
and deleted as soon as no remaining variant needs them."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class ExportJob:
    """One variant to build: its resolved spec and the (temporary) folder to fill."""

    precision: str
    options: dict[str, Any]
    folder: Path
    warnings: list[str] = field(default_factory=list)
    #: Seconds this variant's own step took (shared steps excluded).
    seconds: float = 0.0
    #: Seconds of shared steps it needed (an intermediate, an importance matrix), each counted once per variant.
    shared_seconds: float = 0.0
    #: What the tool was actually asked to do when it differs from the options (resolved defaults);
    #: written to the manifest as ``settings``.
    settings: dict[str, Any] | None = None
    #: Files of the folder that are not the model (path → role, e.g. ``imatrix.gguf`` → ``calibration``).
    roles: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.folder.name


@dataclass
class _Shared:
    value: Any
    error: BaseException | None
    seconds: float
    path: Path | None
    users: set[str]


class Intermediates:
    """What several variants of one export share — an F16 file, an importance matrix, a prequantized
    checkpoint: built once on first need (a failure is shared too: every variant that needs it fails
    with the same error) and deleted from disk as soon as no remaining variant needs it."""

    def __init__(self, work_dir: Path, jobs: Sequence[ExportJob]) -> None:
        self.work_dir = work_dir
        self._jobs = list(jobs)
        self._items: dict[Any, _Shared] = {}
        self.building_seconds: dict[str, float] = {}

    def get(
        self,
        key: Any,
        build: Callable[[], T],
        *,
        job: ExportJob,
        users: Callable[[ExportJob], bool],
        path: Path | None = None,
    ) -> T:
        """The shared thing ``key``, built by ``build`` the first time a variant asks for it.

        Args:
            job: the variant asking (its ``shared_seconds`` grow by the build time).
            users: which variants need it; once none of those is left, ``path`` is deleted.
            path: the file or folder ``build`` writes, deleted when no longer needed (None: nothing to delete).
        """
        item = self._items.get(key)
        if item is None:
            started = time.perf_counter()
            try:
                value, error = build(), None
            except Exception as exc:  # noqa: BLE001 - shared by every variant that needs it
                value, error = None, exc
            seconds = time.perf_counter() - started
            self.building_seconds[job.name] = self.building_seconds.get(job.name, 0.0) + seconds
            item = _Shared(value, error, seconds, path, {j.name for j in self._jobs if users(j)} | {job.name})
            self._items[key] = item
        job.shared_seconds += item.seconds
        if item.error is not None:
            raise item.error
        return item.value

    def seed(self, key: Any, *, value: Any = None, error: BaseException | None = None, seconds: float = 0.0) -> None:
        """Provide ``key`` without building it (a variant's own output serves, or a refusal is known)."""
        self._items.setdefault(key, _Shared(value, error, seconds, None, set()))

    def release(self, remaining: Sequence[ExportJob]) -> None:
        """Delete every intermediate none of the ``remaining`` variants needs."""
        left = {job.name for job in remaining}
        for item in self._items.values():
            if item.path is not None and not (item.users & left):
                _remove(item.path)
                item.path = None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
