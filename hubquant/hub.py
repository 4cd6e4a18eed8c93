"""Publishing to the Hugging Face Hub, through ``huggingface_hub`` only.

Layout follows each ecosystem's convention (names are templates the user can override):

- GGUF: one repo ``{model}-GGUF`` with every quant file at the top (``{Model}-{QTYPE}.gguf``);
- ONNX: one repo ``{model}-onnx`` with a folder per target/precision (``cpu-int4-rtn-block-32-acc-level-4/``);
- OpenVINO: one repo per variant ``{model}-{variant}-ov`` (``Phi-3.5-mini-instruct-int4-ov``);
- MLX: one repo per variant ``{model}-{variant}`` (``Phi-3.5-mini-instruct-4bit``).

Each repo gets one commit holding all its files and its card, so it is never seen half-updated.
Before committing, the local sha256 of every file is compared with what the repo already holds
(LFS oids, git blob ids for small files): unchanged files are not sent, and a repo with nothing
new gets no commit at all. The commit itself is retried with back-off; it either lands whole or
leaves the repo as it was, and a re-run uploads only what the Hub does not hold yet.

Without a token, or with ``dry_run``, everything that would be uploaded is staged under a local
folder (one sub-folder per repo with the exact files, the rendered card and ``commit-plan.json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubquant.artifact import MANIFEST, Artifact, load_artifact
from hubquant.errors import HubquantError, RecipeError, redact

log = logging.getLogger(__name__)

DEFAULT_TEMPLATES = {"gguf": "{model}-GGUF", "onnx": "{model}-onnx", "openvino": "{model}-{variant}-ov",
                     "mlx": "{model}-{variant}"}
#: Files of an artifact folder that describe it rather than run it: published under ``hubquant/``.
RECORD_FILES = (MANIFEST, "eval.json")
CHART = "hubquant-tradeoff.png"
#: Attempts at one commit, and the first wait between them (doubled each time).
COMMIT_ATTEMPTS = 4
SMALL_FILE = 10 * 1024 * 1024
HUB_ID_PATTERN = re.compile(r"^[\w.-]+/[\w.-]+$")


class HubError(HubquantError):
    """Publishing failed; the hint says what to do. The repo is left as it was."""


@dataclass
class VariantFiles:
    artifact: Artifact
    location: str  # the file (GGUF) or folder (ONNX) in the repo, "." for one-variant repos
    files: list[tuple[Path, str]]  # local path → path in repo

    @property
    def format(self) -> str:
        return self.artifact.format

    @property
    def precision(self) -> str:
        return self.artifact.precision

    @property
    def folder(self) -> str:
        return self.artifact.path.name

    @property
    def label(self) -> str:
        name = self.folder
        return name[len(self.format) + 1:] if name.startswith(self.format + "-") else name

    @property
    def manifest(self) -> dict[str, Any]:
        return self.artifact.manifest

    @property
    def evaluation(self) -> dict[str, Any] | None:
        path = self.artifact.path / "eval.json"
        try:
            return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except ValueError:
            return None


@dataclass
class RepoPlan:
    repo_id: str
    format: str
    variants: list[VariantFiles]
    endpoint: str
    #: Files made for the repo (card, chart, records): path in repo → bytes.
    generated: dict[str, bytes] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{self.endpoint.rstrip('/')}/{self.repo_id}"

    def all_files(self) -> list[tuple[str, Path | bytes]]:
        """Every (path in repo, content) of the commit, sorted by path."""
        items: dict[str, Path | bytes] = {}
        for variant in self.variants:
            for local, remote in variant.files:
                items[remote] = local
        items.update(self.generated)
        return sorted(items.items())

    def commit_message(self) -> str:
        return f"hubquant: {', '.join(v.label for v in self.variants)}"


@dataclass
class PushResult:
    repo_id: str
    url: str
    commit: str | None
    commit_url: str | None
    pr_url: str | None
    uploaded: list[str]
    unchanged: list[str]
    uploaded_bytes: int
    staged: Path | None = None

    def summary(self) -> dict[str, Any]:
        return {"repo_id": self.repo_id, "url": self.url, "commit": self.commit, "commit_url": self.commit_url,
                "pr_url": self.pr_url, "uploaded": self.uploaded, "unchanged": len(self.unchanged),
                "uploaded_bytes": self.uploaded_bytes, "staged": str(self.staged) if self.staged else None}


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _variant_name(artifact: Artifact) -> str:
    name = artifact.path.name
    prefix = artifact.format + "-"
    variant = name[len(prefix):] if name.startswith(prefix) else name
    return variant.replace("-g64", "") if artifact.format == "mlx" else variant


def plan_repos(artifacts: list[Artifact], *, namespace: str, templates: dict[str, str] | None = None,
               repo_id: str | None = None, endpoint: str | None = None) -> list[RepoPlan]:
    """Group artifacts into repos by the ecosystem conventions (or ``repo_id`` for all of them).

    Raises:
        RecipeError: a template names an unknown field, artifacts of several sources, two
            variants that would write the same file, or ``repo_id`` for several formats.
    """
    if not artifacts:
        raise RecipeError("nothing to publish", key="artifacts", hint="pass artifact folders written by 'hubquant quantize'")
    fingerprints = {a.manifest.get("source", {}).get("fingerprint") for a in artifacts}
    if len(fingerprints) > 1:
        raise RecipeError("the artifacts come from different source models", key="artifacts",
                          hint="publish one source model at a time")
    names = dict(DEFAULT_TEMPLATES, **(templates or {}))
    endpoint = endpoint or hub_endpoint()
    plans: dict[str, RepoPlan] = {}
    for artifact in artifacts:
        fmt = artifact.format
        fields = {"model": artifact.manifest["source"].get("name", "model"), "format": fmt,
                  "precision": artifact.precision, "variant": _variant_name(artifact)}
        if repo_id:
            target = repo_id
        else:
            try:
                target = f"{namespace}/{names[fmt].format(**fields)}"
            except (KeyError, IndexError) as exc:
                raise RecipeError(f"repo name template '{names.get(fmt)}' uses an unknown field {exc}",
                                  key="repo_name", allowed=sorted(fields)) from None
        plan = plans.setdefault(target, RepoPlan(repo_id=target, format=fmt, variants=[], endpoint=endpoint))
        if plan.format != fmt:
            raise RecipeError(f"repo {target} would mix {plan.format} and {fmt} variants", key="repo_id",
                              hint="publish one format per repo (leave --repo-id out to use the conventions)")
        plan.variants.append(VariantFiles(artifact=artifact, location="", files=[]))
    for plan in plans.values():
        shared = len(plan.variants) > 1 or plan.format in ("gguf", "onnx")
        for variant in plan.variants:
            folder = variant.artifact.path
            runnable = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in RECORD_FILES
                              and not p.name.startswith("."))
            if plan.format == "onnx":
                sub = variant.label.removeprefix("onnx-") if variant.label.startswith("onnx-") else variant.label
                variant.location = sub
                variant.files = [(p, f"{sub}/{p.relative_to(folder).as_posix()}") for p in runnable]
            elif plan.format == "gguf":
                variant.files = [(p, p.relative_to(folder).as_posix()) for p in runnable]
                variant.location = variant.files[0][1] if variant.files else variant.folder
            elif shared:
                variant.location = variant.label
                variant.files = [(p, f"{variant.label}/{p.relative_to(folder).as_posix()}") for p in runnable]
            else:
                variant.location = "."
                variant.files = [(p, p.relative_to(folder).as_posix()) for p in runnable]
        seen: dict[str, str] = {}
        for variant in plan.variants:
            for _, remote in variant.files:
                if remote in seen and seen[remote] != variant.folder:
                    raise RecipeError(f"{seen[remote]} and {variant.folder} would both write {remote} in {plan.repo_id}",
                                      key="artifacts", hint="publish them to different repos")
                seen[remote] = variant.folder
    return list(plans.values())


def _public_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without local paths (a published file must not reveal the builder's disk)."""
    clean = json.loads(json.dumps(manifest))
    source = clean.get("source", {})
    source.pop("path", None)
    if source.get("id") and not source.get("revision"):  # a local folder: its path stays private
        source["id"] = source.get("name")
    return clean


