"""Plays GitHub Actions for tests/test_workflows.py, so a workflow is tested as GitHub would run it.

Each job gets what a fresh runner gives it: an empty workspace, its own Python (a virtual environment
that sees the test machine's packages, so installs resolve offline, but holds no hubquant until a
step installs one), the ``GITHUB_*`` variables and files (``GITHUB_OUTPUT``, ``GITHUB_ENV``,
``GITHUB_STEP_SUMMARY``), ``env:`` of workflow, job and step with their ``${{ }}`` expressions
resolved, and an OIDC token service (a loopback server issuing tokens with GitHub's claims) only when
the job's permissions include ``id-token: write``. The actions the workflows use are played too:
``actions/checkout`` (from local git repositories named ``owner/name``, wiping a non-empty workspace as
the real one does), ``setup-python`` (checks its cache's dependency file exists), ``cache`` (a miss),
``upload-artifact``/``download-artifact`` (a local store; hidden files are left out as v4 does).

What it does not know it refuses — an expression it cannot evaluate, an action it does not play, an
input the called workflow does not declare, a permission the caller did not grant — so a workflow
change that needs more of GitHub fails here loudly instead of passing untested.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
LEVELS = {"none": 0, "read": 1, "write": 2}


class WorkflowFailure(AssertionError):
    """A job could not start or a step failed, with what GitHub's log would show."""


def parse_workflow(text: str) -> dict[str, Any]:
    data = yaml.safe_load(text)
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def _git(*args: str, cwd: Path | None = None) -> str:
    completed = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    if completed.returncode:
        raise WorkflowFailure(f"git {' '.join(args)}: {completed.stderr.strip()}")
    return completed.stdout.strip()


class GitHub:
    """Repositories by ``owner/name`` (local git repositories) and the artifact store of one run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.repositories: dict[str, Path] = {}
        self.artifacts = root / "artifacts"
        self.artifacts.mkdir(parents=True, exist_ok=True)

    def create_repository(self, name: str, files: dict[str, Path | str]) -> str:
        """A repository whose one commit holds ``files`` (repository path → local file or text); its sha."""
        path = self.root / "repositories" / name
        path.mkdir(parents=True)
        for relative, content in files.items():
            target = path / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copy2(content, target)
            else:
                target.write_text(content)
        _git("init", "-q", "-b", "main", cwd=path)
        _git("add", "-A", cwd=path)
        _git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "init", cwd=path)
        self.repositories[name] = path
        return _git("rev-parse", "HEAD", cwd=path)

    def tag(self, name: str, tag: str) -> None:
        _git("tag", tag, cwd=self.repositories[name])


@dataclass
class Call:
    """How the workflow was started: GitHub's ``github`` context is the caller's (or the dispatcher's)
    repository, while the OIDC token names the workflow file's own repository and commit."""

    event: str  # workflow_dispatch | workflow_call
    repository: str  # github.repository
    sha: str  # github.sha
    ref: str  # github.ref
    workflow_repository: str
    workflow_sha: str
    workflow_ref: str
    workflow_path: str = ".github/workflows/publish.yml"
    inputs: dict[str, Any] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    #: The caller job's permissions (workflow_call only): the most a called job may have.
    granted: dict[str, str] | None = None


class _OidcServer:
    """GitHub's ID-token endpoint on 127.0.0.1: ``GET <url>&audience=…`` with the request bearer token
    returns ``{"value": <JWT>}`` whose claims are the job's (unsigned: nothing here verifies it)."""

    def __init__(self) -> None:
        self.claims: dict[str, Any] = {}
        self.request_token = hashlib.sha256(os.urandom(16)).hexdigest()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                query = parse_qs(urlparse(self.path).query)
                if self.headers.get("Authorization") != f"bearer {outer.request_token}":
                    self.send_error(401)
                    return
                claims = {**outer.claims, "aud": query.get("audience", [""])[0]}
                parts = [{"alg": "RS256", "typ": "JWT"}, claims]
                encoded = [base64.urlsafe_b64encode(json.dumps(p).encode()).rstrip(b"=").decode() for p in parts]
                body = json.dumps({"value": ".".join([*encoded, "c2lnbmF0dXJl"])}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/token?api-version=2.0"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class JobOutcome:
    outputs: dict[str, Any]
    summary: str
    workspace: Path
    python: Path


def evaluate(text: Any, contexts: dict[str, Any], workspace: Path | None = None) -> Any:
    """Resolve ``${{ }}`` in a value: a whole-value expression keeps its type, an embedded one becomes text."""
    if not isinstance(text, str):
        return text
    whole = EXPRESSION.fullmatch(text.strip())
    if whole:
        return _expression(whole.group(1), contexts, workspace)
    return EXPRESSION.sub(lambda m: _text(_expression(m.group(1), contexts, workspace)), text)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _expression(expression: str, contexts: dict[str, Any], workspace: Path | None) -> Any:
    call = re.fullmatch(r"hashFiles\('([^']+)'\)", expression)
    if call:
        files = sorted((workspace or Path()).glob(call.group(1)))
        digest = hashlib.sha256(b"".join(hashlib.sha256(f.read_bytes()).digest() for f in files if f.is_file()))
        return digest.hexdigest() if files else ""
    if not re.fullmatch(r"[A-Za-z_][\w-]*(\.[\w-]+)*", expression):
        raise WorkflowFailure(f"actions_runner cannot evaluate `{expression}`: teach it, or simplify the workflow")
    value: Any = contexts
    for part in expression.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def python_environment(where: Path) -> Path:
    """A fresh Python for one job: a virtual environment over the test machine's packages, without
    hubquant (the machine's own copy is hidden from it); returns its ``bin`` folder."""
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(where)], check=True, timeout=120
    )
    return where / "bin"


