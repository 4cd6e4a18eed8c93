"""The README's performance table, generated from the scale reports in ``benchmarks/results/``.

    python benchmarks/results_table.py              # print the table
    python benchmarks/results_table.py --write      # put it into README.md between its markers
    python benchmarks/results_table.py --check      # exit 1 when README.md's table is not the files'

Every ``scale-*.json`` report contributes one row per shape and format it measured (the newest
report wins when two measured the same ones): medians over its runs with (min–max), the ratios hubquant / raw,
and how many alternating runs each figure is the median of. ``tests/test_benchmarks.py`` runs
``--check``, so the README's figures are the files', never retyped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- scale-table:begin -->", "<!-- scale-table:end -->"
#: How each format's row names the variant and the raw tool it is measured against.
ROWS = {
    "gguf": "GGUF Q4_K_M (convert F16 + `llama_model_quantize`)",
    "onnx": "ONNX int4 cpu (builder; hubquant: prequantized route)",
    "openvino": "OpenVINO int4 sym g128 (`optimum-cli export openvino`)",
    "mlx": "MLX 4-bit g64 (`mlx_lm convert`)",
}


def shape_name(report: dict) -> str:
    """The shape a report measured: its ``shape`` when it names one (a view of a shape's weights with another
    tokenizer, e.g. ``phi-4-sp``), else the model folder's name."""
    return report.get("shape") or Path(report["model"]).name


def reports(folder: Path = RESULTS) -> dict[tuple[str, str], tuple[dict, dict]]:
    """(shape, format) → (its summary, the report it comes from), the newest report per shape and format."""
    found: dict[tuple[str, str], tuple[dict, dict]] = {}
    for path in sorted(folder.glob("scale-*.json")):
        report = json.loads(path.read_text())
        report["file"] = path.name
        for fmt, summary in report.get("formats", {}).items():
            key = (shape_name(report), fmt)
            if key not in found or report["date"] > found[key][1]["date"]:
                found[key] = (summary, report)
    return found


def _figure(summary: dict, key: str, digits: int) -> str:
    low, high = summary.get("spread", {}).get(key, [summary[key], summary[key]])
    text = f"{summary[key]:.{digits}f}"
    return text + (f" ({low:.{digits}f}–{high:.{digits}f})" if f"{low:.{digits}f}" != f"{high:.{digits}f}" else "")


def _row(shape: str, fmt: str, summary: dict, report: dict) -> str:
    """One row; a path that did not finish shows its peaks until it was stopped, and no ratio."""
    cells = []
    for name in ("raw", "hubquant"):
        s = summary.get(name)
        if s is None:
            cells += ["not run", "—"]
        elif "stopped" in s:
            cells += [f"stopped after {s['wall_s']:.0f} s", f"≥ {s['peak_rss_gib']:.2f} / ≥ {s['peak_anon_gib']:.2f}"]
        else:
            cells += [_figure(s, "wall_s", 1), f"{s['peak_rss_gib']:.2f} / {s['peak_anon_gib']:.2f}"]
    ratio = summary.get("ratio")
    ratios = [f"**{ratio[k]:.2f}×**" for k in ("wall_s", "peak_rss_gib", "peak_anon_gib")] if ratio else ["—", "—", "—"]
    return (
        f"| {shape} | {ROWS[fmt]} | {report.get('repeat', 1)} | {cells[0]} | {cells[2]} | {ratios[0]} | {cells[1]} "
        f"| {cells[3]} | {ratios[1]} | {ratios[2]} |"
    )


def table(folder: Path = RESULTS) -> str:
    """The Markdown table and the line that names its sources."""
    found = reports(folder)
    lines = [
        "| shape | format (variant, raw tool) | runs | raw wall s | hubquant wall s | wall | raw RSS / anon GiB "
        "| hubquant RSS / anon GiB | RSS | anon |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sources = {}
    for shape in sorted({shape for shape, _ in found}, key=lambda name: (len(name), name), reverse=True):
        for fmt in ROWS:
            if (shape, fmt) in found:
                summary, report = found[(shape, fmt)]
                lines.append(_row(shape, fmt, summary, report))
                sources[report["file"]] = report
    notes = [
        f"`benchmarks/results/{name}` ({report['date'][:10]}, {report['machine']['cores']} cores, "
        f"`{report['command']}`)"
        for name, report in sorted(sources.items())
    ]
    return "\n".join(lines) + "\n\nFrom " + "; ".join(notes) + "."


def replace_section(text: str, generated: str) -> str:
    """``text`` with everything between the markers replaced by ``generated``."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + generated + "\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="rewrite README.md's table")
    group.add_argument("--check", action="store_true", help="exit 1 when README.md's table differs")
    parser.add_argument("--readme", type=Path, default=README)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    generated = table(args.results)
    if not (args.write or args.check):
        print(generated)
        return 0
    text = args.readme.read_text()
    updated = replace_section(text, generated)
    if args.check:
        if updated != text:
            print(f"{args.readme}: the performance table is not the one {args.results} gives; run with --write")
            return 1
        return 0
    args.readme.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
