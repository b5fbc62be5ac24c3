"""A threaded HTTP server for a folder on 127.0.0.1 (shards served to the loader in tests), able
to drop a connection part way through a file."""

from __future__ import annotations

import contextlib
import http.server
import threading
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``drops[name] = k`` cuts the next k responses for ``name`` after half
    the body (the full Content-Length was announced, as a dropped connection looks)."""

    drops: dict[str, int] = {}
    requests: list[str] = []

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        name = self.path.lstrip("/")
        self.requests.append(name)
        if self.drops.get(name, 0) > 0:
            self.drops[name] -= 1
            data = (Path(self.directory) / name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@contextlib.contextmanager
def serve(directory: Path):
    """A threaded HTTP server for ``directory`` on 127.0.0.1 (a free port); yields (url, handler)."""
    handler = type("Handler", (_Handler,), {"drops": {}, "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a: handler(*a, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
