"""The environment OpenVINO's vision export runs in: hubquant's own Python plus ``transformers==4.53.3``.

optimum-intel 2.2 exports Phi-4-multimodal for ``image-text-to-text`` only with transformers ≤ 4.53.3
("Maximum required is 4.53.3"), while hubquant's text formats need transformers 5. So the vision export
(and the PyTorch reference it is scored against) runs in a virtual environment of its own that sees
every package of hubquant's environment (``--system-site-packages``: torch, openvino, nncf, optimum-intel,
hubquant itself) and adds only the pinned transformers with the tokenizers and huggingface-hub it needs
(about 60 MB). hubquant creates it on first need, in ``$HUBQUANT_VISION_ENV`` or the cache
(``~/.cache/hubquant/envs/``), and reuses it; ``hubquant setup openvino-vision`` creates it ahead of time
(CI and the publish workflow do). It is created in a temporary sibling folder and renamed into place
once complete, so an interrupted creation leaves nothing half-made that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from hubquant.errors import MissingDependencyError
from hubquant.paths import cache_root

#: What the environment adds to hubquant's own.
PINS = ("transformers==4.53.3",)
#: Written last, naming the pins and hubquant's Python: an environment without it (or made with other pins,
#: or beside another Python) is rebuilt.
MARKER = "hubquant-env.json"


def env_folder() -> Path:
    """Where the environment lives: ``$HUBQUANT_VISION_ENV``, else the cache, keyed by the pins and Python."""
    configured = os.environ.get("HUBQUANT_VISION_ENV")
    if configured:
        return Path(configured).expanduser()
    key = hashlib.sha256(json.dumps([PINS, sys.version_info[:2], sys.prefix]).encode()).hexdigest()[:10]
    return cache_root() / "envs" / f"openvino-vision-{key}"


def env_python(folder: Path) -> Path:
    return folder / "bin" / "python"


def _ready(folder: Path) -> bool:
    marker = folder / MARKER
    if not marker.is_file() or not env_python(folder).exists():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except ValueError:
        return False
    return recorded.get("pins") == list(PINS) and recorded.get("python") == sys.executable


def _run(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise MissingDependencyError(
            f"could not create the OpenVINO vision environment: {what} failed ({' / '.join(tail) or done.returncode})",
            hint=f"check that pip can reach the package index, or point HUBQUANT_VISION_ENV at a virtual environment "
            f"made with --system-site-packages that has {' '.join(PINS)}",
            extra="openvino",
        )


def ensure_env(say: object = None) -> Path:
    """The environment's Python, creating the environment first when it is missing or stale."""
    folder = env_folder()
    if _ready(folder):
        return env_python(folder)
    if callable(say):
        say(f"creating the OpenVINO vision environment ({', '.join(PINS)}) in {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(staging)], "venv")
        _run(
            [sys.executable, "-m", "pip", "--python", str(env_python(staging)), "install", "--quiet", *PINS],
            "pip install " + " ".join(PINS),
        )
        (staging / MARKER).write_text(json.dumps({"pins": list(PINS), "python": sys.executable}) + "\n")
        if folder.exists():  # stale (other pins) or left by another run that finished first
            if _ready(folder):
                return env_python(folder)
            shutil.rmtree(folder)
        staging.rename(folder)  # the venv's python finds pyvenv.cfg beside itself, so the move is safe
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return env_python(folder)


def env_size(folder: Path) -> int:
    """Bytes the environment adds on disk."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())
