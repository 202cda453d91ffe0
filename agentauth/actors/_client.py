"""Micro-batching calls to the shard actors from a verifier replica.

A shard spends most of a call's cost on the call itself, not on the checks in it, so each
shard gets a queue and at most ``max_inflight`` calls in flight: while they run, new checks
wait in the queue, and the whole queue leaves in one call as soon as a slot frees. Batches
grow with load by themselves; at low load a check leaves on the next turn of the event
loop, or after ``max_wait`` if one is set.

Calls travel over one TCP link per shard (``_wire.py``), found and authenticated through
the shard's Ray handle (``StateShard.endpoint``), and re-found the same way when the link
breaks (a restarted shard listens elsewhere). Every wait is bounded: a dead or stuck shard
turns into a deny, never into a hang or an allow.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

from .._logs import Throttle
from ..metrics import increment, observe
from ._shard import AUDIT_UNAVAILABLE, UNDELIVERED, Result
from ._state import ANY_ALLOW, Check
from ._wire import (
    ACK_AFTER,
    ACKS_ANNOUNCED,
    Codec,
    ack_id,
    decode_results,
    frame,
    link_tls,
    read_frame,
)

__all__ = ["ShardClient"]

log = logging.getLogger("agentauth.shards")

Row = tuple[Any, ...]
# Unsettled checks kept per shard while it is unreachable (a replica's share of a few
# seconds of traffic); beyond that the oldest are dropped, with a warning.
_MAX_UNSETTLED = 10_000


_UNAVAILABLE = Result(False, "state_unavailable")


def _result(row: Row) -> Result:
    """A shard's answer row (see _wire.encode_results); raises on one of another shape."""
    # An event that is not text would come back in a void the shard refuses as malformed,
    # dropping the link and every call on it.
    if not isinstance(row[1], str) or not (row[4] is None or isinstance(row[4], str)):
        raise TypeError("a reason and an event id of text expected")
    return Result(row[0] is True, row[1], row[2], row[3], row[4])


def _results(rows: list[Row], count: int) -> list[Result]:
    """A call's answer, one row per check; raises (ValueError, IndexError, TypeError) on
    one not of the agreed shape."""
    if len(rows) != count:
        raise ValueError("one row per check expected")
    return [_result(row) for row in rows]


_TIMEOUT = Result(False, "state_timeout")
# The least of a timeout a call sent right after a slow connect is given: 10 % of it (4 ms
# at the default 40), so such a check is answered within 1.1 timeouts at worst. A check
# queued behind a batch that waited for the same connect gets as much for the connect
# and as much for its call: 1.2 at worst (it was 2, a whole timeout for each).
_CALL_FLOOR = 0.1
# A shard acknowledges a batch ACK_AFTER after reading it, so a call out for less than
# this may be unacknowledged only because its ack is still on its way: its overrun says
# the shard is slow, not stopped. (A call sent with the floor above, 4 ms at the default
# timeout, overran "unacknowledged" on every healthy shard slower than that, and every
# check was denied at once until it answered.)
_ACK_WINDOW = 2 * ACK_AFTER
# A shard down denies every batch for it, hundreds a second: said once per shard per period.
_SAID_EVERY = 30.0


class _Out:
    """A call out to a shard: its checks, and what its deadline did (``expired`` once its
    checks were denied; ``silent``, the timer that tears the link down if the call stays
    unanswered after that)."""

    __slots__ = ("call", "expired", "items", "link", "request_id", "sent", "shard", "silent")

    def __init__(
        self,
        shard: int,
        link: _Link,
        items: list[tuple[Check, asyncio.Future[Result]]],
        call: tuple[int, asyncio.Future[list[Row]]],  # its request id, and its answer
        sent: float,
    ) -> None:
        self.shard = shard
        self.link = link
        self.items = items
        self.request_id, self.call = call
        self.sent = sent
        self.expired = False
        self.silent: asyncio.TimerHandle | None = None

    @classmethod
    def send(
        cls, shard: int, link: _Link, items: list[tuple[Check, asyncio.Future[Result]]]
    ) -> _Out:
        sent = time.perf_counter()  # the call's time includes writing it
        return cls(shard, link, items, link.send([c for c, _ in items]), sent)


