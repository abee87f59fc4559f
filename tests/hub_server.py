"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, for tests: `HF_ENDPOINT=<server.url>`
and huggingface_hub, datasets and transformers download from it as from huggingface.co.

It answers what huggingface_hub 2.4 asks (read from its file_download.py, hf_api.py, _commit_api.py,
_upload_pipeline.py and utils/_http.py):
- `HEAD` / `GET /{repo}/resolve/{rev}/{path}` (datasets: `/datasets/{repo}/resolve/...`): the file, with
  `X-Repo-Commit` (the commit the revision resolved to) and `ETag` (the git blob id), which
  hf_hub_download requires; a `Range` header gets its bytes (206).
- `GET /api/{models,datasets}/{repo}[/revision/{rev}]`: the repo's info (`sha`, `siblings`, `gated`);
  HfApi.repo_info and resolve_revision read `sha`.
- `GET /api/{type}s/{repo}/tree/{rev}[/{path}]` and `POST .../paths-info/{rev}`: listings, which
  HfFileSystem reads when datasets resolves `data_files` patterns.
- Upload: `POST /api/repos/create`, `/api/validate-yaml` (a README's metadata), `.../preupload/{rev}`
  (every file is "regular": no LFS or Xet storage here, so the files travel inside the commit) and
  `.../commit/{rev}` (ndjson: a header line, then one base64 file a line): a new commit on the branch.
Errors as the Hub sends them, with `X-Error-Code`, which hf_raise_for_status turns into its typed
errors: RepoNotFound (404), GatedRepo (401 without a token, 403 with one not granted),
RevisionNotFound, EntryNotFound (with `X-Repo-Commit`, so the miss is cached as on the real Hub).

Not served: the dataset viewer (datasets-server.<host>, which datasets asks for a parquet export of an
unpinned `main` and does without when it is missing), LFS batch and Xet storage, pull requests.
Every request is logged in `requests`; one it has no answer for is also in `unhandled` (a 400), so a
test can assert that the libraries asked nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO_KEYWORDS = {"revision", "tree", "paths-info", "preupload", "commit", "refs", "commits"}


def git_blob_id(content: bytes) -> str:
    """The id git gives a file's content, which the Hub sends as a regular file's ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    """A repository: its commits (oldest first, each all the files at that commit), branches and tags
    naming them, and who may read it."""

    repo_id: str
    repo_type: str = "model"
    gated: bool = False
    commits: list[tuple[str, dict[str, bytes]]] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)

    def commit(self, files: dict[str, bytes], tag: str | None = None, branch: str = "main") -> str:
        """A new commit holding `files` (all of them: nothing is kept from the one before) on `branch`;
        returns its sha."""
        parent = self.refs.get(branch, "")
        digest = hashlib.sha1(f"{self.repo_type}/{self.repo_id}\n{parent}\n".encode())
        for path in sorted(files):
            digest.update(f"{path} {git_blob_id(files[path])}\n".encode())
        sha = digest.hexdigest()
        self.commits.append((sha, dict(files)))
        self.refs[branch] = sha
        if tag is not None:
            self.refs[tag] = sha
        return sha

    def resolve(self, revision: str) -> tuple[str, dict[str, bytes]] | None:
        sha = self.refs.get(revision, revision)
        return next(((s, files) for s, files in self.commits if s == sha), None)

    @property
    def sha(self) -> str:
        return self.refs["main"]


class HubError(Exception):
    def __init__(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


class HubServer:
    """`with HubServer() as hub: hub.add(...)`; `hub.url` is the HF_ENDPOINT. Tokens: `read_tokens` may read
    gated repos; `write_tokens` may also create repos and commit (to any repo, as its owner);
    `other_tokens` are accounts with neither right. Any other token is refused as invalid (401)."""

    def __init__(
        self, read_tokens: tuple[str, ...] = (), write_tokens: tuple[str, ...] = (), other_tokens: tuple[str, ...] = ()
    ) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.read_tokens = set(read_tokens) | set(write_tokens)
        self.write_tokens = set(write_tokens)
        self.known_tokens = self.read_tokens | set(other_tokens)
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.created: list[dict[str, Any]] = []  # the bodies of /api/repos/create
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> HubServer:  # noqa: PYI034 - Python 3.10 has no typing.Self
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add(
        self,
        repo_id: str,
        files: dict[str, bytes],
        repo_type: str = "model",
        gated: bool = False,
        tag: str | None = None,
    ) -> Repo:
        repo = Repo(repo_id, repo_type, gated)
        repo.commit(files, tag)
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def paths(self) -> list[str]:
        """The paths requested, in order, without the query."""
        return [path for _, path in self.requests]

    # -- answers ---------------------------------------------------------------------------------------

    def readable(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "RepoNotFound", "Repository not found")
        return repo

    def files_of(self, repo: Repo, revision: str, token: str | None) -> tuple[str, dict[str, bytes]]:
        if repo.gated and token not in self.read_tokens:
            status = 401 if token is None else 403
            raise HubError(
                status,
                "GatedRepo",
                f"Access to model {repo.repo_id} is restricted. You must have access to it and be authenticated to "
                "access it. Please log in.",
            )
        found = repo.resolve(revision)
        if found is None:
            raise HubError(404, "RevisionNotFound", "Invalid rev id: " + revision)
        return found

    def info(self, repo: Repo, revision: str, token: str | None) -> dict[str, Any]:
        found = repo.resolve(revision)
        if found is None:
            raise HubError(404, "RevisionNotFound", "Invalid rev id: " + revision)
        sha, files = found
        return {
            "_id": sha[:24],
            "id": repo.repo_id,
            "sha": sha,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "lastModified": "2024-01-01T00:00:00.000Z",
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": [{"rfilename": p} for p in sorted(files)],
        }

    def tree(self, files: dict[str, bytes], folder: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                if depth > 1 and not recursive:
                    break
                sub = prefix + "/".join(parts[:depth])
                entries.setdefault(
                    sub, {"type": "directory", "oid": hashlib.sha1(sub.encode()).hexdigest(), "size": 0, "path": sub}
                )
            if recursive or len(parts) == 1:
                entries[path] = entry(path, files[path])
        if prefix and not entries:
            raise HubError(404, "EntryNotFound", f"{folder} does not exist on the repo")
        return list(entries.values())

    def paths_info(self, files: dict[str, bytes], paths: list[str]) -> list[dict[str, Any]]:
        out = []
        for path in paths:
            path = path.strip("/")
            if path in files:
                out.append(entry(path, files[path]))
            elif any(p.startswith(path + "/") for p in files):
                out.append(
                    {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}
                )
        return out

    def create_repo(self, body: dict[str, Any], token: str | None) -> dict[str, Any]:
        self.need_write(token)
        repo_type = body.get("type") or "model"
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else f"user/{body['name']}"
        self.created.append(body)
        if (repo_type, repo_id) in self.repos:
            raise HubError(409, "", "You already created this model repo")
        self.repos[(repo_type, repo_id)] = Repo(repo_id, repo_type)
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return {"url": f"{self.url}/{prefix}{repo_id}", "name": repo_id}

    def need_write(self, token: str | None) -> None:
        if token not in self.known_tokens:
            raise HubError(401, "", "Invalid credentials in Authorization header")
        if token not in self.write_tokens:
            raise HubError(403, "", "You don't have the rights to create a model under this namespace")

    def commit(self, repo: Repo, revision: str, body: bytes, token: str | None) -> dict[str, Any]:
        self.need_write(token)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]
        assert header["key"] == "header", header
        files = dict(repo.resolve(revision)[1]) if repo.resolve(revision) else {}
        for line in lines[1:]:
            value = line["value"]
            if line["key"] == "file":
                assert value["encoding"] == "base64", value
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "deletedFile":
                files.pop(value["path"], None)
            else:
                raise HubError(400, "", f"this stand-in takes regular files only (got {line['key']})")
        sha = repo.commit(files, branch=revision)
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return {"commitUrl": f"{self.url}/{prefix}{repo.repo_id}/commit/{sha}", "commitOid": sha, "success": True}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet: the test reads `requests`
                pass

            def do_HEAD(self) -> None:
                self.answer("HEAD")

            def do_GET(self) -> None:
                self.answer("GET")

            def do_POST(self) -> None:
                self.answer("POST")

            def answer(self, method: str) -> None:
                split = urlsplit(self.path)
                with hub.lock:
                    hub.requests.append((method, split.path))
                body = self.read_body() if method == "POST" else b""
                auth = self.headers.get("Authorization", "")
                token = auth[len("Bearer ") :] if auth.startswith("Bearer ") else None
                try:
                    with hub.lock:
                        status, headers, content = route(
                            hub, method, split.path, parse_qs(split.query), body, token, self.headers.get("Range")
                        )
                except HubError as exc:
                    status, content = exc.status, json.dumps({"error": exc.message}).encode()
                    headers = {"Content-Type": "application/json", "X-Error-Message": exc.message}
                    headers |= {"X-Error-Code": exc.code} if exc.code else {}
                    headers |= {"X-Repo-Commit": exc.commit} if exc.commit else {}
                    if status == 400:
                        with hub.lock:
                            hub.unhandled.append((method, split.path))
                length = headers.pop("Content-Length", str(len(content)))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", length)
                self.end_headers()
                if method != "HEAD":
                    self.wfile.write(content)

            def read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = io.BytesIO()
                    while size := int(self.rfile.readline().strip() or b"0", 16):
                        out.write(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return out.getvalue()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        return Handler


def entry(path: str, content: bytes) -> dict[str, Any]:
    return {"type": "file", "oid": git_blob_id(content), "size": len(content), "path": path}


def as_json(value: Any) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(value).encode()


def validate_yaml(card: str) -> tuple[int, dict[str, str], bytes]:
    """A README's front matter must be a YAML mapping (the Hub also checks its keys, which this does not)."""
    front = card.split("---\n")[1] if card.startswith("---\n") and card.count("---\n") >= 2 else ""
    try:
        ok = isinstance(yaml.safe_load(front) or {}, dict)
        message = "" if ok else "metadata must be a mapping"
    except yaml.YAMLError as exc:
        ok, message = False, " ".join(str(exc).split())
    if ok:
        return as_json({"errors": [], "warnings": []})
    return (
        400,
        {"Content-Type": "application/json"},
        json.dumps({"errors": [{"message": message}], "warnings": []}).encode(),
    )


def repo_and_rest(segments: list[str], hub: HubServer, repo_type: str) -> tuple[str, list[str]]:
    """`org/name/tree/main/x` -> (`org/name`, [tree, main, x]); ids without an org have one segment."""
    for n in (2, 1):
        if (repo_type, "/".join(segments[:n])) in hub.repos:
            return "/".join(segments[:n]), segments[n:]
    n = 2 if len(segments) >= 2 and (len(segments) == 2 or segments[2] in REPO_KEYWORDS) else 1
    return "/".join(segments[:n]), segments[n:]


def route(
    hub: HubServer,
    method: str,
    path: str,
    query: dict[str, list[str]],
    body: bytes,
    token: str | None,
    byte_range: str | None,
) -> tuple[int, dict[str, str], bytes]:
    if path == "/api/repos/create" and method == "POST":
        return as_json(hub.create_repo(json.loads(body), token))
    if path == "/api/agent-harnesses":  # huggingface_hub's telemetry: which AI agent runs it (none here)
        return as_json({"standardEnvVars": [], "harnesses": {}})
    if path == "/api/validate-yaml" and method == "POST":
        return validate_yaml(json.loads(body)["content"])
    if path.startswith(("/api/models/", "/api/datasets/")):
        kind, rest = path[len("/api/") :].split("/", 1)
        return api(hub, method, kind[:-1], rest, query, body, token)
    if "/resolve/" in path:
        return resolve(hub, method, path, token, byte_range)
    raise HubError(400, "", f"the stand-in Hub has no answer for {method} {path}")


def api(
    hub: HubServer, method: str, repo_type: str, rest: str, query: dict[str, list[str]], body: bytes, token: str | None
) -> tuple[int, dict[str, str], bytes]:
    repo_id, tail = repo_and_rest([unquote(s) for s in rest.split("/")], hub, repo_type)
    repo = hub.readable(repo_type, repo_id)
    action, revision = (tail[0], tail[1]) if len(tail) >= 2 else ("revision", "main")
    if method == "GET" and (not tail or action == "revision"):
        return as_json(hub.info(repo, revision, token))
    if method == "GET" and action == "tree":
        _, files = hub.files_of(repo, revision, token)
        return as_json(hub.tree(files, "/".join(tail[2:]), query.get("recursive", ["False"])[0].lower() == "true"))
    if method == "POST" and action == "paths-info":
        _, files = hub.files_of(repo, revision, token)
        form = parse_qs(body.decode())
        return as_json(hub.paths_info(files, form.get("paths", [])))
    if method == "POST" and action == "preupload":
        hub.need_write(token)
        files = json.loads(body)["files"]
        return as_json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
    if method == "POST" and action == "commit":
        return as_json(hub.commit(repo, revision, body, token))
    raise HubError(400, "", f"the stand-in Hub has no answer for {method} /api/{repo_type}s/{rest}")


def resolve(
    hub: HubServer, method: str, path: str, token: str | None, byte_range: str | None
) -> tuple[int, dict[str, str], bytes]:
    head, tail = path.split("/resolve/", 1)
    repo_type = "dataset" if head.startswith("/datasets/") else "model"
    repo_id = unquote(head[len("/datasets/") :] if repo_type == "dataset" else head[1:])
    revision, _, filename = tail.partition("/")
    repo = hub.readable(repo_type, repo_id)
    sha, files = hub.files_of(repo, unquote(revision), token)
    filename = unquote(filename)
    if filename not in files:
        raise HubError(404, "EntryNotFound", "Entry not found", commit=sha)
    content = files[filename]
    headers = {
        "Content-Type": "application/octet-stream",
        "X-Repo-Commit": sha,
        "ETag": f'"{git_blob_id(content)}"',
        "Accept-Ranges": "bytes",
    }
    if byte_range and byte_range.startswith("bytes="):
        start_text, _, end_text = byte_range[len("bytes=") :].partition("-")
        start = int(start_text) if start_text else max(len(content) - int(end_text), 0)
        end = min(int(end_text), len(content) - 1) if end_text and start_text else len(content) - 1
        headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
        return 206, headers, content[start : end + 1]
    if method == "HEAD":
        headers["Content-Length"] = str(len(content))
        return 200, headers, b""
    return 200, headers, content
