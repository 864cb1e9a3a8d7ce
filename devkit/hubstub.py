"""A loopback stand-in for the Hugging Face Hub: the endpoints huggingface_hub 2.4.0 calls to list a repo
and download from it (read from its source: hf_api.py model_info / list_repo_tree, file_download.py
get_hf_file_metadata / http_get), serving in-memory repos. Plain HTTP only: no xet headers, so the library
downloads with GET (+ Range when it resumes). Test machinery, outside the shipped package.

    GET  /api/models/{org}/{name}[/revision/{rev}]        -> {"id", "sha", "siblings": [{"rfilename"}]}
    GET  /api/models/{org}/{name}/tree/{rev}[/{path}]     -> [{"type": "file", "path", "size", "oid"}]
    HEAD /{org}/{name}/resolve/{rev}/{path}               -> X-Repo-Commit, ETag, Content-Length
    GET  /{org}/{name}/resolve/{rev}/{path}               -> the bytes; `Range: bytes=N-` -> 206

Errors as the Hub sends them (utils/_http.py hf_raise_for_status reads X-Error-Code): an unknown repo 404
RepoNotFound; a private repo without its token 401; a gated one 403 GatedRepo; an unknown revision 404
RevisionNotFound; an unknown file 404 EntryNotFound."""
from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class StubRepo:
    revisions: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> path -> content
    token: str | None = None  # requests must send `Authorization: Bearer <token>`
    gated: bool = False  # without it: 403 GatedRepo (else 401, as for a private repo)


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


class HubStub:
    """`with HubStub() as hub:` serves on 127.0.0.1 (a free port) until the block ends; `hub.url` for
    HF_ENDPOINT, `hub.requests` what was asked. `cut(filename, at, times)`: the next `times` GETs of that
    file stop sending at byte offset `at` and drop the connection (a network cut mid-download)."""

    def __init__(self) -> None:
        self.repos: dict[str, StubRepo] = {}
        self.requests: list[Request] = []
        self.cuts: dict[str, list[int]] = {}  # filename -> [offset, remaining times]
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, revision: str = "main", token: str | None = None,
                 gated: bool = False) -> str:
        """Publish `files` as the commit `revision` names; returns the commit hash."""
        digest = hashlib.sha1()
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha1(files[name]).digest())
        commit = digest.hexdigest()
        repo = self.repos.setdefault(repo_id, StubRepo())
        repo.commits[commit] = dict(files)
        repo.revisions[revision] = commit
        repo.token, repo.gated = token, gated
        return commit

    def add_dir(self, repo_id: str, directory: Path, **kw) -> str:
        files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(Path(directory).rglob("*"))
                 if p.is_file()}
        return self.add_repo(repo_id, files, **kw)

    def cut(self, filename: str, at: int, times: int = 1) -> None:
        self.cuts[filename] = [at, times]

    def env(self, root: Path) -> dict[str, str]:
        """huggingface_hub pointed here, its cache and home (no saved token) under `root`, no token, no xet,
        no telemetry, online."""
        return {"HF_ENDPOINT": self.url, "HF_HUB_CACHE": str(Path(root) / "hub"), "HF_HOME": str(Path(root) / "home"),
                "HF_TOKEN": "", "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0",
                "HF_HUB_ETAG_TIMEOUT": "10", "HF_HUB_DOWNLOAD_TIMEOUT": "10"}

    def __enter__(self) -> HubStub:
        stub = self

        class Handler(_Handler):
            hub = stub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def record(self, r: Request) -> None:
        with self._lock:
            self.requests.append(r)

    def take_cut(self, filename: str) -> int | None:
        with self._lock:
            c = self.cuts.get(filename)
            if not c or c[1] <= 0:
                return None
            c[1] -= 1
            return c[0]

    def downloaded(self) -> set[str]:
        """The files fetched with GET (their repo paths)."""
        return {r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in self.requests
                if r.method == "GET" and "/resolve/" in r.path}


class _Handler(BaseHTTPRequestHandler):
    hub: HubStub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet: the test asserts on hub.requests
        pass

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    def _send(self, status: int, payload: bytes = b"", headers: dict | None = None, body: bool = True) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body and payload:
            self.wfile.write(payload)

    def _json(self, status: int, data, body: bool = True, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}, body)

    def _error(self, status: int, code: str | None, message: str, body: bool) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, body, headers)

    def _route(self, body: bool) -> None:
        path = urlsplit(self.path).path
        self.hub.record(Request(self.command, unquote(path), self.headers.get("Range"),
                                self.headers.get("Authorization")))
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            repo, commit = self._repo(repo_id, rest[1] if len(rest) >= 2 else "main", body)
            if repo is None:
                return
            files = repo.commits[commit]
            if not rest or rest[0] == "revision":
                self._json(200, {"id": repo_id, "sha": commit, "private": repo.token is not None,
                                 "gated": "manual" if repo.gated else False,
                                 "siblings": [{"rfilename": n} for n in sorted(files)]}, body)
            elif rest[0] == "tree":
                prefix = "/".join(rest[2:])
                self._json(200, [{"type": "file", "path": n, "size": len(files[n]),
                                  "oid": hashlib.sha1(files[n]).hexdigest()}
                                 for n in sorted(files) if not prefix or n.startswith(prefix + "/")], body)
            else:
                self._error(404, None, "Not Found", body)
            return
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, commit = self._repo("/".join(parts[:2]), parts[3], body)
            if repo is None:
                return
            name = "/".join(parts[4:])
            content = repo.commits[commit].get(name)
            if content is None:
                self._error(404, "EntryNotFound", "Entry not found", body)
                return
            self._file(name, content, commit, body)
            return
        self._error(404, None, "Not Found", body)

    def _repo(self, repo_id: str, revision: str, body: bool) -> tuple[StubRepo | None, str]:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", body)
            return None, ""
        if repo.token is not None and self.headers.get("Authorization") != f"Bearer {repo.token}":
            if repo.gated:
                self._error(403, "GatedRepo", "Access to this model is restricted", body)
            else:
                # as the Hub answers an anonymous request for a private (or missing) repo
                self._error(401, "RepoNotFound", "Invalid username or password.", body)
            return None, ""
        commit = repo.revisions.get(revision, revision if revision in repo.commits else None)
        if commit is None:
            self._error(404, "RevisionNotFound", "Invalid rev id", body)
            return None, ""
        return repo, commit

    def _file(self, name: str, content: bytes, commit: str, body: bool) -> None:
        etag = f'"{hashlib.sha256(content).hexdigest()}"'
        start, status = 0, 200
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes=") and wanted.endswith("-"):
            start, status = int(wanted[len("bytes="):-1]), 206
        headers = {"X-Repo-Commit": commit, "ETag": etag, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
        cut = self.hub.take_cut(name) if body else None
        if cut is None:
            self._send(status, content[start:], headers, body)
            return
        # the full length announced, the bytes up to `cut` sent, the connection dropped
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(content) - start))
        self.end_headers()
        self.wfile.write(content[start:max(start, cut)])
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
