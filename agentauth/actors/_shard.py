"""The state shard actor: check-and-reserve, audit append and group commit in one hop.

Each shard owns the per-agent state of the agents hashed to it and is the single writer of
its own audit chain (``verifier-<index>``). Batches are decided in arrival order by one
flusher, their events chained and committed to PostgreSQL in one transaction (calls that
arrive during a commit share the next one, up to a cap), and only then does the actor
reply: no allow leaves before its audit row is durable. If the commit fails, every decision
of the batch becomes a deny (``audit_unavailable``); state already reserved stays reserved,
which can only make later decisions stricter.

A restarted shard has lost its jti windows, so it refuses every proof issued at or before
its chain's replay mark (``shard_restarted``): the newest ``iat`` among the proofs any
decision on the chain reserved, which each commit records with the head it moves. Any
proof the previous incarnation accepted is among those, because no allow leaves a shard
before its event, and so the mark covering it, is committed. (A chain whose head has no
mark of its own, moved by an older release, gives the last decision plus the allowed
clock skew instead.) It also rebuilds each grant's usage from its durable decision events
the first time it sees the grant again. A shard that finds another writer's events on its
chain (a zombie incarnation, a second cluster on the same database) starts over the same
way: floor raised to that writer's mark, every grant's usage forgotten, jti entries kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import socket
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from asyncpg.exceptions import DivisionByZeroError, UniqueViolationError

from .._events import wait_event, wait_within
from .._logs import Throttle
from ..metrics import observe
from ..protocol import GENESIS_HASH, AuditEvent, Remaining, b64url_encode, leaf_hash
from ._state import ANY_ALLOW, Check, Outcome, ShardState, usage_from_events, usage_to_json
from ._wire import (
    ACK_AFTER,
    ACKS_ANNOUNCED,
    MAX_CHECKS,
    MAX_FRAME,
    Codec,
    FrameTooLarge,
    ack_id,
    encode_ack,
    encode_results,
    frame,
    link_tls,
    read_frame,
)

__all__ = ["Result", "StateShard", "shard_for"]

log = logging.getLogger("agentauth.shard")
# Seconds the shard's database connection may take to connect or to run a statement.
_DB_TIMEOUT = 2.0
# The most checks one transaction takes from the calls waiting: whole calls in arrival
# order, always at least one, the rest left for the next. One replica's call may carry this
# many (MAX_CHECKS), and decides and commits well inside _DB_TIMEOUT; calls merged without a
# cap (40,000 checks, many replicas' calls behind one slow commit) took 7.4 s on a small
# node, holding the shard's loop all along, and a commit past its timeout denies every one
# of them audit_unavailable.
_MAX_COMMIT = MAX_CHECKS
# How long a new incarnation spends opening its database connection before it takes checks
# anyway (the reconnect goes on in the background): under a replica's 2 s connect timeout.
_WARM_UP_TIMEOUT = 1.0
# A batch's statements, run once at start (see _warm_up).
# One round trip for every grant of a batch that this incarnation has not seen: its latest
# allow (which carries the spend buckets) and the times of its allows inside its longest
# rate window.
_RESTORE = (
    "SELECT g.grant_id, latest.body, recent.times"
    " FROM unnest($1::text[], $2::bigint[], $3::int[]) AS g(grant_id, since, lim)"
    " LEFT JOIN LATERAL (SELECT body FROM audit_events WHERE grant_id = g.grant_id"
    " AND event = 'verify.allow' ORDER BY time_ms DESC, seq DESC LIMIT 1) latest ON true"
    " LEFT JOIN LATERAL (SELECT array_agg(time_ms) AS times FROM (SELECT time_ms"
    " FROM audit_events WHERE grant_id = g.grant_id AND event = 'verify.allow'"
    " AND time_ms > g.since ORDER BY time_ms DESC LIMIT g.lim) w) recent ON true"
)
# The allow a chain holds for each of a list of proofs, and the void of it if there is one
# (see _find_allows).
_FIND_ALLOWS = (
    "SELECT k.n, e.seq, v.chain AS void_chain, v.seq AS void_seq FROM unnest($1::text[],"
    " $2::text[], $3::bigint[], $4::bigint[]) WITH ORDINALITY AS k(grant_id, jti, lo, hi, n)"
    " JOIN audit_events e ON e.grant_id = k.grant_id AND e.event = 'verify.allow'"
    " AND e.time_ms BETWEEN k.lo AND k.hi AND e.chain = $5"
    " AND e.body::jsonb -> 'data' ->> 'proof_jti' = k.jti"
    " LEFT JOIN LATERAL (SELECT chain, seq FROM audit_events WHERE grant_id = e.grant_id"
    " AND event = 'verify.void' AND time_ms >= e.time_ms"
    " AND body::jsonb -> 'data' ->> 'voids' = e.chain || ':' || e.seq"
    " ORDER BY time_ms, seq LIMIT 1) v ON true"
)
# Append the events, record spent step-ups, move the head if it is where this shard left it;
# otherwise 1 / 0 fails the whole statement.
_COMMIT = (
    "WITH appended AS (INSERT INTO audit_events (chain, seq, entry_hash, body,"
    " event, agent_id, grant_id, time_ms) SELECT * FROM unnest($1::text[],"
    " $2::bigint[], $3::bytea[], $4::text[], $5::text[], $6::text[], $7::text[],"
    " $8::bigint[])),"
    " spent AS (INSERT INTO verifier_step_up_uses (approval_ref, grant_id)"
    " SELECT * FROM unnest($9::text[], $10::text[])),"
    # The replay mark (migration 0011) moves with the head: the previous one counts only if
    # it belongs to the head this batch extends.
    " moved AS (UPDATE audit_heads SET size = $11, head = $12, replay_mark_ms ="
    " GREATEST($15, CASE WHEN replay_mark_size = $14 THEN replay_mark_ms END),"
    " replay_mark_size = $11 WHERE chain = $13 AND size = $14 RETURNING 1)"
    " SELECT 1 / count(*) FROM moved"
)
# This connection's server process, and ending another one of this shard (_end_backend).
_BACKEND = "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
_TERMINATE = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = $1 AND backend_start = $2"
)
_STILL_RUNNING = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND backend_start = $2"
# The head, its replay mark and the time of its last decision, from one snapshot.
_HEAD = (
    "SELECT size, head, replay_mark_ms, replay_mark_size, (SELECT time_ms FROM audit_events"
    " WHERE chain = $1 ORDER BY seq DESC LIMIT 1) AS last_ms FROM audit_heads WHERE chain = $1"
)
# The data plane's token: a frame of exactly this size opens a link.
_TOKEN_FRAME = 32
# Seconds a new connection has to show the token (with TLS, as long again for the handshake
# before it).
_TOKEN_TIMEOUT = 5.0
# Connections that have not shown the token yet, at most, counted from their accept: a TLS
# handshake in progress counts. Each holds a socket and a task for up to _TOKEN_TIMEOUT
# (twice that with TLS), and anyone who can reach the port can open them: unbounded, silent
# peers could use up the actor's file descriptors (its database connection among them). A
# replica opens one link per shard and shows the token in its first round trip, so even
# every replica of a large deployment reconnecting at once after a restart stays far below
# this; one turned away retries (ShardClient's reconnect).
_MAX_UNAUTHENTICATED = 64
# Seconds the accept loop waits after accept() failed (out of file descriptors, say) before
# it tries again, rather than spin.
_ACCEPT_RETRY = 0.1
# A flood is reported at most this often (seconds), with the count turned away meanwhile,
# so it cannot flood the log in turn.
_REFUSED_LOG_EVERY = 60.0
# What fails for every batch or connection while it lasts (the database down, a peer that
# keeps presenting a wrong token) is said at most this often, with the count held back.
_SAID_EVERY = 30.0

# Bytes of answers a link may hold in the shard's memory, not yet taken by the socket,
# before the shard aborts the link; the allows among the answers lost with it are voided
# (answer_undelivered, as for an answer that finds its link closed). Without a bound, a
# peer that sends checks and stops reading (a wedged replica, or anything holding the
# token) has every answer buffered for as long as it keeps the connection open. No replica
# that reads comes near it: an answer is 27-75 bytes a check, and a shard core decides at
# most ~20,000 checks/s (docs/capacity-planning.md), so this is seconds of answers nobody
# read, on top of the MiBs the kernel's socket buffers take first; a replica gives a check
# up after shard_timeout (40 ms) anyway, asking about it on its next link. A link that
# stopped reading costs the shard at most this plus one answer.
_MAX_UNSENT = 4 * 1024 * 1024

# The reason on a void the shard writes itself: its answer found the link closed.
UNDELIVERED = "answer_undelivered"
# What a batch is answered when its commit fails, and the reason on the voids the shard
# writes for a commit it answered so but that took effect after all (see _Unsure).
AUDIT_UNAVAILABLE = "audit_unavailable"


def _node_address() -> str:
    try:
        import ray  # noqa: PLC0415 - a shard driven in-process (tests) runs without Ray

        if ray.is_initialized():
            return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
    except ImportError:
        pass
    return "127.0.0.1"


def _ack(link: _Link, request_id: int, answering: asyncio.Task[None]) -> None:
    """Tell the replica a batch it sent is being worked on, unless it is answered already
    (most are, within ``ACK_AFTER``: no frame then). See ``_wire.ACKS_ANNOUNCED``."""
    if not answering.done() and not link.writer.is_closing():
        link.write(encode_ack(ack_id(request_id)))


# Milliseconds a bigint parameter takes, with room to spare (2**63 is about 9.22e18).
_BIGINT_MS = 9e18


def _bigint_ms(seconds: float) -> int:
    """``seconds`` in whole milliseconds, clamped to what a bigint holds. A check's ``iat``
    comes off the wire as any finite number: one past that range failed the statement it
    was a parameter of, and with it the whole batch, every replica's checks merged into
    it. Clamped, it finds nothing, as a time that far off should."""
    return int(min(max(seconds * 1000, -_BIGINT_MS), _BIGINT_MS))


def shard_for(key: str, shards: int) -> int:
    """Stable shard index for an agent id (or any key)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % shards


