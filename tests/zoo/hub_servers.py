"""Servers the hub tests start on 127.0.0.1: a static file server with HTTP Range support, and a
stand-in for the Hugging Face Hub's file endpoint (``/{repo}/resolve/{revision}/{path}``).

The file server can cut a response short (``cut_after`` bytes, once) to simulate a download
killed midway; every request's ``Range`` header is logged so a test can see the resume.
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class FileServer:
    """Serve ``root`` over HTTP/1.1 with single ``bytes=a-`` / ``bytes=a-b`` ranges (206)."""

    def __init__(self, root: Path, hub_repo: str | None = None, hub_revision: str = "0" * 40):
        self.root = Path(root)
        self.hub_repo, self.hub_revision = hub_repo, hub_revision
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range)
        self.cut_after: int | None = None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _file(self) -> Path | None:
                path = self.path.split("?")[0].lstrip("/")
                if outer.hub_repo is not None:  # Hub layout: {repo}/resolve/{revision}/{file}
                    prefix = f"{outer.hub_repo}/resolve/"
                    if not path.startswith(prefix):
                        return None
                    revision, _, path = path[len(prefix):].partition("/")
                    if revision != outer.hub_revision:
                        return None
                target = (outer.root / path).resolve()
                return target if target.is_file() and outer.root.resolve() in target.parents else None

            def _headers(self, target: Path, start: int, end: int, size: int, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(end - start))
                self.send_header("Accept-Ranges", "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                if outer.hub_repo is not None:
                    self.send_header("X-Repo-Commit", outer.hub_revision)
                    self.send_header("ETag", f'"{hashlib.sha256(target.read_bytes()).hexdigest()}"')
                self.end_headers()

            def _serve(self, body: bool) -> None:
                rng = self.headers.get("Range")
                outer.requests.append((self.command, self.path, rng))
                target = self._file()
                if target is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = target.read_bytes()
                size, start, end, status = len(data), 0, len(data), 200
                if rng and rng.startswith("bytes="):
                    first, _, last = rng[6:].partition("-")
                    start = int(first)
                    end = int(last) + 1 if last else size
                    if start >= size:
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{size}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                self._headers(target, start, end, size, status)
                if not body:
                    return
                payload = data[start:end]
                if outer.cut_after is not None:  # a download killed midway: send part, drop the line
                    payload, outer.cut_after = payload[:outer.cut_after], None
                    self.wfile.write(payload)
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

            def do_GET(self):  # noqa: N802 - http.server's naming
                self._serve(True)

            def do_HEAD(self):  # noqa: N802
                self._serve(False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
