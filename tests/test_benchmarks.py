"""The scale benchmark's pieces on a scaled-down shape: the generator writes exactly what
transformers expects, and the runner measures hubquant against the raw tool and reports ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import phi_shapes  # noqa: E402


@pytest.mark.parametrize("shape", ["phi-3.5-mini", "phi-4-mini"])
def test_generator_writes_the_real_layout(shape: str, tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = phi_shapes.generate(shape, tmp_path / shape, layers=1, scale=8)
    config = AutoConfig.from_pretrained(folder)
    real = phi_shapes.SHAPES[shape]
    assert config.vocab_size == real["vocab_size"] and config.tie_word_embeddings == real["tie_word_embeddings"]
    with safe_open(folder / "model.safetensors", "pt") as handle:
        written = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    model = AutoModelForCausalLM.from_config(config)
    expected = {
        name: tuple(t.shape)
        for name, t in model.state_dict().items()
        if not (config.tie_word_embeddings and name == "lm_head.weight")
    }
    assert written == expected
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert str(loaded.dtype) == "torch.bfloat16"


@pytest.mark.slow
def test_scale_runner_reports_ratios(tmp_path: Path) -> None:
    model = phi_shapes.generate("phi-3.5-mini", tmp_path / "model", layers=1, scale=8)
    report = tmp_path / "report"
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "scale.py"),
            str(model),
            "--format",
            "gguf",
            "--repeat",
            "2",
            "--trace",
            "--report",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    data = json.loads(report.with_suffix(".json").read_text())
    assert data["repeat"] == 2 and data["versions"]["llama-cpp-python"] and data["machine"]["cores"] >= 1
    assert "--repeat 2" in data["command"] and data["date"].startswith("20")
    gguf = data["formats"]["gguf"]
    for path in ("raw", "hubquant"):
        assert len(gguf[path]["runs"]) == 2
        assert gguf[path]["wall_s"] > 0 and gguf[path]["peak_rss_gib"] > 0 and gguf[path]["output_gb"] > 0
        low, high = gguf[path]["spread"]["wall_s"]
        assert low <= gguf[path]["wall_s"] <= high
        phases = [phase for step in gguf[path]["runs"][0]["trace"] for phase in step["phases"]]
        assert phases and all(phase["peak_rss_gib"] >= 0 for phase in phases)
    hubquant_phases = [ph["phase"] for step in gguf["hubquant"]["runs"][0]["trace"] for ph in step["phases"]]
    assert any("hashing and writing the manifest" in phase for phase in hubquant_phases), hubquant_phases
    markdown = report.with_suffix(".md").read_text()
    assert gguf["ratio"]["wall_s"] > 0 and "**ratio**" in markdown and "peak memory by phase" in markdown
    # The same converter and quantizer on the same input: the same tensors; hubquant names the model after
    # its folder and records itself as the quantizer.
    outputs = gguf["outputs"]
    assert "gguf:tensors" in outputs["identical"] and outputs["raw_only"] == []
    assert set(outputs["different"]) <= {"file", "gguf:general.name", "gguf:GGUF.kv_count"}, outputs
    assert outputs["hubquant_only"] == ["gguf:general.quantized_by"], outputs


def test_a_forked_child_is_not_counted_twice(tmp_path: Path) -> None:
    """A child forked from a big process shares its pages copy-on-write: summing RSS counts them twice
    (openvino-telemetry forks the exporter), the benchmark's tree sum must not."""
    import scale

    script = (
        "import os, sys\n"
        "buffer = bytearray(os.urandom(1 << 20) * 256)\n"  # 256 MiB, every page touched
        "child = os.fork()\n"
        "if child == 0:\n"
        "    sys.stdin.read()\n"  # the forked child waits for the test, sharing every page
        "    os._exit(0)\n"
        "print(child, flush=True)\n"
        "sys.stdin.read()\n"
        "os.waitpid(child, 0)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        child = int(process.stdout.readline())
        parent_rss, parent_anon = scale.process_memory(process.pid, 0)
        child_rss, child_anon = scale.process_memory(child, process.pid)
        naive = sum(
            int(line.split()[1])
            for line in Path(f"/proc/{child}/status").read_text().splitlines()
            if line.startswith("RssAnon:")
        )
    finally:
        process.communicate("", timeout=60)
    assert parent_anon > 256 * 1024 and naive > 256 * 1024  # KiB: plain RSS sees the buffer in both
    assert child_anon < 32 * 1024 and child_rss < 64 * 1024  # counted with its private pages only


@pytest.mark.slow
def test_scale_runner_times_the_four_format_publish(tmp_path: Path) -> None:
    model = phi_shapes.generate("phi-3.5-mini", tmp_path / "model", layers=1, scale=8)
    report = tmp_path / "report"
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "scale.py"),
            str(model),
            "--format",
            "--publish",
            "--unmeasured",
            "mlx",
            "--report",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    publish = json.loads(report.with_suffix(".json").read_text())["publish"]
    assert publish["wall_s"] > 0 and publish["peak_extra_disk_gb"] > 0 and publish["peak_anon_gib"] > 0
    assert sorted(row["variant"].split("-")[0] for row in publish["rows"]) == ["gguf", "onnx", "openvino"]
    assert len(publish["staged_repos"]) == 4 and any("4bit" in repo for repo in publish["staged_repos"])
    assert all(row["kl_mean"] is not None and row["kl_mean"] >= 0 for row in publish["rows"])
    assert "Four-format publish" in report.with_suffix(".md").read_text()


