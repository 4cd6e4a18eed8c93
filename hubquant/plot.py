"""The size-versus-quality chart: what a user would rather look at than read a table.

Two panels share the x axis (size on disk): Δ perplexity (%) and mean KL divergence against the
reference. One marker per format, the reference as a star; each point is labelled with its
precision. Written atomically as PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from hubquant.errors import MissingDependencyError, OutputError

if TYPE_CHECKING:
    from hubquant.evaluate import EvalRow

MARKERS = {"gguf": "o", "onnx": "s", "openvino": "^", "mlx": "D"}


def plot_tradeoff(rows: list["EvalRow"], path: str | Path, *, title: str = "") -> Path:
    """Draw size against Δ perplexity and KL for every row; return the written path.

    Raises:
        MissingDependencyError: matplotlib is not installed.
        OutputError: the file cannot be written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("--plot needs matplotlib", extra="plot") from None
    path = Path(path)
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), constrained_layout=True)
    formats_seen = set()
    for row in rows:
        size_mb = row.metrics["size_bytes"] / 1e6
        if row.reference:
            for axis, value in ((left, 0.0), (right, 0.0)):
                axis.scatter([size_mb], [value], marker="*", s=220, color="black", zorder=3,
                             label="reference" if axis is left else None)
            continue
        marker = MARKERS.get(row.format, "x")
        label = row.format if row.format not in formats_seen else None
        formats_seen.add(row.format)
        color = f"C{sorted(MARKERS).index(row.format) if row.format in MARKERS else 9}"
        for axis, key in ((left, "ppl_delta_pct"), (right, "kl_mean")):
            value = row.metrics[key]
            axis.scatter([size_mb], [value], marker=marker, s=60, color=color, label=label if axis is left else None,
                         edgecolors="black" if not row.gate["passed"] else "none")
            axis.annotate(row.precision, (size_mb, value), textcoords="offset points", xytext=(5, 4), fontsize=8)
    left.set_xlabel("size on disk (MB)")
    left.set_ylabel("Δ perplexity vs reference (%)")
    right.set_xlabel("size on disk (MB)")
    right.set_ylabel("mean KL divergence vs reference (nats)")
    right.set_yscale("symlog", linthresh=1e-5)
    for axis in (left, right):
        axis.grid(alpha=0.3)
    left.legend(loc="upper right", fontsize=8)
    if title:
        figure.suptitle(title)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write the plot {path}: {exc.strerror or exc}", path=path,
                          hint="pass a writable --plot path") from None
    finally:
        plt.close(figure)
    return path
