"""The planner's estimates (:mod:`hubquant.planner`) next to the full-size runs in ``benchmarks/results/``.

    python benchmarks/plan_vs_measured.py      # a Markdown table: every format at every measured shape

For each shape and format, the newest ``scale-*.json`` report's hubquant run (medians) against the
estimate for the same variant on the same shape (the shape rebuilt from :mod:`phi_shapes`, as the
planner would read it from the checkpoint's headers) and the same machine (its memory caps how much
of the mapped weights can stay resident). A run stopped by ``--memory-limit-gib`` gives lower bounds:
its estimate must not be below the memory it had already reached. ``tests/test_planner.py`` requires every
estimate of peak anonymous memory, peak RSS and peak extra disk to be within 25% of the measurement.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from results_table import shape_name  # noqa: E402

from hubquant.planner import GIB, Shape, estimate  # noqa: E402
from hubquant.recipe import VariantSpec  # noqa: E402

import phi_shapes  # noqa: E402
from scale import VARIANTS  # noqa: E402

RESULTS = HERE / "results"


def shape(name: str) -> Shape:
    """The shape the planner reads from a checkpoint of ``name`` (phi_shapes writes exactly these tensors)."""
    tensors = phi_shapes.tensors(phi_shapes.shape_config(name))
    return Shape.from_headers([{tensor: {"shape": list(dims)} for tensor, dims in tensors}])


def _option(text: str) -> tuple[str, object]:
    key, value = text.split("=", 1)
    return key, json.loads(value)


def rows(folder: Path = RESULTS) -> list[dict]:
    """One row per (shape, format) measured through hubquant; the newest report wins."""
    newest: dict[tuple[str, str], tuple[str, dict, float]] = {}
    for path in sorted(folder.glob("scale-*.json")):
        report = json.loads(path.read_text())
        name = shape_name(report)
        for fmt, summary in report["formats"].items():
            ours = summary.get("hubquant")
            if ours and report["date"] > newest.get((name, fmt), ("", {}))[0]:
                newest[(name, fmt)] = (report["date"], ours, report["machine"]["memory_gib"])
    found = []
    for (name, fmt), (_, ours, memory_gib) in sorted(newest.items()):
        precision, options = VARIANTS[fmt]
        spec = VariantSpec(format=fmt, precision=precision, options=dict(map(_option, options))).resolved()
        guess = estimate(shape(name), spec, cores=2, memory_total=int(memory_gib * GIB))
        found.append(
            {
                "shape": name,
                "format": fmt,
                "memory_estimated": guess.memory / GIB,
                "memory_measured": ours["peak_anon_gib"],
                "rss_estimated": guess.rss / GIB,
                "rss_measured": ours["peak_rss_gib"],
                "disk_estimated": guess.disk / 1e9,
                "disk_measured": ours["peak_extra_disk_gb"],
                "seconds_estimated": guess.seconds,
                "seconds_measured": ours["wall_s"],
                "stopped": "stopped" in ours,  # its figures are peaks until it was stopped: lower bounds
            }
        )
    return found


def table(found: list[dict]) -> str:
    lines = [
        "| shape | format | anon GiB est / measured | RSS GiB est / measured | extra disk GB est / measured "
        "| wall s est / measured |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in found:
        pairs = [(r[f"{k}_estimated"], r[f"{k}_measured"], d) for k, d in (("memory", 2), ("rss", 2), ("disk", 2))]
        pairs.append((r["seconds_estimated"], r["seconds_measured"], 0))
        at_least = "≥ " if r["stopped"] else ""
        cells = [f"{est:.{d}f} / {at_least}{got:.{d}f} ({est / got:.2f}×)" for est, got, d in pairs]
        name = f"{r['format']} (stopped)" if r["stopped"] else r["format"]
        lines.append(f"| {r['shape']} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(rows()))
