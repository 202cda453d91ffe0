"""The machine's own latency floor: what p99 a server doing nothing gets here.

    python bench/floor_probe.py [--rates 267,534,1000] [--seconds 12] [--rounds 2]

One bare uvicorn worker (uvloop, httptools, as the benchmark's columns run) whose only
route answers every ``POST /v1/verify`` with a fixed allow, driven by exactly the
benchmark's wrk harness (``verify_bench.run_wrk``: the same Lua script, open-loop pacing,
connections and percentiles) at each rate, alternately with nothing else on the path.
Whatever p99 this gets at a load is part of every column's p99 at that load: wrk and one
Python process on two shared cores, and nothing of AgentAuth. Not part of the full run;
its figures go in docs/verifier-bench.md's observations by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _stack import free_port
from verify_bench import paced_connections, run_wrk

ANSWER = b'{"decision":"allow","reason":"ok","audit_event":"verifier-0:1"}'

# The server: a raw ASGI callable, so not even a framework's routing is on the path.
SERVER = """
ANSWER = {answer!r}
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:  # read the body, as any verifier must
        message = await receive()
        more = message.get("more_body", False)
    await send({{"type": "http.response.start", "status": 200, "headers": HEADERS}})
    await send({{"type": "http.response.body", "body": ANSWER}})
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="267,534,1000")
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    work = Path(tempfile.mkdtemp(prefix="floor-"))
    (work / "floor_app.py").write_text(SERVER.format(answer=ANSWER))
    # Bodies of a verification's size (about 1.3 KB), each used once, as in the benchmark.
    bodies = work / "bodies.jsonl"
    filler = "x" * 1200
    count = int(max(rates) * args.seconds * 1.2) + 1000
    with bodies.open("w") as handle:
        for k in range(count):
            handle.write(json.dumps({"token": filler, "n": k}) + "\n")
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "floor_app:app",
            "--port",
            str(port),
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=work,
        env={**os.environ, "PYTHONPATH": str(work)},
    )
    url = f"http://127.0.0.1:{port}/v1/verify"
    try:
        for _ in range(100):
            try:
                if httpx.post(url, content=b"{}").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        print("rate/s  achieved  p50 ms  p90 ms  p99 ms  p99.9 ms  max ms  sent late")
        for round_ in range(args.rounds):
            for rate in rates:
                run = run_wrk(
                    "floor",
                    "warm",
                    url,
                    bodies,
                    None,
                    rate=rate,
                    seconds=args.seconds,
                    connections=paced_connections(rate, 16),
                )
                print(
                    f"{rate:6.0f}  {run.rps:8.0f}  {run.p50:6.2f}  {run.p90:6.2f}  {run.p99:6.2f}"
                    f"  {run.p999:8.2f}  {run.max_ms:6.1f}  {run.late}"
                    f"  (round {round_ + 1})",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
