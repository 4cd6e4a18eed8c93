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


def run_demo(output: Path, *, progress: Progress, track: bool = True) -> str:
    """Run the demo into ``output`` and return the table to print.

    With ``track`` the runs go to MLflow (``MLFLOW_TRACKING_URI`` or ``./mlflow.db``) when mlflow
    is installed; without mlflow the demo still runs and says how to add tracking.
    """
    import importlib.util

    from hubquant.evaluate import EvalSettings, eval_text, render_table
    from hubquant.pipeline import TrackingSettings, evaluate_artifacts, quantize
    from hubquant.tiny import tiny_phi

    progress("demo: building the tiny Phi-3-style model (cached after the first run)")
    model = tiny_phi("phi3")
    recipe = build_recipe({
        "source": str(model), "output": str(output),
        "variants": [{"format": "gguf", "precision": p} for p in DEMO_PRECISIONS],
    }, origin="demo")
    tracking = TrackingSettings() if track and importlib.util.find_spec("mlflow") else None
    result = quantize(recipe, progress=progress, tracking=tracking)
    if result.failures:
        raise result.failures[0].error  # type: ignore[misc]
    evaluation = evaluate_artifacts(result.artifacts, result.source, text=eval_text(),
                                    settings=EvalSettings(context=256),
                                    plot=output / "tradeoff.png" if importlib.util.find_spec("matplotlib") else None,
                                    progress=progress, tracking=tracking)
    lines = [render_table(evaluation.rows), ""]
    lines.append(f"source:    {model}")
    lines.append(f"artifacts: {output.resolve()}  (each with manifest.json and eval.json)")
    if evaluation.plot is not None:
        lines.append(f"chart:     {evaluation.plot}")
    if evaluation.tracking is not None:
        from hubquant.tracking import ui_hint

        lines.append(f"mlflow:    experiment '{evaluation.tracking.experiment}' — {ui_hint(evaluation.tracking.uri)}")
    else:
        lines.append('mlflow:    not recorded (pip install "hubquant[tracking]" to track runs)')
    return "\n".join(lines)
