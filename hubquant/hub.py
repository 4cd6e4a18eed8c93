"""Publishing to the Hugging Face Hub, through ``huggingface_hub`` only.

Layout follows each ecosystem's convention (names are templates the user can override):

- GGUF: one repo ``{model}-GGUF`` with every quant file at the top (``{Model}-{QTYPE}.gguf``);
- ONNX: one repo ``{model}-onnx`` with a folder per target/precision (``cpu-int4-rtn-block-32-acc-level-4/``);
- OpenVINO: one repo per variant ``{model}-{variant}-ov`` (``Phi-3.5-mini-instruct-int4-ov``);
- MLX: one repo per variant ``{model}-{variant}`` (``Phi-3.5-mini-instruct-4bit``).

Each repo gets one commit holding all its files and its card, so it is never seen half-updated.
Before committing, the local sha256 of every file is compared with what the repo already holds
(LFS oids, git blob ids for small files): unchanged files are not sent, and a repo with nothing
new gets no commit at all. The commit names the head it was planned against (``parent_commit``):
when someone else committed in between, the Hub refuses it (412) and the push is planned again on
the new head instead of overwriting it. A commit that fails on the way (network, 5xx) is retried
with back-off, but only after checking that it did not land anyway — every commit carries a push id
in its description, looked for in the branch's log (or the open pull requests' with ``create_pr``) —
so an answer lost on the way back never becomes a second commit or a second pull request. The Hub's
refusals (4xx) are reported with its own message and never retried. A commit lands whole or leaves
the repo as it was, and a re-run uploads only what the Hub does not hold yet.

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
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubquant.errors import HubError, HubquantError, redact
from hubquant.faults import checkpoint
from hubquant.repos import RepoPlan

log = logging.getLogger(__name__)

#: Attempts at one commit, and the first wait between them (doubled each time).
COMMIT_ATTEMPTS = 4
#: Plans of one repo's commit when others keep committing to it in between.
PLAN_ATTEMPTS = 3
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
    server_message = getattr(exc, "server_message", None)
    if status is not None and 400 <= status < 500 and server_message:
        detail = redact(" ".join(str(server_message).split()))  # the Hub's own words
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


def _transient(exc: BaseException) -> bool:
    """Worth retrying: the network, a 5xx or 429 answer — never the Hub's refusal of the request itself."""
    status = _http_status(exc)
    if status is None:
        return not isinstance(exc, (ValueError, HubquantError))
    return status >= 500 or status == 429


def _retrying(
    call: Callable[[], Any],
    *,
    what: str,
    repo_id: str,
    endpoint: str,
    progress: Callable[[str], None],
    landed: Callable[[], Any] | None = None,
) -> Any:
    """Run ``call``, retrying network failures and 5xx answers with back-off (bounded).

    With ``landed``, a failed attempt is first asked whether it took effect anyway (a commit whose
    answer was lost): what ``landed`` returns, unless None, is the result and nothing is retried.
    """
    wait = float(os.environ.get("HUBQUANT_HUB_RETRY_WAIT", "2"))
    for attempt in range(1, COMMIT_ATTEMPTS + 1):
        try:
            return call()
        except _Conflict:
            raise
        except Exception as exc:  # noqa: BLE001 - classified below
            if _transient(exc) and landed is not None and (found := landed()) is not None:
                progress(f"{repo_id}: the commit landed although its answer was lost; not committing again")
                return found
            if not _transient(exc) or attempt == COMMIT_ATTEMPTS:
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


class _Conflict(Exception):
    """The branch moved between listing it and committing (the Hub answered 412)."""


