"""Artifacts: output folders that appear atomically, each with a ``manifest.json``.

An artifact is complete or absent: it is built in a temporary folder beside its target and
renamed into place at the end, so a crash or a failed variant never leaves a half-written folder
under the final name. The manifest lists every file with its size and sha256, the variant spec,
the tool versions and the source revision; its ``cache_key`` lets a re-run reuse the artifact.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubquant.errors import ArtifactError, OutputError
from hubquant.records import (
    MANIFEST,
    MANIFEST_VERSION,
    Evaluation,
    FileEntry,
    Manifest,
    SourceFacts,
    VariantRecord,
    read_evaluation,
    read_manifest,
    write_manifest_file,
)

_TMP_MARK = ".hubquant-tmp-"
#: The output folder's lock (see :func:`output_lock`).
LOCK_FILE = ".hubquant-lock"


def _os_error_to_output_error(exc: OSError, path: Path) -> OutputError:
    reason = exc.strerror or str(exc)
    return OutputError(
        f"cannot write output at {path}: {reason}",
        path=path,
        hint="choose an output folder you can write to (--output DIR), with enough free space",
    )


def prepare_output_root(path: Path, *, what: str = "output") -> bool:
    """Make sure ``path`` is a writable folder; return True when this call created it.

    Raises:
        OutputError: the path is a file, or cannot be created or written.
    """
    if path.exists() and not path.is_dir():
        raise OutputError(
            f"{what} path {path} is a file, not a folder",
            path=path,
            hint=f"pass a folder path to --{what} (it is created when missing)",
        )
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f"{temp_prefix('probe')}{uuid.uuid4().hex[:8]}"
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise _os_error_to_output_error(exc, path) from None
    return created


def new_staging_folder(target: Path) -> Path:
    """Create and return an empty temporary folder beside ``target`` (same filesystem, so renames are atomic).

    Raises:
        OutputError: the parent folder cannot be written.
    """
    tmp = target.parent / f"{temp_prefix(target.name)}{uuid.uuid4().hex[:8]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise _os_error_to_output_error(exc, target.parent) from None
    return tmp


def commit_staging_folder(tmp: Path, target: Path) -> None:
    """Rename a complete staging folder to ``target``, swapping out an older ``target`` only at the end."""
    if target.exists():
        old = target.parent / f"{temp_prefix('old-' + target.name)}{uuid.uuid4().hex[:8]}"
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def discard_staging_folder(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(target: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target``; rename it to ``target`` on success.

    On any exception the temporary folder is removed and ``target`` is left as it was. With
    ``replace`` an existing ``target`` is swapped out only after the new one is complete.

    Raises:
        FileExistsError: ``target`` exists and ``replace`` is false.
        OutputError: the parent folder cannot be written.
    """
    target = Path(target)
    if target.exists() and not replace:
        raise FileExistsError(f"{target} already exists")
    tmp = new_staging_folder(target)
    try:
        yield tmp
        commit_staging_folder(tmp, target)
    except BaseException:
        discard_staging_folder(tmp)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_prefix(kind: str) -> str:
    """The name start of a temporary folder this process owns (its pid inside, for stale-temp cleanup)."""
    return f"{_TMP_MARK}{kind}-{os.getpid()}-"


def _owner(name: str) -> int | None:
    """The pid stamped in a temporary folder's name (``…-PID-RANDOM``), None when there is none."""
    parts = name.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('started', '?')}"


