"""The verifier benchmark's paced runs are open loop: requests leave on their schedule
whatever the server does, and a request that could not (every connection was waiting on an
answer) is counted, since its wait would be missing from its latency. Checked against a
small local server that stalls on purpose, with the real wrk the benchmark drives."""

from __future__ import annotations

import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="needs Debian's wrk")


class _Stalling(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, stall_every: int, stall: float) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.stall_every = stall_every
        self.stall = stall
        self.count = 0
        # One lock for every connection: a stall holds all answers, as a busy event loop would.
        self.lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # wrk drops its connections when it stops: not this test's subject


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Stalling

    def setup(self) -> None:
        super().setup()
        # Headers and body leave in two writes: without this, Nagle's algorithm holds the
        # body for the client's delayed ACK (40 ms), which is not what is measured here.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.server.lock:
            self.server.count += 1
            if self.server.stall_every and self.server.count % self.server.stall_every == 0:
                time.sleep(self.server.stall)
        body = b'{"decision":"allow"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _serve(stall_every: int, stall: float) -> Iterator[str]:
    server = _Stalling(stall_every, stall)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/verify"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def steady() -> Iterator[str]:
    yield from _serve(0, 0.0)


@pytest.fixture
def stalling() -> Iterator[str]:
    # A 300 ms stall every 400 requests: at 400/s, once a second.
    yield from _serve(400, 0.3)


def _bodies(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "bodies.txt"
    path.write_text("".join(f'{{"n":{k}}}\n' for k in range(count)))
    return path


def test_a_server_that_keeps_up_gets_the_offered_rate_and_no_late_sends(
    steady: str, tmp_path: Path
) -> None:
    import verify_bench as vb

    run = vb.run_wrk(
        "serve",
        "warm",
        steady,
        _bodies(tmp_path, 2000),
        None,
        rate=400,
        seconds=2,
        connections=vb.paced_connections(400, 16),
    )
    assert run.valid
    assert run.late == 0
    assert 360 <= run.rps <= 440


def test_a_stall_longer_than_the_window_shows_in_the_latencies_and_counts_late_sends(
    stalling: str, tmp_path: Path
) -> None:
    """With rate x 0.1 s of connections (40 at 400/s), a 300 ms stall leaves requests
    waiting for a free connection: they are sent late and counted; the schedule catches
    up (the achieved rate stays the offered one), and the stall itself is in the tail."""
    import verify_bench as vb

    connections = vb.paced_connections(400, 16)
    assert connections == 40
    run = vb.run_wrk(
        "serve",
        "warm",
        stalling,
        _bodies(tmp_path, 2000),
        None,
        rate=400,
        seconds=3,
        connections=connections,
    )
    assert run.valid
    assert run.late > 0
    # Sent up to ~200 ms late (the stall less the 100 ms of connections), never more.
    assert 100 <= run.late_max <= 320
    assert "lower bound" in run.late_note
    assert run.p999 >= 150
    assert run.rps >= 360  # caught up, unlike a closed loop that skips missed slots
