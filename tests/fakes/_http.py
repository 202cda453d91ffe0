"""A JSON HTTP service on 127.0.0.1 (an ephemeral port) in a background thread."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else {}


class FakeHTTPService:
    """Subclasses implement ``handle``; knobs here apply to every request.

    ``delay``: seconds to wait before answering (a slow or hung backend). ``stop()`` closes
    the listening socket, so later connections are refused. HTTP/1.0, one request per
    connection: a stopped server cannot keep answering over a pooled keep-alive connection.
    """

    def __init__(self) -> None:
        self.delay = 0.0
        self.requests: list[Request] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._url: str | None = None

    def handle(self, request: Request) -> tuple[int, Any]:
        raise NotImplementedError

    @property
    def url(self) -> str:
        """Where the service listens (or listened: after ``stop()`` it refuses connections)."""
        assert self._url is not None, "start() first"
        return self._url

    def start(self) -> FakeHTTPService:
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(
                    method=self.command,
                    path=parts.path,
                    query=parse_qs(parts.query),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=self.rfile.read(length),
                )
                service.requests.append(request)
                if service.delay and service._stopping.wait(service.delay):
                    return  # stopped while "slow": drop the connection unanswered
                status, body = service.handle(request)
                payload = b"" if body is None else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    if body is not None:
                        self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timed out) first

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._stopping.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self._url = f"http://{host!s}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        assert self._thread is not None
        self._thread.join()
        self._server = self._thread = None

    def __enter__(self) -> FakeHTTPService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
