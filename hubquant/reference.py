"""The reference every variant is compared with: the source in PyTorch, computed in float32 on CPU.

Its logits are computed once per (source, text, windows) in a child process and cached on disk
(:func:`reference_folder`), beside the per-token negative log-likelihoods that every paired
comparison needs. Each runtime's *fidelity floor* — its full-precision form scored like a variant —
keeps its logits in the same folder (``floors/<cache key>/``), so a variant can also be compared
with its own runtime's unquantized output.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant.eval_worker import run_worker
from hubquant.text import EvalText, token_windows, tokenize
from hubquant.torch_runner import TorchRunner, reference_weights

__all__ = ["TorchRunner", "floor_folder", "reference", "reference_folder", "reference_weights"]
from hubquant.paths import cache_root

if TYPE_CHECKING:
    from hubquant.evaluate import EvalSettings
    from hubquant.exporters.base import Progress
    from hubquant.source import SourceModel

#: Bump when a metric's computation changes: cached references and floors are rebuilt.
REFERENCE_VERSION = 2


def reference_folder(source: SourceModel, text_sha256: str, window_key: dict[str, Any]) -> Path:
    """Where the reference logits of (source, text, windows) are cached."""
    key = hashlib.sha256(
        json.dumps(
            {"source": source.fingerprint, "text": text_sha256, "windows": window_key, "v": REFERENCE_VERSION},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:20]
    return cache_root() / "reference" / key


def floor_folder(reference: Path, floor_key: str) -> Path:
    """Where a runtime floor's logits are kept, inside its reference's folder."""
    return reference / "floors" / floor_key[:20]


def reference(
    source: SourceModel, text: EvalText, settings: EvalSettings, *, work: Path, progress: Progress
) -> tuple[Path, dict[str, Any]]:
    """The cached reference for (source, text, windows): a folder of per-window logits plus its result.

    Computed once in a child process and reused until the source, the text or the window settings change.
    """
    import numpy as np

    from hubquant.artifact import atomic_folder
    from hubquant.reference import reference_folder, reference_weights

    folder = reference_folder(source, text.sha256, settings.key())
    meta_path = folder / "reference.json"
    if meta_path.is_file():
        progress(f"reference: reusing cached logits ({folder})")
        return folder, json.loads(meta_path.read_text())
    windows = token_windows(tokenize(source, text.content), settings.context)
    if settings.max_windows:
        windows = windows[: settings.max_windows]
    progress(f"reference: PyTorch logits for {len(windows)} window(s) of {settings.context} tokens (cached after)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_folder(folder) as staging:
            np.save(staging / "windows.npy", np.asarray(windows, dtype=np.int64))
            weights, why = reference_weights(source, settings.reference_weights)
            progress(f"reference: weights held as {weights} ({why}); computed in float32")
            result = run_worker(
                {
                    "kind": "reference",
                    "label": "reference",
                    "source": str(source.path),
                    "weights": weights,
                    "why": why,
                    "folder": str(staging),
                    "prompt_tokens": settings.prompt_tokens,
                    "gen_tokens": settings.gen_tokens,
                    "context": settings.context,
                },
                work,
            )
            (staging / "reference.json").write_text(json.dumps(result))
    except FileExistsError:  # another process cached it meanwhile
        pass
    return folder, json.loads(meta_path.read_text())
