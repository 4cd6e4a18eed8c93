"""mlflow_plugin through MLflow's own registries and CLI: the GitHub Actions run context, and the
``huggingface`` deployment target publishing a hubquant variant to the loopback Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from hub_server import HubServer

GITHUB_ENV = {
    "GITHUB_ACTIONS": "true",
    "GITHUB_REPOSITORY": "acme/phi-publish",
    "GITHUB_WORKFLOW": "publish",
    "GITHUB_JOB": "quantize",
    "GITHUB_RUN_ID": "4242",
    "GITHUB_RUN_ATTEMPT": "2",
    "GITHUB_SHA": "a" * 40,
    "GITHUB_REF": "refs/heads/main",
    "GITHUB_ACTOR": "octocat",
    "GITHUB_SERVER_URL": "https://github.com",
    "GITHUB_TOKEN": "ghs_secretvalue0123456789",
}


def test_entry_points_are_found_by_mlflow() -> None:
    from mlflow.deployments import get_deploy_client
    from mlflow.tracking.context.registry import _run_context_provider_registry

    from mlflow_plugin.context import GitHubActionsRunContext
    from mlflow_plugin.deployments import HuggingFaceDeploymentClient

    assert any(isinstance(p, GitHubActionsRunContext) for p in _run_context_provider_registry)
    assert isinstance(get_deploy_client("huggingface"), HuggingFaceDeploymentClient)
    assert isinstance(get_deploy_client("hf"), HuggingFaceDeploymentClient)
    completed = subprocess.run(
        [sys.executable, "-m", "mlflow", "deployments", "help", "-t", "huggingface"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    for key in ("private", "create_pr", "revision", "base_model", "confirm"):
        assert key in completed.stdout


def test_runs_get_github_tags_only_inside_actions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for key in GITHUB_ENV:
        monkeypatch.delenv(key, raising=False)
    with mlflow.start_run() as outside:
        pass
    for key, value in GITHUB_ENV.items():
        monkeypatch.setenv(key, value)
    with mlflow.start_run() as inside:
        pass
    client = mlflow.MlflowClient()
    tags_outside = client.get_run(outside.info.run_id).data.tags
    tags_inside = client.get_run(inside.info.run_id).data.tags
    assert not any(k.startswith("github.") for k in tags_outside)
    expected = {
        "github.repository": "acme/phi-publish",
        "github.workflow": "publish",
        "github.job": "quantize",
        "github.run_id": "4242",
        "github.run_attempt": "2",
        "github.sha": "a" * 40,
        "github.ref": "refs/heads/main",
        "github.actor": "octocat",
        "github.run_url": "https://github.com/acme/phi-publish/actions/runs/4242",
    }
    assert {k: v for k, v in tags_inside.items() if k.startswith("github.")} == expected
    assert "ghs_secretvalue" not in json.dumps(tags_inside)
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_deployments_cli_publishes_updates_and_deletes(
    untrained_phi3: Path, tmp_path: Path, mlflow_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    with HubServer() as hub:
        token = hub.add_user("alice")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
        code, stdout, err = run_cli(
            "quantize",
            str(untrained_phi3),
            "--precision",
            "Q8_0",
            "--output",
            str(tmp_path / "out"),
            "--json",
            "--experiment",
            "plugin-test",
        )
        assert code == 0 and stdout.strip(), (stdout, err)
        manifest = json.loads((Path(json.loads(stdout)[0]["path"]) / "manifest.json").read_text())
        from hubquant.tracking import variant_runs

        run_id = variant_runs(mlflow_server.url, [manifest["cache_key"]])[manifest["cache_key"]]
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": mlflow_server.url,
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": token,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HUBQUANT_HUB_RETRY_WAIT": "0.05",
        }

        def mlflow_cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run(
                [sys.executable, "-m", "mlflow", "deployments", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )

        repo = "alice/untrained-phi3-GGUF"
        created = mlflow_cli(
            "create",
            "-t",
            "huggingface",
            "--name",
            repo,
            "-m",
            f"runs:/{run_id}/manifest.json",
            "-C",
            "base_model=hubquant-tests/untrained-phi3",
        )
        assert created.returncode == 0, created.stderr[-2000:]
        assert "untrained-phi3-Q8_0.gguf" in hub.files(repo) and len(hub.commits(repo)) == 2
        assert token not in created.stdout + created.stderr

        got = mlflow_cli("get", "-t", "hf", "--name", repo)
        assert got.returncode == 0 and "untrained-phi3-Q8_0.gguf" in got.stdout, got.stderr[-2000:]
        listed = mlflow_cli("list", "-t", "huggingface:/alice")
        assert listed.returncode == 0 and repo in listed.stdout, listed.stderr[-2000:]

        # update: a changed card (another base model) is one more commit with the card only.
        updated = mlflow_cli(
            "update",
            "-t",
            "huggingface",
            "--name",
            repo,
            "-m",
            f"runs:/{run_id}/manifest.json",
            "-C",
            "base_model=hubquant-tests/other",
        )
        assert updated.returncode == 0, updated.stderr[-2000:]
        assert len(hub.commits(repo)) == 3 and "hubquant-tests/other" in hub.files(repo)["README.md"].decode()

        from mlflow import MlflowClient

        tags = MlflowClient(tracking_uri=mlflow_server.url).get_run(run_id).data.tags
        assert tags["hf.repo_id"] == repo and len(tags["hf.commit"]) == 40

        refused = mlflow_cli("delete", "-t", "huggingface", "--name", repo)
        assert refused.returncode != 0 and "confirm" in refused.stderr and repo in hub.state.repos
        deleted = mlflow_cli("delete", "-t", "huggingface", "--name", repo, "-C", f"confirm={repo}")
        assert deleted.returncode == 0, deleted.stderr[-2000:]
        assert repo not in hub.state.repos

        unsupported = mlflow_cli("run-local", "-t", "huggingface", "--name", "x", "-m", f"runs:/{run_id}/m")
        assert unsupported.returncode != 0 and "not supported" in unsupported.stderr
