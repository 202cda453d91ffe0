"""The shard data plane: its wire format, and a real shard's server refusing bad peers.

The shard here runs in-process (a plain ``StateShard`` object, not an actor) with a real
PostgreSQL behind it; what crosses the socket is what a verifier replica sends.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from decimal import Decimal
from typing import Any

import asyncpg
import msgpack
import pytest
import pytest_asyncio

from agentauth.actors import Check, StateShard
from agentauth.actors._wire import MAX_FRAME, Codec, decode_results, frame, read_frame
from agentauth.protocol import Action, Envelope

ENVELOPE = Envelope.model_validate(
    {
        "rate_limits": [{"max_count": 100, "window_seconds": 60}],
        "spend_limits": [{"amount": "100", "currency": "EUR", "period": "day"}],
        "step_up_threshold": {"amount": "50", "currency": "EUR"},
    }
)


def _check(**changes: Any) -> Check:
    fields: dict[str, Any] = {
        "agent_id": "agt_wire",
        "provider_id": "prov_wire",
        "grant_id": "grt_wire",
        "jkt": "k" * 43,
        "jti": secrets.token_urlsafe(12),
        "iat": time.time(),
        "action": Action(
            kind="transact", resource="pay/x", amount=Decimal("12.50"), currency="EUR"
        ),
        "envelope": ENVELOPE,
        "token_jti": "tok",
    }
    fields.update(changes)
    return Check(**fields)


def _payload(framed: bytes) -> bytes:
    return framed[4:]


def test_checks_round_trip() -> None:
    checks = [
        _check(),
        _check(step_up_ref="ref-1", step_up_valid=True),
        _check(action=None, envelope=None, grant_id=None, jkt=None, jti=None, deny="revoked"),
    ]
    sender, receiver = Codec(), Codec()
    request_id, decoded = receiver.decode_checks(_payload(sender.encode_checks(7, checks)))
    assert request_id == 7
    assert decoded == checks
    # The second time, the receiver serves the same parsed envelope from its cache.
    _, again = receiver.decode_checks(_payload(sender.encode_checks(8, checks[:1])))
    assert again[0].envelope is decoded[0].envelope


def _row(**changes: Any) -> list[Any]:
    row: list[Any] = ["a", "p", None, None, None, 1.0, None, None, None, False, None, None]
    for index, value in changes.items():
        row[int(index[1:])] = value
    return row


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # not msgpack
        msgpack.packb(5),
        msgpack.packb((1, 2, 3)),
        msgpack.packb(("1", [])),
        msgpack.packb((1, [["a"] * 11])),  # a check of the wrong arity
        msgpack.packb((1, [_row(f0=1)])),  # agent id not text
        msgpack.packb((1, [_row(f5="now")])),  # iat not a number
        msgpack.packb((1, [_row(f6='{"kind":"fly"}')])),  # not an action
        msgpack.packb((1, [_row(f7="{")])),  # not an envelope
    ],
)
def test_malformed_batches_are_refused(payload: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case fails in its own words
        Codec().decode_checks(payload)


@pytest_asyncio.fixture
async def shard(migrated_database_url: str) -> Any:
    shard = StateShard(index=701, database_url=migrated_database_url)
    yield shard
    await shard.close()


async def _chain_size(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM audit_events WHERE chain = 'verifier-701'"
        )
    finally:
        await conn.close()
    return int(count)


async def _closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Whether the shard hung up on us (and no frame came first)."""
    try:
        await asyncio.wait_for(read_frame(reader), 2.0)
    except asyncio.IncompleteReadError:
        return True
    finally:
        writer.close()
        await writer.wait_closed()
    return False


@pytest.mark.asyncio
async def test_a_linked_verifier_gets_decisions(shard: StateShard, database_url: str) -> None:
    host, port, token = await shard.endpoint()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(frame(token))
    assert await read_frame(reader) == b"ok"
    writer.write(Codec().encode_checks(3, [_check(), _check(deny="revoked")]))
    request_id, rows = decode_results(await read_frame(reader))
    assert request_id == 3
    assert [(row[0], row[1]) for row in rows] == [(True, "ok"), (False, "revoked")]
    assert rows[0][2] == {"rate": [99], "spend": ["87.5"]}
    writer.close()
    await writer.wait_closed()
    assert await _chain_size(database_url) == 2


@pytest.mark.asyncio
async def test_bad_peers_are_dropped_and_decide_nothing(
    shard: StateShard, database_url: str
) -> None:
    host, port, token = await shard.endpoint()
    before = await _chain_size(database_url)
    batch = Codec().encode_checks(1, [_check()])

    # A wrong token: the connection closes without an "ok", the batch is never read.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(frame(secrets.token_bytes(32)) + batch)
    assert await _closed(reader, writer)

    # A length prefix beyond the cap is refused before anything is buffered.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write((MAX_FRAME + 1).to_bytes(4, "big"))
    assert await _closed(reader, writer)

    # A malformed batch after a good handshake closes the link.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(frame(token))
    assert await read_frame(reader) == b"ok"
    writer.write(frame(b"\x93\x01\x02\x03"))
    assert await _closed(reader, writer)

    assert await _chain_size(database_url) == before


class _Remote:
    """What the client uses of a Ray actor method: ``.remote()`` giving an awaitable."""

    def __init__(self, value: Any) -> None:
        self._value = value

    def remote(self) -> Any:
        async def answer() -> Any:
            return self._value

        return answer()


class _Handle:
    def __init__(self, host: str, port: int, token: bytes) -> None:
        self.endpoint = _Remote((host, port, token))


@pytest.mark.asyncio
async def test_a_stuck_shard_is_denied_fast_and_not_flooded() -> None:
    """A shard that takes the link but never answers (hung, not dead)."""
    from agentauth.actors import ShardClient

    token = secrets.token_bytes(32)
    frames: list[bytes] = []

    async def stuck(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if await read_frame(reader) == token:
                writer.write(frame(b"ok"))
                while True:
                    frames.append(await read_frame(reader))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(stuck, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = ShardClient([_Handle("127.0.0.1", port, token)], timeout=0.05, call_timeout=0.4)
    try:
        await client.connect()
        # One overrun call could be a hiccup: only its own checks are denied.
        for _ in range(2):
            late = await client.check(0, _check())
            assert (late.allowed, late.reason) == (False, "state_timeout")
        assert len(frames) == 2
        # Two calls out and unanswered: the shard looks hung; checks are denied, not sent.
        meanwhile = await asyncio.gather(*(client.check(0, _check()) for _ in range(20)))
        assert {(r.allowed, r.reason) for r in meanwhile} == {(False, "state_timeout")}
        assert len(frames) == 2
        # A call silent for call_timeout: the link is torn down, checks are denied at once
        # while the shard is found afresh, then tried again (and time out again).
        await asyncio.sleep(0.6)
        broken = await client.check(0, _check())
        assert (broken.allowed, broken.reason) == (False, "state_unavailable")
        await asyncio.sleep(0.2)
        retried = await client.check(0, _check())
        assert (retried.allowed, retried.reason) == (False, "state_timeout")
        assert len(frames) == 3
    finally:
        client.close()
        server.close()
        await server.wait_closed()