@contextlib.contextmanager
def output_lock(folder: Path, *, progress: Callable[[str], None] = lambda line: None) -> Iterator[None]:
    """Hold ``folder`` for this run: a second run on it refuses at once, naming the holder.

    The lock is an ``flock`` on ``folder/.hubquant-lock`` (released by the kernel when its holder
    dies, however it dies), and the file names the holder (pid, host, start). A file left by a run
    that died is taken over with a message. The file is removed when the run ends.

    Raises:
        OutputError: another live run holds the folder.
    """
    import fcntl
    import socket

    path = folder / LOCK_FILE
    for _ in range(5):  # the holder may remove the file between our open and our lock: open it again
        handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise OutputError(
                f"{folder} is in use by another hubquant run ({_describe(_holder(path))})",
                path=folder,
                hint="wait for it to finish, or pass another --output",
            ) from None
        if path.exists() and os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()
    else:
        raise OutputError(f"could not lock {folder}", path=folder, hint="run the command again")
    left = _holder(path)
    if left:
        progress(f"{folder}: taking over from a run that ended without releasing it ({_describe(left)})")
    handle.seek(0)
    handle.truncate()
    handle.write(
        json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
    )
    handle.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()


#: errno values of a full disk or an exhausted quota.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
#: A write that fails with less than this left on its disk is taken for a full disk.
NEARLY_FULL = 64 << 20


def existing_parent(path: Path) -> Path:
    """``path`` itself when it exists, else its closest existing parent."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Free space of the filesystem holding ``path`` (or its closest existing parent)."""
    return shutil.disk_usage(existing_parent(path)).free


def is_disk_full(exc: BaseException, where: Path) -> bool:
    """Whether a failed write ran out of disk: ENOSPC/EDQUOT, or a short write with the disk (nearly) full
    (numpy's ``tofile`` reports "N requested and M written" without an errno)."""
    for error in (exc, exc.__cause__, exc.__context__):
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
    return "requested and" in str(exc) and free_bytes(where) < NEARLY_FULL


