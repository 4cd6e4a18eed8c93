"""Faults a long run must survive, each driven deterministically: a pause at a named stage
(``HUBQUANT_FAULT``), never a sleep or a log line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, wait_for_stage

ROOT = Path(__file__).resolve().parents[1]


def _paused_quantize(
    model: Path, out: Path, marker_dir: Path, *precisions: str, fault: str = "pause:gguf-converting"
) -> subprocess.Popen:
    """A ``hubquant quantize`` that waits at the start of conversion until it is signalled (60 s at most)."""
    env = {**os.environ, "HUBQUANT_FAULT": fault, "HUBQUANT_FAULT_DIR": str(marker_dir)}
    flags = [f for p in precisions for f in ("--precision", p)]
    process = subprocess.Popen(
        [sys.executable, "-m", "hubquant.cli", "quantize", str(model), *flags, "--output", str(out), "--no-track"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_for_stage(marker_dir / "gguf-converting.reached", process)
    return process


@pytest.mark.slow
def test_a_second_signal_during_the_clean_up_ends_hubquant_at_once(untrained_phi3: Path, tmp_path: Path) -> None:
    fault = "pause:gguf-converting,pause:interrupted"
    process = _paused_quantize(untrained_phi3, tmp_path / "out", tmp_path, "Q8_0", fault=fault)
    process.send_signal(signal.SIGTERM)
    wait_for_stage(tmp_path / "interrupted.reached", process)  # the first signal was taken; clean-up is next
    process.send_signal(signal.SIGTERM)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 143 and "interrupted again, stopping now" in err, err


@pytest.mark.slow
def test_a_second_run_on_the_same_output_refuses_and_a_dead_holder_is_taken_over(
    untrained_phi3: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = _paused_quantize(untrained_phi3, out, tmp_path, "Q8_0")
    try:
        # A live run's staging folder must survive anyone's clean-up.
        live = [p for p in out.iterdir() if p.name.startswith(".hubquant-tmp-")]
        assert live, "the paused run has its staging folder"
        started = time.monotonic()
        code, _, err = run_cli(
            "quantize", str(untrained_phi3), "--precision", "Q8_0", "--output", str(out), "--no-track"
        )
        assert code == 1 and "in use by another hubquant run" in err and f"pid {first.pid}" in err, err
        assert time.monotonic() - started < 30, "refused at once, not after waiting"
        assert all(p.exists() for p in live), "the refused run deleted nothing"
    finally:
        first.kill()  # kill -9: no clean-up at all
        first.communicate(timeout=60)
    assert (out / ".hubquant-lock").is_file() and all(p.exists() for p in live), "what a killed run leaves"
    code, stdout, err = run_cli(
        "quantize", str(untrained_phi3), "--precision", "Q8_0", "--output", str(out), "--no-track", "--json"
    )
    assert code == 0, err
    assert "taking over from a run that ended" in err and f"pid {first.pid}" in err
    assert not any(p.exists() for p in live), "the dead run's staging folder is cleaned"
    assert sorted(p.name for p in out.iterdir()) == ["gguf-Q8_0"], "no lock, no temporaries left"


def test_weights_with_nan_or_inf_are_refused_before_any_work(model_copy, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    model = model_copy("nan-model")
    tensors = load_file(model / "model.safetensors")
    name = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    tensors[name] = tensors[name].copy()
    tensors[name][0, :3] = [np.nan, np.inf, -np.inf]
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli("quantize", str(model), "--precision", "Q8_0", "--output", str(tmp_path / "o"), "--no-track")
    assert code == 1 and "Traceback" not in err
    assert "NaN or infinite" in err and f"{name} (3 in model.safetensors)" in err, err
    assert not (tmp_path / "o").exists(), "nothing was written"


def _as_bf16(path: Path, name: str) -> None:
    """Relabel a uint16 tensor of a safetensors file as BF16 (safetensors.numpy cannot write bf16)."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    header[name]["dtype"] = "BF16"
    body = json.dumps(header).encode()
    path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + length :])