@dataclass(frozen=True, slots=True)
class Result:
    allowed: bool
    reason: str
    remaining: dict[str, Any] | None = None
    retry_after: float | None = None
    audit_event: str | None = None


class _Link:
    """The shard's side of a replica's link: everything it writes goes through here, so it
    can tell which answers a link it gives up on never handed to the socket (_MAX_UNSENT).

    asyncio keeps what the socket does not take at once in the transport's buffer, and of
    the bytes written, all but the last ``get_write_buffer_size()`` have gone to the
    kernel. An answer whose last byte is among those still buffered when the link is
    aborted is lost with the buffer: no provider can have it. (With TLS the count is of
    plain text, and what is already encrypted and waiting in the socket's own transport,
    about asyncio's 64 KiB high-water mark, counts as gone: lost on an abort, unvoided, as
    answers in a socket nobody reads are.)"""

    __slots__ = ("_transport", "_unsent", "_written", "writer")

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._transport = writer.transport
        self._written = 0  # bytes given to the transport, all told
        # Answers that may still be (partly) in the buffer: the count of bytes written up
        # to their end, their checks and results. Empty while the socket keeps up.
        self._unsent: deque[tuple[int, list[Check], list[Result]]] = deque()

    def write(self, data: bytes) -> None:
        self._transport.write(data)
        self._written += len(data)

    def answer(
        self, data: bytes, checks: list[Check], results: list[Result]
    ) -> list[tuple[list[Check], list[Result]]]:
        """Write an answer. If the link's buffer has grown past _MAX_UNSENT (its peer is
        not reading), abort the link and return the answers that never left the buffer,
        this one among them; otherwise nothing."""
        self._transport.write(data)  # as write() does, a call less: this is every answer
        self._written += len(data)
        buffered = self._transport.get_write_buffer_size()
        if not buffered:  # the usual case: the kernel took it all
            if self._unsent:
                self._unsent.clear()
            return []
        sent, unsent = self._written - buffered, self._unsent
        while unsent and unsent[0][0] <= sent:
            unsent.popleft()
        unsent.append((self._written, checks, results))
        if buffered <= _MAX_UNSENT:
            return []
        # Not close(): that would keep the buffer until the peer reads it, which it may
        # never do, and deliver the answers voided here if it ever did.
        self._transport.abort()
        lost = [(c, r) for _, c, r in unsent]
        unsent.clear()
        return lost


@dataclass(frozen=True, slots=True)
class _Entry:
    """An event with its canonical bytes and entry hash, computed once."""

    event: AuditEvent
    body: str
    hash: bytes


