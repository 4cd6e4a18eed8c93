"""Work-arounds for broken third-party installs, applied when ``hubquant`` is imported.

optimum-intel requires ``torchvision``; pip resolves it to PyPI's wheel, a CUDA build that cannot
load beside the CPU ``torch`` build hubquant pins ("operator torchvision::nms does not exist").
transformers then fails to import every model class, GGUF/ONNX/MLX paths included. No LLM export
uses torchvision, so when the two builds do not match hubquant hides torchvision from this process
(``sys.modules["torchvision"] = None`` makes transformers see it as absent). The check reads
package metadata only — it imports nothing. ``HUBQUANT_KEEP_TORCHVISION=1`` turns it off.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys


def torchvision_mismatch() -> str | None:
    """Why the installed torchvision cannot load beside torch, or None when it can (or is absent)."""
    try:
        torch_version = importlib.metadata.version("torch")
        vision_version = importlib.metadata.version("torchvision")
    except importlib.metadata.PackageNotFoundError:
        return None
    torch_local = torch_version.partition("+")[2]
    vision_local = vision_version.partition("+")[2]
    if torch_local == "cpu" and vision_local != "cpu":
        return f"torchvision {vision_version} (a CUDA build) beside torch {torch_version}"
    return None


def hide_broken_torchvision() -> bool:
    """Hide a torchvision that cannot load; return whether it was hidden."""
    if os.environ.get("HUBQUANT_KEEP_TORCHVISION") or "torchvision" in sys.modules:
        return False
    if torchvision_mismatch() is None:
        return False
    sys.modules["torchvision"] = None  # type: ignore[assignment]
    return True