def render(plans: list[RepoPlan], *, base_model: str | None, chart: Path | None = None,
           mlflow_runs: dict[str, str] | None = None, license_name: str | None = None,
           license_link: str | None = None) -> None:
    """Fill every plan's generated files: README.md (the card), the chart, the records."""
    from hubquant.card import CardContext, build_card

    ci_url = None
    if os.environ.get("GITHUB_ACTIONS") == "true" and os.environ.get("GITHUB_RUN_ID"):
        ci_url = (f"{os.environ.get('GITHUB_SERVER_URL', 'https://github.com')}/"
                  f"{os.environ.get('GITHUB_REPOSITORY', '')}/actions/runs/{os.environ['GITHUB_RUN_ID']}")
    for plan in plans:
        source = _public_manifest(plan.variants[0].manifest)["source"]
        context = CardContext(source=source, base_model=base_model, siblings=plans,
                              chart_path=CHART if chart else None, mlflow_runs=mlflow_runs or {},
                              ci_run_url=ci_url, license_name=license_name, license_link=license_link)
        card = build_card(plan, context)
        plan.generated["README.md"] = str(card).encode("utf-8")
        if chart:
            plan.generated[CHART] = chart.read_bytes()
        for variant in plan.variants:
            records = f"hubquant/{variant.folder}"
            plan.generated[f"{records}/{MANIFEST}"] = (json.dumps(_public_manifest(variant.manifest), indent=2) + "\n").encode()
            if variant.evaluation is not None:
                evaluation = dict(variant.evaluation)
                evaluation["source"] = {k: v for k, v in evaluation.get("source", {}).items() if k != "path"}
                if not evaluation["source"].get("revision"):
                    evaluation["source"]["id"] = source.get("name")
                plan.generated[f"{records}/eval.json"] = (json.dumps(evaluation, indent=2) + "\n").encode()


