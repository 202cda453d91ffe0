"""Limits on the anonymous starts: requests anyone may send that store something or cost
work before any credential is checked (passkey sign-up and sign-in, recovery, agent
registration); on the long polls callers hold open (``Waits``); and on answers whose
cost grows with the data, which any caller may ask for again and again (``RecentAnswers``).

Each limit is a generic cell rate algorithm (GCRA) bucket: ``count`` requests at once,
then one every ``period / count``. One request takes from several buckets (its client's
and the global one) only if every one of them has room, so a refused request changes
nothing. ``take`` is the whole algorithm, on integer microseconds passed in; the Redis
script below runs the same steps atomically, on Redis's clock, for buckets every replica
shares.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Generic, TypeVar

from starlette.types import Scope

__all__ = [
    "TAKE_LUA",
    "Full",
    "Limit",
    "LocalBuckets",
    "RecentAnswers",
    "Taken",
    "Waits",
    "client_address",
    "take",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Limit:
    """At most ``count`` requests in any ``period_us``, all of them at once if need be."""

    count: int
    period_us: int

    @property
    def interval_us(self) -> int:
        # Rounded down: a bucket then refills a little early, never late. In microseconds,
        # so the rounding is a part in 60 or less at the largest limits the settings allow
        # (a million a second); in milliseconds it admitted twice the limit, or a fifth.
        return max(1, self.period_us // self.count)


@dataclass(frozen=True, slots=True)
class Taken:
    """``wait_us`` 0: allowed, and ``tats`` are the buckets' new states; otherwise refused
    for that long (until the fullest bucket has room), with nothing to store."""

    wait_us: int
    tats: tuple[int, ...]


def take(tats: Sequence[int | None], limits: Sequence[Limit], now_us: int) -> Taken:
    """One request against every bucket. ``tats``: each bucket's theoretical arrival time
    (``None``: never used, or expired, which is the same)."""
    after = []
    wait = 0
    for tat, limit in zip(tats, limits, strict=True):
        new = max(now_us if tat is None else tat, now_us) + limit.interval_us
        wait = max(wait, new - now_us - limit.period_us)
        after.append(new)
    if wait > 0:
        return Taken(wait, ())
    return Taken(0, tuple(after))


# ``take`` over KEYS, ARGV holding each one's interval and period in microseconds; returns
# the wait in microseconds (0: taken). A bucket's key expires when it would be empty again.
# (Microseconds since 1970 are about 2^51: exact in Lua's doubles.)
TAKE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wait, after = 0, {}
for i, key in ipairs(KEYS) do
  local interval, period = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key) or now)
  after[i] = math.max(tat, now) + interval
  wait = math.max(wait, after[i] - now - period)
end
if wait > 0 then return wait end
for i, key in ipairs(KEYS) do
  redis.call('SET', key, after[i], 'PX', math.ceil((after[i] - now) / 1000))
end
return 0
"""


class LocalBuckets:
    """``take`` over buckets in this process's memory (when the shared ones cannot be
    reached). Only allowed requests add a bucket, so there are never more live buckets than
    the smallest limit of a request admits per period; expired ones go as new ones come."""

    def __init__(self) -> None:
        self._tats: dict[str, int] = {}
        self._prune_above = 1024

    def take(self, keys: Sequence[str], limits: Sequence[Limit], now_us: int) -> int:
        taken = take([self._tats.get(k) for k in keys], limits, now_us)
        if taken.wait_us == 0:
            self._tats.update(zip(keys, taken.tats, strict=True))
            if len(self._tats) > self._prune_above:
                # Each pruning at least doubles the size the next one waits for: a full scan
                # costs O(1) per request, amortised.
                self._tats = {k: tat for k, tat in self._tats.items() if tat > now_us}
                self._prune_above = max(1024, 2 * len(self._tats))
        return taken.wait_us