class _Link:
    """One connection to one shard, carrying any number of calls at once."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._codec = Codec()
        self._ids = itertools.count()
        self._calls: dict[int, asyncio.Future[list[Row]]] = {}
        # Whether the shard acknowledges batches it is slow to answer, and which calls
        # out it has acknowledged (see _wire.ACKS_ANNOUNCED).
        self.acks = False
        self._acked: set[int] = set()
        self._closed = False
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(
        cls, host: str, port: int, token: bytes, tls: ssl.SSLContext | None = None
    ) -> _Link:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls, server_hostname=host if tls else None
        )
        try:
            writer.write(frame(token))
            if await read_frame(reader) != b"ok":
                raise ConnectionError("the shard refused the link")
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer)

    @property
    def alive(self) -> bool:
        return not self._closed and not self._task.done()

    def send(self, checks: list[Check]) -> tuple[int, asyncio.Future[list[Row]]]:
        """Send a batch now: its request id, and a future that gets its answer (or
        ConnectionError). Raises if the batch cannot be encoded, before anything is sent."""
        request_id = next(self._ids)
        future: asyncio.Future[list[Row]] = asyncio.get_running_loop().create_future()
        if not self.alive:
            future.set_exception(ConnectionError("shard link closed"))
            return request_id, future
        payload = self._codec.encode_checks(request_id, checks)
        self._calls[request_id] = future
        self._writer.write(payload)
        return request_id, future

    def acked(self, request_id: int) -> bool:
        return request_id in self._acked

    def close(self) -> None:
        """End the link now: its socket, its reader and its calls (each gets
        ConnectionError). Done here, not left to the reader's ``finally``: a reader
        cancelled before its first step never runs that, and its socket and calls would
        stay open for good (a link closed in the turn it opened)."""
        self._closed = True
        self._task.cancel()
        self._writer.close()
        self._fail_calls()

    def _fail_calls(self) -> None:
        calls, self._calls = self._calls, {}
        for future in calls.values():
            if not future.done():
                future.set_exception(ConnectionError("shard link closed"))

    async def _read(self) -> None:
        try:
            while True:
                request_id, rows = decode_results(await read_frame(self._reader))
                if request_id < 0:
                    if request_id == ACKS_ANNOUNCED:
                        self.acks = True
                    elif ack_id(request_id) in self._calls:
                        self._acked.add(ack_id(request_id))
                    continue
                self._acked.discard(request_id)
                future = self._calls.pop(request_id, None)
                if future is not None and not future.done():
                    future.set_result(rows)
        except asyncio.CancelledError:
            pass
        except Exception:  # end of stream, reset, garbage: the link is gone
            log.debug("shard link closed", exc_info=True)
        finally:
            self._closed = True
            self._writer.close()
            self._fail_calls()


def _consume(task: asyncio.Task[_Link]) -> None:
    """Retrieve a background connect's failure (it is logged where it matters)."""
    if not task.cancelled():
        task.exception()


