"""The size-versus-quality chart: what a user would rather look at than read a table.

Two panels share the x axis (size on disk): Δ perplexity (%) and mean KL divergence against the
reference, each with its standard error as an error bar. One marker per format (declared by its
exporter), the reference as a star; each point is labelled with its precision. Written atomically as PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hubquant.errors import MissingDependencyError, OutputError

if TYPE_CHECKING:
    from hubquant.records import Evaluation


def plot_tradeoff(rows: list[Evaluation], path: str | Path, *, title: str = "") -> Path:
    """Draw size against Δ perplexity and KL for every row (± one standard error); return the written path.

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
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.4), constrained_layout=True)
    seen: set[str] = set()
    for row in rows:
        _draw(axes, row, seen)
    _label(axes)
    if title:
        figure.suptitle(title)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(
            f"cannot write the plot {path}: {exc.strerror or exc}", path=path, hint="pass a writable --plot path"
        ) from None
    finally:
        plt.close(figure)
    return path


def _draw(axes: Any, row: Evaluation, seen: set[str]) -> None:
    """One row on both panels: a star for the reference, the format's marker with error bars otherwise."""
    from hubquant.exporters import registered_exporters

    left, right = axes
    size_mb = (row.metrics.size_bytes or 0) / 1e6
    if row.is_reference:
        for axis in axes:
            axis.scatter(
                [size_mb],
                [0.0],
                marker="*",
                s=220,
                color="black",
                zorder=3,
                label="reference" if axis is left else None,
            )
        return
    formats = sorted(registered_exporters())
    fmt = row.variant.format
    marker = registered_exporters()[fmt].plot_marker if fmt in formats else "x"
    label = fmt if fmt not in seen else None
    seen.add(fmt)
    color = f"C{formats.index(fmt) % 10 if fmt in formats else 9}"
    m = row.metrics
    for axis, value, error in ((left, m.ppl_delta_pct, m.ppl_delta_pct_stderr), (right, m.kl_mean, m.kl_mean_stderr)):
        if value is None:
            continue
        axis.errorbar(
            [size_mb],
            [value],
            yerr=None if error is None else [error],
            fmt="none",
            ecolor=color,
            elinewidth=1,
            capsize=3,
        )
        axis.scatter(
            [size_mb],
            [value],
            marker=marker,
            s=60,
            color=color,
            label=label if axis is left else None,
            edgecolors="black" if not row.gate.passed else "none",
        )
        axis.annotate(row.variant.precision, (size_mb, value), textcoords="offset points", xytext=(5, 4), fontsize=8)


def _label(axes: Any) -> None:
    left, right = axes
    left.set_xlabel("size on disk (MB)")
    left.set_ylabel("Δ perplexity vs reference (%)")
    right.set_xlabel("size on disk (MB)")
    right.set_ylabel("mean KL divergence vs reference (nats)")
    right.set_yscale("symlog", linthresh=1e-5)
    for axis in axes:
        axis.grid(alpha=0.3)
    left.legend(loc="upper right", fontsize=8)