@pytest.mark.slow
def test_bf16_source_quantizes_from_an_f16_intermediate(tmp_path: Path) -> None:
    """A bf16 checkpoint's K-quants start from the F16 GGUF llama.cpp documents, deleted once used."""
    from conftest import run_cli

    model = phi_shapes.generate("phi-3.5-mini", tmp_path / "model", layers=1, scale=8)
    code, out, err = run_cli(
        "quantize",
        str(model),
        "--precision",
        "Q4_K_M",
        "--precision",
        "Q8_0",
        "--output",
        str(tmp_path / "out"),
        "--json",
        "--no-track",
    )
    assert code == 0, err
    assert "converting the F16 intermediate" in err
    built = {a["precision"]: a for a in json.loads(out)}
    assert set(built) == {"Q4_K_M", "Q8_0"}
    from llama_cpp import Llama

    llm = Llama(model_path=str(Path(built["Q4_K_M"]["path"]) / "model-Q4_K_M.gguf"), n_ctx=64, verbose=False)
    assert llm.n_vocab() == 32064
    assert not list((tmp_path / "out").glob(".hubquant-tmp-*")), "the intermediate is gone"


def test_reference_can_keep_bf16_weights_and_gives_the_same_logits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reference too large for float32 keeps its linear weights in bf16 and widens each as it runs:
    half the weight memory, same logits (bf16 → float32 is exact and the arithmetic is float32)."""
    import numpy as np

    from hubquant import torch_runner as evaluate
    from hubquant.source import resolve_source

    model = phi_shapes.generate("phi-4-mini", tmp_path / "model", layers=1, scale=8)  # tied, bf16, 200k vocab
    source = resolve_source(model)
    assert evaluate.reference_weights(source, "auto")[0] == "fp32"
    monkeypatch.setattr(evaluate, "available_memory", lambda: source.parameter_count * 3)
    weights, why = evaluate.reference_weights(source, "auto")
    assert weights == "source" and "would not fit" in why and "bfloat16" in why
    ids = list(range(100, 148))
    wide, narrow = evaluate.TorchRunner(source, weights="fp32"), evaluate.TorchRunner(source, weights="source")
    import torch

    layers = {name: m for name, m in narrow._model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(m.weight.dtype == torch.bfloat16 for name, m in layers.items() if name != "lm_head")
    assert layers["lm_head"].weight.dtype == torch.float32, "tied to the embedding, which is widened once"
    held = sum(p.numel() * p.element_size() for p in narrow._model.parameters())
    assert held < sum(p.numel() * p.element_size() for p in wide._model.parameters())
    a, b = wide.logits(ids), narrow.logits(ids)
    assert b.dtype == np.float32 and np.allclose(a, b, rtol=1e-5, atol=1e-5), float(np.abs(a - b).max())


def test_task_benchmark_reports_the_cost_of_each_runner(tiny_phi3: Path, tmp_path: Path) -> None:
    import tasks as task_bench

    from conftest import quantize_json

    [artifact] = quantize_json(tiny_phi3, tmp_path / "out", "gguf", "Q8_0")
    out = tmp_path / "report-3.5"
    task_bench.main([str(tiny_phi3), artifact["path"], "--limit", "3", "--max-length", "256", "--out", str(out)])
    report = json.loads(Path(f"{out}.json").read_text())
    assert [r["runner"] for r in report["rows"]] == ["reference", "gguf-Q8_0"]
    for row in report["rows"]:
        assert row["examples"] == 3 and 0 < row["forward_passes"] <= 3 * 4 and row["forward_tokens"] > 3 * 40
        assert row["seconds_per_100_examples"] > 0 and row["ms_per_token"] > 0
    assert "| gguf-Q8_0 |" in Path(f"{out}.md").read_text()


def _report(date: str, wall: float, *, fmt: str = "mlx") -> dict:
    def path(seconds: float) -> dict:
        figures = {"wall_s": seconds, "peak_rss_gib": 3.0, "peak_anon_gib": 2.85}
        return {**figures, "spread": {"wall_s": [seconds - 1, seconds + 2]}}

    return {
        "model": "/data/phi35",
        "date": date,
        "command": "python benchmarks/scale.py /data/phi35 --repeat 3",
        "repeat": 3,
        "machine": {"cores": 2},
        "formats": {
            fmt: {
                "raw": path(wall),
                "hubquant": path(wall),
                "ratio": {"wall_s": 1.0, "peak_rss_gib": 1.0, "peak_anon_gib": 1.0},
            }
        },
    }


def test_readme_table_comes_from_the_result_files(tmp_path: Path) -> None:
    import results_table

    (tmp_path / "scale-old.json").write_text(json.dumps(_report("2026-11-01T00:00:00Z", 40.0)))
    (tmp_path / "scale-new.json").write_text(json.dumps(_report("2026-12-01T00:00:00Z", 35.4)))
    table = results_table.table(tmp_path)
    assert "| phi35 | MLX 4-bit g64 (`mlx_lm convert`) | 3 | 35.4 (34.4–37.4) |" in table  # the newest, its spread
    assert "40.0" not in table and "`benchmarks/results/scale-new.json` (2026-12-01" in table
    stopped = _report("2026-12-02T00:00:00Z", 50.0, fmt="onnx")  # a raw tool that could not fit
    stopped["formats"]["onnx"]["raw"]["stopped"] = "stopped at 20.0 GiB anonymous memory after 50 s"
    del stopped["formats"]["onnx"]["ratio"]
    (tmp_path / "scale-stopped.json").write_text(json.dumps(stopped))
    row = next(line for line in results_table.table(tmp_path).splitlines() if "ONNX" in line)
    assert "| stopped after 50 s | 50.0 (49.0–52.0) | — |" in row and "≥ 3.00 / ≥ 2.85" in row, row
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results_table.BEGIN}\nold figures\n{results_table.END}\nrest\n")
    args = ["--readme", str(readme), "--results", str(tmp_path)]
    assert results_table.main([*args, "--check"]) == 1
    assert results_table.main([*args, "--write"]) == 0 and results_table.main([*args, "--check"]) == 0
    assert readme.read_text().startswith("intro\n") and readme.read_text().endswith("rest\n")
    # The repository's README holds exactly the table its result files give.
    assert results_table.main(["--check"]) == 0


def test_the_scale_runner_stops_a_run_at_its_memory_limit(tmp_path: Path) -> None:
    """A tool that cannot fit is measured up to the limit and reported as stopped, not left to the OOM killer."""
    import scale

    # Holds 200 MiB of written pages, then waits for a signal (the watcher's SIGKILL; alarm bounds it at 120 s).
    hold = "import signal\nheld = b'x' * (200 << 20)\nsignal.alarm(120)\nsignal.pause()\n"
    model = tmp_path / "model"
    model.mkdir()
    result = scale.run_steps([[sys.executable, "-c", hold]], tmp_path, model, tmp_path / "out", limit_gib=0.1)
    assert result["stopped"].startswith("stopped at 0.1 GiB anonymous memory after"), result
    assert 0.1 <= result["peak_anon_gib"] < 0.3 and result["output_gb"] == 0.0, result
