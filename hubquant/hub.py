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

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubquant.errors import HubError, HubquantError, redact
from hubquant.repos import RepoPlan

log = logging.getLogger(__name__)

#: Attempts at one commit, and the first wait between them (doubled each time).
COMMIT_ATTEMPTS = 4
SMALL_FILE = 10 * 1024 * 1024


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
        return {
            "repo_id": self.repo_id,
            "url": self.url,
            "commit": self.commit,
            "commit_url": self.commit_url,
            "pr_url": self.pr_url,
            "uploaded": self.uploaded,
            "unchanged": len(self.unchanged),
            "uploaded_bytes": self.uploaded_bytes,
            "staged": str(self.staged) if self.staged else None,
        }


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
            for entry in variant.manifest.files:
                known[variant.artifact.path / entry.path] = entry.sha256
    return known


def stage(
    plans: list[RepoPlan], folder: Path, *, private: bool, revision: str | None, create_pr: bool
) -> list[PushResult]:
    """Write exactly what a push would send under ``folder/<namespace>/<repo>/`` (atomically per repo)."""
    folder.mkdir(parents=True, exist_ok=True)
    known = _known_hashes(plans)
    results = []
    for plan in plans:
        target = folder / plan.repo_id
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            files = [
                _stage_file(tmp / "files" / remote, content, known) | {"path": remote}
                for remote, content in plan.all_files()
            ]
            commit_plan = {
                "repo_id": plan.repo_id,
                "url": plan.url,
                "private": private,
                "revision": revision or "main",
                "create_pr": create_pr,
                "commit_message": plan.commit_message(),
                "variants": [v.folder for v in plan.variants],
                "files": files,
            }
            (tmp / "commit-plan.json").write_text(json.dumps(commit_plan, indent=2) + "\n")
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        results.append(
            PushResult(
                repo_id=plan.repo_id,
                url=plan.url,
                commit=None,
                commit_url=None,
                pr_url=None,
                uploaded=[f["path"] for f in files],
                unchanged=[],
                uploaded_bytes=sum(f["size"] for f in files),
                staged=target,
            )
        )
    return results


def _stage_file(destination: Path, content: Path | bytes, known: dict[Path, str]) -> dict[str, Any]:
    """Put one file of a staged commit in place (a hard link when it can) and describe it."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        destination.write_bytes(content)
    else:
        try:
            os.link(content, destination)
        except OSError:
            shutil.copy2(content, destination)
    digest = known.get(content) if isinstance(content, Path) and content in known else _sha256(content)
    return {"size": _size(content), "sha256": digest}


# -- pushing --------------------------------------------------------------------------------------


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def translate_error(exc: BaseException, *, repo_id: str, endpoint: str, stage_name: str) -> HubError:
    """A huggingface_hub / network failure as one clear message with what to do."""
    status = _http_status(exc)
    text = str(exc).strip()
    detail = redact(text.splitlines()[0] if text else type(exc).__name__)
    if status is None and isinstance(exc, ValueError):
        return HubError(
            f"the Hub refused {stage_name} {repo_id}: {redact(' '.join(text.split()))}",
            hint="nothing was committed; fix the cause above (for the card: --base-model must be a Hub "
            "model id) and run the same command again",
        )
    if status == 401:
        return HubError(
            f"the Hub rejected the token while {stage_name} {repo_id}",
            hint="set HF_TOKEN to a valid token with write access (https://huggingface.co/settings/tokens)",
        )
    if status == 403:
        return HubError(
            f"the token cannot write to {repo_id}",
            hint="use a token with write access to that namespace, or publish under your own --namespace",
        )
    if status == 404:
        return HubError(
            f"{repo_id} or its revision was not found while {stage_name} it ({detail})",
            hint="check --revision, or leave it out to publish to main",
        )
    if status is not None and status < 500:
        return HubError(
            f"the Hub refused {stage_name} {repo_id}: {detail}",
            hint="nothing was committed; fix the cause above and run the same command again",
        )
    return HubError(
        f"could not reach the Hub at {endpoint} while {stage_name} {repo_id}: {detail}",
        hint="nothing was committed; run the same command again — files the Hub already holds are not uploaded twice",
    )


def _retrying(
    call: Callable[[], Any], *, what: str, repo_id: str, endpoint: str, progress: Callable[[str], None]
) -> Any:
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
                raise translate_error(exc, repo_id=repo_id, endpoint=endpoint, stage_name=what) from None
            progress(
                f"{repo_id}: {what} failed ({redact(type(exc).__name__)}); retrying in {wait:g}s "
                f"(attempt {attempt + 1}/{COMMIT_ATTEMPTS})"
            )
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


def check_access(api: Any, namespace: str, *, endpoint: str) -> str:
    """The token's user; raises when the token is invalid, read-only or cannot write to ``namespace``."""
    try:
        info = api.whoami()
    except Exception as exc:  # noqa: BLE001
        raise translate_error(exc, repo_id=namespace, endpoint=endpoint, stage_name="checking the token for") from None
    user = info.get("name", "")
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise HubError(
            "the token is read-only",
            hint="create a token with write access at https://huggingface.co/settings/tokens and set HF_TOKEN",
        )
    writable = [user] + [org.get("name") for org in info.get("orgs", [])]
    if namespace not in writable:
        raise HubError(
            f"you ({user}) cannot write to the namespace '{namespace}'",
            hint=f"publish under one you can write to: {', '.join(w for w in writable if w)}",
        )
    return user