def test_bf16_and_f16_non_finite_values_are_found_by_their_bits(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    from hubquant.weights import non_finite_tensors

    path = tmp_path / "w.safetensors"
    save_file(
        {
            "a": np.array([1.0, np.nan, 65504.0, -np.inf], dtype=np.float16),
            "b": np.ones(4, dtype=np.float32),
            "c": np.array([1, 2], dtype=np.int64),
        },
        path,
    )
    assert non_finite_tensors(path) == [("a", 2)]
    # bf16 bit patterns: 1.0, NaN, -Inf, +Inf, the largest finite value, the smallest subnormal
    save_file(
        {"x": np.array([0x3F80, 0x7FC0, 0xFF80, 0x7F80, 0x7F7F, 0x0001], dtype=np.uint16)},
        tmp_path / "bits.safetensors",
    )
    _as_bf16(tmp_path / "bits.safetensors", "x")
    assert non_finite_tensors(tmp_path / "bits.safetensors") == [("x", 3)]


@pytest.mark.slow
def test_the_wheel_ships_every_data_file(tmp_path: Path) -> None:
    """A non-editable install must find the profiles, the card template and the texts."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            "-q",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("hubquant-*.whl")
    shipped = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("hubquant/data/")}
    expected = {
        f"hubquant/{p.relative_to(ROOT / 'hubquant').as_posix()}"
        for p in (ROOT / "hubquant" / "data").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert expected and shipped == expected, sorted(expected ^ shipped)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 3 MB tmpfs (needs root; skipped with the reason otherwise)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.strip() or 'mount failed'}); needs root")
    yield mount
    import gc

    gc.collect()  # a failed write's exception may still hold a file open on it
    if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mount)], check=False)  # detach now, free when the last file closes


def test_a_run_that_cannot_fit_is_refused_before_any_work(untrained_phi3: Path, small_disk: Path) -> None:
    out = small_disk / "out"
    code, _, err = run_cli(
        "quantize", str(untrained_phi3), "--precision", "Q8_0", "--precision", "Q4_K_M", "--output", str(out)
    )
    assert code == 1 and "Traceback" not in err, err
    assert f"not enough disk for this run: {out} has 3.1 MB free" in err and "at their peak" in err, err
    assert "--scratch" in err and not out.exists(), "refused before the output folder (or an MLflow run) exists"
    # The same run with the intermediates on a disk with room: the outputs alone still do not fit.
    code, _, err = run_cli(
        "quantize",
        str(untrained_phi3),
        "--precision",
        "Q8_0",
        "--precision",
        "Q4_K_M",
        "--output",
        str(out),
        "--scratch",
        str(small_disk.parent / "scratch"),
        "--no-track",
    )
    assert code == 1 and "(outputs)" in err and "(intermediates)" in err, err


def test_a_full_disk_is_named_and_nothing_is_half_written(untrained_phi3: Path, small_disk: Path) -> None:
    from hubquant.cli import QUIET_ENVIRONMENT

    out = small_disk / "out"
    # A process of its own, as a user runs it: tqdm reads TQDM_DISABLE when it is imported, which in
    # this test process happened long ago; and without the quiet variables an earlier in-process run
    # left here, so that hubquant itself must set them.
    env = {k: v for k, v in os.environ.items() if k not in QUIET_ENVIRONMENT}
    env["HUBQUANT_SKIP_DISK_CHECK"] = "1"  # past the preflight estimate: the write itself runs out of space
    command = ["quantize", str(untrained_phi3), "--precision", "Q8_0", "--precision", "Q4_K_M"]
    completed = subprocess.run(
        [sys.executable, "-m", "hubquant.cli", *command, "--output", str(out), "--no-track"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    code, err = completed.returncode, completed.stderr
    assert code == 1 and "Traceback" not in err and "internal error" not in err, err
    assert f"disk full writing {out}" in err and "--scratch" in err and "checkpoint is complete" not in err, err
    assert "Writing:" not in err, "no third-party progress bar after the error"
    # Nothing half-written: what is left is whole variants (Q8_0 alone fits on this disk, and is kept
    # when its manifest could be written), each file as its manifest lists it, and nothing else.
    from hubquant.artifact import load_artifact

    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) if out.exists() else []
    listed = []
    for folder in sorted(p for p in out.iterdir() if p.is_dir()) if out.exists() else []:
        artifact = load_artifact(folder)
        for entry in artifact.files:
            assert (folder / entry.path).stat().st_size == entry.size, entry
        listed += [f"{folder.name}/{entry.path}" for entry in artifact.files] + [f"{folder.name}/manifest.json"]
    assert left == sorted(listed), "nothing half-written"
    assert "gguf-Q4_K_M" not in {p.split("/")[0] for p in left}


#: Build stages a signal must stop cleanly: the command that reaches each (format, precision).
BUILD_STAGES = {
    "gguf-converting": ("gguf", "Q8_0"),
    "gguf-quantizing": ("gguf", "Q4_K_M"),
    "llama-quantizing": ("gguf", "Q4_K_M"),  # inside llama.cpp's C call
    "onnx-prequantizing": ("onnx", "int4"),
    "onnx-building": ("onnx", "int4"),
    "openvino-exporting": ("openvino", "int4"),
    "openvino-compressing": ("openvino", "int4"),
}


def _interrupt_at(stage: str, command: list[str], tmp_path: Path, signum: int = signal.SIGINT) -> dict:
    """Run ``hubquant COMMAND`` paused at ``stage``, signal hubquant there; how it ended."""
    env = {**os.environ, "HUBQUANT_FAULT": f"pause:{stage}", "HUBQUANT_FAULT_DIR": str(tmp_path)}
    process = subprocess.Popen(
        [sys.executable, "-m", "hubquant.cli", *command],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_for_stage(tmp_path / f"{stage}.reached", process)
    holder = int((tmp_path / f"{stage}.reached").read_text())  # hubquant itself, or the child at that stage
    started = time.monotonic()
    process.send_signal(signum)
    err = process.communicate(timeout=120)[1]
    seconds = time.monotonic() - started
    child_alive = holder != process.pid and _alive(holder)
    print(f"\n{stage}: exit {process.returncode} in {seconds:.2f} s (paused in pid {holder}, hubquant {process.pid})")
    return {"code": process.returncode, "err": err, "seconds": seconds, "child_alive": child_alive}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _left_in(out: Path) -> list[str]:
    """What a stopped run left in its output folder (the lock file, kept for the next run, aside)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name != ".hubquant-lock") if out.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(BUILD_STAGES))
