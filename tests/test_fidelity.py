"""Numbers a maintainer can publish: each runtime's own deviation measured apart from quantization,
standard errors that hold up against a bootstrap, and a broken variant that cannot sink the table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hubquant import stats

from conftest import quantize_json, run_cli

pytestmark = pytest.mark.slow

FAST_EVAL = ("--context", "64", "--max-windows", "3", "--prompt-tokens", "16", "--gen-tokens", "4", "--json")


@pytest.fixture(scope="session")
def tiny_phimoe(model_store: Path) -> Path:
    """A tiny Phi-3.5-MoE-shaped model, its config written as the Hub's microsoft/Phi-3.5-MoE-instruct has it."""
    from conftest import _cached_model

    return _cached_model(model_store, "tiny-phimoe", style="phi3", steps=150, architecture="phimoe")


def _eval(*paths: Path, extra: tuple[str, ...] = ()) -> tuple[int, dict, str]:
    code, out, err = run_cli("eval", *map(str, paths), *FAST_EVAL, "--no-track", *extra)
    return code, json.loads(out) if out.strip() else {}, err


def _floors(document: dict) -> dict[str, dict]:
    return {row["fidelity"]["format"]: row["fidelity"] for row in document["rows"] if row.get("fidelity")}


def test_standard_errors_agree_with_a_bootstrap_over_windows(tiny_phi3: Path, tmp_path: Path) -> None:
    """Per-token standard errors (as llama-perplexity computes them) against 400 bootstrap resamples of
    whole windows: within 25% for perplexity, the paired Δ, KL and top-1."""
    from hubquant.exporters.gguf import GGUFRunner
    from hubquant.source import resolve_source
    from hubquant.text import read_text, token_windows, tokenize
    from hubquant.torch_runner import TorchRunner

    artifact = quantize_json(tiny_phi3, tmp_path / "out", "gguf", "Q4_K_M")[0]
    source = resolve_source(tiny_phi3)
    windows = token_windows(tokenize(source, read_text(None)), 32)
    assert len(windows) >= 60
    reference, variant = TorchRunner(source), GGUFRunner(Path(artifact["path"]) / artifact["file"], context_length=32)
    per_window = []
    for window in windows:
        ref, var = reference.logits(window), variant.logits(window)
        per_window.append(
            (
                stats.window_nll(ref, window),
                stats.window_nll(var, window),
                stats.kl_divergence(ref[:-1], var[:-1]),
                ref[:-1].argmax(-1) == var[:-1].argmax(-1),
            )
        )

    def figures(chosen: np.ndarray) -> list[stats.Estimate]:
        ref_nll, nll, kl, agree = (np.concatenate([per_window[i][k] for i in chosen]) for k in range(4))
        return [
            stats.perplexity(nll),
            stats.perplexity_change_pct(nll, ref_nll),
            stats.mean(kl),
            stats.proportion(agree),
        ]

    full = figures(np.arange(len(windows)))
    rng = np.random.default_rng(0)
    resampled = [figures(rng.integers(0, len(windows), len(windows))) for _ in range(400)]
    for index, name in enumerate(("perplexity", "Δ perplexity", "KL", "top-1")):
        bootstrap = float(np.std([r[index].value for r in resampled], ddof=1))
        assert full[index].stderr is not None
        assert 0.75 < full[index].stderr / bootstrap < 1.25, f"{name}: {full[index].stderr} vs bootstrap {bootstrap}"


