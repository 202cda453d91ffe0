"""A shard gets ready for checks before it hands out its endpoint.

A restarted shard's first batch used to open its database connection, read its chain and
plan its statements on a cold PostgreSQL backend: longer than a replica waits for a shard,
so the first checks after every restart were denied ``state_timeout``, late. Now the
shard does that work when the first replica asks where to connect. These tests hold what
that must not break: it writes nothing, it sets the replay floor a new incarnation needs,
a database that is down does not keep the shard from listening, and replicas asking at
once all get the one endpoint.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import asyncpg
import pytest
from shard_checks import a_check

from agentauth.actors import StateShard

INDEX = 740
CHAIN = f"verifier-{INDEX}"


async def _chain_rows(database_url: str) -> tuple[Any, ...]:
    conn = await asyncpg.connect(database_url)
    try:
        head = await conn.fetchrow("SELECT size, head FROM audit_heads WHERE chain = $1", CHAIN)
        events = await conn.fetchval("SELECT count(*) FROM audit_events WHERE chain = $1", CHAIN)
        spent = await conn.fetchval("SELECT count(*) FROM verifier_step_up_uses")
    finally:
        await conn.close()
    return (tuple(head) if head else None), events, spent


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_new_incarnation_reads_its_chain_before_its_first_check_and_writes_nothing(
    database_url: str,
) -> None:
    first = StateShard(index=INDEX, database_url=database_url)
    try:
        results = await first.check_batch([a_check("warm") for _ in range(3)])
        assert [r.audit_event for r in results] == [f"{CHAIN}:{i}" for i in range(3)]
    finally:
        await first.close()
    before = await _chain_rows(database_url)

    second = StateShard(index=INDEX, database_url=database_url)
    try:
        await second.endpoint()
        # Connected and read: the chain's size and, being a new incarnation, the replay
        # floor at the previous one's last decision ...
        assert second.stats()["chain_size"] == 3
        assert time.time() - 5 < second.state.replay_floor <= time.time()
        # ... and the statements it ran to warm the connection changed nothing.
        assert await _chain_rows(database_url) == before

        # The floor is what the first check meets: a proof from before it may have been
        # allowed by the previous incarnation.
        [old] = await second.check_batch([a_check("warm", iat=time.time() - 2)])
        assert (old.allowed, old.reason, old.audit_event) == (
            False,
            "shard_restarted",
            f"{CHAIN}:3",
        )
    finally:
        await second.close()


@pytest.mark.asyncio
async def test_a_shard_whose_database_does_not_answer_still_listens_and_denies() -> None:
    # A database that accepts connections and never answers (blackholed, or hung): the
    # warm-up gives up within a second, under a replica's 2 s connect timeout.
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    shard = StateShard(index=INDEX + 1, database_url=f"postgresql://postgres@127.0.0.1:{port}/x")
    try:
        began = time.monotonic()
        _, shard_port, token = await shard.endpoint()
        assert time.monotonic() - began < 1.8
        assert shard_port > 0 and len(token) == 32
        [denied] = await shard.check_batch([a_check("down")])
        assert (denied.allowed, denied.reason, denied.audit_event) == (
            False,
            "audit_unavailable",
            None,
        )
    finally:
        await shard.close()
        silent.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_replicas_asking_at_once_get_one_endpoint(database_url: str) -> None:
    shard = StateShard(index=INDEX + 2, database_url=database_url)
    try:
        endpoints = await asyncio.gather(*(shard.endpoint() for _ in range(5)))
        assert len(set(endpoints)) == 1
        [allowed] = await shard.check_batch([a_check("once")])
        assert allowed.allowed and allowed.audit_event == f"verifier-{INDEX + 2}:0"
    finally:
        await shard.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_serving_shard_that_loses_its_database_denies_at_once_and_reconnects_by_itself(
    database_url: str,
) -> None:
    """A shard serving replicas does not make a batch wait for a reconnect (which, with
    the warming, is longer than a replica waits): it denies at once and reconnects in the
    background, with no batch needed to drive it, and carries on its chain."""
    index = INDEX + 3
    shard = StateShard(index=index, database_url=database_url)
    try:
        await shard.endpoint()
        [first] = await shard.check_batch([a_check("lost")])
        assert first.audit_event == f"verifier-{index}:0"
        assert shard.stats()["connected"]

        # The database ends the shard's session (a restart, a failover, an admin).
        admin = await asyncpg.connect(database_url)
        try:
            ended = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE application_name = $1",
                f"agentauth-shard-{index}",
            )
        finally:
            await admin.close()
        assert ended == 1

        # The batch that finds out is denied; nothing of it is on the chain. (If the
        # commit is what finds out, its fate is unknown to the shard until it has
        # reconnected: the allow it would have been is named, for the replica to ask about
        # should the shard die first. If the client library noticed the hang-up first,
        # nothing was sent.)
        [denied] = await shard.check_batch([a_check("lost")])
        assert (denied.allowed, denied.reason) == (False, "audit_unavailable")
        assert denied.audit_event in (None, f"verifier-{index}:1")
        # While the shard reconnects, a batch is denied at once rather than waiting for it.
        assert not shard.stats()["connected"]
        began = time.monotonic()
        [during] = await shard.check_batch([a_check("lost")])
        assert (during.allowed, during.reason) == (False, "audit_unavailable")
        assert time.monotonic() - began < 0.5
        # The reconnect runs by itself ...
        deadline = time.monotonic() + 10
        while not shard.stats()["connected"]:
            assert time.monotonic() < deadline, "the shard did not reconnect"
            await asyncio.sleep(0.02)
        # ... and the chain goes on where it was: the same incarnation (no replay floor).
        [after] = await shard.check_batch([a_check("lost", iat=time.time() - 1)])
        assert (after.allowed, after.reason, after.audit_event) == (
            True,
            "ok",
            f"verifier-{index}:1",
        )
    finally:
        await shard.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_shard_that_cannot_reach_its_database_says_so_once_and_when_it_is_back(
    database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    index = INDEX + 4
    shard = StateShard(index=index, database_url=database_url)
    connect, failures = shard._open_connection, 3

    async def refused_at_first() -> asyncpg.Connection:
        nonlocal failures
        if failures:
            failures -= 1
            raise ConnectionRefusedError
        return await connect()

    monkeypatch.setattr(shard, "_open_connection", refused_at_first)
    caplog.set_level("WARNING", logger="agentauth.shard")
    try:
        await shard.endpoint()
        deadline = time.monotonic() + 10
        while not shard.stats()["connected"]:
            assert time.monotonic() < deadline, "the shard did not reconnect"
            await asyncio.sleep(0.02)
        said = [r.getMessage() for r in caplog.records if "database" in r.getMessage()]
        assert said[0] == (
            f"shard {index} cannot reach the database (ConnectionRefusedError); retrying"
        )
        assert said[1].startswith(f"shard {index} reconnected to the database after 4 tries, ")
        assert len(said) == 2  # three failures, one warning
    finally:
        await shard.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_shard_already_connected_keeps_its_connection_when_it_starts_listening(
    database_url: str,
) -> None:
    """Driven in process first (tools, tests), then asked for its endpoint: the warm-up
    must not open a second connection over the live one (which it replaced, leaking it,
    and whose head reload could race a running batch's commit)."""
    shard = StateShard(index=INDEX + 6, database_url=database_url)
    try:
        assert (await shard.check_batch([a_check("kept")]))[0].allowed
        conn = shard._conn
        assert conn is not None
        await shard.endpoint()
        assert shard._conn is conn and not conn.is_closed()
        assert (await shard.check_batch([a_check("kept")]))[0].allowed
    finally:
        await shard.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_batches_denied_while_the_database_is_down_do_not_flood_the_log(
    database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A shard that serves replicas denies each batch at once while its database is down:
    hundreds a second. The outage is said once (and when it ends), not once per batch, or
    the lines that say what happened are lost among thousands that repeat it."""
    index = INDEX + 8
    shard = StateShard(index=index, database_url=database_url)
    connect, down = shard._open_connection, True

    async def refused_while_down() -> asyncpg.Connection:
        if down:
            raise ConnectionRefusedError
        return await connect()

    monkeypatch.setattr(shard, "_open_connection", refused_while_down)
    caplog.set_level("WARNING", logger="agentauth.shard")
    try:
        await shard.endpoint()
        for _ in range(30):
            [result] = await shard.check_batch([a_check("outage")])
            assert (result.allowed, result.reason) == (False, "audit_unavailable")
        down = False
        deadline = time.monotonic() + 10
        while not shard.stats()["connected"]:
            assert time.monotonic() < deadline, "the shard did not reconnect"
            await asyncio.sleep(0.02)
        said = [r.getMessage() for r in caplog.records if "database" in r.getMessage()]
        assert len(said) == 3, said
        assert said[:2] == [
            f"shard {index} cannot reach the database (ConnectionRefusedError); retrying",
            f"shard {index} cannot reach the database; its checks are denied audit_unavailable",
        ]
        assert said[2].startswith(f"shard {index} reconnected to the database after ")
    finally:
        await shard.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_new_incarnation_says_once_which_proofs_it_refuses(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """After a restart, agents see shard_restarted denials: the shard's log says once that
    it is a new incarnation, and up to when proofs are refused, so an operator can tell a
    restart from an agent whose clock is behind."""
    index = INDEX + 9
    first = StateShard(index=index, database_url=database_url)
    try:
        assert (await first.check_batch([a_check("before")]))[0].allowed
    finally:
        await first.close()
    caplog.set_level("WARNING", logger="agentauth.shard")
    second = StateShard(index=index, database_url=database_url)
    try:
        await second.endpoint()
        for _ in range(3):
            await second.check_batch([a_check("after")])
        said = [r.getMessage() for r in caplog.records if "incarnation" in r.getMessage()]
        assert len(said) == 1, said
        assert said[0].startswith(
            f"shard {index}: a new incarnation on chain verifier-{index} at size 1; proofs"
            " issued up to 20"
        )
        assert said[0].endswith(
            "are refused shard_restarted, as its predecessor may have seen them"
        )
    finally:
        await second.close()


@pytest.mark.asyncio
async def test_a_shard_closed_as_its_reconnect_is_woken_closes() -> None:
    """A batch wakes the reconnect loop (the database may be back) in the loop turn the
    shard is closed in. ``asyncio.wait_for`` on Python 3.11 then returned as if the wait had
    ended and swallowed the cancellation: the loop tried again for good and ``close()``
    waited for it for good."""
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # closed again: connections are refused
    shard = StateShard(index=INDEX + 9, database_url=f"postgresql://postgres@127.0.0.1:{port}/x")
    shard._batches_wait = False  # as when it serves replicas: batches do not wait for it
    [denied] = await shard.check_batch([a_check("closing")])  # the reconnect loop starts
    assert denied.reason == "audit_unavailable"
    await asyncio.sleep(0.06)  # into its backoff
    shard._retry_now.set()  # what the next batch does
    began = time.monotonic()
    closing = asyncio.ensure_future(shard.close())
    done, _ = await asyncio.wait((closing,), timeout=5.0)
    assert done, "close() is still waiting for the reconnect loop"
    assert time.monotonic() - began < 2.0


async def _sessions(database_url: str, index: int) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            f"agentauth-shard-{index}",
        )
    finally:
        await conn.close()
    return int(count)


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_shard_closed_during_a_commit_opens_no_connection_again(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() ends the connection a commit is running on; the commit fails for it, and
    its failure path used to start the reconnect, which opened a new session that nothing
    closed (and, the database down, retried for good). Nor may a batch after close() (a
    void for an answer its link could not take) connect again: it is denied."""
    index = INDEX + 10
    shard = StateShard(index=index, database_url=database_url)
    assert (await shard.check_batch([a_check("closed")]))[0].allowed
    commit = shard._commit

    async def slow(*args: Any) -> None:
        await asyncio.sleep(0.2)
        await commit(*args)

    monkeypatch.setattr(shard, "_commit", slow)
    batch = asyncio.ensure_future(shard.check_batch([a_check("closed")]))
    await asyncio.sleep(0.05)  # decided, its commit under way
    await shard.close()
    [denied] = await batch
    assert (denied.allowed, denied.reason) == (False, "audit_unavailable")
    [later] = await shard.check_batch([a_check("closed")])
    assert (later.allowed, later.reason) == (False, "audit_unavailable")
    await asyncio.sleep(0.5)  # time for a reconnect to have connected
    assert shard._conn is None
    assert await _sessions(database_url, index) == 0


@pytest.mark.asyncio
async def test_a_batch_waiting_for_the_database_when_the_shard_closes_is_answered() -> None:
    """In process a batch waits for the reconnect (bounded). close() cancels that
    reconnect, and the batch's wait ended in the cancellation, not in an answer: its
    caller waited for good."""
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]  # closed again: connections are refused
    shard = StateShard(index=INDEX + 11, database_url=f"postgresql://postgres@127.0.0.1:{port}/x")
    batch = asyncio.ensure_future(shard.check_batch([a_check("closing")]))
    await asyncio.sleep(0.1)  # waiting for the reconnect, which is in its backoff
    await shard.close()
    done, _ = await asyncio.wait((batch,), timeout=5.0)
    assert done, "the batch was never answered"
    [denied] = batch.result()
    assert (denied.allowed, denied.reason) == (False, "audit_unavailable")
