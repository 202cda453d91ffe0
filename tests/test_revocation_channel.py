"""The revocation channel's listener in a verifier replica, against a real Redis (and,
to show the decisions, PostgreSQL and the replica's service layer in process)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import asyncpg
import pytest
import redis.asyncio as aioredis
from verifier_inprocess import ask, mint, verifier

from agentauth.protocol import b64url_decode
from agentauth.store import REVOCATION_CHANNEL
from agentauth.verifier import _service
from agentauth.verifier._service import _Revocations


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


@pytest.mark.asyncio
async def test_a_message_the_listener_cannot_read_leaves_no_subscribed_connection_behind(
    redis_url: str,
) -> None:
    """A message the listener cannot read ends its round (the replica is not fresh until
    it has subscribed again, so it denies meanwhile). The round's connection is still up
    and subscribed: dropped without being closed, every such message left one more
    connection subscribed to the channel in every replica, for good."""
    name = f"revocation-listener-{secrets.token_hex(4)}"
    redis = aioredis.Redis.from_url(redis_url, client_name=name)
    publisher = aioredis.Redis.from_url(redis_url)
    revocations = _Revocations(
        cast(Any, None), redis, cast(Any, None), also=lambda: asyncio.sleep(0)
    )
    listener = asyncio.create_task(revocations._listen())
    try:
        await _until(lambda: revocations._listening)
        for _ in range(4):
            await publisher.publish(REVOCATION_CHANNEL, b"{not json")
            await _until(lambda: not revocations._listening)
            await _until(lambda: revocations._listening)
        mine = [c for c in await publisher.client_list() if c.get("name") == name]
        assert [c["sub"] for c in mine] == ["1"], mine
        # And the one subscribed connection is the live listener: it still hears.
        target = f"agt_{secrets.token_hex(4)}"
        await publisher.publish(REVOCATION_CHANNEL, json.dumps({"kind": "agent", "target": target}))
        await _until(lambda: ("agent", target) in revocations._revoked)
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await redis.aclose()
        await publisher.aclose()


class _Relay:
    """A TCP relay to Redis that can drop its connections, refuse new ones, or stall: pass
    nothing on while keeping the connections open, as a stopped server or a network that
    drops packets does."""

    def __init__(self, redis_url: str) -> None:
        self._target = aioredis.Redis.from_url(redis_url).connection_pool.connection_kwargs
        self._links: list[asyncio.StreamWriter] = []
        self._pipes: set[asyncio.Task[None]] = set()
        self.refusing = False
        self.stalled = False

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def url(self, port: int) -> str:
        return f"redis://127.0.0.1:{port}/{self._target.get('db', 0)}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        host, port = self._target.get("host", "127.0.0.1"), self._target.get("port", 6379)
        upstream_reader, upstream_writer = await asyncio.open_connection(host, port)
        self._links += [writer, upstream_writer]
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            pipe = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                while self.stalled:
                    await asyncio.sleep(0.01)
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.close()

    def cut(self) -> None:
        for writer in self._links:
            writer.close()
        self._links = []

    async def close(self) -> None:
        self.cut()
        self._server.close()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)


@contextlib.asynccontextmanager
async def _relayed_listener(redis_url: str) -> AsyncIterator[tuple[_Relay, _Revocations]]:
    """A revocation listener reaching Redis through a relay the test can stall or cut,
    once it listens; stopped and closed after."""
    relay = _Relay(redis_url)
    redis = aioredis.Redis.from_url(relay.url(await relay.start()))
    revocations = _Revocations(
        cast(Any, None), redis, cast(Any, None), also=lambda: asyncio.sleep(0)
    )
    listener = asyncio.create_task(revocations._listen())
    try:
        await _until(lambda: revocations._listening)
        yield relay, revocations
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await redis.aclose()
        await relay.close()


@contextlib.asynccontextmanager
async def _polled(redis_url: str, database_url: str) -> AsyncIterator[_Revocations]:
    """Revocations over real Redis and PostgreSQL, not started; stopped and closed after."""
    v, _ = verifier()
    redis = aioredis.Redis.from_url(redis_url)
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    revocations = _Revocations(pool, redis, v.settings, also=lambda: asyncio.sleep(0))
    try:
        yield revocations
    finally:
        await revocations.stop()
        await pool.close()
        await redis.aclose()


@pytest.mark.asyncio
async def test_a_channel_that_stops_answering_is_taken_for_dead(redis_url: str) -> None:
    """A stopped Redis, or a network that drops packets, leaves the subscribed connection
    open and takes the listener's pings without answering them; its revocation messages
    are lost alike. Sending a ping was all the listener checked, so it counted itself
    listening (and the replica fresh) for as long as the stall lasted, however long. The
    pongs are what count: a second without one and the channel is down."""
    async with _relayed_listener(redis_url) as (relay, revocations):
        relay.stalled = True
        await _until(lambda: not revocations._listening, timeout=3.0)
        relay.stalled = False
        relay.cut()  # what a stalled connection comes to in the end
        await _until(lambda: revocations._listening)


@pytest.mark.asyncio
async def test_a_replica_busy_for_a_second_does_not_take_its_channel_for_dead(
    redis_url: str,
) -> None:
    """The replica's event loop is held for 1.3 s (a long request, a collection, a busy
    machine) while the listener waits between pings: nothing was asked of Redis meanwhile,
    so nothing is missing. Judged from the last thing heard, that second looked like a
    silent channel: the listener resubscribed, and the replica denied every check
    revocation_state_stale until its next poll."""
    async with _relayed_listener(redis_url) as (_, revocations):
        await asyncio.sleep(0.6)  # pings answered
        subscribed = revocations._subscribed_at
        time.sleep(1.3)  # the whole loop held, the listener among it
        await asyncio.sleep(0.8)
        assert revocations._listening and revocations._subscribed_at == subscribed


@pytest.mark.asyncio
async def test_a_replica_starts_fresh(redis_url: str, migrated_database_url: str) -> None:
    """start() returned before the channel was subscribed, so a replica took requests it
    could only deny (revocation_state_stale) until it was; now it returns once fresh (or,
    with Redis down, after a bounded wait, to deny until Redis is back)."""
    async with _polled(redis_url, migrated_database_url) as revocations:
        await revocations.start()
        assert revocations.fresh()


@pytest.mark.asyncio
async def test_a_stopped_revocation_listener_and_poll_have_ended(
    redis_url: str, migrated_database_url: str
) -> None:
    """stop() cancelled the listener and the poll loop and returned: the verifier closed
    its pool and Redis client while they were still ending."""
    async with _polled(redis_url, migrated_database_url) as revocations:
        await revocations.start()
        await revocations.stop()
        assert all(task.done() for task in revocations._tasks)


@pytest.mark.asyncio
async def test_a_revocation_lost_while_the_channel_was_down_is_read_before_deciding(
    redis_url: str, migrated_database_url: str
) -> None:
    """While the channel is down the replica denies (revocation_state_stale). A revocation
    committed meanwhile has its message lost, and the last poll read before it; once the
    listener had subscribed again the replica counted itself fresh on that poll, and
    allowed the revoked token until the next (here, with a 30 s poll and staleness bound,
    for up to 30 s; by default for up to a poll interval, which the rule for a dead
    channel is there to refuse). Now a replica is fresh only on a poll read after its
    subscription, and it polls at once when it subscribes."""
    v, _ = verifier(revocation_poll=30.0, revocation_max_staleness=31.0)
    relay = _Relay(redis_url)
    redis = aioredis.Redis.from_url(relay.url(await relay.start()))
    pool = await asyncpg.create_pool(migrated_database_url, min_size=1, max_size=2)
    revocations = _Revocations(pool, redis, v.settings, also=lambda: asyncio.sleep(0))
    v.revocations = revocations
    token = mint(now=time.time())
    jti = json.loads(b64url_decode(token.split(".")[1]))["jti"]

    async def decision() -> str:
        v._known_grants.add("grant-1", time.monotonic())  # no grant lookup
        return str((await v.verify("prov_a", ask(token)))["reason"])

    try:
        await revocations.start()
        await _until(revocations.fresh)
        assert await decision() == "ok"
        relay.refusing = True
        relay.cut()
        await _until(lambda: not revocations._listening)
        assert await decision() == "revocation_state_stale"
        await pool.execute(
            "INSERT INTO revocations (kind, target, revoked_by) VALUES ('token', $1, 'test')", jti
        )  # its message, published now, reaches no replica
        relay.refusing = False
        await _until(lambda: revocations._listening)
        assert await decision() in ("revocation_state_stale", "revoked")
        await _until(revocations.fresh)
        assert await decision() == "revoked"
    finally:
        await revocations.stop()
        await redis.aclose()
        await pool.close()
        await relay.close()


# --- stopping: a cancellation in the turn the awaited call ends is not lost -----------------
#
# stop() (the replica closing) cancels the listener and the poll loop. On Python 3.11,
# ``asyncio.wait_for`` returns the result of a call that ends in the loop turn its caller is
# cancelled in and drops the cancellation: the loop then ran on for good, after its replica
# had closed. Each test cancels its loop in exactly that turn.


async def _ends_cancelled(task: asyncio.Task[None]) -> None:
    try:
        await asyncio.wait((task,), timeout=2.0)
        assert task.cancelled(), "the loop runs on after it was cancelled"
    finally:
        task.cancel()
        await asyncio.wait((task,), timeout=2.0)


@pytest.mark.asyncio
async def test_the_listener_stops_when_cancelled_as_its_ping_is_sent(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis = aioredis.Redis.from_url(redis_url)
    revocations = _Revocations(
        cast(Any, None), redis, cast(Any, None), also=lambda: asyncio.sleep(0)
    )
    listener = asyncio.create_task(revocations._listen())
    ping = aioredis.client.PubSub.ping

    async def cancelled_as_sent(pubsub: aioredis.client.PubSub) -> bool:
        sent = await ping(pubsub)
        monkeypatch.undo()  # once
        listener.cancel()
        return sent

    try:
        await _until(lambda: revocations._listening)
        monkeypatch.setattr(aioredis.client.PubSub, "ping", cancelled_as_sent)
        await _ends_cancelled(listener)
    finally:
        await redis.aclose()


@pytest.mark.asyncio
async def test_the_listener_stops_when_cancelled_as_a_failed_round_is_closed(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round that failed closes its connection, then waits and subscribes again: a
    cancellation in the turn the close ends must end the listener there, not a round
    later."""
    redis = aioredis.Redis.from_url(redis_url)
    publisher = aioredis.Redis.from_url(redis_url)
    revocations = _Revocations(
        cast(Any, None), redis, cast(Any, None), also=lambda: asyncio.sleep(0)
    )
    listener = asyncio.create_task(revocations._listen())
    closing = _service._closing

    async def cancelled_as_closed(pubsub: Any) -> None:
        await closing(pubsub)
        monkeypatch.undo()  # once
        listener.cancel()

    try:
        await _until(lambda: revocations._listening)
        monkeypatch.setattr(_service, "_closing", cancelled_as_closed)
        await publisher.publish(REVOCATION_CHANNEL, b"{not json")  # fails the round
        await _ends_cancelled(listener)
        assert not revocations._listening  # not subscribed again
    finally:
        await redis.aclose()
        await publisher.aclose()


