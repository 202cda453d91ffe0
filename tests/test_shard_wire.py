"""The shard data plane: its wire format, and a real shard's server refusing bad peers.

The shard here runs in-process (a plain ``StateShard`` object, not an actor) with a real
PostgreSQL behind it; what crosses the socket is what a verifier replica sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import msgpack
import pytest
import pytest_asyncio
from pydantic import ValidationError
from shard_checks import a_check, arriving, payment, timed

from agentauth.actors import Check, StateShard, _shard, _wire
from agentauth.actors._wire import (
    ACKS_ANNOUNCED,
    MAX_FRAME,
    Codec,
    ack_id,
    decode_results,
    encode_ack,
    frame,
    read_frame,
)
from agentauth.protocol import Action, AuditEvent, Envelope
from agentauth.verifier import VerifierSettings

ENVELOPE = Envelope.model_validate(
    {
        "rate_limits": [{"max_count": 100, "window_seconds": 60}],
        "spend_limits": [{"amount": "100", "currency": "EUR", "period": "day"}],
        "step_up_threshold": {"amount": "50", "currency": "EUR"},
    }
)


def _check(**changes: Any) -> Check:
    fields: dict[str, Any] = {"action": payment("12.50"), "envelope": ENVELOPE, "token_jti": "tok"}
    return a_check("wire", **(fields | changes))


def _payload(framed: bytes) -> bytes:
    return framed[4:]


def test_checks_round_trip() -> None:
    checks = [
        _check(),
        _check(step_up_ref="ref-1", step_up_valid=True),
        _check(action=None, envelope=None, grant_id=None, jkt=None, jti=None, deny="revoked"),
        _check(envelope=None, jkt=None, jti=None, deny="state_timeout", voids="verifier-3:41"),
    ]
    sender, receiver = Codec(), Codec()
    request_id, decoded = receiver.decode_checks(_payload(sender.encode_checks(7, checks)))
    assert request_id == 7
    assert decoded == checks
    # The second time, the receiver serves the same parsed envelope from its cache.
    _, again = receiver.decode_checks(_payload(sender.encode_checks(8, checks[:1])))
    assert again[0].envelope is decoded[0].envelope


def test_a_replica_from_before_voids_is_understood() -> None:
    """Mid-upgrade, a replica sends 12 columns (no ``voids``); the shard takes them."""
    row = ("a", "p", "g", "k", "j", 1.0, None, None, None, False, "t", "revoked")
    [check] = Codec().decode_checks(msgpack.packb((1, [row])))[1]
    assert (check.deny, check.voids) == ("revoked", None)


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
        msgpack.packb((1, [[*_row(), None, None]])),  # ... either way
        msgpack.packb((1, [[*_row(), "verifier-0:1"]])),  # a void without the answer given
        msgpack.packb((1, [_row(f0=1)])),  # agent id not text
        msgpack.packb((1, [_row(f5="now")])),  # iat not a number
        msgpack.packb((1, [_row(f5=float("nan"))])),  # iat NaN: never "too old"
        msgpack.packb((1, [_row(f5=float("inf"))])),  # iat infinite
        msgpack.packb((1, [_row(f6='{"kind":"fly"}')])),  # not an action
        msgpack.packb((1, [_row(f7="{")])),  # not an envelope
        # U+0000, which PostgreSQL cannot store: as an agent, grant or step-up id it failed
        # the commit of every check merged with it; in an event's body, every later jsonb
        # read of the grant's events (a filter is the action's one free text)
        msgpack.packb((1, [_row(f0="agt\x00")])),
        msgpack.packb((1, [_row(f2="grt\x00")])),
        msgpack.packb((1, [_row(f8="ref\x00")])),
        msgpack.packb((1, [_row(f11="revoked\x00")])),
        msgpack.packb((1, [_row(f6='{"kind":"read","resource":"a","filter":"\\u0000"}')])),
        # ids longer than an audit event's subject and actor can name (see the next test)
        msgpack.packb((1, [_row(f0="a" * (_wire._MAX_AGENT_ID + 1))])),
        msgpack.packb((1, [_row(f1="p" * (_wire._MAX_PROVIDER_ID + 1))])),
        # a grant id or step-up reference past what an index entry holds failed the commit
        # of every check merged with it (test_ids_as_long_as_the_wire_takes_are_stored)
        msgpack.packb((1, [_row(f2="g" * (_wire._MAX_KEY + 1))])),
        msgpack.packb((1, [_row(f8="r" * (_wire._MAX_KEY + 1))])),
        # a request id whose ack id msgpack cannot pack (the ack raised in its timer), or
        # one no replica uses
        msgpack.packb((2**64 - 1, [_row()])),
        msgpack.packb((2**63 - 1, [_row()])),
        msgpack.packb((-5, [_row()])),
        # more checks than any replica sends in one batch (VerifierSettings.max_batch)
        pytest.param(msgpack.packb((1, [_row()] * (_wire.MAX_CHECKS + 1))), id="too-many"),
    ],
)
def test_malformed_batches_are_refused(payload: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case fails in its own words
        Codec().decode_checks(payload)


def test_the_largest_batch_a_replica_may_send_is_taken_and_acknowledged() -> None:
    """The bounds above refuse nothing a replica sends: its request ids count up from 0,
    and its batches hold at most its max_batch checks, which its settings hold to
    MAX_CHECKS. The largest id taken still has an ack id that packs."""
    largest = msgpack.packb((_wire._MAX_REQUEST_ID, [_row()] * _wire.MAX_CHECKS))
    request_id, checks = Codec().decode_checks(largest)
    assert len(checks) == _wire.MAX_CHECKS
    assert decode_results(_payload(encode_ack(ack_id(request_id))))[0] == ack_id(request_id)
    settings = {
        "database_url": "postgresql://x",
        "redis_url": "redis://x",
        "issuer": "https://registry.test/registry",
    }
    assert VerifierSettings(**settings, max_batch=_wire.MAX_CHECKS).max_batch == _wire.MAX_CHECKS
    with pytest.raises(ValidationError):
        VerifierSettings(**settings, max_batch=_wire.MAX_CHECKS + 1)


def _wide_text(length: int) -> str:
    """Random characters of four UTF-8 bytes each: the most bytes (and the least
    compression) ``length`` characters can take."""
    return "".join(chr(0x10000 + secrets.randbelow(0xFFFF)) for _ in range(length))


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_ids_as_long_as_the_wire_takes_are_stored(database_url: str) -> None:
    """The longest ids the wire takes (one more character is refused, above) are an allow
    the shard commits, in an event the chain's readers accept. The shard names the agent
    and provider in the event's subject and actor, which AuditEvent.from_canonical holds to
    256 characters (events are chained unvalidated: a longer id was stored all the same,
    and the chain could no longer be exported or verified); the agent id, grant id and
    step-up reference go in indexed columns, whose entries PostgreSQL holds to about 2.7
    KB (longer ones failed the commit of every check merged with them)."""
    wide = _check(
        agent_id=_wide_text(_wire._MAX_AGENT_ID),
        provider_id=_wide_text(_wire._MAX_PROVIDER_ID),
        grant_id=_wide_text(_wire._MAX_KEY),
        step_up_ref=_wide_text(_wire._MAX_KEY),
        step_up_valid=True,
        action=payment("60"),
    )
    _, [check] = Codec().decode_checks(_payload(Codec().encode_checks(1, [wide])))
    shard = StateShard(index=703, database_url=database_url)
    try:
        [result] = await shard.check_batch([check])
        assert (result.allowed, result.audit_event) == (True, "verifier-703:0")
    finally:
        await shard.close()
    conn = await asyncpg.connect(database_url)
    try:
        body = await conn.fetchval("SELECT body FROM audit_events WHERE chain = 'verifier-703'")
    finally:
        await conn.close()
    event = AuditEvent.from_canonical(body)
    assert (len(event.subject), len(event.actor)) == (256, 256)
    assert event.data["step_up_ref"] == wide.step_up_ref


# An envelope with every list at its MAX_RULES: the largest a grant may hold (3.4 KB).
_LARGEST_ENVELOPE = Envelope.model_validate(
    {
        "rate_limits": [{"max_count": 10_000, "window_seconds": 2_678_400}] * 16,
        "time_windows": [
            {
                "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                "start": "00:00",
                "end": "24:00",
            }
        ]
        * 16,
        "timezone": "America/Argentina/ComodRivadavia",
        "spend_limits": [{"amount": "999999999999.999999", "currency": "EUR", "period": "month"}]
        * 16,
        "max_per_transaction": {"amount": "999999999999.999999", "currency": "EUR"},
        "step_up_threshold": {"amount": "999999999999.999999", "currency": "EUR"},
        "expires_at": 253_402_214_400,
    }
)


def _largest_check(n: int) -> Check:
    """As large a check as a replica sends: the largest envelope, the longest resource and
    filter, every id at its longest (128; a proof's jti too)."""
    tag = f"{n:05d}"
    return Check(
        agent_id=tag + "a" * 123,
        provider_id="p" * 128,
        grant_id=tag + "g" * 123,
        jkt="k" * 43,
        jti=tag + "j" * 123,
        iat=time.time(),
        action=Action(kind="read", resource="r/" * 255 + "s", filter="f" * 512),
        envelope=_LARGEST_ENVELOPE,
        step_up_ref=tag + "s" * 123,
        step_up_valid=True,
        token_jti=tag + "t" * 59,
    )


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_full_batch_of_the_largest_checks_crosses_the_link(database_url: str) -> None:
    """A replica may send MAX_CHECKS checks in one call (its max_batch), each as large as
    a grant and a request allow: the frame must fit. At 4 MiB it did not (1,024 such
    checks were over): the shard dropped the link on the frame, and every check of the
    call was denied state_unavailable, again on every full batch."""
    from agentauth.actors import ShardClient

    checks = [_largest_check(n) for n in range(_wire.MAX_CHECKS)]
    assert len(Codec().encode_checks(0, checks)) <= 4 + MAX_FRAME
    shard = StateShard(index=796, database_url=database_url)
    client = None
    try:
        host, port, token = await shard.endpoint()
        client = ShardClient([_Handle(host, port, token)], max_batch=_wire.MAX_CHECKS, timeout=30.0)
        await client.connect()
        results = await asyncio.gather(*(client.check(0, check) for check in checks))
        assert {(r.allowed, r.reason) for r in results} == {(True, "ok")}
        assert client.batches == 1
    finally:
        if client is not None:
            client.close()
        await shard.close()


def test_a_links_cache_of_parsed_envelopes_is_bounded_in_bytes() -> None:
    """JSON allows any amount of whitespace, so a peer holding the token can send valid
    envelopes padded to nearly MAX_FRAME, each a new text. The link's cache of parsed
    envelopes was bounded by count only (4,096 of them: 16 GiB); now it also keeps at most
    _PARSED_TEXT characters of texts, the oldest going first."""
    codec, texts = Codec(), []
    for n in range(12):
        texts.append("{" + " " * (1024 * 1024 + n) + "}")
        _, [check] = codec.decode_checks(msgpack.packb((n, [_row(f7=texts[-1])])))
        assert check.envelope == Envelope()
    cached = codec._envelope._items
    assert sum(len(text) for text in cached) <= _wire._PARSED_TEXT
    assert texts[0] not in cached and texts[-1] in cached
    # A text still held is a hit: the same parsed envelope comes back.
    _, [again] = codec.decode_checks(msgpack.packb((12, [_row(f7=texts[-1])])))
    assert again.envelope is cached[texts[-1]]


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


async def _linked(
    host: str, port: int, token: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A link through the handshake: the shard's "ok", then its word that it acknowledges."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(frame(token))
    assert await read_frame(reader) == b"ok"
    assert decode_results(await read_frame(reader)) == (ACKS_ANNOUNCED, [])
    return reader, writer


async def _frames_until_answer(reader: asyncio.StreamReader) -> list[tuple[int, list[Any]]]:
    """Frames up to and including the next answer (acks, if any, before it)."""
    frames = [decode_results(await asyncio.wait_for(read_frame(reader), 5.0))]
    while frames[-1][0] < 0:
        frames.append(decode_results(await asyncio.wait_for(read_frame(reader), 5.0)))
    return frames


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
    reader, writer = await _linked(host, port, token)
    writer.write(Codec().encode_checks(3, [_check(), _check(deny="revoked")]))
    request_id, rows = (await _frames_until_answer(reader))[-1]
    assert request_id == 3
    assert [(row[0], row[1]) for row in rows] == [(True, "ok"), (False, "revoked")]
    assert rows[0][2] == {"rate": [99], "spend": ["87.5"]}
    writer.close()
    await writer.wait_closed()
    assert await _chain_size(database_url) == 2


@pytest.mark.asyncio
async def test_a_link_reset_by_its_replica_does_not_stop_close_halfway(
    migrated_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() waited for each link's socket in turn, and the wait of a link its replica had
    reset (a crashed replica) raised ConnectionResetError out of close(): the other links
    and the database connection stayed open."""
    shard = StateShard(index=702, database_url=migrated_database_url)
    host, port, token = await shard.endpoint()
    links = [await _linked(host, port, token) for _ in range(2)]
    reader, writer = links[0]
    writer.write(Codec().encode_checks(1, [_check()]))
    await _frames_until_answer(reader)  # the database connection is open now
    assert shard.stats()["connected"]
    reset, other = list(shard._peers)[:2]

    async def reset_by_peer() -> None:
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(reset, "wait_closed", reset_by_peer)
    await shard.close()
    assert not shard.stats()["connected"]
    assert other.is_closing()
    for link_reader, link_writer in links:
        assert await _closed(link_reader, link_writer)


@pytest.mark.asyncio
async def test_a_batch_the_shard_is_slow_to_answer_is_acknowledged_first(
    shard: StateShard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a commit is awaited (here held 0.2 s), the shard still reads and acknowledges:
    the replica learns the shard is slow, not stopped. The ack names the batch, and comes
    in well before the answer."""
    commit = shard._commit

    async def slow(*args: Any) -> None:
        await asyncio.sleep(0.2)
        await commit(*args)

    monkeypatch.setattr(shard, "_commit", slow)
    host, port, token = await shard.endpoint()
    reader, writer = await _linked(host, port, token)
    try:
        began = time.monotonic()
        writer.write(Codec().encode_checks(5, [_check(deny="revoked")]))
        ack = decode_results(await asyncio.wait_for(read_frame(reader), 5.0))
        acked_after = time.monotonic() - began
        assert ack == (ack_id(5), []) and ack_id(ack_id(5)) == 5
        assert (await _frames_until_answer(reader))[-1][0] == 5
        assert acked_after < 0.15 < time.monotonic() - began
    finally:
        writer.close()
        await writer.wait_closed()


def test_a_replica_from_before_acks_takes_them_for_no_answer_of_its() -> None:
    """An old replica looks every answer up by its request id (never negative): the frames
    acks travel in decode as answers with an id it never used and no rows."""
    for frame_ in (encode_ack(ACKS_ANNOUNCED), encode_ack(ack_id(0)), encode_ack(ack_id(7))):
        request_id, rows = decode_results(_payload(frame_))
        assert request_id < 0 and rows == []


@pytest.mark.asyncio
async def test_an_answer_the_shard_cannot_deliver_is_voided_by_the_shard(
    shard: StateShard, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica's link goes while its batch is decided (the replica died): no provider
    can have received those allows, and the shard, finding the link closed, says so."""
    host, port, token = await shard.endpoint()
    _, writer = await _linked(host, port, token)
    before = await _chain_size(database_url)
    # A new incarnation on this chain refuses proofs up to its last decision plus the skew
    # (earlier tests here decided on it a moment ago): this proof is issued after that, on
    # a clock 11 s later, and the shard's clock says so too (no sleep).
    clock = time.time
    monkeypatch.setattr(time, "time", lambda: clock() + 11)
    fresh = _check()
    writer.write(Codec().encode_checks(1, [fresh, _check(deny="revoked")]))
    await writer.drain()
    writer.close()  # gone before the answer
    await writer.wait_closed()
    deadline = time.monotonic() + 5
    while await _chain_size(database_url) < before + 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT seq, event, body FROM audit_events WHERE chain = 'verifier-701'"
            " AND seq >= $1 ORDER BY seq",
            before,
        )
    finally:
        await conn.close()
    assert [r["event"] for r in rows] == ["verify.allow", "verify.deny", "verify.void"]
    void = json.loads(rows[2]["body"])["data"]
    assert void["voids"] == f"verifier-701:{rows[0]['seq']}"
    assert void["reason"] == "answer_undelivered"


@pytest.mark.asyncio
async def test_a_peer_that_stops_reading_is_dropped_and_its_unsent_allows_voided(
    migrated_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer holding the token sends checks and never reads its answers. The shard used to
    buffer every answer for as long as the connection stayed open; now, past _MAX_UNSENT
    of answers unsent, it aborts the link, and each allow among the answers lost with its
    buffer is voided. Afterwards every allow on the chain either reached the peer's socket
    (it reads them at last) or is voided, never both. (A chain of its own: the proofs of
    other tests here, some issued on a clock set ahead, would make these replays.)"""
    limit = 16 * 1024  # the real bound is MiBs of answers: thousands of commits
    monkeypatch.setattr(_shard, "_MAX_UNSENT", limit)
    conn = await asyncpg.connect(migrated_database_url)
    try:
        before = await conn.fetchval(
            "SELECT count(*) FROM audit_events WHERE chain = 'verifier-703'"
        )
    finally:
        await conn.close()
    shard = StateShard(index=703, database_url=migrated_database_url)
    host, port, token = await shard.endpoint()
    # Small socket buffers on both ends, so the kernel takes little before asyncio has to.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before the handshake
    sock.connect((host, port))  # on this host: at once
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(frame(token))
    await _until(lambda: len(shard._peers) == 1)
    [link] = shard._peers
    link.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    codec, buffered = Codec(), []
    try:
        for request_id in range(100):
            # One batch at a time, each answered (or its answer lost) before the next goes:
            # the shard has read everything when it aborts, so its socket closes cleanly.
            writer.write(codec.encode_checks(request_id, [a_check("unread") for _ in range(128)]))
            await writer.drain()
            await _until(lambda sent=128 * (request_id + 1): shard._decisions >= sent)
            await _until(lambda: not shard._answering)
            buffered.append(link.transport.get_write_buffer_size())
            if link.is_closing():
                break
        assert link.is_closing(), "the shard kept buffering answers nobody read"
        assert max(buffered) <= limit
        # What reached the peer's socket: the handshake, acks, whole answers, perhaps part
        # of one.
        delivered = set()
        assert await read_frame(reader) == b"ok"
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                _, answers = decode_results(await asyncio.wait_for(read_frame(reader), 5.0))
                delivered |= {answer[4] for answer in answers if answer[0]}
        # The voids were committed before the last answer task ended (awaited above).
        conn = await asyncpg.connect(migrated_database_url)
        try:
            rows = await conn.fetch(
                "SELECT seq, event, body FROM audit_events WHERE chain = 'verifier-703'"
                " AND seq >= $1 ORDER BY seq",
                before,
            )
        finally:
            await conn.close()
    finally:
        writer.close()
        await writer.wait_closed()
        await shard.close()
    allows = {f"verifier-703:{r['seq']}" for r in rows if r["event"] == "verify.allow"}
    voids = [json.loads(r["body"])["data"] for r in rows if r["event"] == "verify.void"]
    voided = {v["voids"] for v in voids}
    assert {v["reason"] for v in voids} == {"answer_undelivered"}
    assert len(voided) == len(voids)  # each once
    assert delivered and voided  # some answers got out before the peer's buffers filled
    assert delivered | voided == allows
    assert not delivered & voided


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

    # A length prefix beyond the cap is refused before anything is buffered; before the
    # token is shown, the cap is the token's own size.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write((MAX_FRAME + 1).to_bytes(4, "big"))
    assert await _closed(reader, writer)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write((len(token) + 1).to_bytes(4, "big"))
    assert await _closed(reader, writer)

    # A malformed batch after a good handshake closes the link.
    reader, writer = await _linked(host, port, token)
    writer.write(frame(b"\x93\x01\x02\x03"))
    assert await _closed(reader, writer)

    assert await _chain_size(database_url) == before


@pytest.mark.asyncio
async def test_an_oversized_batch_from_a_replica_is_said_in_the_log(
    shard: StateShard, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that showed the token is a replica: a frame over the cap from it means its
    batches outgrew the link (every check on it then denied state_unavailable), which the
    shard dropped without a word, unlike a malformed batch."""
    host, port, token = await shard.endpoint()
    with caplog.at_level(logging.WARNING, logger="agentauth.shard"):
        reader, writer = await _linked(host, port, token)
        writer.write((MAX_FRAME + 1).to_bytes(4, "big"))
        assert await _closed(reader, writer)
    said = [r.getMessage() for r in caplog.records if "frame cap" in r.getMessage()]
    assert len(said) == 1 and str(MAX_FRAME) in said[0], said


@pytest.mark.asyncio
async def test_a_links_socket_is_probed_when_its_peer_falls_silent(shard: StateShard) -> None:
    """A replica host that vanishes sends no FIN: without keepalive probes the shard kept its
    link (a socket and a task) until it next wrote to it, never for a link awaiting its
    next batch."""
    host, port, token = await shard.endpoint()
    _, writer = await _linked(host, port, token)
    try:
        ours = writer.get_extra_info("sockname")
        [peer] = [w for w in shard._peers if w.get_extra_info("peername") == ours]
        sock = peer.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    finally:
        writer.close()


async def _until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5.0
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_connections_yet_to_show_the_token_are_bounded(
    shard: StateShard, caplog: pytest.LogCaptureFixture
) -> None:
    """Silent peers hold a socket each until the token timeout; beyond the bound, new
    connections are closed at once (and reported once, not per connection), and a replica
    links again as soon as there is room."""
    limit = _shard._MAX_UNAUTHENTICATED
    host, port, token = await shard.endpoint()
    silent = [await asyncio.open_connection(host, port) for _ in range(limit)]
    try:
        await _until(lambda: len(shard._peers) == limit)
        with caplog.at_level(logging.WARNING, logger="agentauth.shard"):
            for _ in range(5):
                began = time.monotonic()
                assert await _closed(*await asyncio.open_connection(host, port))
                assert time.monotonic() - began < 1.0  # not the token timeout's 5 s
        turned_away = [r for r in caplog.records if "turned away" in r.getMessage()]
        assert len(turned_away) == 1
        assert len(shard._peers) == limit  # the refused were never taken in

        reader, writer = silent.pop()
        writer.close()
        await writer.wait_closed()
        await _until(lambda: len(shard._peers) == limit - 1)
        reader, writer = await _linked(host, port, token)
        writer.write(Codec().encode_checks(9, [_check(deny="revoked")]))
        assert (await _frames_until_answer(reader))[-1][0] == 9
        assert shard._unauthenticated == limit - 1  # a linked peer is no longer counted
        writer.close()
        await writer.wait_closed()
    finally:
        for _, writer in silent:
            writer.close()
    await _until(lambda: shard._unauthenticated == 0)


@pytest.mark.asyncio
async def test_a_connection_cancelled_as_its_handshake_ends_takes_no_link(
    shard: StateShard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() closes the linked connections, then cancels those still in their handshake.
    One whose handshake ended in the loop turn of that cancel went on (``asyncio.wait_for``
    on Python 3.11 dropped the cancellation): it took the replica's token and served the
    link, which close() no longer closes, and close() waited on it as long as it lasted."""
    loop = asyncio.get_running_loop()
    handshake = loop.connect_accepted_socket

    async def cancelled_as_it_ends(*args: Any, **kwargs: Any) -> Any:
        connected = await handshake(*args, **kwargs)
        monkeypatch.undo()  # once
        for task in shard._connections:  # as close() does
            task.cancel()
        return connected

    host, port, token = await shard.endpoint()
    monkeypatch.setattr(loop, "connect_accepted_socket", cancelled_as_it_ends)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(frame(token))  # a replica shows it at once
    assert await _closed(reader, writer)
    await _until(lambda: not shard._connections and not shard._peers)


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
        # On the new link, first the two unanswered checks are asked about (their fate is
        # unknown: see test_checks_whose_call_never_answered_are_settled_on_the_next_link).
        assert len(frames) == 4
        _, settled = Codec().decode_checks(frames[2])
        assert [(c.voids, c.deny) for c in settled] == [("*", "state_timeout")] * 2
    finally:
        client.close()
        server.close()
        await server.wait_closed()


def _hung_after_one(n: int, checks: list[Check]) -> tuple[float | None, list[tuple[Any, ...]]]:
    """A shard that answers its first call (it warms this process up: the metrics, the
    codec), then reads every call and answers none: hung, not dead."""
    return (0.0, [_allow(n) for _ in checks]) if n == 0 else (None, [])


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("acks", "bound", "sent"),
    [(False, 2.2, 3), (True, 1.3, 2)],
    ids=["shard-without-acks", "acknowledging-shard"],
)
async def test_checks_queued_behind_a_call_to_a_hung_shard_are_denied_in_bounded_time(
    acks: bool, bound: float, sent: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard takes a call and never answers it (hung, not dead); more checks queue up
    behind it. A shard that acknowledges would have acknowledged the call by its deadline:
    it has not, so it is stopped, and the checks behind are denied with it, unsent, within
    one timeout. One from before acks could be merely slow: the checks behind go out, when
    the call overruns, in a call with its own timeout, so they wait at most two. Either
    way, later checks are then denied at once."""
    from agentauth.actors import ShardClient, _client

    counted: list[tuple[str, dict[str, str] | None]] = []
    monkeypatch.setattr(_client, "increment", lambda name, tags=None: counted.append((name, tags)))
    timeout = 0.2
    with _FakeShard(_hung_after_one, acks=acks) as fake:
        client = ShardClient([_Handle("127.0.0.1", fake.port, fake.token)], timeout=timeout)
        try:
            await client.connect()
            assert (await client.check(0, _check())).allowed
            answers = await arriving(client, _check, behind=4, every=timeout / 5)
            assert {(r.allowed, r.reason) for _, r in answers} == {(False, "state_timeout")}
            # The slowest: the first call's own check with acks (one timeout), else the
            # first check behind it (1.8 timeouts); the rest of the margin is for a busy
            # machine.
            assert max(elapsed for elapsed, _ in answers) < timeout * bound
            await fake.batches_seen(sent)
            # The warm-up, the first call, and (without acks) those behind it.
            assert len(fake.batches) == sent
            at_once, result = await timed(client, _check())
            assert result.reason == "state_timeout" and at_once < timeout / 4
            assert len(fake.batches) == sent
            assert (client.overruns, client.unacknowledged) == (sent - 1, int(acks))
            # ... and so says the metric operators see (docs/runbook.md).
            acknowledged = "false" if acks else "true"
            assert counted == [("shard_overruns", {"shard": "0", "acknowledged": acknowledged})] * (
                sent - 1
            )
        finally:
            client.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("acks", [False, True], ids=["shard-without-acks", "acknowledged"])
async def test_a_call_that_overran_once_does_not_cost_the_checks_behind_it(acks: bool) -> None:
    """The shard answers one call late (a slow commit, a busy machine) and the next one at
    once. The checks that queued behind the late call had waited about a timeout for it
    already, but their call gets a timeout of its own, and they are allowed: one overrun
    denies only its own checks. (A shard that acknowledges did so for the late call: it
    is slow, not stopped.)"""
    from agentauth.actors import ShardClient

    timeout = 0.2

    def late_once(n: int, checks: list[Check]) -> tuple[float, list[tuple[Any, ...]]]:
        return (timeout * 1.2 if n == 1 else 0.0), [_allow(n) for _ in checks]

    with _FakeShard(late_once, acks=acks) as fake:
        client = ShardClient([_Handle("127.0.0.1", fake.port, fake.token)], timeout=timeout)
        try:
            await client.connect()
            assert (await client.check(0, _check())).allowed
            late = asyncio.ensure_future(client.check(0, _check()))
            await fake.batches_seen(2)
            behind = await asyncio.gather(*(client.check(0, _check()) for _ in range(3)))
            assert ((await late).allowed, (await late).reason) == (False, "state_timeout")
            assert [r.allowed for r in behind] == [True] * 3
            await fake.batches_seen(4)  # the late call's allow reached nobody: voided
            assert [len(batch) for batch in fake.batches] == [1, 1, 3, 1]
            assert fake.batches[3][0].voids == "verifier-9:1"
            assert (client.overruns, client.unacknowledged) == (1, 0)
        finally:
            client.close()


Answer = Callable[[int, list[Check]], tuple[float | None, list[tuple[Any, ...]]] | None]


class _FakeShard:
    """A shard's wire end in its own thread and event loop, so it answers while the
    test's loop is blocked. ``answer(n, checks)`` gives the delay and the rows of the
    n-th batch (a delay of None: never answered, the next batch is read), or None to
    drop the connection unanswered; every batch received is kept.
    With ``hold``, it answers only once ``go`` is set. With ``acks``, it acknowledges as a
    shard does (announced at the handshake; a batch answered late is acknowledged when
    read, one never answered is not: the shard is stopped)."""

    def __init__(self, answer: Answer, *, hold: bool = False, acks: bool = False) -> None:
        self._hold = hold
        self._acks = acks
        self.token = secrets.token_bytes(32)
        self.batches: list[list[Check]] = []
        self.received = threading.Event()
        self.go = threading.Event()
        self._answer = answer
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _FakeShard:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    async def batches_seen(self, count: int) -> None:
        """Wait (up to 3 s) until ``count`` batches have come in."""
        deadline = time.monotonic() + 3
        while len(self.batches) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.run_until_complete(asyncio.sleep(0.01))
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        codec = Codec()
        try:
            if await read_frame(reader) != self.token:
                return
            writer.write(frame(b"ok"))
            if self._acks:
                writer.write(encode_ack(ACKS_ANNOUNCED))
            while True:
                request_id, checks = codec.decode_checks(await read_frame(reader))
                self.batches.append(checks)
                self.received.set()
                answer = self._answer(len(self.batches) - 1, checks)
                if answer is None:
                    return
                delay, rows = answer
                if delay is None:
                    continue
                if self._acks and (delay or self._hold):
                    writer.write(encode_ack(ack_id(request_id)))
                if self._hold:
                    await asyncio.get_running_loop().run_in_executor(None, self.go.wait, 5)
                if delay:
                    await asyncio.sleep(delay)
                writer.write(frame(msgpack.packb((request_id, rows))))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _fields(check: Check, names: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(getattr(check, name) for name in names)


def _allow(seq: int) -> tuple[Any, ...]:
    return (True, "ok", None, None, f"verifier-9:{seq}")


@pytest.mark.asyncio
async def test_an_answer_in_before_a_busy_loop_sees_it_is_not_a_timeout() -> None:
    """The loop stalls past the call's deadline while the answer comes in: when it runs
    again the timer and the answer are both due. The answer is the shard's committed
    decision, so the client gets it, not ``state_timeout`` (the chain holds an allow)."""
    from agentauth.actors import ShardClient

    with _FakeShard(lambda n, checks: (0.0, [_allow(n)]), hold=True) as fake:
        client = ShardClient([_Handle("127.0.0.1", fake.port, fake.token)], timeout=0.05)
        try:
            await client.connect()
            pending = asyncio.ensure_future(client.check(0, _check()))
            while not fake.received.is_set():
                await asyncio.sleep(0.001)
            fake.go.set()  # it answers now, while ...
            time.sleep(0.2)  # ... this loop is blocked: a long callback, a descheduled process
            result = await pending
            assert (result.allowed, result.reason, result.audit_event) == (
                True,
                "ok",
                "verifier-9:0",
            )
        finally:
            client.close()


@pytest.mark.parametrize(
    "rows",
    [
        [],  # fewer rows than checks
        [(True,)],  # a row cut short
        [_allow(0), _allow(1)],  # more rows than checks
    ],
)
@pytest.mark.asyncio
async def test_an_answer_not_of_the_agreed_shape_is_a_deny(rows: list[tuple[Any, ...]]) -> None:
    """Whatever a malformed answer says, nothing in it is trusted: an allow in it is not
    taken, the check is denied."""
    from agentauth.actors import ShardClient

    with _FakeShard(lambda n, checks: (0.0, rows)) as fake:
        client = ShardClient([_Handle("127.0.0.1", fake.port, fake.token)], timeout=0.5)
        try:
            await client.connect()
            asked = _check()
            result = await client.check(0, asked)
            assert (result.allowed, result.reason, result.audit_event) == (
                False,
                "state_unavailable",
                None,
            )
            # The link that carried it is dropped (the next check finds it broken and opens
            # another); on the new link the shard is asked what it decided for that check,
            # as for a call that never answered.
            await client.check(0, _check())
            await fake.batches_seen(2)
            settle = [c for batch in fake.batches[1:] for c in batch if c.voids == "*"]
            assert [(c.jti, c.deny) for c in settle] == [(asked.jti, "state_unavailable")]
        finally:
            client.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("linked", [True, False], ids=["on-a-link", "through-the-connect"])
async def test_a_batch_that_cannot_be_encoded_is_denied_and_frees_its_slot(
    linked: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Nothing a check carries should fail to encode, but if it did, its batch is denied
    (nothing was sent, so nothing was decided) and the next batch still leaves. On a link
    already open and on the first batch, which goes out through the connect, alike; and it
    is logged as what it is, not as a shard that cannot be reached (an operator would look
    for a dead shard that is fine)."""
    from agentauth.actors import ShardClient

    with _FakeShard(lambda n, checks: (0.0, [_allow(n) for _ in checks])) as fake:
        client = ShardClient([_Handle("127.0.0.1", fake.port, fake.token)], timeout=0.5)
        try:
            if linked:
                await client.connect()
            with caplog.at_level(logging.WARNING, logger="agentauth.shards"):
                unencodable = dataclasses.replace(_check(), jkt=object())
                result = await client.check(0, unencodable)
            assert (result.allowed, result.reason) == (False, "state_unavailable")
            messages = [r.getMessage() for r in caplog.records]
            assert any("could not be sent" in m for m in messages), messages
            assert not any("unreachable" in m for m in messages), messages
            assert (await client.check(0, _check())).allowed
            assert len(fake.batches) == 1
        finally:
            client.close()


@pytest.mark.asyncio
async def test_an_unreachable_shard_is_logged_once_not_per_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every batch for a shard that cannot be reached is denied at once: during a restart,
    hundreds a second per replica. The log says so once per shard, not once per batch."""
    from agentauth.actors import ShardClient

    with socket.socket() as placeholder:  # a port nothing listens on
        placeholder.bind(("127.0.0.1", 0))
        port = placeholder.getsockname()[1]
    client = ShardClient([_Handle("127.0.0.1", port, secrets.token_bytes(32))], timeout=0.2)
    try:
        with caplog.at_level(logging.WARNING, logger="agentauth.shards"):
            for _ in range(30):
                result = await client.check(0, _check())
                assert (result.allowed, result.reason) == (False, "state_unavailable")
        said = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(said) == 1, said
        assert said[0].startswith("shard 0 unreachable; its checks are denied state_unavailable")
    finally:
        client.close()


@pytest.mark.asyncio
async def test_a_check_queued_behind_a_call_in_flight_has_its_wait_timed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a call is out, later checks wait in the replica: that wait is observed per
    call (its oldest check's), apart from the call's own round trip, so an operator can
    tell a queue in the replica from a slow shard."""
    from agentauth.actors import ShardClient, _client

    seen: list[tuple[str, float, dict[str, str] | None]] = []
    monkeypatch.setattr(
        _client, "observe", lambda name, value, tags=None: seen.append((name, value, tags))
    )
    with _FakeShard(lambda n, checks: (0.0, [_allow(n) for _ in checks]), hold=True) as fake:
        client = ShardClient([_Handle("127.0.0.1", fake.port, fake.token)], timeout=2.0)
        try:
            await client.connect()
            first = asyncio.ensure_future(client.check(0, _check()))
            while not fake.received.is_set():
                await asyncio.sleep(0.001)
            second = asyncio.ensure_future(client.check(0, _check()))
            await asyncio.sleep(0.15)  # the first call is held by the shard meanwhile
            fake.go.set()
            assert [r.allowed for r in await asyncio.gather(first, second)] == [True, True]
            waits = [(value, tags) for name, value, tags in seen if name == "shard_queue"]
            assert [tags for _, tags in waits] == [{"shard": "0"}] * 2
            assert waits[0][0] < 0.1  # the first left at once
            assert waits[1][0] >= 0.15  # the second waited for the first to come back
            calls = [value for name, value, _ in seen if name == "shard_call"]
            assert len(calls) == 2
            assert calls[1] < 0.15  # ... which is not the second call's own round trip
        finally:
            client.close()


@pytest.mark.asyncio
async def test_an_allow_that_came_too_late_is_marked_void_on_the_chain() -> None:
    """The first call overruns: both clients are answered ``state_timeout``. When the
    shard's answer comes (an allow and a deny), the client records on the chain that the
    allow reached nobody; the deny needs nothing."""
    from agentauth.actors import ShardClient

    def answer(n: int, checks: list[Check]) -> tuple[float, list[tuple[Any, ...]]]:
        if n == 0:
            return 0.6, [_allow(0), (False, "replay_detected", None, None, "verifier-9:1")]
        return 0.0, [(False, c.deny, None, None, f"verifier-9:{n + 1}") for c in checks]

    with _FakeShard(answer) as fake:
        client = ShardClient([_Handle("127.0.0.1", fake.port, fake.token)], timeout=0.15)
        try:
            await client.connect()
            first, second = _check(), _check()
            results = await asyncio.gather(client.check(0, first), client.check(0, second))
            assert {(r.allowed, r.reason) for r in results} == {(False, "state_timeout")}
            await fake.batches_seen(2)
            await asyncio.sleep(0.3)  # the void's own answer
            assert len(fake.batches) == 2
            [void] = fake.batches[1]
            assert (void.deny, void.voids) == ("state_timeout", "verifier-9:0")
            # The same request, named by its proof (its proof_jti goes on the chain) ...
            same = ("agent_id", "provider_id", "grant_id", "token_jti", "action", "jti")
            assert _fields(void, same) == _fields(first, same)
            assert void.envelope is None  # ... and no envelope travels
        finally:
            client.close()


@pytest.mark.asyncio
async def test_checks_whose_call_never_answered_are_settled_on_the_next_link() -> None:
    """The shard takes a batch and its link dies before it answers (a crash after the
    commit, say): the client cannot know whether it allowed. On the next link it asks
    about each such check, with the answer its client got, so the shard can void the
    allow it may have committed (or record the denial)."""
    from agentauth.actors import ShardClient

    def crashing(n: int, checks: list[Check]) -> tuple[float, list[tuple[Any, ...]]] | None:
        if n == 0:
            return None  # decided, perhaps committed, never answered
        return 0.0, [(False, c.deny, None, None, f"verifier-9:{n}") for c in checks]

    with _FakeShard(crashing) as fake:
        client = ShardClient([_Handle("127.0.0.1", fake.port, fake.token)], timeout=0.5)
        try:
            await client.connect()
            lost = _check()
            first = await client.check(0, lost)
            assert (first.allowed, first.reason) == (False, "state_unavailable")
            # The next check finds the link broken (denied, not sent); it is found afresh.
            assert (await client.check(0, _check())).reason == "state_unavailable"
            await fake.batches_seen(2)
            [settle] = fake.batches[1]
            assert (settle.voids, settle.deny) == ("*", "state_unavailable")
            # The same request: the shard finds its allow by the proof's jti.
            same = ("agent_id", "grant_id", "jkt", "jti")
            assert _fields(settle, same) == _fields(lost, same)
            assert settle.envelope is None
        finally:
            client.close()


def _late_allow_then(
    void_answer: Callable[[list[Check]], tuple[float, list[tuple[Any, ...]]] | None],
) -> Answer:
    """A shard that answers the warm-up, then a call late (an allow: its client was
    denied, so the client voids it), then the void call with ``void_answer``, and every
    later call at once, recording each check."""

    def answer(n: int, checks: list[Check]) -> tuple[float, list[tuple[Any, ...]]] | None:
        if n == 1:
            return 0.5, [_allow(n)]
        if n == 2:
            return void_answer(checks)
        return 0.0, [
            (c.deny is None, c.deny or "ok", None, None, f"verifier-9:{n}") for c in checks
        ]

    return answer


async def _a_late_allow_voided(client: Any, fake: _FakeShard) -> Check:
    """Through ``_late_allow_then``'s first three calls: the check whose allow came late
    (its client denied), once its void has gone out."""
    await client.connect()
    assert (await client.check(0, _check())).allowed
    late = _check()
    assert (await client.check(0, late)).reason == "state_timeout"
    await fake.batches_seen(3)
    [void] = fake.batches[2]
    assert (void.voids, void.jti) == ("verifier-9:1", late.jti)
    return late


@pytest.mark.asyncio
async def test_a_void_whose_call_broke_is_asked_about_on_the_next_link() -> None:
    """The link breaks while the void of a late allow is out: whether the shard wrote it
    is unknown. On the next link the client asks about that proof (the shard voids its
    allow if still unmarked), so the allow is not left on the chain unmarked."""
    from agentauth.actors import ShardClient

    with _FakeShard(_late_allow_then(lambda checks: None)) as fake:
        client = ShardClient([_Handle("127.0.0.1", fake.port, fake.token)], timeout=0.15)
        try:
            late = await _a_late_allow_voided(client, fake)
            # The next check finds the link broken (denied, not sent); it is found afresh.
            await asyncio.sleep(0.1)
            assert (await client.check(0, _check())).reason == "state_unavailable"
            await fake.batches_seen(4)
            [settle] = fake.batches[3]
            assert (settle.voids, settle.deny, settle.jti) == ("*", "state_timeout", late.jti)
        finally:
            client.close()


@pytest.mark.asyncio
async def test_a_void_the_shard_could_not_write_is_asked_about_once_it_records_again() -> None:
    """The shard answers the void of a late allow in time but could not write it (its
    database was away: ``audit_unavailable``). The link is fine, so no reconnect will
    ask about it: the first answer that shows the shard recording again does."""
    from agentauth.actors import ShardClient

    def unwritten(checks: list[Check]) -> tuple[float, list[tuple[Any, ...]]]:
        return 0.0, [(False, "audit_unavailable", None, None, None) for _ in checks]

    with _FakeShard(_late_allow_then(unwritten)) as fake:
        client = ShardClient([_Handle("127.0.0.1", fake.port, fake.token)], timeout=0.15)
        try:
            late = await _a_late_allow_voided(client, fake)
            assert (await client.check(0, _check())).allowed  # the shard records again
            await fake.batches_seen(5)
            [settle] = fake.batches[4]
            assert (settle.voids, settle.deny, settle.jti) == ("*", "state_timeout", late.jti)
            await asyncio.sleep(0.1)
            assert len(fake.batches) == 5  # recorded: not asked about again
        finally:
            client.close()


class _SlowEndpoint:
    """A shard handle whose endpoint answers after ``delay`` (Ray bringing it up)."""

    def __init__(self, host: str, port: int, token: bytes, delay: float) -> None:
        self.endpoint = self
        self._value, self._delay = (host, port, token), delay

    def remote(self) -> Any:
        async def answer() -> Any:
            await asyncio.sleep(self._delay)
            return self._value

        return answer()


@pytest.mark.asyncio
async def test_a_slow_first_connect_leaves_the_call_only_the_rest_of_the_timeout() -> None:
    """The replica's first check to a shard waits for the link to open, then for the call.
    Both together must fit one timeout (plus the call's small floor): a connect that took
    most of it must not start a full timeout of its own for the call."""
    from agentauth.actors import ShardClient

    timeout = 0.2
    # This process's first check pays for its warm-up (the metrics, the codec): not here.
    with _FakeShard(lambda n, checks: (0.0, [_allow(n) for _ in checks])) as warm:
        warming = ShardClient([_Handle("127.0.0.1", warm.port, warm.token)], timeout=timeout)
        try:
            await warming.connect()
            assert (await warming.check(0, _check())).allowed
        finally:
            warming.close()
    with _FakeShard(lambda n, checks: (None, []), acks=True) as fake:  # answers nothing
        handle = _SlowEndpoint("127.0.0.1", fake.port, fake.token, delay=timeout * 0.7)
        client = ShardClient([handle], timeout=timeout)
        try:
            elapsed, result = await timed(client, _check())
            assert (result.allowed, result.reason) == (False, "state_timeout")
            # Before: 0.7 of a timeout to connect, then a whole one for the call (1.7).
            assert elapsed < timeout * 1.35
        finally:
            client.close()