def _push_repo(plan: RepoPlan, target: _Target, known: dict[Path, str]) -> PushResult:
    repo_id, api = plan.repo_id, target.api
    target.progress(f"{repo_id}: creating the repo (or finding it)")
    target.retrying(
        functools.partial(api.create_repo, repo_id, private=target.private, exist_ok=True),
        what="creating",
        repo_id=repo_id,
    )
    push_id = f"hubquant-push: {uuid.uuid4().hex}"
    for _ in range(PLAN_ATTEMPTS):
        parent, remote = target.retrying(
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
        try:
            oid, commit_url, pr_url = _commit(plan, target, operations, parent=parent, push_id=push_id)
        except _Conflict:
            target.progress(f"{repo_id}: someone committed to it since it was listed; planning again on the new head")
            continue
        return PushResult(repo_id, plan.url, oid, commit_url, pr_url, uploaded, unchanged, size)
    raise HubError(
        f"{repo_id} kept changing while hubquant committed to it ({PLAN_ATTEMPTS} plans, each overtaken)",
        hint="nothing of this push was committed; run the same command again when the other writer is done",
    )


def _commit(
    plan: RepoPlan, target: _Target, operations: list[Any], *, parent: str | None, push_id: str
) -> tuple[str, str | None, str | None]:
    """One commit on top of ``parent`` (raises _Conflict when the branch moved): (oid, url, PR url)."""
    repo_id, api = plan.repo_id, target.api

    def attempt() -> tuple[str, str | None, str | None]:
        checkpoint("hub-committing")
        try:
            info = api.create_commit(
                repo_id,
                operations,
                commit_message=plan.commit_message(),
                commit_description=f"Built, evaluated and published by hubquant.\n\n{push_id}",
                revision=target.revision,
                create_pr=target.create_pr,
                parent_commit=parent,
            )
        except Exception as exc:
            if _http_status(exc) == 412:
                raise _Conflict from None
            raise
        return info.oid, info.commit_url, info.pr_url

    def landed() -> tuple[str, str | None, str | None] | None:
        check = functools.partial(_landed, api, repo_id, target, push_id)
        return target.retrying(check, what="checking the last commit of", repo_id=repo_id)

    return _retrying(
        attempt,
        what="committing to",
        repo_id=repo_id,
        endpoint=target.endpoint,
        progress=target.progress,
        landed=landed,
    )


def _landed(api: Any, repo_id: str, target: _Target, push_id: str) -> tuple[str, str | None, str | None] | None:
    """The commit carrying ``push_id`` when it is on the branch (or an open pull request's), else None."""
    from huggingface_hub.errors import RevisionNotFoundError

    endpoint = target.endpoint
    if target.create_pr:
        refs = api.list_repo_refs(repo_id, include_pull_requests=True).pull_requests or []
        for ref in refs:
            if any(push_id in commit.message for commit in api.list_repo_commits(repo_id, revision=ref.ref)[:1]):
                number = ref.ref.rsplit("/", 1)[-1]
                url = f"{endpoint}/{repo_id}/commit/{ref.target_commit}"
                return ref.target_commit, url, f"{endpoint}/{repo_id}/discussions/{number}"
        return None
    try:
        recent = api.list_repo_commits(repo_id, revision=target.revision or "main")[:20]
    except RevisionNotFoundError:
        return None
    for commit in recent:
        if push_id in commit.message:
            return commit.commit_id, f"{endpoint}/{repo_id}/commit/{commit.commit_id}", None
    return None


def _remote_files(api: Any, repo_id: str, revision: str | None) -> tuple[str | None, dict[str, tuple[str | None, str]]]:
    """The branch's head commit, and path → (LFS sha256 or None, git blob id) of every file it holds.

    The files are listed at that very commit, so the plan and the ``parent_commit`` agree.
    """
    from huggingface_hub.errors import RevisionNotFoundError
    from huggingface_hub.hf_api import RepoFile

    try:
        head = api.model_info(repo_id, revision=revision).sha
        entries = list(api.list_repo_tree(repo_id, recursive=True, revision=head or revision))
    except RevisionNotFoundError:
        return None, {}  # a new branch: everything is new
    return head, {
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
