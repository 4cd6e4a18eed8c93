"""The formats: found through the ``hubquant.exporters`` entry-point group.

The four built-in formats register exactly the way a third-party package does — hubquant's own
``pyproject.toml`` lists them under ``[project.entry-points."hubquant.exporters"]`` — so a fifth
format can live in a package of its own. Entry points are loaded once, on first use; a plugin
that fails to load or declares itself wrongly is skipped with a warning and never breaks the
others. The format modules import their heavy libraries lazily, so loading them is cheap.
"""

from __future__ import annotations

import importlib.metadata
import logging

from hubquant.errors import HubquantError, RecipeError
from hubquant.exporters import base
from hubquant.exporters.base import (
    Exporter,
    ExporterOptions,
    ExportJob,
    Intermediates,
    Runner,
    Speed,
    registry,
    unregister_exporter,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "Exporter",
    "ExporterOptions",
    "ExportJob",
    "Intermediates",
    "Runner",
    "Speed",
    "get_exporter",
    "load_plugins",
    "register_exporter",
    "registered_exporters",
    "unregister_exporter",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "hubquant.exporters"
_loaded = False


def load_plugins(*, reload: bool = False) -> list[str]:
    """Register every exporter of the entry-point group that is not registered yet; return the failures."""
    global _loaded
    if _loaded and not reload:
        return []
    _loaded = True
    failures = []
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = entry.load()
            if registry().get(getattr(cls, "name", None)) is not cls:
                base.register_exporter(cls)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break the other formats
            message = exc.message if isinstance(exc, HubquantError) else f"{type(exc).__name__}: {exc}"
            failures.append(f"{entry.name} ({entry.value}): {message}")
            log.warning("format plugin %s (%s) was not loaded: %s", entry.name, entry.value, message)
    return failures


def register_exporter(cls: type[Exporter]) -> type[Exporter]:
    """Validate and register a format (class decorator); the entry-point formats are loaded first, so a
    name clash with any of them is an error too (see :func:`hubquant.exporters.base.register_exporter`)."""
    load_plugins()
    return base.register_exporter(cls)


def registered_exporters() -> dict[str, type[Exporter]]:
    """Every format, by name (entry points loaded on first use)."""
    load_plugins()
    return dict(registry())


def get_exporter(name: str) -> type[Exporter]:
    """The exporter class of a format (case-insensitive).

    Raises:
        RecipeError: no such format.
    """
    formats = registered_exporters()
    key = name.strip().lower()
    if key not in formats:
        hint = (
            None
            if formats
            else "no format is registered: install hubquant (pip install -e .) so its entry points exist"
        )
        raise RecipeError(f"unknown format '{name}'", key="format", allowed=sorted(formats), hint=hint)
    return formats[key]