def draw_chart(artifacts: list[Artifact], folder: Path) -> Path | None:
    """The size-vs-quality chart of every evaluated variant, or None (no evaluation, no matplotlib)."""
    from hubquant.errors import MissingDependencyError
    from hubquant.evaluate import EvalRow
    from hubquant.plot import plot_tradeoff

    rows = []
    for artifact in artifacts:
        path = artifact.path / "eval.json"
        if not path.is_file():
            continue
        evaluation = json.loads(path.read_text(encoding="utf-8"))
        if not rows:
            rows.append(EvalRow(label="original", format="pytorch", precision=evaluation["source"].get("dtype", ""),
                                metrics=evaluation["reference"], path="", reference=True,
                                gate={"passed": True, "reasons": []}, options={}, warnings=[]))
        rows.append(EvalRow(label=evaluation["variant"]["label"], format=artifact.format,
                            precision=artifact.precision, metrics=evaluation["metrics"], path=str(artifact.path),
                            reference=False, gate=evaluation.get("gate") or {"passed": True, "reasons": []},
                            options=evaluation["variant"].get("options", {}), warnings=[]))
    if len(rows) < 2:
        return None
    try:
        return plot_tradeoff(rows, folder / CHART, title=artifacts[0].manifest["source"].get("name", ""))
    except MissingDependencyError:
        log.info("matplotlib is not installed: the cards carry no chart")
        return None


def _sha256(content: Path | bytes) -> str:
    if isinstance(content, bytes):
        return hashlib.sha256(content).hexdigest()
    from hubquant.artifact import sha256_file

    return sha256_file(content)


def _size(content: Path | bytes) -> int:
    return len(content) if isinstance(content, bytes) else content.stat().st_size


def _git_blob_id(content: Path | bytes) -> str:
    data = content if isinstance(content, bytes) else content.read_bytes()
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


def _known_hashes(plans: list[RepoPlan]) -> dict[Path, str]:
    """sha256 of artifact files from their manifests (hashed once, when the artifact was written)."""
    known = {}
    for plan in plans:
        for variant in plan.variants:
            for entry in variant.manifest.get("files", []):
                known[variant.artifact.path / entry["path"]] = entry["sha256"]
    return known