@dataclass(frozen=True, slots=True)
class _Unsure:
    """A commit whose answer never came (a timeout, a dropped connection): the database may
    have applied it or not. Its clients were answered ``audit_unavailable``, so if it did,
    the chain holds allows nobody got, and the shard owes the chain a void for each."""

    seq: int  # its last event: the statement is atomic, so that one tells for all
    hash: bytes
    carried: list[Check]  # voids owed before it, which it carried
    if_committed: list[Check]  # voids owed if it took effect: one per allow in it
    # The server process that ran it (pid, backend_start), which may still be running it:
    # its fate is only final once that process is gone (see _end_backend).
    backend: tuple[int, Any] | None = None


def _remaining_json(remaining: Remaining | None) -> dict[str, Any] | None:
    if remaining is None:
        return None
    return {
        "rate": list(remaining.rate),
        "spend": [format(amount, "f") for amount in remaining.spend],
    }


# How long close() waits for the links' sockets to finish closing.
_CLOSE_WAIT = 2.0


# A replica's host that vanishes (power, a network partition) sends no FIN: without probes,
# its links stayed open here, a socket and a task each, until the shard next wrote to them,
# which for a link waiting on its next batch was never. Probed after a minute of silence,
# every 10 s, given up after 3 unanswered (about 90 s).
_KEEPALIVE = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))


def _keep_alive(conn: socket.socket) -> None:
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in _KEEPALIVE:
            option = getattr(socket, name, None)  # Linux's; elsewhere the system's timing
            if option is not None:
                conn.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError:
        pass