def test_interrupted_at_every_build_stage(stage: str, untrained_phi3: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    fmt, precision = BUILD_STAGES[stage]
    out = tmp_path / "out"
    command = ["quantize", str(untrained_phi3), "--format", fmt, "--precision", precision, "--output", str(out)]
    ended = _interrupt_at(stage, command, tmp_path)
    assert ended["code"] == 130 and "interrupted" in ended["err"] and "Traceback" not in ended["err"], ended["err"]
    assert not ended["child_alive"], "the child working at that stage was stopped with hubquant"
    assert ended["seconds"] < 30, f"stopped in {ended['seconds']:.1f} s"
    assert _left_in(out) == [], "nothing half-written, no temporaries"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and {r.info.status for r in runs} == {"KILLED"}, [(r.info.run_name, r.info.status) for r in runs]


@pytest.mark.slow
def test_interrupted_while_evaluating_stops_the_evaluation_child(untrained_phi3: Path, tmp_path: Path) -> None:
    code, stdout, err = run_cli(
        "quantize", str(untrained_phi3), "--precision", "Q8_0", "--output", str(tmp_path / "out"), "--json"
    )
    assert code == 0, err
    artifact = json.loads(stdout)[0]["path"]
    command = ["eval", artifact, "--context", "64", "--max-windows", "1", "--no-fidelity"]
    ended = _interrupt_at("evaluating", command, tmp_path)
    assert ended["code"] == 130 and "Traceback" not in ended["err"], ended["err"]
    assert not ended["child_alive"], "the evaluation child was stopped with hubquant"
    assert not (Path(artifact) / "eval.json").exists(), "no evaluation recorded from a stopped run"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert "RUNNING" not in {r.info.status for r in runs}, [(r.info.run_name, r.info.status) for r in runs]


@pytest.mark.slow
def test_interrupted_before_the_hub_commit_leaves_the_repo_as_it_was(
    untrained_phi3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hub_server import HubServer

    code, stdout, err = run_cli(
        "quantize", str(untrained_phi3), "--precision", "Q8_0", "--output", str(tmp_path / "out"), "--json"
    )
    assert code == 0, err
    artifact = json.loads(stdout)[0]["path"]
    with HubServer() as hub:
        monkeypatch.setenv("HF_TOKEN", hub.add_user("alice"))
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        command = ["push", artifact, "--namespace", "alice", "--base-model", "hubquant-tests/tiny", "--no-track"]
        ended = _interrupt_at("hub-committing", command, tmp_path, signal.SIGTERM)
        assert ended["code"] == 143 and "Traceback" not in ended["err"], ended["err"]
        (repo,) = hub.state.repos
        assert hub.commits(repo) == ["initial commit"], "no commit, no half commit"
