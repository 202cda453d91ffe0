"""A verifier replica's end of the shard link (``ShardClient``) against a peer that
misbehaves: a real socket, served by an asyncio server in the test's own loop, whose
script says what it does with each batch. No database, no Ray."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import pytest
from shard_checks import a_check, timed

from agentauth.actors import Check, Result, ShardClient
from agentauth.actors._client import _Link, _Out
from agentauth.actors._wire import (
    ACK_AFTER,
    ACKS_ANNOUNCED,
    Codec,
    ack_id,
    encode_ack,
    frame,
    read_frame,
)

# What the peer does with the n-th batch of a connection (request id, checks, writer).
Script = Callable[[int, int, list[Check], asyncio.StreamWriter], Awaitable[None]]


class _Endpoint:
    """What the client uses of a shard's Ray handle: ``endpoint.remote()``, answered
    after ``delay`` (Ray bringing a shard up)."""

    def __init__(self, address: tuple[str, int, bytes], delay: float = 0.0) -> None:
        self.endpoint = self
        self._address, self._delay = address, delay

    def remote(self) -> Any:
        async def answer() -> tuple[str, int, bytes]:
            await asyncio.sleep(self._delay)
            return self._address

        return answer()


class _Peer:
    """A shard's wire end that does what ``script`` says; counts connections, keeps the
    batches it read and whether each connection has ended."""

    def __init__(self, script: Script, *, acks: bool = True) -> None:
        self._script, self._acks = script, acks
        self.token = secrets.token_bytes(32)
        self.connections = 0
        self.open = 0
        self.batches: list[list[Check]] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def handle(self, delay: float = 0.0) -> _Endpoint:
        return _Endpoint(("127.0.0.1", self.port, self.token), delay)

    async def stop(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        codec = Codec()
        try:
            if await read_frame(reader) != self.token:
                return
            writer.write(frame(b"ok") + (encode_ack(ACKS_ANNOUNCED) if self._acks else b""))
            n = 0
            while True:
                request_id, checks = codec.decode_checks(await read_frame(reader))
                self.batches.append(checks)
                await self._script(n, request_id, checks, writer)
                n += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


def _answer(request_id: int, rows: list[tuple[Any, ...]]) -> bytes:
    return frame(msgpack.packb((request_id, rows)))


def _allows(request_id: int, checks: list[Check]) -> bytes:
    return _answer(request_id, [(True, "ok", None, None, f"verifier-9:{request_id}")] * len(checks))


async def _silent(n: int, request_id: int, checks: list[Check], writer: Any) -> None:
    """Reads every batch, answers none (a stopped shard, a half-open link)."""


async def _until(condition: Callable[[], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


def _check() -> Check:
    return a_check("faults")


@pytest.mark.asyncio
async def test_close_ends_every_link_and_call_and_nothing_reconnects() -> None:
    """close() while a call is out to a silent shard and checks wait behind it: every
    check is denied, the socket is closed, no task of the client is left, and nothing
    opens a new link afterwards (before, the checks queued behind the failed call went
    out through a fresh connect that nobody ever closed, and so did a later check)."""
    peer = _Peer(_silent)
    await peer.start()
    client = ShardClient([peer.handle()], timeout=5.0, call_timeout=5.0)
    try:
        await client.connect()
        out = asyncio.ensure_future(client.check(0, _check()))
        await _until(lambda: len(peer.batches) == 1)
        behind = [asyncio.ensure_future(client.check(0, _check())) for _ in range(3)]
        await asyncio.sleep(0.01)
        client.close()
        results = await asyncio.wait_for(asyncio.gather(out, *behind), 1.0)
        assert {(r.allowed, r.reason) for r in results} == {(False, "state_unavailable")}
        late = await asyncio.wait_for(client.check(0, _check()), 1.0)
        assert (late.allowed, late.reason) == (False, "state_unavailable")
        await asyncio.sleep(0.3)  # time for a reconnect, were one to start
        assert (peer.connections, peer.open) == (1, 0)
        assert not client._watchers
        assert client._connecting == [None]
    finally:
        client.close()
        await peer.stop()


@pytest.mark.asyncio
async def test_close_during_a_connect_keeps_no_link_and_answers_its_checks() -> None:
    """close() while the first connect is still finding the shard: the connect ends,
    the checks waiting for it are denied at once, and no link is left open."""
    peer = _Peer(_silent)
    await peer.start()
    client = ShardClient([peer.handle(delay=0.2)], timeout=5.0, connect_timeout=5.0)
    try:
        waiting = asyncio.ensure_future(client.check(0, _check()))
        await asyncio.sleep(0.05)
        client.close()
        result = await asyncio.wait_for(waiting, 0.1)
        assert (result.allowed, result.reason) == (False, "state_unavailable")
        await asyncio.sleep(0.3)
        assert peer.connections == 0
        assert not client._watchers and client._connecting == [None]
    finally:
        client.close()
        await peer.stop()


@pytest.mark.asyncio
async def test_a_link_closed_in_the_turn_it_opened_ends_its_socket_and_calls() -> None:
    """A link closed before its reader ever ran (in the same turn it opened): its call
    fails and its socket is closed (before, the reader's cleanup never ran: the call
    waited forever and the socket stayed open)."""
    peer = _Peer(_silent)
    await peer.start()
    try:
        link = await _Link.open("127.0.0.1", peer.port, peer.token)
        _, call = link.send([_check()])
        link.close()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(call, 0.5)
        await _until(lambda: peer.connections == 1 and peer.open == 0)
        assert (peer.connections, peer.open) == (1, 0)
        assert not link.alive
    finally:
        await peer.stop()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "rows",
    [
        [(True,)],  # a row cut short
        [],  # no row for the check
        [(True, "ok", None, None, 7)],  # an event id that is not text
    ],
    ids=["row-cut-short", "no-row", "event-not-text"],
)
async def test_a_malformed_late_answer_leaves_its_checks_asked_about(
    rows: list[tuple[Any, ...]],
) -> None:
    """A call overruns (its client is denied ``state_timeout``) and its answer, when it
    comes, is not of the agreed shape. Nothing in it is trusted: the check's fate is
    unknown, so it is asked about by its proof on the next link, and the link that carried
    the answer goes. (A row cut short ended the call's task with an IndexError: the check
    was never asked about and its allow, if committed, never voided.)"""

    async def late(n: int, request_id: int, checks: list[Check], writer: Any) -> None:
        if n == 0 and len(peer.batches) == 1:
            await asyncio.sleep(0.15)
            writer.write(_answer(request_id, rows))
        else:
            writer.write(_allows(request_id, checks))

    peer = _Peer(late)
    await peer.start()
    client = ShardClient([peer.handle()], timeout=0.05)
    try:
        await client.connect()
        lost = _check()
        first = await client.check(0, lost)
        assert (first.allowed, first.reason) == (False, "state_timeout")
        await asyncio.sleep(0.2)  # the late answer has come
        # The next check finds the link gone (or opens the next one); either way the
        # check of unknown fate is asked about on the next link.
        await client.check(0, _check())
        await _until(lambda: any(c.voids == "*" for batch in peer.batches for c in batch))
        asked = [c for batch in peer.batches for c in batch if c.voids == "*"]
        assert [(c.jti, c.deny) for c in asked] == [(lost.jti, "state_timeout")]
        assert peer.connections == 2
    finally:
        client.close()
        await peer.stop()


@pytest.mark.asyncio
async def test_checks_queued_behind_a_slow_connect_are_answered_within_its_bound() -> None:
    """The shard is still being found (its endpoint answers only after a while) when
    a check arrives, and more queue behind it. The first is denied at its timeout; those
    behind it waited for the same connect, so they are denied within 1.2 timeouts of
    their arrival, not a timeout in the queue and a whole one more (2)."""
    timeout = 0.2
    peer = _Peer(_silent)
    await peer.start()
    # This process's first checks pay for its warm-up: not in the measured client.
    warm = ShardClient([peer.handle(delay=1.0)], timeout=timeout)
    await timed(warm, _check())
    warm.close()
    client = ShardClient([peer.handle(delay=1.0)], timeout=timeout)
    try:
        first = asyncio.ensure_future(timed(client, _check()))
        await asyncio.sleep(0.01)
        behind = [asyncio.ensure_future(timed(client, _check())) for _ in range(3)]
        answers = await asyncio.gather(first, *behind)
        assert {r.reason for _, r in answers} == {"state_unavailable"}
        assert max(elapsed for elapsed, _ in answers) < timeout * 1.4
    finally:
        client.close()
        await peer.stop()


@pytest.mark.asyncio
async def test_answers_out_of_order_duplicated_or_for_no_call_change_nothing() -> None:
    """The peer answers a later call first, then repeats an answer with another verdict
    and sends one for an id never used: each check gets the answer to its own call,
    once."""
    held: list[tuple[int, list[Check]]] = []

    async def shuffled(n: int, request_id: int, checks: list[Check], writer: Any) -> None:
        held.append((request_id, checks))
        if len(held) < 2:
            return
        (first_id, first), (second_id, _) = held
        deny = [(False, "replay_detected", None, None, "verifier-9:77")] * len(first)
        writer.write(_answer(second_id, [(False, "rate_limited", None, 1.0, "verifier-9:5")]))
        writer.write(_answer(first_id, deny))
        writer.write(_allows(first_id, first))  # a duplicate: too late to count
        writer.write(_allows(99, [_check()]))  # a call never made

    peer = _Peer(shuffled)
    await peer.start()
    client = ShardClient([peer.handle()], timeout=1.0, max_batch=1, max_inflight=2)
    try:
        await client.connect()
        results = await asyncio.gather(client.check(0, _check()), client.check(0, _check()))
        assert [(r.allowed, r.reason) for r in results] == [
            (False, "replay_detected"),
            (False, "rate_limited"),
        ]
        link = client._links[0]
        assert link is not None and link.alive and not link._calls
    finally:
        client.close()
        await peer.stop()


@pytest.mark.asyncio
async def test_a_frame_cut_in_the_middle_denies_and_the_check_is_asked_about() -> None:
    """The peer sends half of an answer's frame and goes quiet (stopped mid-write, or a
    half-open link): the check is denied at its timeout, the link is torn down after the
    call's silence, and the check is asked about on the next link."""

    async def cut(n: int, request_id: int, checks: list[Check], writer: Any) -> None:
        if len(peer.batches) == 1:
            whole = _allows(request_id, checks)
            writer.write(whole[: len(whole) // 2])
        else:
            writer.write(_allows(request_id, checks))

    peer = _Peer(cut, acks=False)
    await peer.start()
    client = ShardClient([peer.handle()], timeout=0.05, call_timeout=0.2)
    try:
        await client.connect()
        lost = _check()
        elapsed, first = await timed(client, lost)
        assert (first.allowed, first.reason) == (False, "state_timeout")
        assert elapsed < 0.15
        await asyncio.sleep(0.3)  # past call_timeout: the link is torn down
        await client.check(0, _check())  # finds it broken; the reconnect starts
        await _until(lambda: any(c.voids == "*" for batch in peer.batches for c in batch))
        asked = [c for batch in peer.batches for c in batch if c.voids == "*"]
        assert [(c.jti, c.deny) for c in asked] == [(lost.jti, "state_timeout")]
    finally:
        client.close()
        await peer.stop()


@pytest.mark.asyncio
async def test_a_cancelled_caller_cancels_no_other_check_of_its_batch() -> None:
    """Three checks leave in one call; one caller is cancelled while it is out. The other
    two get their allows; the cancelled one's allow is voided (it reached no one)."""
    gate = asyncio.Event()

    async def held(n: int, request_id: int, checks: list[Check], writer: Any) -> None:
        if len(peer.batches) == 1:
            await gate.wait()
        writer.write(_allows(request_id, checks))

    peer = _Peer(held)
    await peer.start()
    client = ShardClient([peer.handle()], timeout=1.0)
    try:
        await client.connect()
        calls = [asyncio.ensure_future(client.check(0, _check())) for _ in range(3)]
        await _until(lambda: len(peer.batches) == 1)
        calls[1].cancel()
        gate.set()
        kept = await asyncio.gather(calls[0], calls[2])
        assert [r.allowed for r in kept] == [True, True]
        assert calls[1].cancelled()
        await _until(lambda: len(peer.batches) == 2)
        [void] = peer.batches[1]
        assert (void.deny, void.voids) == ("answer_undelivered", "verifier-9:0")
    finally:
        client.close()
        await peer.stop()


@pytest.mark.asyncio
async def test_a_call_sent_with_the_floor_of_its_timeout_is_not_taken_for_a_stopped_shard() -> None:
    """A slow first connect leaves the call only the floor of its timeout (4 ms at the
    default 40), less than a shard waits before it acknowledges (5 ms). A healthy shard
    that takes longer than that to answer has not acknowledged yet when the call overruns:
    that says nothing of it being stopped. Only the call's own check is denied; the next
    check goes out and is allowed (before, the shard was taken for stopped: every check
    was denied at once until the late answer came, and counted as unacknowledged). The
    call is sent as the connect sends it, with a 3 ms budget: a connect timed to leave
    just that would make the test hang on this machine's load."""
    timeout = 0.2  # for the second check: the first gets the floor at the default, 3 ms

    async def slow(n: int, request_id: int, checks: list[Check], writer: Any) -> None:
        loop = asyncio.get_running_loop()
        # As a shard does: an ack ACK_AFTER after reading, then the answer.
        loop.call_later(ACK_AFTER, writer.write, encode_ack(ack_id(request_id)))
        loop.call_later(0.02, writer.write, _allows(request_id, checks))

    peer = _Peer(slow)
    await peer.start()
    client = ShardClient([peer.handle()], timeout=timeout)
    try:
        await client.connect()
        # This process's first call pays for its warm-up (the metrics, the codec): not here.
        await client.check(0, _check())
        await asyncio.sleep(0.05)
        link = client._links[0]
        assert link is not None and link.acks
        answer: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        client._inflight[0] += 1  # as _flush counts the call it hands _connect_and_send
        out = _Out.send(0, link, [(_check(), answer)])
        waiting = asyncio.ensure_future(client._wait(out, 0.003))
        first = await answer
        assert (first.allowed, first.reason) == (False, "state_timeout")
        assert (client.overruns, client.unacknowledged) == (1, 0)
        second = await client.check(0, _check())
        assert (second.allowed, second.reason) == (True, "ok")
        await waiting
    finally:
        client.close()
        await peer.stop()


@pytest.mark.asyncio
async def test_allows_of_unknown_fate_let_go_past_the_bound_are_said(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The allows a shard may have committed while answering audit_unavailable are kept,
    at most _MAX_UNSETTLED per shard, to be asked about: past that the oldest went without
    a word (the unsettled checks' queue says how many it lets go). Each one let go is an
    allow that may stand unvoided on the chain, which an operator must hear of."""
    from agentauth.actors import _client

    monkeypatch.setattr(_client, "_MAX_UNSETTLED", 3)
    client = ShardClient([_Endpoint(("127.0.0.1", 9, b""))], timeout=0.2)
    link: Any = object()  # only compared by identity
    checks = [_check() for _ in range(5)]
    unknown = [Result(False, "audit_unavailable", audit_event=f"verifier-0:{i}") for i in range(5)]
    with caplog.at_level("WARNING", logger="agentauth.actors"):
        results = client._hold_unsure(0, link, checks, unknown, "audit_unavailable")
    assert [r.audit_event for r in results] == [None] * 5  # no name reaches a client
    assert [check for _, check, _ in client._unsure[0]] == checks[2:]  # the newest three
    assert "shard 0: 2 unsettled checks dropped (the oldest)" in caplog.text
    client.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("recorded", [True, False], ids=["recorded", "not-recorded"])
async def test_checks_of_unknown_fate_are_asked_about_a_batch_at_a_time(recorded: bool) -> None:
    """Ten checks of unknown fate wait for the next link (there may be 10,000). They are
    asked about in batches of at most ``max_batch``, the next once the one before is
    answered, not all at once past ``max_inflight`` (until 2026-11-30 they all left
    together, to be merged by the shard into one commit). A batch that records nothing
    (here the shard cannot write) keeps the rest waiting with it, unasked."""
    calls: list[tuple[int, list[Check], Any]] = []

    async def held(n: int, request_id: int, checks: list[Check], writer: Any) -> None:
        calls.append((request_id, checks, writer))

    def made(n: int) -> Callable[[], bool]:
        return lambda: len(calls) == n

    def answer(k: int) -> None:
        request_id, checks, writer = calls[k]
        event = (lambda i: f"verifier-9:{k}{i}") if recorded else (lambda i: None)
        rows = [(False, c.deny, None, None, event(i)) for i, c in enumerate(checks)]
        writer.write(_answer(request_id, rows))

    peer = _Peer(held)
    await peer.start()
    client = ShardClient([peer.handle()], timeout=5.0, max_batch=4, max_inflight=1)
    lost = [_check() for _ in range(10)]
    client._unsettled[0].extend((check, "state_unavailable") for check in lost)
    try:
        await client.connect()  # the new link asks
        await _until(made(1))
        assert (len(calls), client.batches) == (1, 1)  # one call out, the rest unsent
        answer(0)
        if not recorded:
            await _until(lambda: not client._settling[0])
            assert not client._settling[0]
            assert (len(calls), client.batches) == (1, 1)
            kept = [c.jti for c, _ in client._unsettled[0]]
            assert len(kept) == len(lost) and set(kept) == {c.jti for c in lost}
            return
        for k in (1, 2):
            await _until(made(k + 1))
            assert (len(calls), client.batches) == (k + 1, k + 1)
            answer(k)
        await _until(lambda: not client._settling[0])
        asked = [checks for _, checks, _ in calls]
        assert [len(checks) for checks in asked] == [4, 4, 2]
        assert [(c.jti, c.voids, c.deny) for checks in asked for c in checks] == [
            (c.jti, "*", "state_unavailable") for c in lost
        ]
        assert not client._unsettled[0]
    finally:
        client.close()
        await peer.stop()