def push(
    plans: list[RepoPlan],
    *,
    token: str,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    collection: str | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> list[PushResult]:
    """Create the repos, commit what changed (one commit per repo), group them in a Collection."""
    from huggingface_hub import HfApi

    endpoint = plans[0].endpoint
    api = HfApi(endpoint=endpoint, token=token)
    for namespace in sorted({plan.repo_id.split("/")[0] for plan in plans}):
        check_access(api, namespace, endpoint=endpoint)
    known = _known_hashes(plans)
    target = _Target(
        api=api, endpoint=endpoint, private=private, revision=revision, create_pr=create_pr, progress=progress
    )
    results = [_push_repo(plan, target, known) for plan in plans]
    if collection:
        _collect(api, plans, title=collection, endpoint=endpoint, progress=progress)
    return results


@dataclass
class _Target:
    """Where and how one push commits."""

    api: Any
    endpoint: str
    private: bool
    revision: str | None
    create_pr: bool
    progress: Callable[[str], None]

    def retrying(self, call: Callable[[], Any], *, what: str, repo_id: str) -> Any:
        return _retrying(call, what=what, repo_id=repo_id, endpoint=self.endpoint, progress=self.progress)


def _changes(
    plan: RepoPlan, remote: dict[str, tuple[str | None, str]], known: dict[Path, str]
) -> tuple[list[Any], list[str], list[str], int]:
    """The files the repo does not hold yet: operations, their paths, the unchanged paths, bytes to send."""
    from huggingface_hub import CommitOperationAdd

    operations, uploaded, unchanged, size = [], [], [], 0
    for path, content in plan.all_files():
        digest = known.get(content) if isinstance(content, Path) and content in known else _sha256(content)
        existing = remote.get(path)
        if existing is not None and (
            existing[0] == digest
            or (existing[0] is None and _size(content) < SMALL_FILE and existing[1] == _git_blob_id(content))
        ):
            unchanged.append(path)
            continue
        operations.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=content))
        uploaded.append(path)
        size += _size(content)
    return operations, uploaded, unchanged, size


def _push_repo(plan: RepoPlan, target: _Target, known: dict[Path, str]) -> PushResult:
    repo_id, api = plan.repo_id, target.api
    target.progress(f"{repo_id}: creating the repo (or finding it)")
    target.retrying(
        functools.partial(api.create_repo, repo_id, private=target.private, exist_ok=True),
        what="creating",
        repo_id=repo_id,
    )
    remote = target.retrying(
        functools.partial(_remote_files, api, repo_id, target.revision), what="listing", repo_id=repo_id
    )
    operations, uploaded, unchanged, size = _changes(plan, remote, known)
    if not operations:
        target.progress(f"{repo_id}: up to date — every file is already on the Hub, nothing uploaded")
        return PushResult(repo_id, plan.url, None, None, None, [], unchanged, 0)
    target.progress(
        f"{repo_id}: committing {len(operations)} file(s), {size / 1e6:.1f} MB "
        f"({len(unchanged)} unchanged file(s) skipped)"
    )
    commit = functools.partial(
        api.create_commit,
        repo_id,
        operations,
        commit_message=plan.commit_message(),
        commit_description="Built, evaluated and published by hubquant.",
        revision=target.revision,
        create_pr=target.create_pr,
    )
    info = target.retrying(commit, what="committing to", repo_id=repo_id)
    return PushResult(repo_id, plan.url, info.oid, info.commit_url, info.pr_url, uploaded, unchanged, size)


def _remote_files(api: Any, repo_id: str, revision: str | None) -> dict[str, tuple[str | None, str]]:
    """path → (LFS sha256 or None, git blob id) of every file the repo holds at ``revision``."""
    from huggingface_hub.errors import RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        entries = list(api.list_repo_tree(repo_id, recursive=True, revision=revision))
    except RevisionNotFoundError:
        return {}  # a new branch: everything is new
    return {
        e.path: ((e.lfs or {}).get("sha256") if isinstance(e.lfs, dict) else getattr(e.lfs, "sha256", None), e.blob_id)
        for e in entries
        if isinstance(e, RepoFile)
    }


def _collect(api: Any, plans: list[RepoPlan], *, title: str, endpoint: str, progress: Callable[[str], None]) -> None:
    namespace = plans[0].repo_id.split("/")[0]
    try:
        collection = api.create_collection(
            title=title,
            namespace=namespace,
            exists_ok=True,
            description="Every format hubquant built from one source model.",
        )
        for plan in plans:
            api.add_collection_item(collection.slug, item_id=plan.repo_id, item_type="model", exists_ok=True)
        progress(f"collection: {endpoint}/collections/{collection.slug}")
    except Exception as exc:  # noqa: BLE001 - the repos are published; the grouping is secondary
        progress(
            f"collection '{title}' could not be updated "
            f"({translate_error(exc, repo_id=namespace, endpoint=endpoint, stage_name='grouping').message})"
        )