class ShardClient:
    def __init__(
        self,
        handles: list[Any],
        *,
        max_batch: int = 128,
        max_wait: float = 0.0,
        timeout: float = 0.04,
        max_inflight: int = 1,
        call_timeout: float = 5.0,
        connect_timeout: float = 2.0,
    ) -> None:
        self._handles = handles
        self._max_batch = max_batch
        self._max_wait = max_wait
        # How long a call may be out before its checks are denied. It bounds the shard's
        # part only: time a check spends queued behind the call in flight is bounded by
        # that call's own limit, and is the replica's load, not a sign of a stuck shard;
        # at saturation a call overruns now and then for the load's sake, and the checks
        # behind it still deserve their turn. A shard that has not even acknowledged the
        # call by then (see _wire.ACKS_ANNOUNCED) is not slow but stopped: the checks
        # behind are denied with it. (A shard that does not acknowledge, from before acks,
        # can hold a check queued behind its first unanswered call for two timeouts.)
        self._timeout = timeout
        # A call outlives the client's own deny (a shard may take up to its database
        # timeout to commit), but not forever: a link silent this long is torn down.
        self._call_timeout = call_timeout
        self._connect_timeout = connect_timeout
        self._tls = link_tls("client", os.environ)
        self._queues: list[list[tuple[Check, asyncio.Future[Result]]]] = [[] for _ in handles]
        # When each queued check was queued (parallel to _queues): a call's oldest check
        # says how long checks wait in this replica before their call leaves, the part of a
        # verification's time that is neither the shard's nor the network's.
        self._queued_at: list[list[float]] = [[] for _ in handles]
        self._scheduled = [False] * len(handles)
        self._inflight = [0] * len(handles)
        self._max_inflight = max_inflight
        self._links: list[_Link | None] = [None] * len(handles)
        self._connecting: list[asyncio.Task[_Link] | None] = [None] * len(handles)
        self._retry_at = [0.0] * len(handles)
        self._said = Throttle(_SAID_EVERY)
        self._dropped = [0] * len(handles)  # unsettled checks dropped since the last warning
        # Calls out past the timeout and not answered yet, per shard. One is a hiccup (a
        # slow commit, a descheduled process): only its own checks are denied. From two
        # on, the shard looks hung: checks are denied at once, not sent, until one of
        # those calls answers (or the link is torn down).
        self._overrun = [0] * len(handles)
        # A call overran unacknowledged: the shard is not running. Checks are denied at
        # once, as from the second overrun, until it answers or the link goes.
        self._stopped = [False] * len(handles)
        self._watchers: set[asyncio.Task[object]] = set()
        # Checks sent in a call that never answered (the link broke, or it stayed silent):
        # the shard may have committed an allow for any of them. Each is asked about once
        # the shard is reachable again (see _settle), with the answer its client got. The
        # voids that were not recorded wait here too.
        self._unsettled: list[deque[tuple[Check, str]]] = [
            deque(maxlen=_MAX_UNSETTLED) for _ in handles
        ]
        self._settling = [False] * len(handles)
        # Allows the shard may have committed although it answered ``audit_unavailable``
        # (a commit whose answer the database never gave), with the link they came on and
        # the answer their clients got: ``audit_unavailable``, or ``state_timeout`` when
        # that answer came after the deadline. The shard settles them itself before its
        # next commit; should it die first, the next incarnation is asked about them by
        # their proofs, like unanswered calls (_open), with that answer.
        self._unsure: list[deque[tuple[_Link, Check, str]]] = [
            deque(maxlen=_MAX_UNSETTLED) for _ in handles
        ]
        self._tags = [{"shard": str(i)} for i in range(len(handles))]
        self._closed = False
        self.batches = 0
        self.checks = 0  # sent; every one is a decision of a request, given up, or a void
        self.given_up = 0  # ... whose request was cancelled before it took its answer
        self.void_checks = 0  # ... that void an allow no client received
        self.overruns = 0  # calls past their timeout
        self.unacknowledged = 0  # ... of which the shard had not acknowledged (stopped)

    @property
    def shards(self) -> int:
        return len(self._handles)

    def queue_depth(self) -> int:
        return sum(len(q) for q in self._queues)

    async def connect(self) -> None:
        """Open every shard's link now rather than on the first check (best effort)."""
        await asyncio.gather(
            *(self._link(i) for i in range(len(self._handles))), return_exceptions=True
        )

    def close(self) -> None:
        """End every link, connect and queued check now (those get ``state_unavailable``);
        calls out are denied as their links close. Nothing reconnects afterwards: the
        checks that queued behind those calls, a settling and a check that comes later are
        denied, not sent (before, the first of them opened a new link that nobody closed)."""
        self._closed = True
        for task in self._connecting:
            if task is not None:
                task.cancel()
        for link in self._links:
            if link is not None:
                link.close()
        for shard in range(len(self._handles)):
            self._flush(shard)

    async def check(self, shard: int, check: Check) -> Result:
        if self._closed:
            return _UNAVAILABLE
        if self._looks_hung(shard):
            self._keep_voids(shard, [check])
            return _TIMEOUT
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        queue = self._queues[shard]
        queue.append((check, future))
        self._queued_at[shard].append(time.perf_counter())
        if len(queue) >= self._max_batch:
            self._flush(shard)
        elif not self._scheduled[shard] and self._inflight[shard] < self._max_inflight:
            self._scheduled[shard] = True
            if self._max_wait > 0:
                loop.call_later(self._max_wait, self._flush, shard)
            else:  # still after every check already queued behind this one in the loop
                loop.call_soon(self._flush, shard)
        # Awaited bare: every batch is resolved by its answer, its deadline (a timer of its
        # own) or its link's failure. Each layer of wait_for or shield would cost a turn of
        # the event loop, and under load a turn is other requests' work (see _wait).
        try:
            return await future
        except asyncio.CancelledError:
            # Given up after its answer came but before this task ran again: the answer
            # reaches no one, as when the cancel comes while the call is out (_finish).
            if future.done() and not future.cancelled():
                void = self._given_up(check, future.result())
                if void is not None:
                    self._watch(self._record_voids(shard, [void]))
            raise

    def _flush(self, shard: int) -> None:
        self._scheduled[shard] = False
        if self._closed or self._looks_hung(shard):
            queue, self._queues[shard] = self._queues[shard], []
            self._queued_at[shard] = []
            self._keep_voids(shard, [check for check, _ in queue])
            denied = _UNAVAILABLE if self._closed else _TIMEOUT
            for _, future in queue:
                if not future.done():
                    future.set_result(denied)
            return
        if (
            self._inflight[shard] >= self._max_inflight
            and len(self._queues[shard]) < self._max_batch
        ):
            return  # a call is out: the queue leaves when it comes back (see _finish)
        queue = self._queues[shard][: self._max_batch]
        self._queues[shard] = self._queues[shard][self._max_batch :]
        queued_at = self._queued_at[shard]
        self._queued_at[shard] = queued_at[self._max_batch :]
        # A check whose request was given up before its call left (the provider hung up,
        # and Serve cancelled the request) is not sent: no decision, nothing to record.
        sent = [i for i, (_, future) in enumerate(queue) if not future.cancelled()]
        if not sent:
            return
        if len(sent) < len(queue):
            queue = [queue[i] for i in sent]
        # How long the oldest check that leaves waited (queued_at runs parallel to the queue).
        observe("shard_queue", time.perf_counter() - queued_at[sent[0]], self._tags[shard])
        self.batches += 1
        self.checks += len(queue)
        self.void_checks += sum(check.voids is not None for check, _ in queue)
        self._inflight[shard] += 1
        link = self._links[shard]
        if link is None or not link.alive:
            self._watch(self._connect_and_send(shard, queue, queued_at[sent[0]]))
        elif (out := self._send(shard, link, queue)) is not None:  # leaves now, not a turn later
            self._watch(self._wait(out))

    def _unreachable(self, shard: int) -> None:
        if self._closed:
            return  # closing: its calls fail for that, not for an unreachable shard
        self._said.log(
            log,
            ("unreachable", shard),
            "shard %s unreachable; its checks are denied state_unavailable until Ray has it"
            " running again",
            shard,
        )

    def _looks_hung(self, shard: int) -> bool:
        return self._overrun[shard] >= 2 or self._stopped[shard]

    def _send(
        self, shard: int, link: _Link, items: list[tuple[Check, asyncio.Future[Result]]]
    ) -> _Out | None:
        """The call carrying ``items``, sent; None when the batch could not be encoded (then
        nothing was sent, nothing decided, and its checks are denied)."""
        try:
            return _Out.send(shard, link, items)
        except Exception:
            log.exception("shard %s: a batch could not be sent; its checks are denied", shard)
            self._keep_voids(shard, [check for check, _ in items])
            self._finish(shard, items, [_UNAVAILABLE] * len(items))
            return None

    async def _link(self, shard: int) -> _Link:
        if self._closed:
            raise ConnectionError("shard client closed")
        link = self._links[shard]
        if link is not None and link.alive:
            return link
        if time.monotonic() < self._retry_at[shard]:
            raise ConnectionError("shard link down; retrying shortly")
        task = self._connecting[shard]
        if task is None:
            task = asyncio.get_running_loop().create_task(self._open(shard))
            task.add_done_callback(_consume)
            self._connecting[shard] = task
        if link is not None:
            # The link broke: the shard is gone or restarting, which takes Ray seconds.
            # Deny at once meanwhile; the reconnect goes on in the background.
            raise ConnectionError("shard link broken; reconnecting")
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The connect was cancelled (close()), not this wait: a failure to connect for
            # whoever waits, who denies its checks, rather than a cancellation that would
            # leave them unanswered.
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                raise ConnectionError("shard client closed") from None
            raise

    async def _open(self, shard: int) -> _Link:
        try:
            # A restarting shard answers once Ray has brought it back; bounded meanwhile.
            host, port, token = await asyncio.wait_for(
                self._handles[shard].endpoint.remote(), self._connect_timeout
            )
            link = await asyncio.wait_for(
                _Link.open(host, port, token, self._tls), self._connect_timeout
            )
            if self._closed:  # closed while this connect was finishing: not kept
                link.close()
                raise ConnectionError("shard client closed")
            self._links[shard] = link
            # The link before this one is gone, and the incarnation behind it may be too.
            unsure, self._unsure[shard] = self._unsure[shard], deque(maxlen=_MAX_UNSETTLED)
            told: dict[str, list[Check]] = {}
            for _, check, answer in unsure:
                told.setdefault(answer, []).append(check)
            for answer, checks in told.items():
                self._unsettle(shard, checks, answer)
            if self._unsettled[shard]:
                self._watch(self._settle(shard))
            return link
        except BaseException:
            # Checks meanwhile are denied at once rather than each paying a failed connect.
            self._retry_at[shard] = time.monotonic() + 0.1
            raise
        finally:
            self._connecting[shard] = None

    async def _connect_and_send(
        self, shard: int, items: list[tuple[Check, asyncio.Future[Result]]], since: float
    ) -> None:
        """Send ``items`` once the link is up. ``since`` is when the oldest of them was
        queued: checks that queued behind a batch waiting for this same connect have
        waited for it too, and are given only what is left of their timeout."""
        started = min(since, time.perf_counter())
        floor = self._timeout * _CALL_FLOOR
        try:
            link = await asyncio.wait_for(
                self._link(shard), max(self._timeout - (time.perf_counter() - started), floor)
            )
        except Exception:  # dead, restarting or unreachable: deny, never allow
            self._unreachable(shard)
            self._keep_voids(shard, [check for check, _ in items])
            self._finish(shard, items, [_UNAVAILABLE] * len(items))
            return
        if (out := self._send(shard, link, items)) is not None:
            # The connect spent part of these checks' time: the call gets the rest, so a
            # check is answered within one timeout (plus a floor that lets a call that left
            # at the last moment have a chance), not a connect's timeout and a call's.
            spent = time.perf_counter() - started
            await self._wait(out, max(self._timeout - spent, floor))

    async def _wait(self, out: _Out, timeout: float | None = None) -> None:
        """See a sent call through. Its checks are answered with its rows, or denied at its
        deadline (``_deadline``), or denied when its link fails. A call past its deadline
        is still awaited: the shard is healthy again once it answers, and the allows it
        brings reached nobody and are voided; a link silent for ``call_timeout`` after the
        deadline is torn down (the next check finds the shard afresh)."""
        shard, items = out.shard, out.items
        timer = asyncio.get_running_loop().call_later(
            self._timeout if timeout is None else timeout, self._deadline, out, 2
        )
        try:
            rows = await out.call  # one turn of the loop after the link's reader has it
        except BaseException:  # the link broke or was torn down: decided or not, unknown
            checks = [check for check, _ in items]
            if out.expired:
                self._overrun[shard] = max(0, self._overrun[shard] - 1)
                self._stopped[shard] = False
                self._unsettle(shard, checks, "state_timeout")
            else:
                self._unreachable(shard)
                self._unsettle(shard, checks, "state_unavailable")
                self._finish(shard, items, [_UNAVAILABLE] * len(items))
            if not out.call.done():
                raise  # this task was cancelled (shutdown), not the call
            return
        finally:
            timer.cancel()
            if out.silent is not None:
                out.silent.cancel()
        if out.expired:
            self._overrun[shard] = 0  # it answers: whatever else is out will follow
            self._stopped[shard] = False
            checks = [check for check, _ in items]
            try:
                late = _results(rows, len(items))
            except (ValueError, IndexError, TypeError):
                # As for an answer in time (below): nothing in it is trusted, the checks'
                # fate is unknown, and the link goes. (A row cut short used to end this
                # task with an IndexError: its checks were never asked about.)
                log.warning(
                    "shard %s sent a malformed late answer; its checks are asked about", shard
                )
                self._unsettle(shard, checks, "state_timeout")
                out.link.close()
                return
            # Voids among them that the shard could not record are asked about again.
            self._keep_voids(
                shard, [c for c, r in zip(checks, late, strict=True) if r.audit_event is None]
            )
            # Their clients were told state_timeout at the deadline, whatever came since.
            late = self._hold_unsure(shard, out.link, checks, late, _TIMEOUT.reason)
            await self._void(shard, list(zip(checks, late, strict=True)))
            return
        observe("shard_call", time.perf_counter() - out.sent, self._tags[shard])
        try:
            results = _results(rows, len(items))
        except (ValueError, IndexError, TypeError):
            # Not the answer agreed on: nothing in it is trusted, and whatever the shard
            # decided for these checks is unknown, as if the link had broken.
            log.warning("shard %s sent a malformed answer; its checks are denied", shard)
            self._unsettle(shard, [check for check, _ in items], "state_unavailable")
            results = [_UNAVAILABLE] * len(items)
            # A link that carries such answers is not trusted either; the next one asks
            # the shard about these checks (_settle runs when a link opens).
            out.link.close()
        else:
            results = self._hold_unsure(
                shard, out.link, [c for c, _ in items], results, AUDIT_UNAVAILABLE
            )
            self._keep_voids(
                shard, [c for (c, _), r in zip(items, results, strict=True) if not r.audit_event]
            )
            # The shard records again (on this link, which _open's settling would not see):
            # what is pending from before is asked about now.
            if self._unsettled[shard] and any(r.audit_event for r in results):
                self._watch(self._settle(shard))
        self._finish(shard, items, results)

    def _hold_unsure(
        self, shard: int, link: _Link, checks: list[Check], results: list[Result], told: str
    ) -> list[Result]:
        """Keep the allows a call's answer says may stand unanswered (a decision denied
        ``audit_unavailable`` that names an event: the shard's commit got no answer from
        the database), with ``told``, the answer their clients got, and return the results
        without those names, which nobody must take for a recorded decision. A decision
        recorded on the same link since means the incarnation behind it resolved that
        commit first (it does, before committing anything else): what it held is
        settled."""
        held = self._unsure[shard]
        unsure = [
            i
            for i, (check, result) in enumerate(zip(checks, results, strict=True))
            if check.deny is None
            and check.voids is None
            and result.audit_event
            and result.reason == AUDIT_UNAVAILABLE
            and not result.allowed
        ]
        # A decision's event (not a void's: one already on the chain is named even when
        # the batch failed) is only ever named by a committed batch.
        committed = any(
            c.voids is None and r.audit_event and i not in unsure
            for i, (c, r) in enumerate(zip(checks, results, strict=True))
        )
        if held and committed:
            kept = [held_check for held_check in held if held_check[0] is not link]
            held.clear()
            held.extend(kept)
        # Bounded as the unsettled checks are, and counted the same way: one let go here is
        # an allow that may stand unvoided, which an operator must hear of.
        self._count_dropped(shard, len(held) + len(unsure) - _MAX_UNSETTLED)
        for i in unsure:
            held.append((link, checks[i], told))
            results[i] = Result(False, AUDIT_UNAVAILABLE)
        return results

    def _deadline(self, out: _Out, turns: int) -> None:
        """A call's timer. After a stall of this event loop (a long callback, a descheduled
        process) the timer and the answer are due together, and the timer may run first:
        the answer is given two more turns of the loop for the link's reader to take what
        the socket holds. An answer that came is the shard's committed decision: using it
        is neither late for the client (that time is spent) nor a second decision."""
        if out.call.done():
            return
        loop = asyncio.get_running_loop()
        if turns:
            loop.call_soon(self._deadline, out, turns - 1)
            return
        # The shard may still record these decisions: the clients get a deny, and any
        # allow among them is marked void on the chain once it comes (see _wait).
        out.expired = True
        self._overrun[out.shard] += 1
        self.overruns += 1
        acknowledged = (
            not out.link.acks
            or out.link.acked(out.request_id)
            or time.perf_counter() - out.sent < _ACK_WINDOW
        )
        if not acknowledged:
            self._stopped[out.shard] = True  # the checks queued behind go with these
            self.unacknowledged += 1
        increment(  # rare (a slow or stopped shard): no need to buffer
            "shard_overruns",
            tags={"shard": str(out.shard), "acknowledged": "true" if acknowledged else "false"},
        )
        out.silent = loop.call_later(self._call_timeout, self._silent, out)
        self._finish(out.shard, out.items, [_TIMEOUT] * len(out.items))

    def _silent(self, out: _Out) -> None:
        if not out.call.done():
            log.warning("shard %s did not answer for %.0f s", out.shard, self._call_timeout)
            out.link.close()

    def _finish(
        self,
        shard: int,
        items: list[tuple[Check, asyncio.Future[Result]]],
        results: list[Result],
    ) -> None:
        """Answer a call's checks, free its slot and send what queued up meanwhile.

        A check whose request was given up while its call was out (the provider hung up,
        and Serve cancelled the request) has no one to answer: an allow among those reached
        no client, and is voided on the chain as the shard voids an answer it could not
        send (``answer_undelivered``), so the chain holds no allow its provider never saw.
        """
        abandoned = []
        for (check, future), result in zip(items, results, strict=True):
            if not future.done():
                future.set_result(result)
            elif future.cancelled() and (void := self._given_up(check, result)) is not None:
                abandoned.append(void)
        self._inflight[shard] -= 1
        if abandoned:
            self._watch(self._record_voids(shard, abandoned))
        if self._queues[shard]:
            self._flush(shard)  # what queued up meanwhile leaves now, as one call

    def _given_up(self, check: Check, result: Result) -> Check | None:
        """Count a decided check whose request was given up; the void its allow needs."""
        self.given_up += 1
        if result.allowed and result.audit_event:
            return check.voiding(UNDELIVERED, result.audit_event)
        return None

    async def _record_voids(self, shard: int, voids: list[Check]) -> list[Result]:
        return await asyncio.gather(*(self.check(shard, void) for void in voids))

    async def _void(self, shard: int, answered: list[tuple[Check, Result]]) -> None:
        """Record on the chain that these allows reached no client (each was answered
        ``state_timeout``), so the chain says what the provider was told. What the allow
        reserved stays reserved: a proof is single-use, and spend is not handed back for a
        request whose fate the provider may not know either. A void that is not recorded
        (its call fails, overruns and never answers, or the shard cannot write) is kept and
        asked about again by its proof (``_keep_voids``, ``_settle``)."""
        voids = [
            check.voiding("state_timeout", result.audit_event)
            for check, result in answered
            if result.allowed and result.audit_event
        ]
        if voids:
            await self._record_voids(shard, voids)

    def _watch(self, work: Coroutine[Any, Any, object]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    def _unsettle(self, shard: int, checks: list[Check], answer: str) -> None:
        """Keep checks whose call never answered, to be asked about by their proofs: the
        decisions (any may be an allow the shard committed) with the answer their clients
        got, and the voids (one not written leaves an allow unmarked) with theirs. A
        recorded denial cannot have become an allow: it needs nothing."""
        pending = self._unsettled[shard]
        kept = [
            (check, answer if check.voids is None else check.deny or answer)
            for check in checks
            if check.deny is None or check.voids is not None
        ]
        self._count_dropped(shard, len(pending) + len(kept) - _MAX_UNSETTLED)
        pending.extend(kept)

    def _count_dropped(self, shard: int, dropped: int) -> None:
        """The oldest checks of unknown fate a bounded queue is about to let go (``dropped``,
        0 or less for none): said once per period with the count since the last line."""
        if dropped <= 0:
            return
        self._dropped[shard] += dropped
        if self._said.due(("dropped", shard)) is not None:
            log.warning(
                "shard %s: %d unsettled checks dropped (the oldest) since the last such line",
                shard,
                self._dropped[shard],
            )
            self._dropped[shard] = 0

    def _keep_voids(self, shard: int, checks: list[Check]) -> None:
        """The voids among ``checks``, which end here unrecorded (denied unsent, or the
        shard could not write): asked about again like checks of unknown fate."""
        voids = [check for check in checks if check.voids is not None]
        if voids:
            self._unsettle(shard, voids, "state_timeout")

    async def _settle(self, shard: int) -> None:
        """Ask the shard about the checks kept by ``_unsettle``: it voids the allow it
        committed for each proof, if any, and otherwise records the denial its client got.
        One that fails again is kept again by the path it fails on (see ``_keep_voids``),
        for the next link or the next answer that shows the shard recording.

        Asked a batch at a time, each once the one before is answered: up to
        ``_MAX_UNSETTLED`` may be kept, and asked all at once they left as that many
        divided by ``max_batch`` calls together, whatever ``max_inflight`` says; the
        shard's group commit merged them into one statement (with a lookup per proof)
        under its database timeout, and this replica's checks queued behind them all."""
        if self._settling[shard]:
            return
        self._settling[shard] = True
        try:
            pending = self._unsettled[shard]
            asked = [pending.popleft() for _ in range(len(pending))]
            for start in range(0, len(asked), self._max_batch):
                batch = asked[start : start + self._max_batch]
                results = await self._record_voids(
                    shard, [check.voiding(answer, ANY_ALLOW) for check, answer in batch]
                )
                if not any(result.audit_event for result in results):
                    # Nothing recorded (the shard is unreachable, looks hung or cannot
                    # write; this batch was kept again): the rest wait with it, rather
                    # than each take the same way back.
                    rest = asked[start + self._max_batch :]
                    self._count_dropped(shard, len(pending) + len(rest) - _MAX_UNSETTLED)
                    pending.extend(rest)
                    return
        finally:
            self._settling[shard] = False
