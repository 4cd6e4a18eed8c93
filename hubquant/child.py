"""Child processes, run one way: hubquant's own environment, progress lines, a tail for errors.

Heavy or crash-prone work (the ONNX builder, the OpenVINO export, each evaluation) runs in a child
so its memory leaves with it and a crash becomes one clear error. A child prints lines starting
with :data:`PROGRESS_PREFIX` for the user; every other line goes to hubquant's debug log, and the
last ones are kept to explain a failure. When the parent is interrupted the child is stopped too.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import logging
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hubquant.paths import child_environment

log = logging.getLogger(__name__)

#: Prefix of a child's progress lines on its output.
PROGRESS_PREFIX = "hubquant-progress: "
#: Seconds a child gets to exit after SIGTERM before it is killed.
STOP_GRACE_SECONDS = 10.0


@dataclass
class ChildResult:
    """How a child ended and the last lines it printed (progress lines excluded)."""

    returncode: int
    tail: list[str] = field(default_factory=list)

    @property
    def killed(self) -> bool:
        """Killed by SIGKILL: on Linux usually the kernel's out-of-memory killer."""
        return self.returncode in (-9, 137)

    def reason(self) -> str:
        """The line that best says why the child failed: the last one naming an error, else the last one."""
        for line in reversed(self.tail):
            if "Error" in line or "error:" in line:
                return line.strip()
        return self.tail[-1].strip() if self.tail else f"exit code {self.returncode}"


def say(line: str) -> None:
    """Called in a child: one progress line for the parent to show."""
    print(PROGRESS_PREFIX + line, flush=True)


def python_module(module: str, *args: str) -> list[str]:
    """The command line that runs ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def run_child(
    command: Sequence[str], *, name: str, progress: Callable[[str], None] | None = None, tail_lines: int = 40
) -> ChildResult:
    """Run ``command`` to its end; relay its progress lines; keep its last lines for errors.

    Args:
        command: the argv (see :func:`python_module`).
        name: how the child is called in the debug log (``onnx builder``).
        progress: receives the child's progress lines (without the prefix).
        tail_lines: how many of its other lines to keep.

    Interrupted (Ctrl-C, SIGTERM turned into an exception), the child is stopped before the
    exception goes on: SIGTERM, then SIGKILL after :data:`STOP_GRACE_SECONDS`.
    """
    tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
    child = subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=child_environment(),
        bufsize=1,
    )
    try:
        assert child.stdout is not None
        for line in child.stdout:
            line = line.rstrip("\n")
            if line.startswith(PROGRESS_PREFIX):
                if progress is not None:
                    progress(line[len(PROGRESS_PREFIX) :])
            elif line.strip():
                log.debug("%s: %s", name, line)
                tail.append(line)
        returncode = child.wait()
    except BaseException:
        stop(child)
        raise
    finally:
        if child.stdout is not None:
            child.stdout.close()
    return ChildResult(returncode=returncode, tail=list(tail))


def stop(child: subprocess.Popen) -> None:
    """Terminate a child and wait for it; kill it when it does not exit in time."""
    if child.poll() is not None:
        return
    child.terminate()
    try:
        child.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def hand_back(path: Path, data: bytes) -> None:
    """Called in a child: write its answer for the parent whole or not at all (a temporary, then a rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def release_memory() -> None:
    """Hand freed buffers back to the system (glibc keeps them in its heap otherwise), e.g. the torch
    model of an export before the next step allocates its own."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