class Waits:
    """Long polls open in this process: at most ``per_caller`` of one caller and
    ``in_all`` together. A count, not a rate: a slot is free again as soon as the poll that
    held it ends, however it ends."""

    def __init__(self, *, per_caller: int, in_all: int) -> None:
        self._per_caller = per_caller
        self._in_all = in_all
        self._held: dict[str, int] = {}
        self._total = 0

    @contextmanager
    def hold(self, caller: str) -> Iterator[None]:
        """One slot for ``caller`` while the block runs; raises ``Full`` (having taken
        nothing) when either bound is reached."""
        held = self._held.get(caller, 0)
        if held >= self._per_caller:
            raise Full("caller")
        if self._total >= self._in_all:
            raise Full("replica")
        self._held[caller] = held + 1
        self._total += 1
        try:
            yield
        finally:
            self._total -= 1
            if self._held[caller] == 1:
                del self._held[caller]  # idle callers leave nothing behind
            else:
                self._held[caller] -= 1


class RecentAnswers(Generic[T]):
    """Answers computed at most once per key per ``ttl_us`` in this process: asked again
    within it, the answer computed then is given again, and askers at the same moment
    await the one computation. A computation that fails is not kept (the next asker
    computes again), and one whose asker goes away goes on for the others. Whoever asks
    must have been authorized already: this only decides how often the work is done."""

    def __init__(self, *, ttl_us: int) -> None:
        self._ttl_us = ttl_us
        self._held: dict[str, tuple[int, asyncio.Future[T]]] = {}
        self._prune_above = 1024

    async def get(self, key: str, now_us: int, compute: Callable[[], Awaitable[T]]) -> T:
        held = self._held.get(key)
        if held is None or now_us - held[0] >= self._ttl_us:
            answer = asyncio.ensure_future(compute())
            answer.add_done_callback(partial(self._done, key))
            held = self._held[key] = (now_us, answer)
            if len(self._held) > self._prune_above:
                # As LocalBuckets prune: O(1) per computation, amortised.
                self._held = {
                    k: (at, a)
                    for k, (at, a) in self._held.items()
                    if not a.done() or now_us - at < self._ttl_us
                }
                self._prune_above = max(1024, 2 * len(self._held))
        # Shielded: an asker that goes away (its client disconnected) leaves the
        # computation to the others, rather than cancel it under them.
        return await asyncio.shield(held[1])

    def _done(self, key: str, answer: asyncio.Future[T]) -> None:
        if not answer.cancelled() and answer.exception() is None:
            return
        held = self._held.get(key)
        if held is not None and held[1] is answer:
            del self._held[key]


class Full(Exception):
    """A ``Waits`` bound reached: ``args[0]`` says which, ``"caller"`` or ``"replica"``."""


def client_address(scope: Scope, trusted_proxies: Sequence[IPNetwork]) -> str:
    """The address a request's limits are kept under.

    The peer of the connection, unless it is a trusted proxy: then the X-Forwarded-For
    hops are read from the nearest back, skipping trusted proxies, and the first other
    one is the client (what the outermost trusted proxy saw). Hops before it were written
    by the client and prove nothing. An IPv6 client is its /64, which one host usually
    holds whole; anything unreadable is "unknown", one client."""
    peer = _address((scope.get("client") or ("",))[0])
    if peer is None:
        return "unknown"
    client = peer
    if _within(peer, trusted_proxies):
        for hop in reversed(_forwarded_for(scope)):
            address = _address(hop)
            if address is None:
                break  # a trusted proxy never writes this: keep the last hop it vouched for
            client = address
            if not _within(address, trusted_proxies):
                break
    if isinstance(client, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((client, 64), strict=False))
    return str(client)


def _forwarded_for(scope: Scope) -> list[str]:
    hops: list[str] = []
    for name, value in scope.get("headers", ()):
        if name == b"x-forwarded-for":
            hops.extend(h.strip() for h in value.decode("latin-1").split(","))
    return hops


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: Sequence[IPNetwork]
) -> bool:
    return any(address in network for network in networks)
