"""``hubquant demo``: the main job on the embedded default, runnable on any machine.

Builds (once, cached) a tiny Phi-3-style checkpoint and runs ``publish`` on it for all four
formats — GGUF Q4_K_M and Q8_0, ONNX int4, OpenVINO int4, MLX 4bit — measuring every variant
against the PyTorch original on hubquant's built-in text, recording the runs in MLflow's local
store and staging the Hub repos (a dry run: nothing is uploaded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hubquant.exporters.base import Progress
from hubquant.recipe import build_recipe

DEMO_VARIANTS = (
    {"format": "gguf", "precision": "Q8_0"},
    {"format": "gguf", "precision": "Q4_K_M"},
    {"format": "onnx", "precision": "int4"},
    {"format": "openvino", "precision": "int4"},
    {"format": "mlx", "precision": "4bit"},
)


def run_demo(output: Path, *, progress: Progress, track: bool = True) -> str:
    """Run the demo into ``output`` and return what to print.

    With ``track`` the runs go to MLflow (``MLFLOW_TRACKING_URI`` or ``./mlflow.db``) when mlflow
    is installed; without mlflow the demo still runs and says how to add tracking.
    """
    import importlib.util

    from hubquant.exporters import get_exporter
    from hubquant.pipeline import TrackingSettings, publish
    from hubquant.publishing import PushSettings
    from hubquant.repos import default_templates
    from hubquant.tiny import tiny_phi

    progress("demo: building the tiny Phi-3-style model (cached after the first run)")
    model = tiny_phi("phi3")
    variants = []
    for variant in DEMO_VARIANTS:
        try:
            get_exporter(variant["format"]).check_installed()
            variants.append(variant)
        except Exception as exc:  # noqa: BLE001 - a missing extra skips that format, said below
            progress(f"demo: skipping {variant['format']} ({getattr(exc, 'message', exc)})")
    recipe = build_recipe(
        {
            "source": str(model),
            "output": str(output / "variants"),
            "variants": variants,
            # Short windows: MLX's 4-bit kernels are slow on Linux CPUs.
            "eval": {"context": 128, "max_windows": 4, "gen_tokens": 16},
            "hub": {"namespace": "your-namespace", "base_model": None},
        },
        origin="demo",
    )
    tracking = TrackingSettings() if track and importlib.util.find_spec("mlflow") else None
    stage = output / "hub-staging"
    # The cached model's folder carries a hash; the staged repos get the plain name.
    names = {fmt: template.replace("{model}", "tiny-phi3") for fmt, template in default_templates().items()}
    result = publish(
        recipe,
        push=PushSettings(
            namespace="your-namespace", dry_run=True, stage_dir=stage, templates=names, track=tracking is not None
        ),
        token=None,
        tracking=tracking,
        progress=progress,
        plot=output / "tradeoff.png" if importlib.util.find_spec("matplotlib") else None,
    )
    if result.quantized.failures:
        raise result.quantized.failures[0].error  # type: ignore[misc]
    return _report(result, model=model, output=output, stage=stage)


def _report(result: Any, *, model: Path, output: Path, stage: Path) -> str:
    from hubquant.table import render_table

    evaluation = result.evaluation
    lines = [render_table(evaluation.rows) if evaluation else "", ""]
    lines.append(f"source:    {model}")
    lines.append(f"artifacts: {(output / 'variants').resolve()}  (each with manifest.json and eval.json)")
    if evaluation is not None and evaluation.plot is not None:
        lines.append(f"chart:     {evaluation.plot}")
    if evaluation is not None and evaluation.tracking is not None:
        from hubquant.tracking import ui_hint

        tracked = evaluation.tracking
        lines.append(f"mlflow:    experiment '{tracked.experiment}' — {ui_hint(tracked.uri, tracked.experiment_id)}")
    else:
        lines.append('mlflow:    not recorded (pip install "hubquant[tracking]" to track runs)')
    if result.pushed is not None:
        lines.append(f"hub:       dry run — the repos that would be pushed are staged in {stage.resolve()}:")
        lines += [f"           {r.repo_id}  ({len(r.uploaded)} files)" for r in result.pushed.results]
    return "\n".join(lines)
