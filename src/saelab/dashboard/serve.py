"""A local server over a built dashboard folder: GET and HEAD of files inside it, nothing else.

127.0.0.1 by default (opting in to another address is the caller's choice). A request whose
path, once percent-decoded and resolved (symlinks included), falls outside the folder is
refused with 403; methods other than GET/HEAD get 405."""

from __future__ import annotations

import mimetypes
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".html": "text/html; charset=utf-8", ".csv": "text/csv; charset=utf-8", ".svg": "image/svg+xml",
         ".png": "image/png", ".json": "application/json"}


def resolve_inside(root: Path, url_path: str) -> Path | None:
    """The file `url_path` names inside root, or None if it points outside root."""
    rel = unquote(urlsplit(url_path).path)
    if "\x00" in rel:
        return None
    target = (root / rel.lstrip("/")).resolve()
    if target.is_dir():
        target = target / "index.html"
    try:
        target.relative_to(root)
    except ValueError:
        return None
    return target


def make_handler(root: Path) -> type[BaseHTTPRequestHandler]:
    root = root.resolve()

    class Handler(BaseHTTPRequestHandler):
        server_version = "saelab-dashboard"

        def _send(self, head_only: bool) -> None:
            target = resolve_inside(root, self.path)
            if target is None:
                self.send_error(HTTPStatus.FORBIDDEN, "outside the dashboard")
                return
            if not target.is_file():
                self.send_error(HTTPStatus.NOT_FOUND)
                return
            body = target.read_bytes()
            self.send_response(HTTPStatus.OK)
            kind = TYPES.get(target.suffix) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            if not head_only:
                self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self._send(False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._send(True)

        def _refuse(self) -> None:
            self.send_error(HTTPStatus.METHOD_NOT_ALLOWED)

        do_POST = do_PUT = do_DELETE = do_PATCH = _refuse  # noqa: N815

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet unless asked
            if getattr(self.server, "verbose", False):
                super().log_message(format, *args)

    return Handler


def start_server(root: str | Path, host: str = "127.0.0.1", port: int = 0, verbose: bool = False
                 ) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """Serve root in a background thread; returns the server (its .server_address has the port)
    and the thread. Stop with server.shutdown(); server.server_close()."""
    root = Path(root)
    if not (root / "index.html").is_file():
        raise FileNotFoundError(f"{root} has no index.html: build it first (`saelab dashboard RUN --out {root}`)")
    server = ThreadingHTTPServer((host, port), make_handler(root))
    server.verbose = verbose  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread
