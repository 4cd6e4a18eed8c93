"""A loopback server that speaks the Hugging Face Hub's HTTP API, as far as the real
``huggingface_hub`` client uses it for publishing.

Covered: ``whoami-v2``, repo create (409 with the url when it exists) and delete, ``validate-yaml``,
``preupload`` (upload mode + the remote oid of unchanged files), the git-LFS batch API (basic
transfer: upload + verify, nothing to upload for objects already stored), the NDJSON ``commit``
endpoint (regular, LFS and deleted files, ``create_pr``, ``parentCommit``), model info, tree,
paths-info, ``resolve`` (HEAD and GET, with the ETag/X-Repo-Commit headers ``hf_hub_download``
reads, and a ``Range`` answered 206 as ``get_safetensors_metadata`` asks) and collections. Errors
carry the ``X-Error-Code`` headers the client maps to its
exception classes. The client must run with Xet disabled (``HF_HUB_DISABLE_XET``): this server
offers only the basic LFS transfer.

The commit log (``commits/{revision}``) and refs (``refs?include_prs=1``) answer what the client's
``list_repo_commits`` and ``list_repo_refs`` read, so a client can look for its own commit.

Faults a test can inject:
- any call fails (``server.fail("POST", r"/commit/", status=500)``; 599 drops the connection
  before the call is handled; 598 handles it — a commit lands — and then drops the connection,
  as a Hub does when its answer is lost on the way back);
- another writer acts first (``server.before("POST", r"/commit/", action)``: ``action(server)``
  runs just before the matching call is handled, e.g. ``server.commit_directly(...)``);
- LFS uploads are authorised per repo: the batch answer's upload link is signed for that repo and
  object, an unsigned or foreign link is refused (403), and a commit may only reference objects
  uploaded to its own repo (objects held for another repo are not offered as already present).

``server.calls`` holds every request the server saw (method, path, bytes received).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

#: Files whose content goes to LFS (the Hub's .gitattributes does the same by extension).
LFS_SUFFIXES = (".gguf", ".bin", ".onnx", ".data", ".safetensors", ".png", ".npz", ".model", ".msgpack")
LFS_SIZE = 10 * 1024 * 1024
KNOWN_LICENSES = {
    "mit",
    "apache-2.0",
    "bsd-3-clause",
    "cc-by-4.0",
    "cc-by-nc-4.0",
    "llama3",
    "gemma",
    "other",
    "openrail",
    "gpl-3.0",
    "unknown",
}
RELATIONS = {"adapter", "merge", "quantized", "finetune"}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


@dataclass
class StoredFile:
    data: bytes | None  # regular files keep their bytes; LFS files point into the LFS store
    size: int
    sha256: str
    lfs: bool

    @property
    def blob_id(self) -> str:
        if self.lfs:
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n"
            return git_blob_sha1(pointer.encode())
        return git_blob_sha1(self.data or b"")


@dataclass
class Repo:
    repo_id: str
    private: bool
    created: float = field(default_factory=time.time)
    #: branch (``main``, ``refs/pr/1``) → list of (commit oid, message, tree)
    branches: dict[str, list[tuple[str, str, dict[str, StoredFile]]]] = field(default_factory=dict)
    #: commit oid → its whole message (summary, blank line, description)
    messages: dict[str, str] = field(default_factory=dict)
    #: LFS objects uploaded to this repo (the bytes live in the server-wide store)
    lfs_objects: set[str] = field(default_factory=set)

    def head(self, revision: str) -> tuple[str, str, dict[str, StoredFile]] | None:
        revision = unquote(revision)
        if revision in self.branches:
            return self.branches[revision][-1]
        for commits in self.branches.values():
            for commit in commits:
                if commit[0] == revision:
                    return commit
        return None


class HubState:
    def __init__(self) -> None:
        self.tokens: dict[str, tuple[str, str]] = {}  # token → (user, role)
        self.orgs: dict[str, set[str]] = {}  # user → orgs it can write to
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.collections: dict[str, dict[str, Any]] = {}
        self.failures: list[dict[str, Any]] = []
        self.actions: list[dict[str, Any]] = []
        self.secret = uuid.uuid4().bytes  # signs LFS upload links
        self.calls: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()


class HubServer:
    """``with HubServer() as hub: HfApi(endpoint=hub.url, token=hub.add_user("alice"))``."""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("Handler", (_Handler,), {"state": self.state, "server_ref": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        handler.base_url = self.url
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

    # -- test controls ---------------------------------------------------------------------
    def add_user(self, name: str, *, role: str = "write", orgs: tuple[str, ...] = ()) -> str:
        token = f"hf_{uuid.uuid4().hex}"
        self.state.tokens[token] = (name, role)
        self.state.orgs.setdefault(name, set()).update(orgs)
        return token

    def fail(
        self, method: str, path_pattern: str, *, status: int = 500, times: int = 1, message: str = "injected failure"
    ) -> None:
        """Answer the next ``times`` matching calls with ``status`` (599 = drop the connection)."""
        self.state.failures.append(
            {
                "method": method,
                "pattern": re.compile(path_pattern),
                "status": status,
                "times": times,
                "message": message,
            }
        )

    def before(self, method: str, path_pattern: str, action: Any, *, times: int = 1) -> None:
        """Run ``action(server)`` just before the next ``times`` matching calls are handled."""
        self.state.actions.append(
            {"method": method, "pattern": re.compile(path_pattern), "action": action, "times": times}
        )

    def commit_directly(self, repo_id: str, files: dict[str, bytes], *, message: str = "another writer") -> str:
        """Commit regular files to ``main`` as someone else would (called with the server's lock held)."""
        repo = self.state.repos[repo_id]
        oid, _, tree = repo.head("main")
        new_oid = hashlib.sha1(oid.encode() + json.dumps(sorted(files)).encode() + uuid.uuid4().bytes).hexdigest()
        repo.branches["main"].append((new_oid, message, {**tree, **{p: _regular(d) for p, d in files.items()}}))
        repo.messages[new_oid] = message
        return new_oid

    def pull_requests(self, repo_id: str) -> list[str]:
        return sorted(name for name in self.state.repos[repo_id].branches if name.startswith("refs/pr/"))

    @property
    def calls(self) -> list[tuple[str, str, int]]:
        return list(self.state.calls)

    def uploaded_bytes(self) -> int:
        """Bytes of file content received (LFS PUTs and regular files inside commits)."""
        return sum(
            size
            for method, path, size in self.state.calls
            if (method == "PUT" and path.startswith("/lfs-upload/")) or "/commit/" in path
        )

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.state.repos[repo_id]
        head = repo.head(revision)
        assert head is not None
        return {path: (f.data if not f.lfs else self.state.lfs[f.sha256]) or b"" for path, f in head[2].items()}

    def commits(self, repo_id: str, revision: str = "main") -> list[str]:
        return [message for _, message, _ in self.state.repos[repo_id].branches.get(revision, [])]


class _Handler(BaseHTTPRequestHandler):
    state: HubState
    base_url: str
    server_ref: HubServer
    protocol_version = "HTTP/1.1"
    _drop_answer = False

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    # -- plumbing ------------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        return b""

    def _send(
        self,
        status: int,
        payload: Any = None,
        *,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        head: bool = False,
    ) -> None:
        if self._drop_answer:
            return self._drop()
        body = raw if raw is not None else (b"" if payload is None else json.dumps(payload).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if not head and self.command != "HEAD":  # an error answering a HEAD has no body either
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        self._send(status, {"error": message}, headers={"X-Error-Code": code} if code else None)

    def _user(self) -> tuple[str, str] | None:
        auth = self.headers.get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else None
        return self.state.tokens.get(token) if token else None

    def _can_write(self, namespace: str) -> bool:
        user = self._user()
        return bool(user and user[1] == "write" and (namespace == user[0] or namespace in self.state.orgs[user[0]]))

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        user = self._user()
        visible = repo is not None and (not repo.private or (user and self._can_read_private(repo_id)))
        if not visible:
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        if write and not self._can_write(repo_id.split("/")[0]):
            self._error(403, f"You don't have the rights to write to {repo_id}")
            return None
        return repo

    def _commit(self, repo_id: str, revision: str) -> tuple[str, str, dict[str, StoredFile]] | None:
        """The commit a read names, or None after answering 404 (no repo, or no such revision)."""
        repo = self._repo(repo_id)
        if repo is None:
            return None
        commit = repo.head(revision)
        if commit is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _can_read_private(self, repo_id: str) -> bool:
        user = self._user()
        namespace = repo_id.split("/")[0]
        return bool(user and (namespace == user[0] or namespace in self.state.orgs[user[0]]))

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        body = self._body() if method in ("POST", "PUT", "DELETE") else b""
        self._drop_answer = False
        with self.state.lock:
            self.state.calls.append((method, path, len(body)))
            for action in self.state.actions:
                if action["times"] > 0 and action["method"] == method and action["pattern"].search(path):
                    action["times"] -= 1
                    action["action"](self.server_ref)
            for failure in self.state.failures:
                if failure["times"] > 0 and failure["method"] == method and failure["pattern"].search(path):
                    failure["times"] -= 1
                    if failure["status"] == 599:
                        return self._drop()
                    if failure["status"] == 598:
                        self._drop_answer = True  # handle the call, then lose the answer
                        break
                    return self._error(failure["status"], failure["message"])
        for pattern, handler_method, name in ROUTES:
            match = re.fullmatch(pattern, path)
            if match and handler_method == method:
                groups = [unquote(g) if g is not None else None for g in match.groups()]
                with self.state.lock:
                    return getattr(self, name)(*groups, query=query, body=body)
        self._error(404, f"no route for {method} {path}")

    def _drop(self) -> None:
        self.close_connection = True
        self.connection.shutdown(2)

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    # -- endpoints -----------------------------------------------------------------------------
    def whoami(self, *, query: dict, body: bytes) -> None:
        user = self._user()
        if user is None:
            return self._error(401, "Invalid credentials in Authorization header")
        self._send(
            200,
            {
                "type": "user",
                "name": user[0],
                "fullname": user[0],
                "orgs": [{"name": org, "type": "org"} for org in sorted(self.state.orgs[user[0]])],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": user[1]}},
            },
        )

    def create_repo(self, *, query: dict, body: bytes) -> None:
        payload = json.loads(body)
        user = self._user()
        if user is None:
            return self._error(401, "You must be authenticated to create a repo")
        namespace = payload.get("organization") or user[0]
        repo_id = f"{namespace}/{payload['name']}"
        if not self._can_write(namespace):
            return self._error(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        if repo_id in self.state.repos:
            return self._send(
                409, {"error": "You already created this model repo", "url": f"{self.base_url}/{repo_id}"}
            )
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = Repo(repo_id=repo_id, private=private)
        initial = {".gitattributes": _regular(b"*.gguf filter=lfs diff=lfs merge=lfs -text\n")}
        repo.branches["main"] = [(uuid.uuid4().hex + uuid.uuid4().hex[:8], "initial commit", initial)]
        self.state.repos[repo_id] = repo
        self._send(200, {"url": f"{self.base_url}/{repo_id}", "name": repo_id, "id": uuid.uuid4().hex})

    def delete_repo(self, *, query: dict, body: bytes) -> None:
        payload = json.loads(body)
        user = self._user()
        namespace = payload.get("organization") or (user[0] if user else "")
        repo_id = f"{namespace}/{payload['name']}"
        if repo_id not in self.state.repos:
            return self._error(404, "Repository not found", "RepoNotFound")
        if not self._can_write(namespace):
            return self._error(403, "You don't have the rights to delete this repo")
        del self.state.repos[repo_id]
        self._send(200, {})

    def validate_yaml(self, *, query: dict, body: bytes) -> None:
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        errors = []
        if not match:
            return self._send(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
        try:
            meta = yaml.safe_load(match.group(1)) or {}
        except yaml.YAMLError as exc:
            return self._send(400, {"error": "Invalid YAML", "errors": [{"message": str(exc)}]})
        license_id = meta.get("license")
        if license_id is not None and license_id not in KNOWN_LICENSES:
            errors.append({"message": f'"license" must be one of the known licenses, got "{license_id}"'})
        if license_id == "other" and not (meta.get("license_name") and meta.get("license_link")):
            errors.append({"message": '"license: other" needs "license_name" and "license_link"'})
        base = meta.get("base_model")
        for item in [base] if isinstance(base, str) else (base or []):
            if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(item)):
                errors.append({"message": f'"base_model" must be a Hub model id, got "{item}"'})
        if meta.get("base_model_relation") not in (None, *RELATIONS):
            errors.append({"message": f'"base_model_relation" must be one of {sorted(RELATIONS)}'})
        for entry in meta.get("model-index") or []:
            for result in entry.get("results", []):
                if not {"task", "dataset", "metrics"} <= set(result):
                    errors.append({"message": '"model-index" results need "task", "dataset" and "metrics"'})
                for metric in result.get("metrics", []):
                    if not isinstance(metric.get("value"), (int, float)) or not metric.get("type"):
                        errors.append({"message": '"model-index" metrics need a "type" and a numeric "value"'})
        if not isinstance(meta.get("tags", []), list):
            errors.append({"message": '"tags" must be a list'})
        if errors:
            return self._send(400, {"error": "Invalid metadata", "errors": errors})
        self._send(200, {"errors": [], "warnings": []})

    def preupload(self, repo_id: str, revision: str, *, query: dict, body: bytes) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        head = repo.head(revision)
        tree = head[2] if head else {}
        files = []
        for entry in json.loads(body)["files"]:
            sample = base64.b64decode(entry["sample"])
            lfs = entry["path"].endswith(LFS_SUFFIXES) or entry["size"] >= LFS_SIZE or b"\0" in sample
            existing = tree.get(entry["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.lfs else existing.blob_id
            files.append(
                {"path": entry["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self._send(200, {"files": files, "commitOid": head[0] if head else None})

    def lfs_batch(self, repo_id: str, *, query: dict, body: bytes) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        payload = json.loads(body)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            return self._error(422, "only basic uploads are supported here")
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in repo.lfs_objects:  # held for another repo counts as absent here
                link = f"repo={repo_id}&sig={self._signature(repo_id, obj['oid'])}"
                entry["actions"] = {
                    "upload": {"href": f"{self.base_url}/lfs-upload/{obj['oid']}?{link}"},
                    "verify": {"href": f"{self.base_url}/lfs-verify/{obj['oid']}?{link}"},
                }
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _signature(self, repo_id: str, oid: str) -> str:
        return hmac.new(self.state.secret, f"{repo_id}\0{oid}".encode(), hashlib.sha256).hexdigest()

    def _signed_repo(self, oid: str, query: dict) -> Repo | None:
        """The repo an LFS link was signed for, or None after answering 403."""
        repo_id, signature = (query.get("repo") or [""])[0], (query.get("sig") or [""])[0]
        if not (repo_id in self.state.repos and hmac.compare_digest(signature, self._signature(repo_id, oid))):
            self._error(403, "this upload link is not signed for this object and repo")
            return None
        return self.state.repos[repo_id]

    def lfs_upload(self, oid: str, *, query: dict, body: bytes) -> None:
        repo = self._signed_repo(oid, query)
        if repo is None:
            return
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "content does not match the oid")
        self.state.lfs[oid] = body
        repo.lfs_objects.add(oid)
        self._send(200, {})

    def lfs_verify(self, oid: str, *, query: dict, body: bytes) -> None:
        repo = self._signed_repo(oid, query)
        if repo is None:
            return
        payload = json.loads(body)
        if oid not in repo.lfs_objects or len(self.state.lfs[oid]) != payload["size"]:
            return self._error(404, "object not found")
        self._send(200, {})

    def commit(self, repo_id: str, revision: str, *, query: dict, body: bytes) -> None:
        repo = self._repo(repo_id, write=True)
        if repo is None:
            return
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return self._error(400, "the first line must be the commit header")
        header = lines[0]["value"]
        head = repo.head(revision)
        if head is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        if header.get("parentCommit") and header["parentCommit"] != head[0]:
            return self._error(412, "A commit has happened since. Please refresh and try again.")
        tree = dict(head[2])
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                tree[value["path"]] = _regular(base64.b64decode(value["content"]))
            elif line["key"] == "lfsFile":
                if value["oid"] not in repo.lfs_objects:
                    return self._error(422, f"LFS file {value['path']} was not uploaded to {repo_id}")
                tree[value["path"]] = StoredFile(None, len(self.state.lfs[value["oid"]]), value["oid"], True)
            elif line["key"] == "deletedFile":
                if value["path"] not in tree:
                    return self._error(404, "A file with this name doesn't exist", "EntryNotFound")
                del tree[value["path"]]
            elif line["key"] == "deletedFolder":
                tree = {p: f for p, f in tree.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                return self._error(400, f"unknown key {line['key']}")
        oid = hashlib.sha1(json.dumps([head[0], header, sorted(tree)]).encode() + uuid.uuid4().bytes).hexdigest()
        result = {"commitOid": oid, "commitUrl": f"{self.base_url}/{repo_id}/commit/{oid}"}
        description = header.get("description") or ""
        repo.messages[oid] = header["summary"] + (f"\n\n{description}" if description else "")
        if query.get("create_pr") == ["1"]:
            number = 1 + sum(1 for name in repo.branches if name.startswith("refs/pr/"))
            repo.branches[f"refs/pr/{number}"] = [head, (oid, header["summary"], tree)]
            result["pullRequestUrl"] = f"{self.base_url}/{repo_id}/discussions/{number}"
        else:
            repo.branches.setdefault(unquote(revision), []).append((oid, header["summary"], tree))
        self._send(200, result)

    def commits(self, repo_id: str, revision: str, *, query: dict, body: bytes) -> None:
        """The commit log of a branch, newest first (one page: the client follows no Link header)."""
        repo = self._repo(repo_id)
        if repo is None:
            return
        branch = unquote(revision)
        if branch not in repo.branches:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        date = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(repo.created))
        log = []
        for oid, summary, _ in reversed(repo.branches[branch]):
            message = repo.messages.get(oid, summary)
            log.append({"id": oid, "title": summary, "message": message, "authors": [], "date": date})
        self._send(200, log)

    def refs(self, repo_id: str, *, query: dict, body: bytes) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        refs: dict[str, list[dict[str, str]]] = {"branches": [], "converts": [], "tags": []}
        if query.get("include_prs") == ["1"]:
            refs["pullRequests"] = []
        for name, log in sorted(repo.branches.items()):
            if name.startswith("refs/pr/"):
                if "pullRequests" in refs:
                    refs["pullRequests"].append({"name": name.split("/")[-1], "ref": name, "targetCommit": log[-1][0]})
            else:
                refs["branches"].append({"name": name, "ref": f"refs/heads/{name}", "targetCommit": log[-1][0]})
        self._send(200, refs)

    def model_info(self, repo_id: str, revision: str | None = None, *, query: dict, body: bytes) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        head = repo.head(revision or "main")
        if head is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        card = head[2].get("README.md")
        card_data = None
        if card is not None and card.data:
            match = re.match(r"^---\n(.*?)\n---\n", card.data.decode(), re.S)
            card_data = yaml.safe_load(match.group(1)) if match else None
        created = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(repo.created))
        self._send(
            200,
            {
                "_id": uuid.uuid5(uuid.NAMESPACE_URL, repo_id).hex,
                "id": repo_id,
                "modelId": repo_id,
                "author": repo_id.split("/")[0],
                "sha": head[0],
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": (card_data or {}).get("tags", []),
                "cardData": card_data,
                "library_name": (card_data or {}).get("library_name"),
                "pipeline_tag": (card_data or {}).get("pipeline_tag"),
                "createdAt": created,
                "lastModified": created,
                "siblings": [{"rfilename": path} for path in sorted(head[2])],
            },
        )

    def list_models(self, *, query: dict, body: bytes) -> None:
        author = (query.get("author") or [None])[0]
        wanted = set(query.get("filter") or [])
        found = []
        for repo_id, repo in sorted(self.state.repos.items()):
            if author and repo_id.split("/")[0] != author:
                continue
            if repo.private and not self._can_read_private(repo_id):
                continue
            head = repo.head("main")
            card = head[2].get("README.md") if head else None
            meta = {}
            if card is not None and card.data:
                match = re.match(r"^---\n(.*?)\n---\n", card.data.decode(), re.S)
                meta = (yaml.safe_load(match.group(1)) if match else None) or {}
            tags = set(meta.get("tags", []))
            if wanted - tags:
                continue
            found.append(
                {
                    "_id": uuid.uuid5(uuid.NAMESPACE_URL, repo_id).hex,
                    "id": repo_id,
                    "modelId": repo_id,
                    "private": repo.private,
                    "tags": sorted(tags),
                    "library_name": meta.get("library_name"),
                    "downloads": 0,
                    "likes": 0,
                }
            )
        self._send(200, found)

    def _entries(self, tree: dict[str, StoredFile], paths: list[str]) -> list[dict[str, Any]]:
        entries = []
        for path in paths:
            stored = tree[path]
            entry: dict[str, Any] = {"type": "file", "oid": stored.blob_id, "size": stored.size, "path": path}
            if stored.lfs:
                entry["lfs"] = {"oid": stored.sha256, "size": stored.size, "pointerSize": 130}
            entries.append(entry)
        return entries

    def tree(self, repo_id: str, revision: str, sub: str | None = None, *, query: dict, body: bytes) -> None:
        head = self._commit(repo_id, revision)
        if head is None:
            return
        prefix = (sub.strip("/") + "/") if sub else ""
        recursive = query.get("recursive", ["false"])[0] in ("true", "1", "True")
        files = sorted(p for p in head[2] if p.startswith(prefix))
        if prefix and not files:
            return self._error(404, f"{sub} does not exist", "EntryNotFound")
        entries, folders = [], set()
        for path in files:
            rest = path[len(prefix) :]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
            entries += self._entries(head[2], [path])
        entries += [
            {"type": "directory", "oid": git_blob_sha1(f.encode()), "size": 0, "path": f} for f in sorted(folders)
        ]
        self._send(200, entries)

    def paths_info(self, repo_id: str, revision: str, *, query: dict, body: bytes) -> None:
        head = self._commit(repo_id, revision)
        if head is None:
            return
        form = parse_qs(body.decode()) if body and not body.startswith(b"{") else {}
        paths = form.get("paths") or (json.loads(body).get("paths", []) if body.startswith(b"{") else [])
        self._send(200, self._entries(head[2], [p for p in paths if p in head[2]]))

    def resolve(self, repo_id: str, revision: str, path: str, *, query: dict, body: bytes, head: bool = False) -> None:
        commit = self._commit(repo_id, revision)
        if commit is None:
            return
        stored = commit[2].get(path)
        if stored is None:
            return self._error(404, "Entry not found", "EntryNotFound")
        data = self.state.lfs[stored.sha256] if stored.lfs else (stored.data or b"")
        headers = {"X-Repo-Commit": commit[0], "ETag": f'"{stored.sha256 if stored.lfs else stored.blob_id}"'}
        if stored.lfs:
            headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(stored.size)})
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if ranged and not head:  # get_safetensors_metadata reads a file's header with bytes=0-100000
            start = int(ranged.group(1))
            end = min(int(ranged.group(2) or len(data) - 1), len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, raw=data[start : end + 1], headers=headers)
        self._send(200, raw=data, headers=headers, head=head)

    def resolve_head(self, repo_id: str, revision: str, path: str, *, query: dict, body: bytes) -> None:
        self.resolve(repo_id, revision, path, query=query, body=body, head=True)

    # -- collections ---------------------------------------------------------------------------
    def _collection_json(self, collection: dict[str, Any]) -> dict[str, Any]:
        return {
            **{k: v for k, v in collection.items() if k != "namespace"},
            "lastUpdated": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        }

    def create_collection(self, *, query: dict, body: bytes) -> None:
        payload = json.loads(body)
        if not self._can_write(payload["namespace"]):
            return self._error(403, f"You don't have the rights to create a collection in {payload['namespace']}")
        for slug, existing in self.state.collections.items():
            if existing["namespace"] == payload["namespace"] and existing["title"] == payload["title"]:
                return self._send(409, {"error": "A collection with this title already exists", "slug": slug})
        title_slug = re.sub(r"[^a-z0-9]+", "-", payload["title"].lower()).strip("-")
        slug = f"{payload['namespace']}/{title_slug}-{uuid.uuid4().hex[:24]}"
        self.state.collections[slug] = {
            "slug": slug,
            "title": payload["title"],
            "namespace": payload["namespace"],
            "owner": {"name": payload["namespace"]},
            "items": [],
            "position": 0,
            "private": bool(payload.get("private")),
            "theme": "blue",
            "upvotes": 0,
            "description": payload.get("description"),
        }
        self._send(200, self._collection_json(self.state.collections[slug]))

    def get_collection(self, slug: str, *, query: dict, body: bytes) -> None:
        collection = self.state.collections.get(slug)
        if collection is None:
            return self._error(404, "Collection not found")
        self._send(200, self._collection_json(collection))

    def add_collection_item(self, slug: str, *, query: dict, body: bytes) -> None:
        collection = self.state.collections.get(slug)
        if collection is None:
            return self._error(404, "Collection not found")
        if not self._can_write(collection["namespace"]):
            return self._error(403, "You don't have the rights to edit this collection")
        payload = json.loads(body)
        item = payload["item"]
        if any(i["id"] == item["id"] and i["type"] == item["type"] for i in collection["items"]):
            return self._send(409, {"error": "Item already in the collection"})
        collection["items"].append(
            {
                "_id": uuid.uuid4().hex[:24],
                "id": item["id"],
                "type": item["type"],
                "position": len(collection["items"]),
                "note": {"text": payload["note"]} if payload.get("note") else None,
            }
        )
        self._send(200, self._collection_json(collection))


def _regular(data: bytes) -> StoredFile:
    return StoredFile(data, len(data), hashlib.sha256(data).hexdigest(), False)


_REPO = r"([\w.-]+/[\w.-]+)"
ROUTES = [
    (r"/api/whoami-v2", "GET", "whoami"),
    (r"/api/repos/create", "POST", "create_repo"),
    (r"/api/repos/delete", "DELETE", "delete_repo"),
    (r"/api/validate-yaml", "POST", "validate_yaml"),
    (rf"/api/models/{_REPO}/preupload/([^/]+)", "POST", "preupload"),
    (rf"/{_REPO}\.git/info/lfs/objects/batch", "POST", "lfs_batch"),
    (r"/lfs-upload/([0-9a-f]{64})", "PUT", "lfs_upload"),
    (r"/lfs-verify/([0-9a-f]{64})", "POST", "lfs_verify"),
    (rf"/api/models/{_REPO}/commit/(.+)", "POST", "commit"),
    (rf"/api/models/{_REPO}/commits/(.+)", "GET", "commits"),
    (rf"/api/models/{_REPO}/refs", "GET", "refs"),
    (r"/api/models", "GET", "list_models"),
    (rf"/api/models/{_REPO}", "GET", "model_info"),
    (rf"/api/models/{_REPO}/revision/(.+)", "GET", "model_info"),
    (rf"/api/models/{_REPO}/tree/([^/]+)(?:/(.*))?", "GET", "tree"),
    (rf"/api/models/{_REPO}/paths-info/(.+)", "POST", "paths_info"),
    (rf"/{_REPO}/resolve/([^/]+)/(.+)", "GET", "resolve"),
    (rf"/{_REPO}/resolve/([^/]+)/(.+)", "HEAD", "resolve_head"),
    (r"/api/collections", "POST", "create_collection"),
    (r"/api/collections/([\w.-]+/[\w.-]+)", "GET", "get_collection"),
    (r"/api/collections/([\w.-]+/[\w.-]+)/items", "POST", "add_collection_item"),
]