class _Hooked:
    """The pool, but ``then()`` runs in the very turn one kind of read has been answered:
    ``epoch`` (the provider table's change counter), ``kids`` (the signing keys) or
    ``providers`` (the provider table, read on a pooled connection). ``after`` counts the
    reads begun after that."""

    def __init__(self, pool: asyncpg.Pool, read: str, then: Callable[[], Any]) -> None:
        self._pool = pool
        self._read = read
        self._then = then
        self.after = 0

    def _begun(self) -> None:
        if not self._read:
            self.after += 1

    def _answered(self, read: str) -> None:
        if read == self._read:
            self._read = ""  # once
            self._then()

    async def fetchval(self, query: str, *args: Any) -> Any:
        self._begun()
        value = await self._pool.fetchval(query, *args)
        self._answered("epoch" if "provider_changes" in query else query)
        return value

    async def fetch(self, query: str, *args: Any) -> Any:
        self._begun()
        rows = await self._pool.fetch(query, *args)
        self._answered("kids" if query.startswith("SELECT kid ") else query)
        return rows

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        self._begun()
        async with self._pool.acquire() as conn:
            yield conn
        self._answered("providers")


@pytest.mark.asyncio
@pytest.mark.parametrize("read", ["epoch", "providers", "kids"])
async def test_the_poll_loop_stops_when_cancelled_as_a_table_sync_read_is_answered(
    migrated_database_url: str, read: str
) -> None:
    """Each poll also syncs the provider and key tables (``_sync_tables``), each read
    bounded; a cancellation in the turn one of them is answered must end the loop there,
    before any other read."""
    pool = await asyncpg.create_pool(migrated_database_url, min_size=1, max_size=2)
    polling: asyncio.Task[None] | None = None

    def cancel() -> None:
        assert polling is not None
        polling.cancel()

    hooked = _Hooked(pool, read, cancel)
    v, _ = verifier(pool=hooked, revocation_poll=0.01)
    revocations = _Revocations(pool, cast(Any, None), v.settings, also=v._sync_tables)
    try:
        polling = asyncio.create_task(revocations._poll_loop())
        await _ends_cancelled(polling)
        assert hooked.after == 0
    finally:
        await pool.close()
