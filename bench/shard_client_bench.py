"""The replica's side of a shard call: what ``ShardClient`` itself costs per check.

    python bench/shard_client_bench.py [--seconds 2] [--rounds 3]

A stand-in shard in the same process and event loop (uvloop, as in a Serve replica)
answers every batch at once with allows, so what is measured is the client: queueing,
framing, the link's reader, the deadline timer and the turns of the event loop between an
answer's arrival and the check's caller running again. ``streams`` callers each issue one
check after another (1: a check per call; 16: batches form while a call is out). Reported
per round: checks/s, process CPU per check (client and stand-in together), p50/p99 of a
check's latency as its caller sees it, and checks per call. Rounds run back to back; on a
shared machine compare figures from the same run, or runs close in time.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from typing import Any

import msgpack
import uvloop

from agentauth.actors import Check, ShardClient
from agentauth.actors._wire import Codec, frame, read_frame


class _Endpoint:
    """What a shard's Ray handle offers the client: ``endpoint.remote()``."""

    def __init__(self, value: tuple[str, int, bytes]) -> None:
        self._value = value

    async def remote(self) -> tuple[str, int, bytes]:
        return self._value


class _Handle:
    def __init__(self, host: str, port: int, token: bytes) -> None:
        self.endpoint = _Endpoint((host, port, token))


async def _stand_in(token: bytes) -> asyncio.Server:
    """Answers each batch at once: every check allowed, one event id each."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        codec = Codec()
        try:
            if await read_frame(reader) != token:
                return
            writer.write(frame(b"ok"))
            seq = 0
            while True:
                request_id, checks = codec.decode_checks(await read_frame(reader))
                rows = []
                for _ in checks:
                    rows.append((True, "ok", None, None, f"bench-0:{seq}"))
                    seq += 1
                writer.write(frame(msgpack.packb((request_id, rows))))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


def _checks(n: int) -> list[Check]:
    now = time.time()
    return [
        Check(
            agent_id=f"agt_{i % 8}",
            provider_id="prov_bench",
            grant_id=f"grt_{i % 8}",
            jkt="k" * 43,
            jti=secrets.token_urlsafe(12),
            iat=now,
            token_jti="tok",
        )
        for i in range(n)
    ]


async def _round(streams: int, seconds: float) -> dict[str, Any]:
    token = secrets.token_bytes(32)
    server = await _stand_in(token)
    port = server.sockets[0].getsockname()[1]
    client = ShardClient([_Handle("127.0.0.1", port, token)], timeout=1.0)
    await client.connect()
    checks = _checks(4096)
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def caller(first: int) -> None:
        i = first
        while time.perf_counter() < stop:
            began = time.perf_counter()
            result = await client.check(0, checks[i % len(checks)])
            latencies.append(time.perf_counter() - began)
            if not result.allowed:
                raise RuntimeError(f"the stand-in allows everything, got {result.reason}")
            i += streams

    cpu = time.process_time()
    await asyncio.gather(*(caller(i) for i in range(streams)))
    cpu = time.process_time() - cpu
    client.close()
    await asyncio.sleep(0.05)  # the stand-in sees the link close and ends its handler
    server.close()
    latencies.sort()
    n = len(latencies)
    return {
        "checks_per_s": n / seconds,
        "cpu_us": cpu / n * 1e6,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1e3,
        "per_call": client.checks / max(1, client.batches),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("| callers | round | checks/s | CPU µs per check | p50 ms | p99 ms | checks per call |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for streams in (1, 16):
        for n in range(1, args.rounds + 1):
            r = uvloop.run(_round(streams, args.seconds))
            print(
                f"| {streams} | {n} | {r['checks_per_s']:,.0f} | {r['cpu_us']:.1f} |"
                f" {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {r['per_call']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
