"""The environments the vision routes run in: hubquant's own Python plus pinned packages its text formats
cannot live beside.

- ``openvino-vision`` (``transformers==4.53.3``): optimum-intel 2.2 exports Phi-4-multimodal for
  ``image-text-to-text`` only with transformers ≤ 4.53.3 ("Maximum required is 4.53.3"). The vision export
  and the PyTorch reference it is scored against run there.
- ``mlx-vision`` (``transformers==5.14.1``, ``mlx-vlm==0.7.10``): mlx-vlm's Phi-4-SigLIP model needs
  transformers ≥ 5.14. The MLX vision conversion and every measurement of an MLX vision variant run there.
  mlx-vlm is installed without its dependencies: mlx and mlx-lm come from hubquant's environment, and its
  server, audio and video extras (opencv, mlx-audio, …) are never imported on this route.

Each sees every package of hubquant's environment (``--system-site-packages``: torch, openvino, nncf,
optimum-intel, mlx, hubquant itself) and adds only its pins. hubquant creates one on first need, in its
variable's folder (``$HUBQUANT_VISION_ENV``, ``$HUBQUANT_MLX_VISION_ENV``) or the cache
(``~/.cache/hubquant/envs/``), and reuses it; ``hubquant setup NAME`` creates it ahead of time (CI does).
It is created in a temporary sibling folder and renamed into place once complete, so an interrupted
creation leaves nothing half-made that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hubquant.errors import MissingDependencyError
from hubquant.paths import cache_root


@dataclass(frozen=True)
class Environment:
    name: str
    #: What it adds to hubquant's own environment.
    pins: tuple[str, ...]
    #: The variable that names its folder.
    variable: str
    #: Installed without their dependencies (which hubquant's environment provides).
    no_deps: bool = False


OPENVINO = Environment("openvino-vision", ("transformers==4.53.3",), "HUBQUANT_VISION_ENV")
MLX = Environment("mlx-vision", ("transformers==5.14.1", "mlx-vlm==0.7.10"), "HUBQUANT_MLX_VISION_ENV", no_deps=True)
ENVIRONMENTS = {env.name: env for env in (OPENVINO, MLX)}
#: Written last, naming the pins and hubquant's Python: an environment without it (or made with other pins,
#: or beside another Python) is rebuilt.
MARKER = "hubquant-env.json"


def env_folder(env: Environment = OPENVINO) -> Path:
    """Where the environment lives: its variable's folder, else the cache, keyed by the pins and Python."""
    configured = os.environ.get(env.variable)
    if configured:
        return Path(configured).expanduser()
    key = hashlib.sha256(json.dumps([env.pins, sys.version_info[:2], sys.prefix]).encode()).hexdigest()[:10]
    return cache_root() / "envs" / f"{env.name}-{key}"


def env_python(folder: Path) -> Path:
    return folder / "bin" / "python"


def _interpreter() -> str:
    """hubquant's Python, resolved: ``bin/python`` (``python -m pytest``) and ``bin/python3.11`` (the ``hubquant``
    script) are one interpreter, and an environment made by one serves the other."""
    return os.path.realpath(sys.executable)


def _ready(folder: Path, env: Environment) -> bool:
    marker = folder / MARKER
    if not marker.is_file() or not env_python(folder).exists():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except ValueError:
        return False
    return recorded.get("pins") == list(env.pins) and recorded.get("python") == _interpreter()


def _run(command: list[str], what: str, env: Environment) -> None:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise MissingDependencyError(
            f"could not create the {env.name} environment: {what} failed ({' / '.join(tail) or done.returncode})",
            hint=f"check that pip can reach the package index, or point {env.variable} at a virtual environment "
            f"made with --system-site-packages that has {' '.join(env.pins)}",
            extra=env.name.split("-")[0],
        )


def ensure_env(say: object = None, env: Environment = OPENVINO) -> Path:
    """The environment's Python, creating the environment first when it is missing or stale."""
    folder = env_folder(env)
    if _ready(folder, env):
        return env_python(folder)
    if callable(say):
        say(f"creating the {env.name} environment ({', '.join(env.pins)}) in {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(staging)], "venv", env)
        flags = ["--no-deps"] if env.no_deps else []
        install = ["install", "--quiet", *flags, *env.pins]
        pip = [sys.executable, "-m", "pip", "--python", str(env_python(staging))]
        _run([*pip, *install], "pip " + " ".join(install), env)
        (staging / MARKER).write_text(json.dumps({"pins": list(env.pins), "python": _interpreter()}) + "\n")
        if folder.exists():  # stale (other pins) or left by another run that finished first
            if _ready(folder, env):
                return env_python(folder)
            shutil.rmtree(folder)
        staging.rename(folder)  # the venv's python finds pyvenv.cfg beside itself, so the move is safe
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return env_python(folder)


def env_size(folder: Path) -> int:
    """Bytes the environment adds on disk."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())
