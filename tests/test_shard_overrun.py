"""Calls that overrun against a real shard actor: the chain ends up saying what clients got.

The session's shard actor 0 (a Ray actor with the session's PostgreSQL) is held up by a
row lock on its chain head, so its commit waits while a ``ShardClient`` in this process,
with a short timeout, answers ``state_timeout``. When the lock goes, the shard commits the
allows it decided meanwhile; every one of them must then be voided on the chain, and every
allow a client did receive must not be. A shard actor of its own is stopped outright
(SIGSTOP), its whole process, and let go again: the same must hold.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
from typing import Any

import asyncpg
import pytest
from conftest import verifier_settings
from shard_checks import a_check, arriving, timed

from agentauth.actors import Check, Result, ShardClient
from agentauth.protocol import Envelope

pytestmark = [pytest.mark.ray, pytest.mark.postgres]
ENVELOPE = Envelope.model_validate({"rate_limits": [{"max_count": 1000, "window_seconds": 60}]})


async def _chain_rows(db: asyncpg.Connection, grant_id: str) -> list[tuple[str, str, Any]]:
    rows = await db.fetch(
        "SELECT chain, seq, event, body FROM audit_events WHERE grant_id = $1", grant_id
    )
    return [(f"{r['chain']}:{r['seq']}", r["event"], json.loads(r["body"])["data"]) for r in rows]


@pytest.mark.asyncio
@pytest.mark.usefixtures("verifier_base")  # the session's shard actors exist
async def test_every_allow_on_the_chain_reached_a_client_or_is_voided(
    registry_settings: Any, database_url: str, db: asyncpg.Connection
) -> None:
    from agentauth.deployments.verifier import shard_handles

    grant_id = f"grt_overrun_{secrets.token_hex(4)}"

    def check() -> Check:
        return a_check("overrun", grant_id=grant_id, envelope=ENVELOPE)

    handles = shard_handles(verifier_settings(registry_settings))
    # Hasty overruns while the lock is held (and still has time for its voids afterwards,
    # on a busy machine); patient, with the tests' generous timeout, is the clients whose
    # answers must not be voided.
    hasty, patient = ShardClient(handles, timeout=0.25), ShardClient(handles, timeout=2.0)
    await asyncio.gather(hasty.connect(), patient.connect())
    lock = await asyncpg.connect(database_url)
    try:
        # The shard's first commit creates its chain head: there must be a row to lock.
        received = [await patient.check(0, check())]
        late: list[Result] = []
        async with lock.transaction():
            await lock.execute("SELECT 1 FROM audit_heads WHERE chain = 'verifier-0' FOR UPDATE")
            # Two calls go out and overrun while the shard's commit waits on the lock (the
            # shard's own statement timeout, 2 s, is longer than this).
            for _ in range(2):
                late += await asyncio.gather(*(hasty.check(0, check()) for _ in range(5)))
            await asyncio.sleep(0.3)
        assert {(r.allowed, r.reason) for r in late} == {(False, "state_timeout")}

        # The shard commits once the lock goes; its late answers are voided by the client.
        voided: set[str] = set()
        deadline = time.monotonic() + 10
        while len(voided) < 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            rows = await _chain_rows(db, grant_id)
            voided = {data["voids"] for _, event, data in rows if event == "verify.void"}
        received += await asyncio.gather(*(patient.check(0, check()) for _ in range(3)))
        assert all(r.allowed for r in received), [r.reason for r in received]
    finally:
        await lock.close()
        hasty.close()
        patient.close()

    rows = await _chain_rows(db, grant_id)
    allows = {event_id for event_id, event, _ in rows if event == "verify.allow"}
    voids = [data for _, event, data in rows if event == "verify.void"]
    told = {r.audit_event for r in received}
    assert len(allows) == 14
    assert {v["voids"] for v in voids} == allows - told  # each late allow, once
    assert len(voids) == 10 and all(v["reason"] == "state_timeout" for v in voids)
    assert told <= allows


@pytest.mark.asyncio
@pytest.mark.usefixtures("verifier_base")  # the session's shard actors exist
async def test_an_allow_whose_request_was_given_up_is_voided_and_a_queued_check_not_sent(
    registry_settings: Any, database_url: str, db: asyncpg.Connection
) -> None:
    """A request given up (its task cancelled, as Serve does when it notices that the
    provider hung up). A check whose call was already out is decided anyway; its allow
    reached nobody, so it is voided (``answer_undelivered``). A check still queued when its
    request went is not sent at all: no decision, no event. The others get their allows,
    which stand."""
    from agentauth.deployments.verifier import shard_handles

    grant_id = f"grt_gone_{secrets.token_hex(4)}"

    def check() -> Check:
        return a_check("gone", grant_id=grant_id, envelope=ENVELOPE)

    client = ShardClient(shard_handles(verifier_settings(registry_settings)), timeout=5.0)
    await client.connect()
    lock = await asyncpg.connect(database_url)
    try:
        received = [await client.check(0, check())]  # the chain head exists to be locked
        async with lock.transaction():
            await lock.execute("SELECT 1 FROM audit_heads WHERE chain = 'verifier-0' FOR UPDATE")
            out = [asyncio.create_task(client.check(0, check())) for _ in range(3)]
            await asyncio.sleep(0.2)  # one call, out, its commit waiting on the lock
            queued = [asyncio.create_task(client.check(0, check())) for _ in range(2)]
            await asyncio.sleep(0.05)
            for task in (out[0], out[1], queued[0]):
                task.cancel()
            await asyncio.sleep(0.05)
        received += await asyncio.gather(out[2], queued[1])
        assert all(r.allowed for r in received), [r.reason for r in received]
        assert all(t.cancelled() for t in (out[0], out[1], queued[0]))

        rows: list[tuple[str, str, Any]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rows = await _chain_rows(db, grant_id)
            if sum(event == "verify.void" for _, event, _ in rows) >= 2:
                break
            await asyncio.sleep(0.1)
    finally:
        await lock.close()
        client.close()

    allows = {event_id for event_id, event, _ in rows if event == "verify.allow"}
    voids = [data for _, event, data in rows if event == "verify.void"]
    told = {r.audit_event for r in received}
    assert len(rows) == 7  # 5 allows (the queued check given up was never decided), 2 voids
    # The client's counters add up the same way: 7 checks sent, 3 answered, 2 given up with
    # their call out, 2 voids.
    assert (client.checks, client.given_up, client.void_checks) == (7, 2, 2)
    assert len(allows) == 5 and told <= allows
    assert sorted(v["voids"] for v in voids) == sorted(allows - told)
    assert {v["reason"] for v in voids} == {"answer_undelivered"}


@pytest.mark.asyncio
async def test_an_allow_whose_request_was_given_up_as_its_answer_came_is_voided(
    registry_settings: Any, db: asyncpg.Connection
) -> None:
    """The cancel lands after the answer resolved the check but before the request's task
    ran again (the provider hung up in that moment): the task never takes the allow, so
    it is voided like one whose cancel came while the call was out."""
    from agentauth.deployments.verifier import shard_handles

    grant_id = f"grt_late_gone_{secrets.token_hex(4)}"
    client = ShardClient(shard_handles(verifier_settings(registry_settings)), timeout=5.0)
    await client.connect()
    targets: list[asyncio.Task[Any]] = []
    finish = client._finish

    def finish_then_cancel(*args: Any) -> None:
        finish(*args)  # the checks' futures hold their answers; their tasks have not run
        for task in targets:
            task.cancel()
        targets.clear()

    try:
        kept = await client.check(0, a_check("late", grant_id=grant_id, envelope=ENVELOPE))
        client._finish = finish_then_cancel  # type: ignore[method-assign]
        gone = asyncio.create_task(
            client.check(0, a_check("late", grant_id=grant_id, envelope=ENVELOPE))
        )
        targets.append(gone)
        with pytest.raises(asyncio.CancelledError):
            await gone
        rows: list[tuple[str, str, Any]] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rows = await _chain_rows(db, grant_id)
            if any(event == "verify.void" for _, event, _ in rows):
                break
            await asyncio.sleep(0.1)
    finally:
        client.close()

    allows = [event_id for event_id, event, _ in rows if event == "verify.allow"]
    voids = [data for _, event, data in rows if event == "verify.void"]
    assert len(allows) == 2 and kept.audit_event in allows
    assert [(v["voids"], v["reason"]) for v in voids] == [
        (next(a for a in allows if a != kept.audit_event), "answer_undelivered")
    ]
    assert (client.checks, client.given_up, client.void_checks) == (3, 1, 1)


@pytest.mark.asyncio
@pytest.mark.usefixtures("serve_port")  # Ray is up
async def test_a_stopped_shard_actor_is_denied_fast_and_answers_again_by_itself(
    migrated_database_url: str,
) -> None:
    """A shard actor's process stopped (SIGSTOP): hung, not dead, its link still open.
    The call out when it stopped overruns unacknowledged, so the checks queued behind it
    are denied with it, within a timeout of the first one's arrival, and later ones at
    once. Let go (SIGCONT), it answers again by itself, and the allows it decided for the
    call already denied are voided on its chain."""
    import ray

    from agentauth.actors import StateShard

    grant_id = f"grt_stopped_{secrets.token_hex(4)}"

    def check() -> Check:
        return a_check("stopped", grant_id=grant_id, envelope=ENVELOPE)

    shard = (
        ray.remote(StateShard)
        .options(num_cpus=0)
        .remote(index=708, database_url=migrated_database_url)
    )
    pid = await shard.__ray_call__.remote(lambda _: os.getpid())
    timeout = 0.2
    client = ShardClient([shard], timeout=timeout)
    db = await asyncpg.connect(migrated_database_url)
    try:
        await client.connect()
        received = [await client.check(0, check())]
        assert received[0].allowed
        os.kill(pid, signal.SIGSTOP)
        try:
            stalled = await arriving(client, check, behind=3, every=timeout / 4)
            at_once = await timed(client, check())  # the shard looks hung
        finally:
            os.kill(pid, signal.SIGCONT)
        assert {(r.allowed, r.reason) for _, r in [*stalled, at_once]} == {(False, "state_timeout")}
        # All by the first call's deadline (the checks behind it were not sent).
        assert max(elapsed for elapsed, _ in stalled) < timeout + 0.1
        assert at_once[0] < timeout / 4

        deadline = time.monotonic() + 10
        while not received[-1].allowed or len(received) == 1:
            assert time.monotonic() < deadline, "the shard did not answer again"
            await asyncio.sleep(0.05)
            received.append(await client.check(0, check()))

        # Its late answers: each allow in them reached nobody and is voided, once.
        told = {r.audit_event for r in received if r.allowed}
        while True:
            rows = await _chain_rows(db, grant_id)
            allows = {event_id for event_id, event, _ in rows if event == "verify.allow"}
            voids = [data["voids"] for _, event, data in rows if event == "verify.void"]
            if set(voids) == allows - told or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        # The call that overran (1 check) was decided once it ran again; the checks
        # queued behind it and the one denied at once were never sent.
        assert len(allows - told) == 1
        assert sorted(voids) == sorted(allows - told)
        assert told <= allows
    finally:
        await db.close()
        client.close()
        ray.kill(shard)
