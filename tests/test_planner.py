"""The resource planner: its estimates against the full-size benchmark runs kept in benchmarks/results,
the memory preflight of ``quantize`` (refused before any weight is read), and ``plan``'s table and runners."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import plan_vs_measured  # noqa: E402

from hubquant.exporters.onnx import ONNXExporter  # noqa: E402
from hubquant.planner import ResourceError, Shape, check_memory, choose_runner, estimate_run  # noqa: E402
from hubquant.recipe import RunnerSpec, VariantSpec  # noqa: E402

import phi_shapes  # noqa: E402


def test_estimates_are_within_a_quarter_of_every_full_size_run() -> None:
    rows = plan_vs_measured.rows()
    shapes = {row["shape"] for row in rows}
    assert {"phi-3.5-mini", "phi-4"} <= shapes, f"both shapes are measured: {shapes}"
    finished = {(row["shape"], row["format"]) for row in rows if not row["stopped"]}
    assert {fmt for _, fmt in finished} == {"gguf", "onnx", "openvino", "mlx"}
    assert {fmt for shape, fmt in finished if shape == "phi-4"} >= {"gguf", "openvino", "mlx"}
    for row in rows:
        if row["stopped"]:  # measured until it was stopped: the estimate must be at least that
            assert row["memory_estimated"] >= row["memory_measured"], row
            continue
        for key in ("memory", "rss", "disk"):
            estimated, measured = row[f"{key}_estimated"], row[f"{key}_measured"]
            assert abs(estimated / measured - 1) <= 0.25, f"{row['shape']} {row['format']} {key}: {row}"


def test_the_shape_comes_from_the_headers_alone() -> None:
    shape = Shape.from_headers(
        [{name: {"shape": list(dims)} for name, dims in phi_shapes.tensors(phi_shapes.shape_config("phi-4"))}]
    )
    assert shape.parameters == 14_659_507_200 and shape.weight_bytes == 2 * shape.parameters
    assert shape.largest_tensor_bytes == 100352 * 5120 * 2  # the embedding (and the untied LM head)
    assert shape.own_lm_head and not plan_vs_measured.shape("phi-4-mini").own_lm_head  # Phi-4-mini ties it


def test_a_job_goes_to_the_first_runner_that_holds_it() -> None:
    shape = plan_vs_measured.shape("phi-4")
    runners = {
        "default": RunnerSpec(label="small-8gb", memory_gb=8, disk_gb=100),
        "large": RunnerSpec(label="ubuntu-24.04-64gb", memory_gb=64, disk_gb=300),
    }
    chosen = {
        fmt: choose_runner(estimate_run(shape, [VariantSpec(format=fmt, precision=p)]), runners, shape.weight_bytes)
        for fmt, p in (("gguf", "Q4_K_M"), ("onnx", "int4"), ("openvino", "int4"), ("mlx", "4bit"))
    }
    # Measured at this shape: GGUF 3.1, ONNX 3.3, MLX 7.4, OpenVINO 7.8 GiB anonymous (+10% margin > 8 GB).
    assert chosen == {
        "gguf": "small-8gb",
        "onnx": "small-8gb",
        "openvino": "ubuntu-24.04-64gb",
        "mlx": "ubuntu-24.04-64gb",
    }
    # On this 24 GiB machine (22.7 GiB available) all four were built; with 8 GB, two are refused up front.
    for fmt, precision in (("gguf", "Q4_K_M"), ("onnx", "int4"), ("openvino", "int4"), ("mlx", "4bit")):
        run = estimate_run(shape, [VariantSpec(format=fmt, precision=precision)])
        check_memory(run, 24_410_000_000)
        if fmt in ("openvino", "mlx"):
            with pytest.raises(ResourceError, match=f"building {fmt}-.* needs about"):
                check_memory(run, 8_000_000_000)
        else:
            check_memory(run, 8_000_000_000)
    # A model whose LM head is its embeddings leaves the head to the builder's whole-graph quantizer pass
    # (measured before the route prequantized the head: past 20 GiB at this shape): refused here.
    tied = replace(shape, own_lm_head=False)
    run = estimate_run(tied, [VariantSpec(format="onnx", precision="int4").resolved()])
    assert run.memory > 20 * 2**30
    with pytest.raises(ResourceError, match="building onnx-int4 needs about"):
        check_memory(run, 24_410_000_000)
    # The planner asks the exporter's own rule: shared embeddings leave the head to the builder too, and a
    # head kept in float needs no quantizer pass at all, tied or not.
    for where, options in ((shape, {"shared_embeddings": True}), (tied, {"quantize_lm_head": False})):
        spec = VariantSpec(format="onnx", precision="int4", options=options).resolved()
        expected = ONNXExporter.builder_quantizes_lm_head(dict(spec.options), where.own_lm_head)
        full_pass = estimate_run(where, [spec]).memory > 20 * 2**30
        assert full_pass == expected == bool(options.get("shared_embeddings"))
    # GitHub's standard runner (14 GB of disk) cannot even hold the 29 GB download.
    standard = {"default": RunnerSpec(label="ubuntu-latest"), "large": runners["large"]}
    gguf = estimate_run(shape, [VariantSpec(format="gguf", precision="Q4_K_M")])
    assert choose_runner(gguf, standard, shape.weight_bytes) == "ubuntu-24.04-64gb"


def test_quantize_refuses_a_run_that_cannot_fit_in_memory_before_reading_a_weight(
    untrained_phi3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hubquant.torch_runner
    import hubquant.weights

    def never(*args: object) -> bool:
        raise AssertionError("the weights were read before the memory preflight")

    monkeypatch.setattr(hubquant.torch_runner, "available_memory", lambda: 50_000_000)  # 50 MB "free"
    monkeypatch.setattr(hubquant.weights, "check_finite", never)
    out = tmp_path / "out"
    code, _, err = run_cli(
        "quantize", str(untrained_phi3), "--format", "gguf", "--precision", "Q4_K_M", "--output", str(out)
    )
    assert code == 1 and "Traceback" not in err, err
    assert "not enough memory for this run: building gguf-Q4_K_M needs about" in err, err
    assert "at its peak, 50.0 MB is available" in err, err
    assert "HUBQUANT_SKIP_MEMORY_CHECK=1" in err and "runners" in err, err
    assert not out.exists(), "refused before the output folder (or an MLflow run) exists"
    # plan says the same, per variant, without refusing
    code, out_text, err = run_cli("plan", "--source", str(untrained_phi3), "--profile", "mobile")
    assert code == 0, err
    assert "50.0 MB memory available" in out_text and "more memory than is available here" in out_text, out_text


def test_plan_prints_each_variants_cost_and_runner(untrained_phi3: Path, tmp_path: Path) -> None:
    code, out, err = run_cli("plan", "--source", str(untrained_phi3), "--profile", "mobile")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"source: {untrained_phi3} (") and "memory available" in lines[0], out
    rows = [line.split() for line in lines[2:6]]
    assert [row[1] for row in rows] == ["gguf", "onnx", "openvino", "mlx"], out
    assert all("minutes" in line for line in lines[2:6]) and lines[-1].startswith("run: peak memory"), out
    # A recipe's runners: the job with the largest estimate goes to the large runner, the others stay.
    memory = sorted((float(row[3]) * {"MB": 1, "GB": 1000}[row[4]], row[1], row[2]) for row in rows)
    (second, *_), (largest, big, _) = memory[-2], memory[-1]
    assert largest > second, out
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "source": str(untrained_phi3),
                "variants": [{"format": fmt, "precision": precision} for _, fmt, precision in memory],
                "runners": {
                    "default": {"label": "small", "memory_gb": (largest + second) / 2e3},
                    "large": "big-runner",
                },
            }
        )
    )
    code, out, err = run_cli("plan", str(recipe), "--github-matrix")
    assert code == 0, err
    chosen = {job["format"]: job["runner"] for job in json.loads(out)["include"]}
    assert chosen == {fmt: "big-runner" if fmt == big else "small" for _, fmt, _ in memory}, out


def test_plan_reads_a_hub_models_shape_from_its_headers_alone(untrained_phi3: Path, hub, monkeypatch, tmp_path) -> None:
    """The publish workflow plans from a Hub id: the safetensors headers come by Range requests, no weights."""
    from huggingface_hub import HfApi

    monkeypatch.setenv("HF_TOKEN", hub.add_user("planner"))
    HfApi().create_repo("planner/tiny")
    HfApi().upload_folder(repo_id="planner/tiny", folder_path=str(untrained_phi3))
    from huggingface_hub import constants

    from hubquant.planner import source_shape
    from hubquant.source import resolve_source

    assert source_shape("planner/tiny") == Shape.of_source(resolve_source(untrained_phi3))
    assert not list(Path(constants.HF_HUB_CACHE).rglob("*.safetensors")), "headers only: no weights downloaded"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        json.dumps(
            {
                "source": "planner/tiny",
                "variants": [{"format": "gguf", "precision": "Q8_0"}],
                "runners": {"default": {"label": "tiny-runner", "memory_gb": 0.001}, "large": "large-runner"},
            }
        )
    )
    code, out, err = run_cli("plan", str(recipe), "--github-matrix")
    assert code == 0, err
    assert [job["runner"] for job in json.loads(out)["include"]] == ["large-runner"]
    code, _, err = run_cli("plan", "--source", "planner/absent", "--profile", "mobile")
    assert code == 1 and "could not read the safetensors headers of planner/absent" in err, err
