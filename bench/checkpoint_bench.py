"""How long the registry's checkpointer holds its event loop, with and without checking
new events ahead of the checkpoint (``AuditLog.verify_ahead``).

A verifier shard at 1,000 decisions a second leaves 10,000 events on its chain between two
checkpoints (every 10 s). The checkpoint checks each one (body parsed, link, hash) before it
signs: without checking ahead that is one stretch of CPU with no await in it, which on a
2-core machine is a core taken from the request path all at once. With it, the checkpoint
loop does the same work in slices between checkpoints and the checkpoint has only the rest.

Each round appends the same number of verifier-like decision events to a fresh chain, then
measures the process CPU time of (1) one checkpoint of all of them, and (2) the slices of
``verify_ahead`` (as the registry's loop runs them) and then the checkpoint. Reported: the
longest stretch (the checkpoint's for (1); the longest slice or the checkpoint for (2)) and
the total, median over rounds. The checkpoint's own stretch includes its queries' client
side; the database's side runs in PostgreSQL's processes and is not counted.

    python bench/checkpoint_bench.py [--events 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import asyncpg

from agentauth.keys import LocalFileSigner
from agentauth.protocol import KeySet
from agentauth.registry._audit_log import AuditLog
from agentauth.registry._service import AHEAD_SLICE
from agentauth.store import migrate

DATABASE_URL = os.environ.get(
    "AGENTAUTH_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
CHAIN = "registry-0"


def _decision(i: int) -> dict[str, object]:
    """The data of a verifier's allow, as a shard writes it (sizes alike: about 480 bytes)."""
    return {
        "reason": "ok",
        "proof_jti": secrets.token_urlsafe(16),
        "grant_id": "grt_" + secrets.token_urlsafe(16),
        "token_jti": secrets.token_urlsafe(16),
        "action": {"kind": "read", "resource": "calendar/events"},
        "usage": {"rate": {"used": i % 1000, "limit": 1000}},
    }


async def _fill(log: AuditLog, conn: asyncpg.Connection, count: int) -> None:
    async with conn.transaction():
        for i in range(count):
            await log.append(
                conn,
                event="verify.allow",
                actor="provider:prov_" + "p" * 22,
                subject="agent:agt_" + "a" * 22,
                key="k",
                data=_decision(i),
            )


async def _round(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet, events: int, ahead: bool
) -> tuple[float, float]:
    """(longest stretch, total) in ms of process CPU for checkpointing ``events`` new events."""
    await conn.execute("TRUNCATE audit_events, audit_checkpoints, audit_nodes, audit_heads")
    log = AuditLog(chains=1)
    await log.ensure_chains(conn)
    await _fill(log, conn, 1)
    await log.checkpoint(conn, CHAIN, signer, keys=keys, now=int(time.time()))
    await _fill(log, conn, events)
    stretches = []
    if ahead:
        while True:
            start = time.process_time()
            done = await log.verify_ahead(conn, CHAIN, events + 1, limit=AHEAD_SLICE)
            stretches.append(time.process_time() - start)
            if done < AHEAD_SLICE:
                break
    start = time.process_time()
    made = await log.checkpoint(conn, CHAIN, signer, keys=keys, now=int(time.time()))
    stretches.append(time.process_time() - start)
    if made is None or made["size"] != events + 1:
        raise SystemExit(f"the checkpoint did not cover {events + 1} events: {made}")
    return max(stretches) * 1000, sum(stretches) * 1000


async def main(events: int, rounds: int) -> None:
    name = f"ckptbench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(DATABASE_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        conn = await asyncpg.connect(DATABASE_URL.rsplit("/", 1)[0] + "/" + name)
        await migrate(conn)
        with tempfile.TemporaryDirectory() as tmp:
            signer = LocalFileSigner.load_or_create(Path(tmp) / "k.pem")
            keys = KeySet([signer.public_key()])
            results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
            for _ in range(rounds):  # interleaved: the machine's speed drifts
                for ahead in (False, True):
                    results[ahead].append(await _round(conn, signer, keys, events, ahead))
        await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print(f"{events:,} new events a checkpoint, {rounds} rounds, slices of {AHEAD_SLICE}")
    print("| mode | longest stretch ms (median) | total CPU ms (median) | per event us |")
    print("|---|---:|---:|---:|")
    for ahead, label in ((False, "checkpoint alone"), (True, "checked ahead, then checkpoint")):
        longest = statistics.median(r[0] for r in results[ahead])
        total = statistics.median(r[1] for r in results[ahead])
        print(f"| {label} | {longest:.1f} | {total:.1f} | {total * 1000 / events:.1f} |")
    pairs = zip(results[False], results[True], strict=True)
    ratio = statistics.median(alone[0] / ahead[0] for alone, ahead in pairs)
    print(f"longest stretch, alone / ahead: {ratio:.1f}x (median of per-round ratios)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.rounds))
