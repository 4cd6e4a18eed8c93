"""One module per format; importing this package registers the built-in exporters.

The format modules import their heavy libraries lazily, so importing them here is cheap.
"""

from __future__ import annotations

from hubquant.errors import RecipeError
from hubquant.exporters import gguf as _gguf  # noqa: F401  (registers the format)
from hubquant.exporters import mlx as _mlx  # noqa: F401
from hubquant.exporters import onnx as _onnx  # noqa: F401
from hubquant.exporters import openvino as _openvino  # noqa: F401
from hubquant.exporters.base import (
    Exporter,
    ExporterOptions,
    ExportJob,
    Runner,
    register_exporter,
    registered_exporters,
)

__all__ = ["Exporter", "ExporterOptions", "ExportJob", "Runner", "get_exporter", "register_exporter",
           "registered_exporters"]


def get_exporter(name: str) -> type[Exporter]:
    """The exporter class of a format (case-insensitive).

    Raises:
        RecipeError: no such format.
    """
    registry = registered_exporters()
    key = name.strip().lower()
    if key not in registry:
        raise RecipeError(f"unknown format '{name}'", key="format", allowed=sorted(registry))
    return registry[key]