def test_phi3_floors_are_rounding_in_every_format(tiny_phi3: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for fmt, precision in (("gguf", "Q4_K_M"), ("onnx", "int4"), ("openvino", "int8"), ("mlx", "8bit")):
        quantize_json(tiny_phi3, out, fmt, precision)
    code, document, err = _eval(*sorted(out.iterdir()))
    assert code == 0, err
    floors = _floors(document)
    assert set(floors) == {"gguf", "onnx", "openvino", "mlx"}
    for fmt, floor in floors.items():
        assert not floor["deviates"] and floor["kl_mean"] < 1e-4 and floor["origin"] == "floor", (fmt, floor)
    for row in document["rows"][1:]:
        metrics = row["metrics"]
        assert metrics["quant_kl_mean"] == pytest.approx(metrics["kl_mean"], rel=0.25), row["label"]
        assert metrics["kl_mean_stderr"] > 0 and metrics["perplexity_stderr"] > 0
    assert not list(out.glob(".hubquant-tmp-*")), "the floors built for measuring are deleted"


def test_long_rope_mlx_is_a_finding_the_others_are_not(tiny_phi4mini: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    quantize_json(tiny_phi4mini, out, "mlx", "8bit")
    quantize_json(tiny_phi4mini, out, "gguf", "Q8_0", options=("--option", "pre_tokenizer=gpt-4o"))
    quantize_json(tiny_phi4mini, out, "openvino", "int8")
    code, table, err = run_cli("eval", *map(str, sorted(out.iterdir())), *FAST_EVAL[:-1], "--no-track")
    assert code == 0, err
    assert "! finding: MLX computes this model differently" in table and "long-rope factors" in table
    saved = {path.parent.name: json.loads(path.read_text()) for path in out.glob("*/eval.json")}
    floors = {document["fidelity"]["format"]: document["fidelity"] for document in saved.values()}
    assert floors["mlx"]["deviates"] and "long-rope factors at every length" in floors["mlx"]["finding"]
    assert not floors["gguf"]["deviates"] and not floors["openvino"]["deviates"]
    mlx = saved["mlx-8bit-g64"]["metrics"]
    assert mlx["quant_kl_mean"] < mlx["kl_mean"] / 10, "the quantization alone is small; the runtime is not"
    # A recipe gate can hold such a runtime back; by default it is published with the finding.
    code, table, err = run_cli(
        "eval", str(out / "mlx-8bit-g64"), *FAST_EVAL[:-1], "--no-track", "--max-runtime-kl", "1e-3"
    )
    assert code == 2 and "unquantized KL" in table, err


def test_phimoe_routing_is_named_and_the_attention_factor_follows_the_config(tiny_phimoe: Path, tmp_path: Path) -> None:
    import gguf

    out = tmp_path / "out"
    quantize_json(tiny_phimoe, out, "gguf", "F32", "Q4_K_M")
    quantize_json(tiny_phimoe, out, "mlx", "fp32")
    reader = gguf.GGUFReader(out / "gguf-Q4_K_M" / "tiny-phimoe-Q4_K_M.gguf")
    field = reader.fields["phimoe.rope.scaling.attn_factor"]
    assert float(field.parts[field.data[0]][0]) == pytest.approx(1.243163121016122, rel=1e-6), (
        "the config's mscale, not the converter's 1.190"
    )
    code, document, err = _eval(*sorted(out.iterdir()))
    assert code == 0, err
    floors = _floors(document)
    assert floors["gguf"]["origin"] == "variant" and floors["gguf"]["precision"] == "F32"
    for fmt in ("gguf", "mlx"):
        assert floors[fmt]["deviates"] and "sparsemixer" in floors[fmt]["finding"], fmt
    q4 = next(row for row in document["rows"] if row["variant"]["precision"] == "Q4_K_M")
    assert q4["metrics"]["quant_kl_mean"] < floors["gguf"]["kl_mean"], "quantization is not blamed for the runtime"


def test_a_variant_that_cannot_be_measured_is_a_failed_row(tiny_phi3: Path, tmp_path: Path) -> None:
    """Non-finite logits (here: NaN written into one tensor) fail that variant with a clear message;
    the others are still measured, its MLflow run is FAILED, and the command exits 1 at the end."""
    import gguf

    out = tmp_path / "out"
    quantize_json(tiny_phi3, out, "gguf", "F32", "Q8_0")
    broken = out / "gguf-F32" / "tiny-phi3-F32.gguf"
    reader = gguf.GGUFReader(broken, "r+")
    next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight").data[:] = np.nan
    del reader
    code, out_text, err = run_cli(
        "eval", str(out / "gguf-F32"), str(out / "gguf-Q8_0"), *FAST_EVAL[:-1], "--no-fidelity"
    )
    assert code == 1 and "Traceback" not in err
    assert "non-finite logits" in err and "gguf F32" in err
    assert "✗ gguf F32" in out_text and "gguf Q8_0" in out_text
    measured = json.loads((out / "gguf-Q8_0" / "eval.json").read_text())
    assert measured["metrics"]["kl_mean"] is not None and measured["error"] is None
    failed = json.loads((out / "gguf-F32" / "eval.json").read_text())
    assert "non-finite" in failed["error"] and failed["gate"]["passed"] is False
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string="tags.`hubquant.role` = 'variant'"
    )
    status = {run.data.tags["hubquant.precision"]: run.info.status for run in runs}
    assert status == {"F32": "FAILED", "Q8_0": "FINISHED"}
