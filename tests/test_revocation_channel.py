"""The revocation channel's listener in a verifier replica, against a real Redis (and,
to show the decisions, PostgreSQL and the replica's service layer in process)."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from typing import Any, cast

import asyncpg
import pytest
import redis.asyncio as aioredis
from verifier_inprocess import ask, mint, verifier

from agentauth.protocol import b64url_decode
from agentauth.store import REVOCATION_CHANNEL
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


@pytest.mark.asyncio
async def test_a_channel_that_stops_answering_is_taken_for_dead(redis_url: str) -> None:
    """A stopped Redis, or a network that drops packets, leaves the subscribed connection
    open and takes the listener's pings without answering them; its revocation messages
    are lost alike. Sending a ping was all the listener checked, so it counted itself
    listening (and the replica fresh) for as long as the stall lasted, however long. The
    pongs are what count: a second without one and the channel is down."""
    relay = _Relay(redis_url)
    redis = aioredis.Redis.from_url(relay.url(await relay.start()))
    revocations = _Revocations(
        cast(Any, None), redis, cast(Any, None), also=lambda: asyncio.sleep(0)
    )
    listener = asyncio.create_task(revocations._listen())
    try:
        await _until(lambda: revocations._listening)
        relay.stalled = True
        await _until(lambda: not revocations._listening, timeout=3.0)
        relay.stalled = False
        relay.cut()  # what a stalled connection comes to in the end
        await _until(lambda: revocations._listening)
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await redis.aclose()
        await relay.close()


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
    v, _ = verifier(revocation_poll=30.0, revocation_max_staleness=30.0)
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