def _job_path(bin_dir: Path) -> str:
    """PATH of a job: its Python first, and no folder that holds the machine's own ``hubquant`` command."""
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "hubquant").exists()]
    return os.pathsep.join([str(bin_dir), *keep])


class Runner:
    """Runs the jobs of one workflow run, one at a time, each on a fresh 'runner' under ``work``."""

    def __init__(self, github: GitHub, workflow: dict[str, Any], call: Call, *, work: Path, env: dict[str, str]):
        self.github, self.workflow, self.call, self.work, self.base_env = github, workflow, call, work, env
        self.inputs = self._inputs()
        self.oidc = _OidcServer()
        self._jobs = 0

    def close(self) -> None:
        self.oidc.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _inputs(self) -> dict[str, Any]:
        declared = self.workflow["on"][self.call.event].get("inputs", {})
        unknown = set(self.call.inputs) - set(declared)
        if unknown:
            raise WorkflowFailure(f"Invalid input, {sorted(unknown)[0]} is not defined in the referenced workflow.")
        if self.call.event == "workflow_call":
            secrets = self.workflow["on"]["workflow_call"].get("secrets", {})
            extra = set(self.call.secrets) - set(secrets)
            if extra:
                raise WorkflowFailure(f"Invalid secret, {sorted(extra)[0]} is not defined in the referenced workflow.")
        inputs = {}
        for name, spec in declared.items():
            if name in self.call.inputs:
                inputs[name] = self.call.inputs[name]
            elif spec.get("required"):
                raise WorkflowFailure(f"Input required and not supplied: {name}")
            else:
                inputs[name] = spec.get("default", False if spec.get("type") == "boolean" else "")
        return inputs

    def _permissions(self, job_id: str, job: dict[str, Any]) -> dict[str, str]:
        asked = job.get("permissions", self.workflow.get("permissions", {}))
        if self.call.granted is not None:
            for scope, level in asked.items():
                allowed = self.call.granted.get(scope, "none")
                if LEVELS[level] > LEVELS[allowed]:
                    raise WorkflowFailure(
                        f"The nested job '{job_id}' is requesting '{scope}: {level}', "
                        f"but is only allowed '{scope}: {allowed}'."
                    )
        return asked

    def run_job(
        self, job_id: str, *, matrix: dict[str, Any] | None = None, needs: dict[str, dict[str, Any]] | None = None
    ) -> JobOutcome:
        job = self.workflow["jobs"][job_id]
        permissions = self._permissions(job_id, job)
        self._jobs += 1
        home = self.work / f"{self._jobs:02d}-{job_id}"
        workspace, temp, files = home / "workspace", home / "temp", home / "files"
        for folder in (workspace, temp, files):
            folder.mkdir(parents=True)
        python = python_environment(home / "python")
        call = self.call
        contexts: dict[str, Any] = {
            "inputs": self.inputs,
            "secrets": {**call.secrets, "GITHUB_TOKEN": "ghs_fake"},
            "matrix": matrix or {},
            "needs": {name: {"outputs": outputs, "result": "success"} for name, outputs in (needs or {}).items()},
            "steps": {},
            "github": {"repository": call.repository, "sha": call.sha, "ref": call.ref, "workspace": str(workspace)},
            "runner": {"os": "Linux", "temp": str(temp)},
        }
        env = {
            **self.base_env,
            "PATH": _job_path(python),
            "CI": "true",
            "GITHUB_ACTIONS": "true",
            "GITHUB_EVENT_NAME": call.event,
            "GITHUB_REPOSITORY": call.repository,
            "GITHUB_SHA": call.sha,
            "GITHUB_REF": call.ref,
            "GITHUB_WORKSPACE": str(workspace),
            "GITHUB_WORKFLOW_REF": f"{call.repository}/{call.workflow_path}@{call.ref}",
            "RUNNER_TEMP": str(temp),
            "RUNNER_OS": "Linux",
            "RUNNER_ENVIRONMENT": "self-hosted",
        }
        for scope in (self.workflow.get("env", {}), job.get("env", {})):
            env.update({k: _text(evaluate(v, {**contexts, "env": env})) for k, v in scope.items()})
        if permissions.get("id-token") == "write":
            self.oidc.claims = {
                "repository": call.repository,
                "ref": call.ref,
                "sha": call.sha,
                "workflow_ref": f"{call.repository}/{call.workflow_path}@{call.ref}",
                "job_workflow_ref": f"{call.workflow_repository}/{call.workflow_path}@{call.workflow_ref}",
                "job_workflow_sha": call.workflow_sha,
            }
            env["ACTIONS_ID_TOKEN_REQUEST_URL"] = self.oidc.url
            env["ACTIONS_ID_TOKEN_REQUEST_TOKEN"] = self.oidc.request_token
        summary = []
        for number, step in enumerate(job["steps"]):
            contexts["env"] = env
            if "if" in step and not evaluate(step["if"], contexts, workspace):
                continue
            step_env = {**env, **{k: _text(evaluate(v, contexts, workspace)) for k, v in step.get("env", {}).items()}}
            if "uses" in step:
                given = {k: evaluate(v, contexts, workspace) for k, v in step.get("with", {}).items()}
                self._action(step["uses"], given, workspace, contexts)
                continue
            outputs, added, text = self._run(step, number, step_env, workspace, files)
            if step.get("id"):
                contexts["steps"][step["id"]] = {"outputs": outputs}
            env.update(added)
            summary.append(text)
        outputs = {k: evaluate(v, contexts, workspace) for k, v in job.get("outputs", {}).items()}
        return JobOutcome(outputs=outputs, summary="".join(summary), workspace=workspace, python=python)

    def _run(
        self, step: dict[str, Any], number: int, env: dict[str, str], workspace: Path, files: Path
    ) -> tuple[dict[str, str], dict[str, str], str]:
        paths = {name: files / f"{number:02d}-{name}" for name in ("output", "env", "summary")}
        for path in paths.values():
            path.touch()
        env = {
            **env,
            "GITHUB_OUTPUT": str(paths["output"]),
            "GITHUB_ENV": str(paths["env"]),
            "GITHUB_STEP_SUMMARY": str(paths["summary"]),
        }
        script = files / f"{number:02d}-script.sh"
        script.write_text(step["run"])
        # GitHub's default shell on Linux when none is named: `bash -e {0}`.
        completed = subprocess.run(
            ["bash", "-e", str(script)],
            cwd=workspace / step.get("working-directory", "."),
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if completed.returncode:
            raise WorkflowFailure(
                f"step {step.get('name', step['run'][:40])!r} exited {completed.returncode}:\n"
                f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
            )
        return _pairs(paths["output"]), _pairs(paths["env"]), paths["summary"].read_text()

    def _action(self, uses: str, given: dict[str, Any], workspace: Path, contexts: dict[str, Any]) -> None:
        name = uses.split("@")[0]
        if name == "actions/checkout":
            self._checkout(given, workspace, contexts)
        elif name == "actions/setup-python":
            if given.get("cache"):
                pattern = given.get("cache-dependency-path", "**/requirements.txt")
                if not list(workspace.glob(pattern)):
                    raise WorkflowFailure(
                        f"setup-python: No file in {workspace} matched to [{pattern}], "
                        "make sure you have checked out the target repository"
                    )
        elif name == "actions/cache":
            pass  # a cache miss: the job does the work
        elif name == "actions/upload-artifact":
            self._upload(given, workspace)
        elif name == "actions/download-artifact":
            self._download(given, workspace)
        else:
            raise WorkflowFailure(f"actions_runner does not play {uses}")

    def _checkout(self, given: dict[str, Any], workspace: Path, contexts: dict[str, Any]) -> None:
        repository = given.get("repository") or contexts["github"]["repository"]
        ref = given.get("ref") or contexts["github"]["sha"]
        if repository not in self.github.repositories:
            raise WorkflowFailure(f"checkout: repository {repository!r} not found")
        target = (workspace / given.get("path", ".")).resolve()
        if target == workspace.resolve():
            # The real action empties a workspace that is not already this repository's clone.
            for item in list(workspace.iterdir()):
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        elif target.exists():
            shutil.rmtree(target)
        _git("clone", "-q", str(self.github.repositories[repository]), str(target))
        _git("checkout", "-q", "--detach", ref, cwd=target)

    def _upload(self, given: dict[str, Any], workspace: Path) -> None:
        store = self.github.artifacts / given["name"]
        if store.exists():
            raise WorkflowFailure(f"upload-artifact: an artifact named {given['name']!r} already exists")
        source = workspace / given["path"]
        found = [p for p in source.rglob("*") if p.is_file() and not _hidden(p.relative_to(source))]
        if not found:
            if given.get("if-no-files-found", "warn") == "error":
                raise WorkflowFailure(f"upload-artifact: no files were found with the provided path: {given['path']}")
            return
        for path in found:  # v4 leaves hidden files out (include-hidden-files: false)
            target = store / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)

    def _download(self, given: dict[str, Any], workspace: Path) -> None:
        target = workspace / given.get("path", ".")
        names = sorted(p.name for p in self.github.artifacts.iterdir())
        for name in fnmatch.filter(names, given.get("pattern", "*")):
            destination = target if given.get("merge-multiple") else target / name
            shutil.copytree(self.github.artifacts / name, destination, dirs_exist_ok=True)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _pairs(path: Path) -> dict[str, str]:
    """``name=value`` lines, as GITHUB_OUTPUT and GITHUB_ENV are read; the multi-line ``name<<DELIMITER``
    form is refused (no step here writes it: teach this runner before one does)."""
    pairs: dict[str, str] = {}
    for line in path.read_text().splitlines():
        name, equals, value = line.partition("=")
        if not equals or "<<" in name:
            raise WorkflowFailure(f"actions_runner cannot read {line!r} from {path.name}: teach it the form")
        pairs[name] = value
    return pairs