def disk_full_error(where: Path, *, need: int | None = None) -> OutputError:
    """The one message for a full disk: where, how much is left, about how much more is needed."""
    from hubquant.display import human_size

    more = f"; needs about {human_size(need)} more" if need and need > 0 else ""
    return OutputError(
        f"disk full writing {where}: {human_size(free_bytes(where))} left{more}",
        path=where,
        hint="free space, or put the intermediates on another disk with --scratch DIR "
        "(or --output on a larger one); nothing half-written was kept",
    )


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporary folders that runs which are no longer alive left in ``folder`` (never a live
    run's, never finished artifacts); return what was removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for child in folder.iterdir():
        if not child.name.startswith(_TMP_MARK):
            continue
        owner = _owner(child.name)
        if owner is not None and owner != os.getpid() and _alive(owner):
            continue
        if owner == os.getpid():
            continue
        shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
        removed.append(child)
    return removed


def sha256_file(path: Path, *, chunk: int = 8 << 20) -> str:
    """The sha256 of a file, read in chunks (artifacts can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _digest(path: Path, known: Mapping[tuple[int, int], tuple[int, int, str]]) -> str:
    stat = path.stat()
    taken = known.get((stat.st_dev, stat.st_ino))
    if taken is not None and taken[:2] == (stat.st_size, stat.st_mtime_ns):
        return taken[2]
    return sha256_file(path)


def cache_key(*, source_fingerprint: str, spec: dict[str, Any], tools: dict[str, str]) -> str:
    """The identity of an artifact's inputs: same key ⇒ the same bytes would be rebuilt."""
    payload = json.dumps({"source": source_fingerprint, "spec": spec, "tools": tools}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass
class Artifact:
    """A finished variant on disk: its folder and its manifest."""

    path: Path
    manifest: Manifest
    reused: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def format(self) -> str:
        return self.manifest.variant.format

    @property
    def precision(self) -> str:
        return self.manifest.variant.precision

    @property
    def options(self) -> dict[str, Any]:
        return self.manifest.variant.options

    @property
    def files(self) -> list[FileEntry]:
        return self.manifest.files

    @property
    def model_files(self) -> list[FileEntry]:
        """The files a runtime loads (calibration data and other companions excluded), by path."""
        return [f for f in self.files if f.role == "model"]

    @property
    def size_bytes(self) -> int:
        """Bytes of the model files (the manifest and companions such as an importance matrix excluded)."""
        return sum(f.size for f in self.model_files)

    def main_file(self) -> FileEntry:
        """The largest model file: the weights a user downloads."""
        return max(self.model_files or self.files, key=lambda f: f.size)

    def evaluation(self) -> Evaluation | None:
        """The ``eval.json`` beside the artifact, when it has one of the current schema."""
        return read_evaluation(self.path)

    def summary(self) -> dict[str, Any]:
        """What ``--json`` prints for this artifact."""
        main = self.main_file()
        return {
            "path": str(self.path),
            "format": self.format,
            "precision": self.precision,
            "options": self.options,
            "size": self.size_bytes,
            "file": main.path,
            "sha256": main.sha256,
            "reused": self.reused,
            "warnings": self.warnings or self.manifest.warnings,
        }


def write_manifest(
    folder: Path,
    *,
    variant: dict[str, Any],
    source: dict[str, Any],
    tools: dict[str, str],
    key: str,
    export_seconds: float,
    shared_seconds: float,
    warnings: list[str],
    settings: dict[str, Any] | None = None,
    roles: dict[str, str] | None = None,
    peak_disk_bytes: int | None = None,
    known: Mapping[tuple[int, int], tuple[int, int, str]] | None = None,
) -> Manifest:
    """Hash every file in ``folder`` and write ``manifest.json``; return the manifest.

    ``export_seconds`` is the variant's own step; ``shared_seconds`` the intermediates it needed
    (built once per run and shared with the other variants of its format); ``roles`` marks the files
    that are not the model (see :attr:`FileEntry.role`); ``peak_disk_bytes`` the most its format's build
    held on disk (see :mod:`hubquant.diskmeter`); ``known`` the digests taken while the files were written,
    by (device, inode) → (size, mtime_ns, sha256) (see :mod:`hubquant.follow`), used when still current.
    """
    from hubquant import __version__

    files = [
        FileEntry(
            path=path.relative_to(folder).as_posix(),
            size=path.stat().st_size,
            sha256=_digest(path, known or {}),
            role=(roles or {}).get(path.relative_to(folder).as_posix(), "model"),
        )
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    ]
    manifest = Manifest(
        manifest_version=MANIFEST_VERSION,
        hubquant_version=__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        variant=VariantRecord.model_validate(variant),
        source=SourceFacts.model_validate(source),
        tools=tools,
        cache_key=key,
        export_seconds=round(export_seconds, 3),
        shared_seconds=round(shared_seconds, 3),
        peak_disk_bytes=peak_disk_bytes,
        warnings=warnings,
        settings=settings or None,
        files=files,
    )
    write_manifest_file(folder, manifest)
    return manifest


def load_artifact(path: str | Path) -> Artifact:
    """Read an artifact folder and its manifest.

    Raises:
        ArtifactError: no folder, no manifest, or an unreadable one.
    """
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(
            f"artifact folder not found: {path}", path=path, hint="pass a folder written by 'hubquant quantize'"
        )
    if not (path / MANIFEST).is_file():
        raise ArtifactError(
            f"{path} has no {MANIFEST}",
            path=path,
            hint="pass a folder written by 'hubquant quantize' (it writes the manifest last)",
        )
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError) as exc:
        raise ArtifactError(
            f"{path / MANIFEST} is not a hubquant manifest ({exc})",
            path=path,
            hint="rebuild the artifact with 'hubquant quantize --force'",
        ) from None
    return Artifact(path=path, manifest=manifest)


def reusable_artifact(path: Path, key: str) -> Artifact | None:
    """The artifact at ``path`` when it exists, is intact and was built from the same inputs."""
    try:
        artifact = load_artifact(path)
    except ArtifactError:
        return None
    if artifact.manifest.cache_key != key:
        return None
    for entry in artifact.files:
        file = path / entry.path
        if not file.is_file() or file.stat().st_size != entry.size:
            return None
    artifact.reused = True
    return artifact
