"""``hubquant demo``: the main job on the embedded default, runnable on any machine.

Builds (once, cached) a tiny Phi-3-style checkpoint, quantizes it to GGUF F16, Q8_0 and Q4_K_M,
and measures each variant's perplexity against the PyTorch original on hubquant's built-in text.
"""

from __future__ import annotations

from pathlib import Path

from hubquant.exporters.base import Progress
from hubquant.recipe import build_recipe

DEMO_PRECISIONS = ("F16", "Q8_0", "Q4_K_M")


def run_demo(output: Path, *, progress: Progress) -> str:
    """Run the demo into ``output`` and return the table to print."""
    from hubquant.evaluate import perplexity_table
    from hubquant.pipeline import quantize
    from hubquant.tiny import tiny_phi

    progress("demo: building the tiny Phi-3-style model (cached after the first run)")
    model = tiny_phi("phi3")
    recipe = build_recipe({
        "source": str(model), "output": str(output),
        "variants": [{"format": "gguf", "precision": p} for p in DEMO_PRECISIONS],
    }, origin="demo")
    result = quantize(recipe, progress=progress)
    if result.failures:
        raise result.failures[0].error  # type: ignore[misc]
    progress("demo: measuring perplexity of every variant on the built-in text")
    rows = perplexity_table(result.source, result.artifacts)
    lines = [f"{'variant':<22} {'size':>10} {'perplexity':>11} {'Δ vs ref':>9}"]
    for row in rows:
        lines.append(f"{row['variant']:<22} {row['size'] / 1e6:>8.2f}MB {row['perplexity']:>11.3f} "
                     f"{row['delta_pct']:>+8.2f}%")
    lines.append("")
    lines.append(f"source:    {model}")
    lines.append(f"artifacts: {output.resolve()}  (each with manifest.json)")
    return "\n".join(lines)