def stage(plans: list[RepoPlan], folder: Path, *, private: bool, revision: str | None, create_pr: bool) -> list[PushResult]:
    """Write exactly what a push would send under ``folder/<namespace>/<repo>/`` (atomically per repo)."""
    folder.mkdir(parents=True, exist_ok=True)
    known = _known_hashes(plans)
    results = []
    for plan in plans:
        target = folder / plan.repo_id
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        files = []
        try:
            for remote, content in plan.all_files():
                destination = tmp / "files" / remote
                destination.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, bytes):
                    destination.write_bytes(content)
                else:
                    try:
                        os.link(content, destination)
                    except OSError:
                        shutil.copy2(content, destination)
                files.append({"path": remote, "size": _size(content),
                              "sha256": known.get(content) if isinstance(content, Path) and content in known
                              else _sha256(content)})
            (tmp / "commit-plan.json").write_text(json.dumps({
                "repo_id": plan.repo_id, "url": plan.url, "private": private, "revision": revision or "main",
                "create_pr": create_pr, "commit_message": plan.commit_message(),
                "variants": [v.folder for v in plan.variants], "files": files}, indent=2) + "\n")
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        results.append(PushResult(repo_id=plan.repo_id, url=plan.url, commit=None, commit_url=None, pr_url=None,
                                  uploaded=[f["path"] for f in files], unchanged=[],
                                  uploaded_bytes=sum(f["size"] for f in files), staged=target))
    return results


# -- pushing --------------------------------------------------------------------------------------

def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _translate(exc: BaseException, *, repo_id: str, endpoint: str, stage_name: str) -> HubError:
    """A huggingface_hub / network failure as one clear message with what to do."""
    status = _http_status(exc)
    text = str(exc).strip()
    detail = redact(text.splitlines()[0] if text else type(exc).__name__)
    if status is None and isinstance(exc, ValueError):
        return HubError(f"the Hub refused {stage_name} {repo_id}: {redact(' '.join(text.split()))}",
                        hint="nothing was committed; fix the cause above (for the card: --base-model must be a Hub "
                             "model id) and run the same command again")
    if status == 401:
        return HubError(f"the Hub rejected the token while {stage_name} {repo_id}",
                        hint="set HF_TOKEN to a valid token with write access (https://huggingface.co/settings/tokens)")
    if status == 403:
        return HubError(f"the token cannot write to {repo_id}",
                        hint="use a token with write access to that namespace, or publish under your own --namespace")
    if status == 404:
        return HubError(f"{repo_id} or its revision was not found while {stage_name} it ({detail})",
                        hint="check --revision, or leave it out to publish to main")
    if status is not None and status < 500:
        return HubError(f"the Hub refused {stage_name} {repo_id}: {detail}",
                        hint="nothing was committed; fix the cause above and run the same command again")
    return HubError(f"could not reach the Hub at {endpoint} while {stage_name} {repo_id}: {detail}",
                    hint="nothing was committed; run the same command again — files the Hub already holds are "
                         "not uploaded twice")


def _retrying(call: Callable[[], Any], *, what: str, repo_id: str, endpoint: str,
              progress: Callable[[str], None]) -> Any:
    """Run ``call``, retrying network failures and 5xx answers with back-off (bounded)."""
    wait = float(os.environ.get("HUBQUANT_HUB_RETRY_WAIT", "2"))
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - classified below
            status = _http_status(exc)
            transient = status is None or status >= 500 or status == 429
            if isinstance(exc, (ValueError, HubquantError)) and status is None:
                transient = False
            if not transient or attempt == COMMIT_ATTEMPTS:
                raise _translate(exc, repo_id=repo_id, endpoint=endpoint, stage_name=what) from None
            progress(f"{repo_id}: {what} failed ({redact(type(exc).__name__)}); retrying in {wait:g}s "
                     f"(attempt {attempt + 1}/{COMMIT_ATTEMPTS})")
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def check_access(api: Any, namespace: str, *, endpoint: str) -> str:
    """The token's user; raises when the token is invalid, read-only or cannot write to ``namespace``."""
    try:
        info = api.whoami()
    except Exception as exc:  # noqa: BLE001
        raise _translate(exc, repo_id=namespace, endpoint=endpoint, stage_name="checking the token for") from None
    user = info.get("name", "")
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubError("the token is read-only", hint="create a token with write access at "
                                                     "https://huggingface.co/settings/tokens and set HF_TOKEN")
    writable = [user] + [org.get("name") for org in info.get("orgs", [])]
    if namespace not in writable:
        raise HubError(f"you ({user}) cannot write to the namespace '{namespace}'",
                       hint=f"publish under one you can write to: {', '.join(w for w in writable if w)}")
    return user


