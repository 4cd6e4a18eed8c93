"""``hubquant demo``: the main job on the embedded default, runnable on any machine.

Builds (once, cached) a tiny Phi-3-style checkpoint, quantizes it to GGUF F16, Q8_0 and Q4_K_M,
and measures every variant against the PyTorch original on hubquant's built-in text
(perplexity, KL divergence, top-1 agreement, speed, memory).
"""

from __future__ import annotations

from pathlib import Path

from hubquant.exporters.base import Progress
from hubquant.recipe import build_recipe

DEMO_PRECISIONS = ("F16", "Q8_0", "Q4_K_M")


def run_demo(output: Path, *, progress: Progress) -> str:
    """Run the demo into ``output`` and return the table to print."""
    from hubquant.evaluate import EvalSettings, eval_text, evaluate, render_table
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
    rows = evaluate(result.artifacts, result.source, text=eval_text(), settings=EvalSettings(context=256),
                    progress=progress)
    lines = [render_table(rows), ""]
    lines.append(f"source:    {model}")
    lines.append(f"artifacts: {output.resolve()}  (each with manifest.json and eval.json)")
    return "\n".join(lines)
