"""Where hubquant keeps things on disk, and how its child processes find this very package."""

from __future__ import annotations

import os
from pathlib import Path

#: The folder holding the ``hubquant`` package (a checkout or site-packages).
PACKAGE_PARENT = Path(__file__).resolve().parents[1]


def cache_root() -> Path:
    """Reusable things (tiny models, reference logits): ``$HUBQUANT_CACHE`` or ``~/.cache/hubquant``."""
    env = os.environ.get("HUBQUANT_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hubquant"


def child_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a hubquant child process: it imports this hubquant, even an uninstalled one."""
    path = os.pathsep.join(p for p in (str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}
