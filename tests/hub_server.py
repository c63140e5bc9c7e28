"""A local stand-in for the Hugging Face Hub's file API, on 127.0.0.1, for the pull tests.

Implements what huggingface-hub calls: revision info, tree listing, and file resolve (HEAD and
GET with ETag, X-Repo-Commit, Content-Length and Range). Repositories can answer 401 (gated) or
404, and a file's first download can be cut off after some bytes, as a killed pull would be.
A hostile Hub can be played too: any commit id, ETags and listed sizes of its choosing, and
slow bodies (for pulls that overlap).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    status: int = 200  # 401: gated, 404: missing


@dataclass
class HubState:
    repos: dict[str, Repo] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)  # file -> bytes before hanging up
    requests: list[tuple[str, str, dict]] = field(default_factory=list)
    etags: dict[str, str] = field(default_factory=dict)  # file -> the ETag sent instead
    sizes: dict[str, object] = field(default_factory=dict)  # file -> the size listed instead
    slow: float = 0.0  # seconds between 64 KiB pieces of a body


def etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _json(self, data, status=200) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _repo(self, name: str) -> Repo | None:
        repo = self.state.repos.get(name)
        if repo is None or repo.status == 404:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if repo.status == 401:
            self._error(401, "GatedRepo", "Access to this repository is restricted")
            return None
        return repo

    def do_GET(self) -> None:
        self.state.requests.append(("GET", self.path, dict(self.headers)))
        path = self.path.split("?")[0]
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path)
        if m:
            repo = self._repo(m.group(1))
            if repo:
                self._json(
                    {
                        "id": m.group(1),
                        "sha": repo.commit,
                        "private": False,
                        "siblings": [{"rfilename": n} for n in repo.files],
                    }
                )
            return
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path)
        if m:
            repo = self._repo(m.group(1))
            if repo:
                self._json(
                    [
                        {
                            "type": "file",
                            "path": n,
                            "size": self.state.sizes.get(n, len(d)),
                            "oid": etag(d)[:40],
                        }
                        for n, d in repo.files.items()
                    ]
                )
            return
        self._resolve(send_body=True)

    def do_HEAD(self) -> None:
        self.state.requests.append(("HEAD", self.path, dict(self.headers)))
        self._resolve(send_body=False)

    def _resolve(self, send_body: bool) -> None:
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
        if not m:
            self._error(404, "EntryNotFound", "no such endpoint")
            return
        repo = self._repo(m.group(1))
        if repo is None:
            return
        data = repo.files.get(m.group(3))
        if data is None:
            self._error(404, "EntryNotFound", "Entry not found")
            return
        start = 0
        rng = self.headers.get("Range")
        if rng:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
        body = data[start:]
        self.send_response(206 if rng else 200)
        self.send_header("ETag", f'"{self.state.etags.get(m.group(3), etag(data))}"')
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body) if send_body else len(data)))
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not send_body:
            return
        cut = self.state.cut_after.pop(m.group(3), None)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # hang up mid-body, as a killed download ends
            return
        piece = 1 << 16 if self.state.slow else len(body) or 1
        for i in range(0, len(body), piece):
            self.wfile.write(body[i : i + piece])
            time.sleep(self.state.slow)


class FakeHub:
    """Serves a HubState on 127.0.0.1 in a background thread; use as a context manager."""

    def __init__(self, state: HubState) -> None:
        handler = type("BoundHandler", (Handler,), {"state": state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.state = state
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def repo_from_dir(path: Path, **kwargs) -> Repo:
    return Repo({p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}, **kwargs)
