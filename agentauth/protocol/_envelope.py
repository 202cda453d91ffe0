"""The behavioral envelope: the limits a grant's actions must stay within, and their evaluation.

Evaluation is pure: ``evaluate(envelope, state, action, now=...)`` returns a ``Decision``
carrying the new usage state; whoever owns the state (a shard actor) stores it. Time is a
Unix timestamp in seconds; time windows and spend periods are read in the envelope's zone.

Rules are checked in this order, the first failure naming the reason:
expired -> outside_time_window -> amount_precision -> currency_mismatch ->
transaction_limit_exceeded -> step_up_required -> rate_limited -> cumulative_limit_exceeded.

``amount_precision``: a transaction's amount is finer than its currency's minor unit (USD
0.005). Nobody can pay it, and counting it would let sub-unit payments, each settled as a
whole unit, spend past the limits (see ``_currencies``).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ._capabilities import Action
from ._currencies import amount_fits
from ._types import Amount, Currency

__all__ = [
    "Decision",
    "Envelope",
    "Money",
    "RateLimit",
    "Remaining",
    "SpendLimit",
    "TimeWindow",
    "UsageState",
    "evaluate",
]

Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
Period = Literal["hour", "day", "week", "month", "grant"]
_CLOCK = r"^([01][0-9]|2[0-3]):[0-5][0-9]$|^24:00$"

# Bounds on what an envelope may ask for. They keep per-agent state small (a rate window
# remembers at most max_count timestamps) and reject nonsense before a human sees it.
MAX_RATE_COUNT = 10_000
MAX_RATE_WINDOW_S = 31 * 24 * 3600
MAX_RULES = 16
# The latest expiry: 9999-12-31 00:00 UTC. A day short of year 10000, so the time reads as a
# date in every zone (Python's datetime ends at 9999); any later value is no real deadline.
MAX_EXPIRES_AT = 253_402_214_400


# Keys that open a zone file but name no zone: 'localtime' is each host's /etc/localtime,
# 'posixrules' the rules of some default zone, 'Factory' a placeholder. One signed grant
# would open and close its windows at different instants on differently set-up nodes.
_HOST_DEPENDENT_ZONES = frozenset({"localtime", "posixrules", "Factory"})


@functools.cache
def _iana_zones() -> frozenset[str]:
    # Listing the zone database opens hundreds of files (about 10 ms): once per process.
    return frozenset(available_timezones()) - _HOST_DEPENDENT_ZONES


def _minutes(clock: str) -> int:
    hours, minutes = clock.split(":")
    return int(hours) * 60 + int(minutes)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RateLimit(_Frozen):
    """At most ``max_count`` allowed actions in any sliding window of ``window_seconds``."""

    max_count: int = Field(ge=1, le=MAX_RATE_COUNT)
    window_seconds: int = Field(ge=1, le=MAX_RATE_WINDOW_S)


class TimeWindow(_Frozen):
    """Allowed on ``days`` from ``start`` (inclusive) to ``end`` (exclusive), local time.

    A window that crosses midnight is written as two windows; ``end`` may be ``24:00``.
    """

    days: tuple[Weekday, ...] = Field(min_length=1, max_length=7)
    start: str = Field(pattern=_CLOCK)
    end: str = Field(pattern=_CLOCK)

    @field_validator("days")
    @classmethod
    def _ordered_days(cls, days: tuple[Weekday, ...]) -> tuple[Weekday, ...]:
        return tuple(d for d in _WEEKDAYS if d in days)

    @model_validator(mode="after")
    def _ordered_clock(self) -> TimeWindow:
        if _minutes(self.start) >= _minutes(self.end):
            raise ValueError("start must be before end (split windows that cross midnight)")
        return self

    def contains(self, weekday: int, minute: int) -> bool:
        return _WEEKDAYS[weekday] in self.days and (
            _minutes(self.start) <= minute < _minutes(self.end)
        )

    def within(self, parent: TimeWindow) -> bool:
        return (
            set(self.days) <= set(parent.days)
            and _minutes(self.start) >= _minutes(parent.start)
            and _minutes(self.end) <= _minutes(parent.end)
        )


class Money(_Frozen):
    amount: Amount
    currency: Currency


class SpendLimit(_Frozen):
    """At most ``amount`` of ``currency`` in total per calendar ``period`` (or per grant)."""

    amount: Amount
    currency: Currency
    period: Period


class Envelope(_Frozen):
    """Limits on how a grant's capabilities may be used. The default envelope limits nothing
    beyond the capabilities themselves."""

    rate_limits: tuple[RateLimit, ...] = Field((), max_length=MAX_RULES)
    time_windows: tuple[TimeWindow, ...] = Field(
        (), max_length=MAX_RULES, description="Empty means any time."
    )
    timezone: str = Field("UTC", description="IANA zone for time windows and spend periods.")
    max_per_transaction: Money | None = None
    spend_limits: tuple[SpendLimit, ...] = Field((), max_length=MAX_RULES)
    step_up_threshold: Money | None = Field(
        None, description="Transactions above this amount need a one-time human approval."
    )
    expires_at: int | None = Field(
        None, ge=0, le=MAX_EXPIRES_AT, description="Unix time after which nothing."
    )

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, zone: str) -> str:
        # Membership, not "ZoneInfo opens it": ZoneInfo also opens host-dependent keys and
        # any file under the zone path that looks like one.
        if zone not in _iana_zones():
            raise ValueError("timezone must be an IANA zone name such as 'Europe/Berlin'")
        try:
            ZoneInfo(zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("unknown IANA time zone") from None
        return zone

    @property
    def max_rate_count(self) -> int:
        """How many recent action times evaluation must remember."""
        return max((limit.max_count for limit in self.rate_limits), default=0)

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)  # ZoneInfo caches instances by key

    def is_within(self, parent: Envelope) -> bool:
        """Whether this envelope is at least as strict as ``parent`` on every rule.

        Used when a human tightens a request before approving, and for sub-delegation:
        anything this envelope allows, ``parent`` allows too.
        """
        # A limit of n per w is implied by n' <= n per w' >= w: any w-window lies in a w'-window.
        for limit in parent.rate_limits:
            if not any(
                c.max_count <= limit.max_count and c.window_seconds >= limit.window_seconds
                for c in self.rate_limits
            ):
                return False
        if parent.time_windows:
            if not self.time_windows or self.timezone != parent.timezone:
                return False
            if not all(any(w.within(p) for p in parent.time_windows) for w in self.time_windows):
                return False
        if not _money_within(self.max_per_transaction, parent.max_per_transaction):
            return False
        if not _money_within(self.step_up_threshold, parent.step_up_threshold):
            return False
        for spend in parent.spend_limits:
            if not any(
                c.currency == spend.currency
                and c.amount <= spend.amount
                and _period_within(c.period, spend.period, self.timezone == parent.timezone)
                for c in self.spend_limits
            ):
                return False
        return parent.expires_at is None or (
            self.expires_at is not None and self.expires_at <= parent.expires_at
        )


def _money_within(child: Money | None, parent: Money | None) -> bool:
    if parent is None:
        return True
    return child is not None and child.currency == parent.currency and child.amount <= parent.amount


# Which periods' buckets each period's bucket contains. A cap per longer period implies the
# same cap per any period nested in it; weeks and months do not nest in each other.
_CONTAINS: dict[str, frozenset[str]] = {
    "hour": frozenset({"hour"}),
    "day": frozenset({"day", "hour"}),
    "week": frozenset({"week", "day", "hour"}),
    "month": frozenset({"month", "day", "hour"}),
}


def _period_within(child: Period, parent: Period, same_zone: bool) -> bool:
    """Whether a cap per ``child`` period also caps spend per ``parent`` period."""
    if child == "grant":
        return True  # the grant's whole lifetime contains every bucket
    # Calendar buckets only nest within one zone: zones shift day and hour boundaries.
    return same_zone and parent in _CONTAINS[child]


@dataclass(frozen=True, slots=True)
class UsageState:
    """What evaluation remembers between actions for one grant.

    ``recent``: times of the most recent allowed actions (at most the largest rate count),
    oldest first. ``spend``: per spend limit, the period key and the amount spent in it.
    """

    recent: tuple[float, ...] = ()
    spend: tuple[tuple[str, Decimal], ...] = ()


@dataclass(frozen=True, slots=True)
class Remaining:
    """What is left after this decision: per rate limit and per spend limit, in order."""

    rate: tuple[int, ...] = ()
    spend: tuple[Decimal, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: str
    state: UsageState
    remaining: Remaining = field(default_factory=Remaining)
    retry_after: float | None = None


def period_key(period: Period, when: datetime) -> str:
    """The calendar bucket ``when`` (a local time) falls in."""
    if period == "day":
        return f"{when.year:04d}-{when.month:02d}-{when.day:02d}"
    if period == "hour":
        return f"{when.year:04d}-{when.month:02d}-{when.day:02d}T{when.hour:02d}"
    if period == "week":
        year, week, _ = when.isocalendar()
        return f"{year:04d}-W{week:02d}"
    if period == "month":
        return f"{when.year:04d}-{when.month:02d}"
    return "grant"


def _spent(state: UsageState, index: int, key: str) -> Decimal:
    if index < len(state.spend) and state.spend[index][0] == key:
        return state.spend[index][1]
    return Decimal(0)


def evaluate(
    envelope: Envelope,
    state: UsageState,
    action: Action,
    *,
    now: float,
    step_up_approved: bool = False,
) -> Decision:
    """Decide one action against the envelope; on allow, the returned state records it."""
    needs_local = bool(envelope.time_windows or envelope.spend_limits)
    # The whole second, rounded down: fromtimestamp rounds to the nearest microsecond, which
    # put an instant half a microsecond before a window opened (or a day began) inside it.
    # Windows and periods begin on whole seconds (zone offsets are whole seconds), so the
    # floor lands every instant in the minute and bucket it belongs to.
    local = datetime.fromtimestamp(math.floor(now), tz=envelope.zone) if needs_local else None
    keys = [period_key(cap.period, local) for cap in envelope.spend_limits] if local else []
    for index, key in enumerate(keys):
        # A late action (clock skew between replicas) must not move a bucket back to an
        # earlier period, which would forget the newer period's spend: it counts against
        # the newer bucket instead. Keys sort by time, but for the zones whose fall-back
        # repeats two hour labels (Pacific/Chatham 03:45 to 02:45, Antarctica/Troll 03:00
        # to 01:00): the earlier label's second pass is charged to the later hour already
        # begun, so that one local hour can take its cap twice (docs/protocol.md).
        if index < len(state.spend) and state.spend[index][0] > key:
            keys[index] = state.spend[index][0]

    def deny(reason: str, retry_after: float | None = None) -> Decision:
        rate = tuple(
            max(0, limit.max_count - _count_since(state.recent, now - limit.window_seconds))
            for limit in envelope.rate_limits
        )
        spend = tuple(
            max(Decimal(0), cap.amount - _spent(state, i, keys[i]))
            for i, cap in enumerate(envelope.spend_limits)
        )
        return Decision(False, reason, state, Remaining(rate, spend), retry_after)

    if envelope.expires_at is not None and now >= envelope.expires_at:
        return deny("expired")

    if envelope.time_windows and local is not None:
        minute = local.hour * 60 + local.minute
        if not any(w.contains(local.weekday(), minute) for w in envelope.time_windows):
            return deny("outside_time_window")

    amount = action.amount
    if amount is not None:
        if action.currency is None or not amount_fits(amount, action.currency):
            return deny("amount_precision")
        currencies = [
            m.currency for m in (envelope.max_per_transaction, envelope.step_up_threshold) if m
        ]
        currencies += [cap.currency for cap in envelope.spend_limits]
        if any(currency != action.currency for currency in currencies):
            return deny("currency_mismatch")
        if envelope.max_per_transaction and amount > envelope.max_per_transaction.amount:
            return deny("transaction_limit_exceeded")
        if (
            envelope.step_up_threshold
            and amount > envelope.step_up_threshold.amount
            and not step_up_approved
        ):
            return deny("step_up_required")

    # Sliding windows: ``recent`` keeps the last n allowed times (n = the largest count), so
    # the actions inside any window of a limit are all there to count.
    recent = state.recent
    rate_left = []
    waits: list[float] = []  # per full limit: until its oldest counted action leaves it
    for limit in envelope.rate_limits:
        count = _count_since(recent, now - limit.window_seconds)
        if count >= limit.max_count:
            waits.append(recent[-limit.max_count] + limit.window_seconds - now)
        rate_left.append(limit.max_count - count - 1)
    if waits:
        # Every full limit must have room again: a retry after the first one's wait alone
        # would be refused by the others.
        return deny("rate_limited", retry_after=max(waits))

    spend: list[tuple[str, Decimal]] = []
    for index, cap in enumerate(envelope.spend_limits):
        spent = _spent(state, index, keys[index])
        if amount is not None:
            spent += amount
            if spent > cap.amount:
                return deny("cumulative_limit_exceeded")
        spend.append((keys[index], spent))

    keep = envelope.max_rate_count
    if keep:
        if not recent or now >= recent[-1]:
            recent = (*recent[-(keep - 1) :], now) if keep > 1 else (now,)
        else:
            # The state owner may see slightly out-of-order clocks: insert in time order.
            updated = list(recent)
            bisect.insort(updated, now)
            recent = tuple(updated[-keep:])
    new_state = UsageState(recent=recent, spend=tuple(spend))
    spend_left = tuple(
        cap.amount - s for cap, (_, s) in zip(envelope.spend_limits, spend, strict=True)
    )
    return Decision(True, "ok", new_state, Remaining(tuple(rate_left), spend_left))


def _count_since(times: Sequence[float], since: float) -> int:
    """How many of the sorted ``times`` are after ``since``."""
    return len(times) - bisect.bisect_right(times, since)