class StateShard:
    """A Ray actor (created with ``ray.remote``); async, one batch at a time."""

    def __init__(self, *, index: int, database_url: str, idle_grants_after: float = 600.0) -> None:
        self.index = index
        self.chain = f"verifier-{index}"
        self.state = ShardState(started_at=time.time())
        self._database_url = database_url
        self._idle_grants_after = idle_grants_after
        self._conn: asyncpg.Connection | None = None
        # The reconnect in the background, if one runs (see _keep_connecting), and whether
        # a batch waits for it: in process (tests, tools), bounded as a statement is; not
        # once the shard serves replicas (endpoint()), which wait for a batch only
        # shard_timeout: a batch denied at once is the faster denial.
        self._connecting: asyncio.Task[asyncpg.Connection] | None = None
        self._batches_wait = True
        self._retry_now = asyncio.Event()
        # Set by close(): nothing connects again after it (see _reconnect).
        self._closed = False
        # The chain's head as this shard last committed or loaded it.
        self._size = 0
        self._head = GENESIS_HASH
        # The time of this shard's last decision (or of its chain's last committed one, if
        # later), in ms. Decisions are timed no earlier: a wall clock stepped back (NTP,
        # another node after a restart) must not give a later decision an earlier time,
        # since "a grant's latest allow", whose usage a restart restores, is found by time.
        # Nor may a batch whose commit failed leave it behind: that batch's prune forgot the
        # jtis that had expired by its time, so a later decision timed earlier could accept
        # one of their proofs again. A clock held still is conservative: rate windows and
        # spend periods wait for it.
        self._last_ms = 0
        self._pending: deque[tuple[list[Check], asyncio.Future[list[Result]]]] = deque()
        # Voids this shard owes its chain (see _Unsure and _answer), written ahead of the next
        # batch; kept until a commit holding them succeeds.
        self._owed: list[Check] = []
        self._unsure: _Unsure | None = None
        # The server process (pid, backend_start) of the connection last opened, which is
        # self._conn whenever a commit runs (one is opened only while there is none): a
        # commit of unknown fate names the one that ran it.
        self._conn_backend: tuple[int, Any] | None = None
        self._flushing = False
        self.batches = 0
        self._last_prune = time.monotonic()
        self._decisions = 0
        self._tags = {"shard": str(index)}
        # The data plane (see _wire.py): a TCP server started on first ask, and the token
        # a connection must present before it may send checks.
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()  # one per accepted connection
        self._address: tuple[str, int] | None = None
        self._starting = asyncio.Lock()  # replicas ask for the endpoint concurrently
        self._token = secrets.token_bytes(_TOKEN_FRAME)
        self._tls = link_tls("server", os.environ)
        self._answering: set[asyncio.Task[None]] = set()
        self._peers: set[asyncio.StreamWriter] = set()
        self._unauthenticated = 0  # connections yet to show the token (_MAX_UNAUTHENTICATED)
        self._refused = 0  # turned away since the last report of it
        self._refused_logged_at = -math.inf
        self._said = Throttle(_SAID_EVERY)
        # As in the verifier replica: the process's long-lived objects (Ray's own) need not
        # be walked by every full collection, which would pause every decision.
        gc.freeze()

    def ping(self) -> float:
        return self.state.started_at

    async def endpoint(self) -> tuple[str, int, bytes]:
        """Where verifier replicas send checks: host, port and the connection token.

        Asked through Ray, so only members of the cluster learn the token; the server
        listens on this node's address, so replicas on other nodes reach it.
        """
        async with self._starting:
            if self._address is None:
                await self._warm_up()
                await self._listen()
        assert self._address is not None
        return self._address[0], self._address[1], self._token

    async def _warm_up(self) -> None:
        """Connect before the first check comes (see _keep_connecting), for at most a second:
        a database that does not answer is left to the reconnect, which goes on in the
        background while batches are denied at once."""
        # Not again on a live connection (a shard driven in process first, or an endpoint()
        # asked again after listening failed): a second one would replace it under a
        # running batch, and its head reload, racing that batch's commit, could take the
        # shard's own commit for another writer's.
        if self._conn is None or self._conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._reconnect()), _WARM_UP_TIMEOUT)
        self._batches_wait = False

    async def _listen(self) -> None:
        # Connections are accepted here, not by asyncio's server: it would run the TLS
        # handshake before handing a connection over, so a connection could be counted in
        # _MAX_UNAUTHENTICATED only once its handshake was done (or be refused only after
        # one). Accepted here, a connection counts from its accept, and one beyond the
        # bound is closed before any handshake.
        host = _node_address()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, 0), family=family)
        listener.setblocking(False)
        self._listener = listener
        self._address = (host, listener.getsockname()[1])
        self._accepting = asyncio.create_task(self._accept(listener))

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:
                self._said.log(log, "accept", "shard %s: accept failed: %s", self.index, exc)
                await asyncio.sleep(_ACCEPT_RETRY)
                continue
            if self._unauthenticated >= _MAX_UNAUTHENTICATED:
                self._refuse(conn)
                continue
            self._unauthenticated += 1
            _keep_alive(conn)
            task = asyncio.create_task(self._serve(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    def _refuse(self, conn: socket.socket) -> None:
        """Turn away a connection beyond _MAX_UNAUTHENTICATED, reporting it rate-limited."""
        conn.close()  # before any handshake: the point is to free the socket
        self._refused += 1
        now = time.monotonic()
        if now - self._refused_logged_at >= _REFUSED_LOG_EVERY:
            log.warning(
                "shard %s: turned away %d connection(s) since the last such report: %d"
                " others were connected without having shown the token yet (a flood of"
                " peers that never authenticate?)",
                self.index,
                self._refused,
                _MAX_UNAUTHENTICATED,
            )
            self._refused_logged_at = now
            self._refused = 0

    async def _serve(self, conn: socket.socket) -> None:
        """One accepted connection, counted in _unauthenticated (by _accept) until it has
        shown the token or gone."""
        loop = asyncio.get_running_loop()
        codec = Codec()
        reader = asyncio.StreamReader(loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        writer: asyncio.StreamWriter | None = None
        try:
            try:
                # The TLS handshake is bounded as the token is: a peer that stalls either
                # is dropped. On any failure the transport, which owns conn, is closed.
                transport, _ = await asyncio.wait_for(
                    loop.connect_accepted_socket(
                        lambda: protocol,
                        conn,
                        ssl=self._tls,
                        ssl_handshake_timeout=_TOKEN_TIMEOUT if self._tls else None,
                    ),
                    _TOKEN_TIMEOUT,
                )
                writer = asyncio.StreamWriter(transport, protocol, reader, loop)
                self._peers.add(writer)
                # A peer that has not shown the token gets no room for more than one.
                # wait_within also raises a cancellation the handshake's wait_for swallowed
                # (close() cancelling in the turn the handshake ended, after it had closed
                # the writers of _peers): served on, the link would keep close() waiting.
                # (Not for the handshake itself: it would drop the transport unclosed.)
                token = await wait_within(read_frame(reader, limit=_TOKEN_FRAME), _TOKEN_TIMEOUT)
            finally:
                self._unauthenticated -= 1
            if not hmac.compare_digest(token, self._token):
                self._said.log(
                    log,
                    "token",
                    "shard %s: a connection presented a wrong token (a replica of another"
                    " cluster, or someone probing the port)",
                    self.index,
                )
                return
            link = _Link(writer)
            link.write(frame(b"ok") + encode_ack(ACKS_ANNOUNCED))
            while True:
                try:
                    payload = await read_frame(reader)
                except FrameTooLarge:
                    # From a peer that showed the token: a replica whose max_batch or
                    # checks outgrew the frame, which is worth an operator's look (every
                    # check on the link is denied state_unavailable), said as a malformed
                    # batch is, but throttled: the replica reconnects and sends it again.
                    self._said.log(
                        log,
                        "frame",
                        "shard %s: a batch over the %d-byte frame cap; connection closed",
                        self.index,
                        MAX_FRAME,
                    )
                    return
                try:
                    request_id, checks = codec.decode_checks(payload)
                except ValueError:
                    log.warning("shard %s: malformed batch; connection closed", self.index)
                    return
                task = asyncio.create_task(self._answer(link, request_id, checks))
                self._answering.add(task)
                task.add_done_callback(self._answering.discard)
                loop.call_later(ACK_AFTER, _ack, link, request_id, task)
        except (asyncio.IncompleteReadError, OSError, TimeoutError, FrameTooLarge):
            # The peer left, stalled, failed the TLS handshake (ssl.SSLError is an OSError,
            # as ConnectionError is) or sent garbage: drop the connection.
            return
        finally:
            if writer is None:
                conn.close()  # no transport took it over (a failed handshake closed its own)
            else:
                self._peers.discard(writer)
                writer.close()

    async def _answer(self, link: _Link, request_id: int, checks: list[Check]) -> None:
        results = await self.check_batch(checks)
        if not link.writer.is_closing():
            lost = link.answer(encode_results(request_id, results), checks, results)
            if not lost:
                return
            self._said.log(
                log,
                "unread",
                "shard %s: a link's peer stopped reading (over %d bytes of answers"
                " unsent); link closed, the allows among them voided",
                self.index,
                _MAX_UNSENT,
            )
        else:
            lost = [(checks, results)]
        # The link went while these were decided (the replica died, or dropped the link), or
        # the shard gave up on it with these answers still in its buffer (see _MAX_UNSENT):
        # no allow among them reached a provider, so the chain says so. (A replica alive
        # will also ask about them on its next link; by then they are voided already.)
        # Owed, not sent as checks: a replica gone will never ask again, so a void whose
        # commit fails must stay owed, written ahead of a later batch, like those of a
        # commit of unknown fate. An empty batch writes them now.
        undelivered = [
            check.voiding(UNDELIVERED, result.audit_event)
            for answered, answers in lost
            for check, result in zip(answered, answers, strict=True)
            if result.allowed and result.audit_event
        ]
        if undelivered:
            self._owed.extend(undelivered)
            await self.check_batch([])

    async def _connection(self) -> asyncpg.Connection:
        """The database connection, for a batch. One connection, not a pool: flushes run
        one at a time, and a pool's reset on every release would cost a round trip per
        commit.

        A batch of a shard that serves replicas does not wait for a reconnect (see
        _keep_connecting): it is denied ``audit_unavailable`` at once, while the reconnect
        goes on."""
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        self._conn = None
        connecting = self._reconnect()
        if not self._batches_wait:
            self._retry_now.set()
            raise ConnectionError("reconnecting to the database")
        try:
            return await asyncio.wait_for(asyncio.shield(connecting), _DB_TIMEOUT)
        except asyncio.CancelledError:
            # close() cancelled the reconnect, not this batch: denied like any batch the
            # database cannot take. (The cancellation went through _flush, which answers
            # failures only, and left the batch's caller waiting for good.)
            current = asyncio.current_task()
            if connecting.cancelled() and (current is None or not current.cancelling()):
                raise ConnectionError("shard closed") from None
            raise

    def _reconnect(self) -> asyncio.Task[asyncpg.Connection]:
        if self._closed:
            # A commit that close() cut short, or a batch after it (the void of an answer
            # whose link close() ended), opened a session nothing would close again (and,
            # the database down, retried for good): denied instead.
            raise ConnectionError("shard closed")
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._keep_connecting())
        return self._connecting

    async def _keep_connecting(self) -> asyncpg.Connection:
        """Connect until it works, with a short backoff; the connection is used from then.

        Each try connects, reads the chain's head and replay floor, and runs a batch's
        statements once with nothing to write. A fresh PostgreSQL backend plans its first
        statements against cold catalog caches: left to the first batch (15-17 ms for the
        restore query and 9-11 for the commit on the slow machine of 2026-11-29, against
        0.5-1.5 once warm, on top of 9-15 ms to connect), that made the batch slower than a
        replica waits for a shard (``shard_timeout``, 40 ms), so the first checks after a
        restart of the shard or of the database were denied ``state_timeout``, later than
        a fail-closed denial may be. Batches meanwhile are denied at once."""
        delay, tries, began = 0.05, 0, time.monotonic()
        # Said at once, then every 30 s: an outage of minutes is thousands of tries. (One
        # per outage: the next outage's first failure is said at once too.)
        said = Throttle(30.0)
        while True:
            self._retry_now.clear()
            tries += 1
            try:
                conn = await self._open_connection()
            except Exception as exc:
                said.log(
                    log,
                    "connect",
                    "shard %s cannot reach the database (%s); retrying",
                    self.index,
                    type(exc).__name__,
                )
                # A batch denied meanwhile cuts the wait short: the database may be back
                # and checks are waiting for it (one try at a time, as before the backoff).
                await wait_event(self._retry_now, delay)
                delay = min(0.25, delay * 2)
                continue
            if tries > 1:
                log.warning(
                    "shard %s reconnected to the database after %d tries, %.1f s",
                    self.index,
                    tries,
                    time.monotonic() - began,
                )
            self._conn = conn
            return conn

    async def _open_connection(self) -> asyncpg.Connection:
        # Both bounded: a database that stops answering (blackholed, not refusing) would
        # otherwise hold a try for asyncpg's 60 s connect timeout, and the recovery as long
        # after the database is back.
        conn = await asyncpg.connect(
            self._database_url,
            command_timeout=_DB_TIMEOUT,
            timeout=_DB_TIMEOUT,
            # So pg_stat_activity says which shard a session is (runbook.md).
            server_settings={"application_name": f"agentauth-shard-{self.index}"},
        )
        try:
            row = await conn.fetchrow(_BACKEND)
            if row is None:
                raise RuntimeError("this session is not in pg_stat_activity")
            self._conn_backend = (row["pid"], row["backend_start"])
            if self._unsure is not None and self._unsure.backend is not None:
                # Before the head is read: a commit still running there would land after.
                await self._end_backend(conn, self._unsure.backend)
            await conn.execute(
                "INSERT INTO audit_heads (chain, size, head) VALUES ($1, 0, $2)"
                " ON CONFLICT (chain) DO NOTHING",
                self.chain,
                GENESIS_HASH,
            )
            await self._reload_head(conn)
            await conn.fetch(_RESTORE, [], [], [])
            # Right after a restart, replicas ask what became of their calls the old
            # incarnation never answered (voids of ANY_ALLOW), in the first batches.
            await conn.fetch(_FIND_ALLOWS, [], [], [], [], self.chain)
            # No rows to append, and a head size no row has: the statement is planned and
            # run, and fails at 1 / 0 having written nothing.
            with contextlib.suppress(DivisionByZeroError):
                await conn.fetchval(
                    _COMMIT, [], [], [], [], [], [], [], [], [], [], 0, b"", "", -1, 0
                )
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _end_backend(self, conn: asyncpg.Connection, backend: tuple[int, Any]) -> None:
        """Make the fate of a commit whose answer never came final: end the server process
        that ran it, and wait until it is gone.

        Closing the connection is not enough. A statement waiting on a lock (another
        writer's, a standby's acknowledgement) goes on when its client hangs up, and
        PostgreSQL only notices at the next read or write, after the commit: so the lookup
        in _resolve could find nothing, and the commit land just after, its allows (their
        clients answered ``audit_unavailable``) never voided. Terminated, the statement
        either committed already or never will. The process is named by pid and start
        time, so a pid the server has given to another session since is not touched (a
        role may end its own sessions). Bounded like a statement: a try that runs out
        fails, and the reconnect tries again while batches are denied."""
        pid, started = backend
        deadline = time.monotonic() + _DB_TIMEOUT
        await conn.execute(_TERMINATE, pid, started)
        while await conn.fetchval(_STILL_RUNNING, pid, started):
            if time.monotonic() > deadline:
                raise TimeoutError(f"server process {pid} has not ended")
            await asyncio.sleep(0.01)

    async def _reload_head(self, conn: asyncpg.Connection) -> None:
        """Load the chain's head. Unless it is the one this shard left (or the one its
        commit of unknown fate would have left), someone else has decided on the chain: a
        previous incarnation, or another writer still running. Their jti window is not
        here and their allows are not in this shard's usage, so it starts over: proofs up
        to the chain's replay mark are refused, and each grant is rebuilt from the chain.
        (Losing a commit race always ends here: the head only grows.)

        One statement, read before anything here changes: the head is taken as this
        shard's own only together with the floor and the forgotten usage that go with it.
        (Taking it first and awaiting a second query left a window: a failure there, and
        the retry found "its own" head and kept the old floor and usage, so a proof the
        other writer had allowed could be allowed again.)"""
        row = await conn.fetchrow(_HEAD, self.chain)
        if row is None:
            raise RuntimeError(f"audit chain {self.chain} has no head")
        found = row["size"], bytes(row["head"])
        unsure = self._unsure
        ours = found == (self._size, self._head) or (
            unsure is not None and found == (unsure.seq + 1, unsure.hash)
        )
        known, (self._size, self._head) = self._size, found
        last = row["last_ms"]
        if last is not None:
            self._last_ms = max(self._last_ms, last)
        if ours:
            return
        if known:
            log.warning(
                "shard %s: another writer moved chain %s; starting over", self.index, self.chain
            )
        self.state.grants.clear()
        if last is None:
            return
        if row["replay_mark_size"] == found[0] and row["replay_mark_ms"] is not None:
            # Every proof reserved on the chain was issued at or before the mark, and the
            # mark is the head's own (set by the commit that moved the head here). A
            # millisecond more absorbs the rounding between ms and a float iat.
            floor = (row["replay_mark_ms"] + 1) / 1000
        else:
            # No mark for this head (see migration 0011): the writer accepted proofs up to
            # its clock plus the skew, its clock at its last decision at least last / 1000
            # (the very float it decided on).
            floor = last / 1000 + self.state.policy.future_skew
        self.state.replay_floor = max(self.state.replay_floor, floor)
        if not known:
            # Once per incarnation: what the shard_restarted denials that follow are about.
            log.warning(
                "shard %s: a new incarnation on chain %s at size %d; proofs issued up to %s"
                " are refused shard_restarted, as its predecessor may have seen them",
                self.index,
                self.chain,
                found[0],
                datetime.fromtimestamp(self.state.replay_floor, UTC).isoformat(
                    timespec="milliseconds"
                ),
            )

    async def check_batch(self, checks: list[Check]) -> list[Result]:
        """Decide ``checks`` in arrival order; answer once their events are committed.

        Calls that arrive while a commit is in flight wait and are then decided and
        committed together (group commit): one transaction for many verifier batches, up to
        ``_MAX_COMMIT`` checks.
        """
        future: asyncio.Future[list[Result]] = asyncio.get_running_loop().create_future()
        self._pending.append((checks, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                groups = [self._pending.popleft()]
                taken = len(groups[0][0])
                while self._pending and taken + len(self._pending[0][0]) <= _MAX_COMMIT:
                    taken += len(self._pending[0][0])
                    groups.append(self._pending.popleft())
                merged = [check for checks, _ in groups for check in checks]
                try:
                    results = await self._decide_and_commit(merged)
                except Exception:  # never leave a caller waiting: deny what failed
                    self._said.log(
                        log,
                        "batch",
                        "shard %s failed a batch; its checks are denied audit_unavailable",
                        self.index,
                        level=logging.ERROR,
                        exc_info=True,
                    )
                    results = [Result(False, AUDIT_UNAVAILABLE) for _ in merged]
                offset = 0
                for checks, future in groups:
                    if not future.done():
                        future.set_result(results[offset : offset + len(checks)])
                    offset += len(checks)
        finally:
            # No await between the empty-queue check above and this line, so no call can
            # slip in unserved.
            self._flushing = False

    async def _decide_and_commit(self, checks: list[Check]) -> list[Result]:
        settled: dict[int, str] = {}
        try:
            conn = await self._connection()
            if self._unsure is not None:
                await self._resolve(conn, self._unsure)
            # A whole millisecond, rounded up: the chain stores this time exactly, so the
            # floor and rate windows rebuilt from it are the ones decided on, not up to a
            # millisecond earlier.
            now_ms = max(math.ceil(time.time() * 1000), self._last_ms)
            now = now_ms / 1000
            await self._restore(conn, checks, now_ms)
            if any(check.voids == ANY_ALLOW for check in checks):
                checks, settled = await self._find_allows(conn, checks)
        except Exception:  # database unreachable: nothing can be recorded, so deny all
            # Per batch while the database is down: _keep_connecting says when it is back.
            self._said.log(
                log,
                "database",
                "shard %s cannot reach the database; its checks are denied audit_unavailable",
                self.index,
            )
            return [Result(False, AUDIT_UNAVAILABLE) for _ in checks]
        # A void naming no event of this chain is recorded as the malformed check it is.
        checks = [
            c
            if c.voids is None or self._voidable(c.voids)
            else dataclasses.replace(c, deny="malformed_check", voids=None)
            for c in checks
        ]
        # A copy: voids owed meanwhile (an answer of the previous batch finding its link
        # gone, see _answer) are appended to self._owed while this commit is awaited, and
        # stay owed whatever becomes of it.
        owed = list(self._owed)
        # What is decided and chained: the voids owed first (answered to nobody), then each
        # check but those a void already answers. One allow is voided once: a second void
        # of it (two replicas asking about one proof, or a replica asking about an allow the
        # shard voids itself in this batch) is answered by the first.
        work = list(owed)
        voided = {c.voids: i for i, c in enumerate(owed) if c.voids is not None}
        place: list[int] = []  # each check's position in work: its own, or its void's
        own: list[bool] = []  # whether that position is its own
        for i, check in enumerate(checks):
            if i in settled:
                place.append(-1)
                own.append(False)
            elif check.voids is not None and check.voids in voided:
                place.append(voided[check.voids])
                own.append(False)
            else:
                if check.voids is not None:
                    voided[check.voids] = len(work)
                place.append(len(work))
                own.append(True)
                work.append(check)
        outcomes = [self.state.decide(check, now) for check in work]
        # Whatever becomes of the commit: see _last_ms.
        self._last_ms = now_ms
        entries = self._chain(work, outcomes, now_ms)

        def answer(i: int, check: Check, unknown: bool = False) -> Result:
            if i in settled:  # its allow's void is on the chain already: nothing to write
                return Result(False, check.deny or AUDIT_UNAVAILABLE, audit_event=settled[i])
            p = place[i]
            event = f"{entries[p].event.chain}:{entries[p].event.seq}"
            if unknown:
                # The allow that may stand, for the replica to ask about should this
                # incarnation not live to resolve the commit (see ShardClient).
                decided = own[i] and outcomes[p].allowed
                return Result(False, AUDIT_UNAVAILABLE, audit_event=event if decided else None)
            if not own[i]:  # answered by the void of its allow another check wrote
                return Result(False, check.deny or AUDIT_UNAVAILABLE, audit_event=event)
            o = outcomes[p]
            return Result(o.allowed, o.reason, _remaining_json(o.remaining), o.retry_after, event)

        try:
            began = time.perf_counter()
            await self._commit(conn, work, outcomes, entries)
            observe("audit_commit", time.perf_counter() - began, self._tags)
        except Exception as exc:
            self._said.log(
                log,
                "commit",
                "shard %s failed to commit its audit batch (%s); its checks are denied"
                " audit_unavailable",
                self.index,
                type(exc).__name__,
            )
            backend = self._conn_backend
            # Reconnect (which reloads the head) now, not in the next batch.
            await self._drop_connection()
            if not self._closed:
                self._reconnect()
            # An error the database sent means the statement, and so all of it, failed.
            # No answer at all (a timeout, even one that fires late because this process
            # was stopped while the answer waited) leaves it open: resolved on reconnect.
            unknown = bool(entries) and not isinstance(exc, (asyncpg.PostgresError, RuntimeError))
            if unknown:
                self._owed = self._owed[len(owed) :]  # carried, below
                self._unsure = _Unsure(
                    entries[-1].event.seq,
                    entries[-1].hash,
                    owed,
                    [
                        check.voiding(AUDIT_UNAVAILABLE, f"{e.event.chain}:{e.event.seq}")
                        for check, o, e in zip(work, outcomes, entries, strict=True)
                        if o.allowed
                    ],
                    backend,
                )
            else:
                self._unreserve([c for c, o in zip(work, outcomes, strict=True) if o.allowed])
            # Decisions were reserved all the same: an outage must not grow memory.
            self._prune(now)
            return [
                answer(i, c, unknown=True)
                if unknown or i in settled
                else Result(False, AUDIT_UNAVAILABLE)
                for i, c in enumerate(checks)
            ]
        self._owed = self._owed[len(owed) :]
        self._decisions += len(work)
        self.batches += 1
        self._prune(now)
        return [answer(i, c) for i, c in enumerate(checks)]

    def _replay_mark_ms(self) -> int:
        """The mark a commit records: no proof any decision on this chain has reserved,
        here or before this incarnation (its floor), was issued after it. In whole
        milliseconds, rounded up, so the next floor is at or above every such ``iat``.
        It covers proofs reserved in batches whose commit failed too (they were denied,
        so this only refuses more)."""
        return math.ceil(max(self.state.newest_reserved, self.state.replay_floor) * 1000)

    def _prune(self, now: float) -> None:
        """Forget expired state (see ShardState.prune), at most every 5 s."""
        if time.monotonic() - self._last_prune <= 5.0:
            return
        self._last_prune = time.monotonic()
        try:
            self.state.prune(now, idle_grants_after=self._idle_grants_after)
        except Exception:
            # Pruning is upkeep (memory): a failure costs memory until the next try, never
            # decisions. (Committed ones answered as failed would leave allows in the audit
            # chain that no client received.)
            log.exception("shard %s failed to prune its state", self.index)

    async def _restore(self, conn: asyncpg.Connection, checks: list[Check], now_ms: int) -> None:
        """Rebuild usage of grants this incarnation has not seen, and spent step-ups."""
        now = now_ms / 1000
        # A grant idle here for longer than a proof lives is read again from the chains:
        # meanwhile another shard may have decided for it (the shard count changed, and
        # changed back, each after the documented pause for that window), and the usage
        # here would miss what it spent there.
        policy = self.state.policy
        fresh_since = now - policy.max_age - policy.future_skew
        missing: dict[str, Check] = {}
        for check in checks:
            wanted = check.deny is None and check.grant_id and check.envelope is not None
            if wanted and check.grant_id and not self.state.knows(check.grant_id, fresh_since):
                missing.setdefault(check.grant_id, check)
        refs = [c.step_up_ref for c in checks if c.step_up_ref]
        if refs:
            rows = await conn.fetch(
                "SELECT approval_ref FROM verifier_step_up_uses WHERE approval_ref = ANY($1)",
                refs,
            )
            self.state.spent_elsewhere((r["approval_ref"] for r in rows), now)
        if not missing:
            return
        ids = list(missing)
        windows = []
        for grant_id, check in missing.items():
            envelope = check.envelope
            assert envelope is not None
            longest = max((r.window_seconds for r in envelope.rate_limits), default=0)
            # A millisecond wider than the window: evaluate() draws its exact edge, on the
            # same floats the live state holds (time_ms / 1000, as decided).
            since = now_ms - longest * 1000 - 1
            windows.append((grant_id, since, envelope.max_rate_count))
        rows = await conn.fetch(
            _RESTORE,
            [w[0] for w in windows],
            [w[1] for w in windows],
            [w[2] for w in windows],
        )
        spend: dict[str, Any] = {}
        recent: dict[str, list[float]] = {g: [] for g in ids}
        for row in rows:
            if row["body"] is not None:
                spend[row["grant_id"]] = json.loads(row["body"])["data"].get("usage")
            recent[row["grant_id"]] = [t / 1000 for t in row["times"] or ()]
        for grant_id in ids:
            self.state.restore(
                grant_id, usage_from_events(spend.get(grant_id), recent[grant_id]), now
            )

    async def _resolve(self, conn: asyncpg.Connection, unsure: _Unsure) -> None:
        """Learn whether ``unsure`` took effect (on a new connection, the head reloaded):
        if it did, its allows are owed voids; if not, the voids it carried still are."""
        stored = await conn.fetchval(
            "SELECT entry_hash FROM audit_events WHERE chain = $1 AND seq = $2",
            self.chain,
            unsure.seq,
        )
        committed = stored is not None and hmac.compare_digest(bytes(stored), unsure.hash)
        if committed and unsure.if_committed:
            log.warning(
                "shard %s: a commit answered as failed took effect; voiding its %d allows",
                self.index,
                len(unsure.if_committed),
            )
        # Ahead of any owed since (see _answer).
        self._owed = (unsure.if_committed if committed else unsure.carried) + self._owed
        self._unsure = None
        if not committed:
            self._unreserve(unsure.if_committed)

    def _unreserve(self, allowed: list[Check]) -> None:
        """Give back what the allows of a batch known not to have committed reserved: the
        usage of their grants (rebuilt from the chain when next seen) and their step-up
        references (the durable record, which every batch reads, never had them). Their
        clients were denied ``audit_unavailable``, and a retry must meet the limits the
        chain supports, not spend that never happened. Their proofs stay spent: a proof is
        single-use whatever became of it."""
        for check in allowed:
            if check.grant_id is not None:
                self.state.grants.pop(check.grant_id, None)
            if check.step_up_ref is not None:
                self.state.used_refs.pop(check.step_up_ref, None)

    async def _find_allows(
        self, conn: asyncpg.Connection, checks: list[Check]
    ) -> tuple[list[Check], dict[int, str]]:
        """Point each ``ANY_ALLOW`` void at the allow this chain holds for its proof, or
        turn it into the record of the denial its client got if there is none. An allow
        voided already needs nothing more: those are returned apart (by the check's index,
        with the void's event id), to be answered without writing anything. (Asking
        twice is normal: a replica asks about every check whose answer it did not get,
        and the shard may have voided the allow itself, its answer finding the link gone.)"""
        asked = [
            (i, c) for i, c in enumerate(checks) if c.voids == ANY_ALLOW and c.grant_id and c.jti
        ]
        # Only the allows of the proof's lifetime are read (the grant index has the time):
        # this runs inside a flush, and a busy grant's whole history would stall the shard.
        # The margin covers queueing and clock differences between replica and shard.
        policy, margin = self.state.policy, 60.0
        rows = await conn.fetch(
            _FIND_ALLOWS,
            [c.grant_id for _, c in asked],
            [c.jti for _, c in asked],
            [_bigint_ms(c.iat - policy.future_skew - margin) for _, c in asked],
            [_bigint_ms(c.iat + policy.max_age + margin) for _, c in asked],
            self.chain,
        )
        found: dict[int, str] = {}
        settled: dict[int, str] = {}
        for r in rows:
            i = asked[r["n"] - 1][0]
            if r["void_seq"] is None:
                found[i] = f"{self.chain}:{r['seq']}"
            else:
                settled[i] = f"{r['void_chain']}:{r['void_seq']}"
        checks = [
            dataclasses.replace(c, voids=found.get(i)) if c.voids == ANY_ALLOW else c
            for i, c in enumerate(checks)
        ]
        return checks, settled

    def _voidable(self, event_id: str) -> bool:
        """Whether ``event_id`` names an event already on this shard's chain. (Only a
        replica holding the link's token can send a void, and a void takes nothing back:
        this keeps a confused one from writing voids that point nowhere.)"""
        chain, _, seq = event_id.rpartition(":")
        # At most a bigint's 19 digits before int(): a longer number names no event, and
        # past 4,300 digits int() raises, which failed the whole batch it came in (any
        # replica's checks merged into it denied audit_unavailable).
        return (
            chain == self.chain
            and len(seq) <= 19
            and seq.isascii()
            and seq.isdigit()
            and int(seq) < self._size
        )

    def _chain(self, checks: list[Check], outcomes: list[Outcome], time_ms: int) -> list[_Entry]:
        entries = []
        size, head = self._size, self._head
        for check, outcome in zip(checks, outcomes, strict=True):
            data: dict[str, Any] = {"reason": outcome.reason}
            if check.jti:  # which request this was: a provider's logs can be matched to it
                data["proof_jti"] = check.jti
            if check.grant_id:
                data["grant_id"] = check.grant_id
            if check.token_jti:
                data["token_jti"] = check.token_jti
            if check.action is not None:
                data["action"] = check.action.model_dump(mode="json", exclude_none=True)
            if check.step_up_ref:
                data["step_up_ref"] = check.step_up_ref
            if outcome.allowed and outcome.usage is not None:
                data["usage"] = usage_to_json(outcome.usage)
            void = check.voids is not None  # checked against this chain already
            if void:
                data["voids"] = check.voids
            # Built without re-validation: every field is this shard's own or was validated
            # on its way in, and canonical_bytes() still refuses data JSON cannot carry.
            event = AuditEvent.model_construct(
                chain=self.chain,
                seq=size,
                prev=b64url_encode(head),
                time_ms=time_ms,
                event=(
                    "verify.void" if void else "verify.allow" if outcome.allowed else "verify.deny"
                ),
                actor=f"provider:{check.provider_id}",
                subject=f"agent:{check.agent_id}",
                data=data,
            )
            body = event.canonical_bytes()  # once: it is hashed, linked and stored
            head = leaf_hash(body)
            size += 1
            entries.append(_Entry(event, body.decode("utf-8"), head))
        return entries

    async def _commit(
        self,
        conn: asyncpg.Connection,
        checks: list[Check],
        outcomes: list[Outcome],
        entries: list[_Entry],
    ) -> None:
        """Append the batch's events, move the chain head and record spent step-ups.

        One statement, so one round trip and its own transaction: all of it commits or none.
        The head moves only if it is still where this actor left it (an optimistic check
        that this actor is the chain's only writer); if it is not, ``1 / 0`` fails the
        statement, which undoes the appends too.
        """
        if not entries:
            return
        hashes = [e.hash for e in entries]
        used = [
            (c.step_up_ref, c.grant_id)
            for c, o in zip(checks, outcomes, strict=True)
            if o.allowed and c.step_up_ref
        ]
        try:
            await conn.fetchval(
                _COMMIT,
                [e.event.chain for e in entries],
                [e.event.seq for e in entries],
                hashes,
                [e.body for e in entries],
                [e.event.event for e in entries],
                [c.agent_id for c in checks],
                [c.grant_id for c in checks],
                [e.event.time_ms for e in entries],
                [ref for ref, _ in used],
                [grant for _, grant in used],
                self._size + len(entries),
                hashes[-1],
                self.chain,
                self._size,
                self._replay_mark_ms(),
            )
        except (DivisionByZeroError, UniqueViolationError) as exc:
            if isinstance(exc, UniqueViolationError) and "step_up" in str(
                exc.constraint_name or ""
            ):
                raise  # a step-up spent elsewhere meanwhile: this batch fails, nothing else
            # Another writer (a second cluster during an upgrade, a zombie actor) has
            # decided on this chain. The failure drops the connection, and the reconnect's
            # reload finds the head moved: the shard starts over (see _reload_head).
            raise RuntimeError("audit chain moved under this shard") from exc
        self._size += len(entries)
        self._head = hashes[-1]

    async def close(self) -> None:
        """Stop serving and drop the database connection (for in-process use)."""
        self._closed = True
        if self._accepting is not None:
            self._accepting.cancel()
        if self._listener is not None:
            self._listener.close()
        writers = list(self._peers)
        for writer in writers:
            writer.close()
        if writers:
            # Each waited for, whatever it raises: a replica that reset its connection (it
            # crashed) makes wait_closed raise, and that used to end close() there, leaving
            # the other links and the database connection open. Bounded: a TLS link to a
            # peer that stopped reading would hold its shutdown for up to 30 s.
            with contextlib.suppress(TimeoutError):
                await wait_within(
                    asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True),
                    _CLOSE_WAIT,
                )
        # Connections still in their TLS handshake have no writer yet.
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._drop_connection()

    async def _drop_connection(self) -> None:
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()

    def stats(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "started_at": self.state.started_at,
            "grants": len(self.state.grants),
            "jtis": len(self.state.jtis),
            "memory_bytes": self.state.memory_bytes(),
            "decisions": self._decisions,
            "commits": self.batches,
            "chain_size": self._size,
            "connected": self._conn is not None and not self._conn.is_closed(),
        }