def push(plans: list[RepoPlan], *, token: str, private: bool = False, revision: str | None = None,
         create_pr: bool = False, collection: str | None = None,
         progress: Callable[[str], None] = lambda line: None) -> list[PushResult]:
    """Create the repos, commit what changed (one commit per repo), group them in a Collection."""
    from huggingface_hub import CommitOperationAdd, HfApi

    endpoint = plans[0].endpoint
    api = HfApi(endpoint=endpoint, token=token)
    namespaces = sorted({plan.repo_id.split("/")[0] for plan in plans})
    for namespace in namespaces:
        check_access(api, namespace, endpoint=endpoint)
    known = _known_hashes(plans)
    results = []
    for plan in plans:
        repo_id = plan.repo_id
        progress(f"{repo_id}: creating the repo (or finding it)")
        _retrying(lambda: api.create_repo(repo_id, private=private, exist_ok=True), what="creating",
                  repo_id=repo_id, endpoint=endpoint, progress=progress)
        remote = _retrying(lambda: _remote_files(api, repo_id, revision), what="listing", repo_id=repo_id,
                           endpoint=endpoint, progress=progress)
        operations, uploaded, unchanged, size = [], [], [], 0
        for path, content in plan.all_files():
            digest = known.get(content) if isinstance(content, Path) and content in known else _sha256(content)
            existing = remote.get(path)
            if existing is not None and (existing[0] == digest or (
                    existing[0] is None and _size(content) < SMALL_FILE and existing[1] == _git_blob_id(content))):
                unchanged.append(path)
                continue
            operations.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=content))
            uploaded.append(path)
            size += _size(content)
        if not operations:
            progress(f"{repo_id}: up to date — every file is already on the Hub, nothing uploaded")
            results.append(PushResult(repo_id, plan.url, None, None, None, [], unchanged, 0))
            continue
        progress(f"{repo_id}: committing {len(operations)} file(s), {size / 1e6:.1f} MB "
                 f"({len(unchanged)} unchanged file(s) skipped)")
        info = _retrying(lambda: api.create_commit(
            repo_id, operations, commit_message=plan.commit_message(),
            commit_description="Built, evaluated and published by hubquant.", revision=revision,
            create_pr=create_pr), what="committing to", repo_id=repo_id, endpoint=endpoint, progress=progress)
        results.append(PushResult(repo_id, plan.url, info.oid, info.commit_url, info.pr_url, uploaded, unchanged, size))
    if collection:
        _collect(api, plans, title=collection, endpoint=endpoint, progress=progress)
    return results


def _remote_files(api: Any, repo_id: str, revision: str | None) -> dict[str, tuple[str | None, str]]:
    """path → (LFS sha256 or None, git blob id) of every file the repo holds at ``revision``."""
    from huggingface_hub.errors import RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        entries = list(api.list_repo_tree(repo_id, recursive=True, revision=revision))
    except RevisionNotFoundError:
        return {}  # a new branch: everything is new
    return {e.path: ((e.lfs or {}).get("sha256") if isinstance(e.lfs, dict) else getattr(e.lfs, "sha256", None),
                     e.blob_id) for e in entries if isinstance(e, RepoFile)}


def _collect(api: Any, plans: list[RepoPlan], *, title: str, endpoint: str, progress: Callable[[str], None]) -> None:
    namespace = plans[0].repo_id.split("/")[0]
    try:
        collection = api.create_collection(title=title, namespace=namespace, exists_ok=True,
                                           description="Every format hubquant built from one source model.")
        for plan in plans:
            api.add_collection_item(collection.slug, item_id=plan.repo_id, item_type="model", exists_ok=True)
        progress(f"collection: {endpoint}/collections/{collection.slug}")
    except Exception as exc:  # noqa: BLE001 - the repos are published; the grouping is secondary
        progress(f"collection '{title}' could not be updated ({_translate(exc, repo_id=namespace, endpoint=endpoint, stage_name='grouping').message})")


def load_artifacts(paths: list[str | Path]) -> list[Artifact]:
    return [load_artifact(path) for path in paths]
