"""Behavioral envelopes: each rule of ``evaluate``, the tightening order, and two properties.

Times are Unix seconds; local times are built in the envelope's IANA zone so that the tests
read like the rules a human approved ("weekdays 09:00-17:00 in Berlin").
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo, available_timezones

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agentauth.protocol import (
    Action,
    Decision,
    Envelope,
    Money,
    RateLimit,
    Remaining,
    SpendLimit,
    TimeWindow,
    UsageState,
    evaluate,
)

BERLIN = "Europe/Berlin"
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri")
T0 = 1_700_000_000  # a Tuesday, 2023-11-14 22:13:20 UTC

READ = Action(kind="read", resource="calendar")


def pay(amount: str, currency: str = "EUR") -> Action:
    return Action(kind="transact", resource="payments", amount=amount, currency=currency)


def local(zone: str, *fields: int) -> float:
    """Unix time of a wall-clock time in ``zone`` (never an ambiguous or skipped one here)."""
    return datetime(*fields, tzinfo=ZoneInfo(zone)).timestamp()  # type: ignore[misc]


def utc(*fields: int) -> float:
    return local("UTC", *fields)


def run(
    envelope: Envelope,
    steps: Iterable[tuple[float, Action]],
    state: UsageState | None = None,
) -> list[Decision]:
    """Evaluate actions in order, threading the state as its owner would."""
    state = state or UsageState()
    decisions = []
    for now, action in steps:
        decision = evaluate(envelope, state, action, now=now)
        state = decision.state
        decisions.append(decision)
    return decisions


def reasons(decisions: Iterable[Decision]) -> list[str]:
    return [d.reason for d in decisions]


def spend(amount: str, period: str, currency: str = "EUR") -> SpendLimit:
    return SpendLimit(amount=amount, currency=currency, period=period)  # type: ignore[arg-type]


# --- the default envelope -------------------------------------------------------------------


def test_default_envelope_allows_everything_and_remembers_nothing() -> None:
    envelope = Envelope()
    for action in (READ, pay("999999999999"), pay("1", "JPY")):
        decision = evaluate(envelope, UsageState(), action, now=T0)
        assert decision == Decision(True, "ok", UsageState(), Remaining(), None)


# --- rate limits ----------------------------------------------------------------------------


def test_rate_limit_is_a_sliding_window_with_an_exclusive_far_edge() -> None:
    envelope = Envelope(rate_limits=(RateLimit(max_count=3, window_seconds=60),))
    first = run(envelope, [(T0, READ), (T0 + 1, READ), (T0 + 2, READ)])
    assert reasons(first) == ["ok", "ok", "ok"]
    assert [d.remaining.rate for d in first] == [(2,), (1,), (0,)]
    state = first[-1].state

    denied = evaluate(envelope, state, READ, now=T0 + 3)
    assert (denied.allowed, denied.reason) == (False, "rate_limited")
    assert denied.retry_after == 57
    assert denied.state is state
    assert denied.remaining.rate == (0,)

    almost = evaluate(envelope, state, READ, now=T0 + 59.5)
    assert almost.reason == "rate_limited"
    assert almost.retry_after == pytest.approx(0.5)

    # Exactly window_seconds after the first action, it has left the window.
    boundary = evaluate(envelope, state, READ, now=T0 + 60)
    assert boundary.allowed
    assert boundary.remaining.rate == (0,)  # T0+1, T0+2 and T0+60 are in (T0, T0+60]
    assert evaluate(envelope, boundary.state, READ, now=T0 + 60.5).reason == "rate_limited"
    assert evaluate(envelope, boundary.state, READ, now=T0 + 61).allowed


def test_several_rate_limits_apply_at_once() -> None:
    envelope = Envelope(
        rate_limits=(
            RateLimit(max_count=2, window_seconds=10),
            RateLimit(max_count=3, window_seconds=100),
        )
    )
    decisions = run(
        envelope,
        [
            (T0, READ),
            (T0 + 1, READ),
            (T0 + 5, READ),  # the short window is full
            (T0 + 10, READ),  # T0 left the short window; the long one now holds 3
            (T0 + 20, READ),  # short window empty, long window full until T0 + 100
            (T0 + 99, READ),
            (T0 + 100, READ),
        ],
    )
    assert reasons(decisions) == [
        "ok",
        "ok",
        "rate_limited",
        "ok",
        "rate_limited",
        "rate_limited",
        "ok",
    ]
    assert decisions[2].retry_after == 5
    assert decisions[4].retry_after == 80
    assert decisions[5].retry_after == 1
    assert [d.remaining.rate for d in decisions] == [
        (1, 2),
        (0, 1),
        (0, 1),  # a denial reports what is left now, without the denied action
        (0, 0),
        (2, 0),
        (2, 0),
        (1, 0),
    ]


def test_retry_after_waits_for_every_full_rate_limit() -> None:
    """With two limits full at once it gave the first one's wait only: a retry then was
    refused again by the other."""
    envelope = Envelope(
        rate_limits=(
            RateLimit(max_count=2, window_seconds=10),
            RateLimit(max_count=2, window_seconds=100),
        )
    )
    decisions = run(envelope, [(T0, READ), (T0 + 1, READ), (T0 + 5, READ)])
    assert reasons(decisions) == ["ok", "ok", "rate_limited"]
    assert decisions[2].retry_after == 95  # the long window's, not the short one's 5
    (again,) = run(envelope, [(T0 + 5 + 95, READ)], state=decisions[1].state)
    assert again.allowed


def test_denied_actions_do_not_count_against_rate_limits() -> None:
    envelope = Envelope(rate_limits=(RateLimit(max_count=1, window_seconds=10),))
    steps = [(T0 + i, READ) for i in range(0, 31)]
    decisions = run(envelope, steps)
    allowed = [now for (now, _), d in zip(steps, decisions, strict=True) if d.allowed]
    assert allowed == [T0, T0 + 10, T0 + 20, T0 + 30]


def test_rate_limits_count_every_kind_of_action() -> None:
    envelope = Envelope(rate_limits=(RateLimit(max_count=2, window_seconds=60),))
    decisions = run(envelope, [(T0, READ), (T0 + 1, pay("1")), (T0 + 2, pay("1"))])
    assert reasons(decisions) == ["ok", "ok", "rate_limited"]


def test_rate_limit_bounds() -> None:
    with pytest.raises(ValidationError):
        RateLimit(max_count=0, window_seconds=1)
    with pytest.raises(ValidationError):
        RateLimit(max_count=1, window_seconds=0)
    with pytest.raises(ValidationError):
        Envelope(rate_limits=tuple(RateLimit(max_count=1, window_seconds=i + 1) for i in range(17)))


# --- time windows ---------------------------------------------------------------------------

OFFICE_HOURS = Envelope(
    time_windows=(TimeWindow(days=WEEKDAYS, start="09:00", end="17:00"),), timezone=BERLIN
)


@pytest.mark.parametrize(
    ("when", "allowed"),
    [
        ((2024, 6, 3, 8, 59), False),  # Monday
        ((2024, 6, 3, 8, 59, 59), False),
        ((2024, 6, 3, 9, 0), True),
        ((2024, 6, 3, 12, 0), True),
        ((2024, 6, 3, 16, 59), True),
        ((2024, 6, 3, 16, 59, 59), True),
        ((2024, 6, 3, 17, 0), False),
        ((2024, 6, 7, 16, 0), True),  # Friday
        ((2024, 6, 8, 12, 0), False),  # Saturday
        ((2024, 6, 9, 12, 0), False),  # Sunday
        ((2024, 6, 10, 0, 0), False),  # Monday midnight
    ],
)
def test_time_window_in_local_time(when: tuple[int, ...], allowed: bool) -> None:
    decision = evaluate(OFFICE_HOURS, UsageState(), READ, now=local(BERLIN, *when))
    assert decision.allowed is allowed
    assert decision.reason == ("ok" if allowed else "outside_time_window")


def test_time_window_edges_are_exact_to_the_last_float() -> None:
    """Any instant before the start is outside and any before the end inside, however close:
    the float just below 09:00 is not rounded up to it (fromtimestamp rounds to the
    microsecond, which let in the last half microsecond before a window opened)."""
    start, end = local(BERLIN, 2024, 6, 3, 9, 0), local(BERLIN, 2024, 6, 3, 17, 0)
    cases = [
        (math.nextafter(start, 0), False),
        (start - 4e-7, False),
        (start, True),
        (math.nextafter(end, 0), True),
        (end, False),
    ]
    for now, allowed in cases:
        assert evaluate(OFFICE_HOURS, UsageState(), READ, now=now).allowed is allowed, now


def test_time_window_follows_daylight_saving_time() -> None:
    # Berlin is UTC+1 in winter and UTC+2 from 2024-03-31: the window moves in UTC.
    before = [(utc(2024, 3, 25, 7, 59), False), (utc(2024, 3, 25, 8, 0), True)]
    before += [(utc(2024, 3, 25, 15, 59), True), (utc(2024, 3, 25, 16, 0), False)]
    after = [(utc(2024, 4, 1, 6, 59), False), (utc(2024, 4, 1, 7, 0), True)]
    after += [(utc(2024, 4, 1, 14, 59), True), (utc(2024, 4, 1, 15, 0), False)]
    for now, allowed in before + after:
        assert evaluate(OFFICE_HOURS, UsageState(), READ, now=now).allowed is allowed, now
    # The same UTC time of day is outside the window in winter and inside it in summer.
    assert not evaluate(OFFICE_HOURS, UsageState(), READ, now=utc(2024, 3, 25, 7, 30)).allowed
    assert evaluate(OFFICE_HOURS, UsageState(), READ, now=utc(2024, 4, 1, 7, 30)).allowed


def test_skipped_hour_on_spring_forward_never_matches() -> None:
    envelope = Envelope(
        time_windows=(TimeWindow(days=("sun",), start="02:00", end="03:00"),), timezone=BERLIN
    )
    # 2024-03-31: local 02:00-03:00 does not exist in Berlin.
    start = utc(2024, 3, 30, 22, 0)
    minutes = [start + 60 * i for i in range(8 * 60)]
    assert not any(evaluate(envelope, UsageState(), READ, now=m).allowed for m in minutes)


def test_repeated_hour_on_fall_back_matches_twice() -> None:
    envelope = Envelope(
        time_windows=(TimeWindow(days=("sun",), start="02:00", end="03:00"),), timezone=BERLIN
    )
    # 2024-10-27: local 02:00-03:00 happens at 00:00 UTC (CEST) and again at 01:00 UTC (CET).
    cases = [
        (utc(2024, 10, 26, 23, 59, 59), False),
        (utc(2024, 10, 27, 0, 0), True),
        (utc(2024, 10, 27, 0, 59, 59), True),
        (utc(2024, 10, 27, 1, 0), True),
        (utc(2024, 10, 27, 1, 59, 59), True),
        (utc(2024, 10, 27, 2, 0), False),
    ]
    for now, allowed in cases:
        assert evaluate(envelope, UsageState(), READ, now=now).allowed is allowed, now


def test_time_windows_are_a_union_and_may_end_at_midnight() -> None:
    envelope = Envelope(
        time_windows=(
            TimeWindow(days=("sat",), start="22:00", end="24:00"),
            TimeWindow(days=("sun",), start="00:00", end="02:00"),
        ),
        timezone=BERLIN,
    )
    assert not evaluate(envelope, UsageState(), READ, now=local(BERLIN, 2024, 6, 8, 21, 59)).allowed
    assert evaluate(envelope, UsageState(), READ, now=local(BERLIN, 2024, 6, 8, 23, 59, 59)).allowed
    assert evaluate(envelope, UsageState(), READ, now=local(BERLIN, 2024, 6, 9, 0, 0)).allowed
    assert not evaluate(envelope, UsageState(), READ, now=local(BERLIN, 2024, 6, 9, 2, 0)).allowed


@pytest.mark.parametrize(
    "fields",
    [
        {"days": ("mon",), "start": "17:00", "end": "09:00"},  # crosses midnight: split it
        {"days": ("mon",), "start": "09:00", "end": "09:00"},
        {"days": ("mon",), "start": "9:00", "end": "17:00"},
        {"days": ("mon",), "start": "09:00", "end": "24:01"},
        {"days": ("mon",), "start": "24:00", "end": "24:00"},
        {"days": ("mon",), "start": "09:60", "end": "17:00"},
        {"days": (), "start": "09:00", "end": "17:00"},
        {"days": ("monday",), "start": "09:00", "end": "17:00"},
    ],
)
def test_bad_time_windows_are_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        TimeWindow.model_validate(fields)


def test_unknown_time_zones_are_refused() -> None:
    for zone in ("Mars/Olympus_Mons", "", "../etc/passwd", "Europe/Berlin "):
        with pytest.raises(ValidationError):
            Envelope(timezone=zone)


@pytest.mark.parametrize(
    "zone",
    [
        # Each host's own zone, whatever /etc/localtime links to there.
        "localtime",
        "posixrules",
        "Factory",
        # Other names ZoneInfo opens: the same zones under the posix/ and right/ trees.
        "posix/Europe/Berlin",
        "right/UTC",
        "/usr/share/zoneinfo/Europe/Berlin",
        "Europe/./Berlin",
        "zone.tab",
    ],
)
def test_zone_keys_that_are_not_iana_names_are_refused(zone: str) -> None:
    with pytest.raises(ValidationError, match="IANA"):
        Envelope(timezone=zone)
    with pytest.raises(ValidationError):
        Envelope.model_validate({"timezone": zone})


def test_every_iana_zone_is_accepted() -> None:
    zones = available_timezones() - {"localtime", "posixrules", "Factory"}
    assert {"UTC", BERLIN, "America/Argentina/Buenos_Aires", "Etc/GMT+5"} <= zones
    for zone in sorted(zones):
        assert Envelope(timezone=zone).zone.key == zone


def test_days_are_stored_in_week_order() -> None:
    window = TimeWindow(days=("fri", "mon", "wed", "mon"), start="09:00", end="10:00")
    assert window.days == ("mon", "wed", "fri")


# --- money per transaction ------------------------------------------------------------------


def test_max_per_transaction_is_inclusive() -> None:
    envelope = Envelope(max_per_transaction=Money(amount="100", currency="EUR"))
    assert evaluate(envelope, UsageState(), pay("100.00"), now=T0).allowed
    over = evaluate(envelope, UsageState(), pay("100.01"), now=T0)  # a cent, EUR's minor unit
    assert (over.allowed, over.reason) == (False, "transaction_limit_exceeded")
    assert evaluate(envelope, UsageState(), READ, now=T0).allowed  # not a transaction
    # A unit outside ISO 4217 keeps the 6 places, to its last one.
    tokens = Envelope(max_per_transaction=Money(amount="100", currency="TOK"))
    over = evaluate(tokens, UsageState(), pay("100.000001", "TOK"), now=T0)
    assert (over.allowed, over.reason) == (False, "transaction_limit_exceeded")


# --- amounts finer than the currency's minor unit ------------------------------------------


def test_sub_cent_payments_cannot_spend_past_a_limit() -> None:
    """200 payments of USD 0.005 each settle as 0.01: 2.00 against a 1.00 limit, if allowed."""
    envelope = Envelope(spend_limits=(spend("1.00", "grant", "USD"),))
    state, allowed = UsageState(), 0
    for i in range(200):
        decision = evaluate(envelope, state, pay("0.005", "USD"), now=T0 + i)
        assert (decision.allowed, decision.reason) == (False, "amount_precision")
        allowed += decision.allowed
        state = decision.state
    assert allowed == 0 and state == UsageState()
    # Whole cents count as before, up to the limit exactly.
    for i in range(100):
        decision = evaluate(envelope, state, pay("0.01", "USD"), now=T0 + i)
        assert decision.allowed
        state = decision.state
    over = evaluate(envelope, state, pay("0.01", "USD"), now=T0 + 100)
    assert (over.allowed, over.reason) == (False, "cumulative_limit_exceeded")


@pytest.mark.parametrize(
    ("amount", "currency", "allowed"),
    [
        ("0.01", "USD", True),
        ("1.50", "USD", True),  # trailing zeros are not places
        ("0.005", "USD", False),
        ("1", "JPY", True),
        ("1.0", "JPY", True),
        ("1.5", "JPY", False),
        ("0.001", "BHD", True),
        ("0.0005", "BHD", False),
        ("0.0001", "CLF", True),
        ("0.00001", "CLF", False),
        ("0.000001", "TOK", True),  # not an ISO 4217 code: 6 places
        ("0.000001", "XAU", True),  # ISO 4217 without a minor unit: 6 places
    ],
)
def test_an_amount_finer_than_its_currency_is_denied(
    amount: str, currency: str, allowed: bool
) -> None:
    # No limit at all: the amount itself is what nobody could pay.
    decision = evaluate(Envelope(), UsageState(), pay(amount, currency), now=T0)
    assert (decision.allowed, decision.reason) == (
        (True, "ok") if allowed else (False, "amount_precision")
    )


def test_amount_precision_comes_before_the_currency_and_limits() -> None:
    envelope = Envelope(
        max_per_transaction=Money(amount="1", currency="EUR"),
        spend_limits=(spend("1", "day", "EUR"),),
    )
    for action in (pay("5.005", "EUR"), pay("0.005", "USD")):
        decision = evaluate(envelope, UsageState(), action, now=T0)
        assert (decision.allowed, decision.reason) == (False, "amount_precision")
        assert decision.remaining.spend == (Decimal(1),)


def test_a_stored_envelope_with_too_fine_limits_still_evaluates() -> None:
    """A grant approved before the rule keeps working: its limits parse, and payable amounts
    compared with them behave as if they were rounded down."""
    document = {
        "max_per_transaction": {"amount": "1.005", "currency": "USD"},
        "spend_limits": [{"amount": "2.009", "currency": "USD", "period": "grant"}],
        "step_up_threshold": {"amount": "0.995", "currency": "USD"},
    }
    envelope = Envelope.model_validate(document)
    assert evaluate(envelope, UsageState(), pay("1.00", "USD"), now=T0).reason == (
        "step_up_required"
    )
    state = UsageState()
    for amount in ("1.00", "1.00"):
        decision = evaluate(envelope, state, pay(amount, "USD"), now=T0, step_up_approved=True)
        assert decision.allowed
        state = decision.state
    assert evaluate(envelope, state, pay("0.01", "USD"), now=T0).reason == (
        "cumulative_limit_exceeded"
    )
    over = evaluate(envelope, UsageState(), pay("1.01", "USD"), now=T0, step_up_approved=True)
    assert over.reason == "transaction_limit_exceeded"


def test_currency_mismatch_denies() -> None:
    per_transaction = Envelope(max_per_transaction=Money(amount="100", currency="EUR"))
    step_up = Envelope(step_up_threshold=Money(amount="100", currency="EUR"))
    cumulative = Envelope(spend_limits=(spend("100", "day"),))
    for envelope in (per_transaction, step_up, cumulative):
        decision = evaluate(envelope, UsageState(), pay("1", "USD"), now=T0, step_up_approved=True)
        assert (decision.allowed, decision.reason) == (False, "currency_mismatch")


def test_step_up_threshold() -> None:
    envelope = Envelope(step_up_threshold=Money(amount="50", currency="EUR"))
    assert evaluate(envelope, UsageState(), pay("50"), now=T0).allowed
    needs = evaluate(envelope, UsageState(), pay("50.01"), now=T0)
    assert (needs.allowed, needs.reason) == (False, "step_up_required")
    approved = evaluate(envelope, UsageState(), pay("50.01"), now=T0, step_up_approved=True)
    assert (approved.allowed, approved.reason) == (True, "ok")


def test_step_up_approval_does_not_lift_the_per_transaction_limit() -> None:
    envelope = Envelope(
        max_per_transaction=Money(amount="100", currency="EUR"),
        step_up_threshold=Money(amount="50", currency="EUR"),
    )
    decision = evaluate(envelope, UsageState(), pay("101"), now=T0, step_up_approved=True)
    assert decision.reason == "transaction_limit_exceeded"


# --- cumulative spend -----------------------------------------------------------------------


def test_daily_spend_rolls_over_at_local_midnight() -> None:
    envelope = Envelope(spend_limits=(spend("100", "day"),), timezone=BERLIN)
    # 21:30 UTC on June 3 is 23:30 in Berlin; 22:00 UTC is already June 4 there.
    decisions = run(
        envelope,
        [
            (utc(2024, 6, 3, 21, 30), pay("60")),
            (utc(2024, 6, 3, 21, 59, 59), pay("60")),
            (utc(2024, 6, 3, 21, 59, 59), pay("40")),
            (utc(2024, 6, 3, 22, 0), pay("60")),
        ],
    )
    assert reasons(decisions) == ["ok", "cumulative_limit_exceeded", "ok", "ok"]
    assert [d.remaining.spend for d in decisions] == [
        (Decimal(40),),
        (Decimal(40),),
        (Decimal(0),),
        (Decimal(40),),
    ]
    # In UTC the same instants are all on June 3.
    in_utc = run(
        envelope.model_copy(update={"timezone": "UTC"}),
        [(utc(2024, 6, 3, 21, 30), pay("60")), (utc(2024, 6, 3, 22, 0), pay("60"))],
    )
    assert reasons(in_utc) == ["ok", "cumulative_limit_exceeded"]


def test_spend_period_edges_are_exact_to_the_last_float() -> None:
    envelope = Envelope(spend_limits=(spend("100", "day"),), timezone=BERLIN)
    midnight = local(BERLIN, 2024, 6, 4, 0, 0)
    decisions = run(
        envelope,
        [(math.nextafter(midnight, 0), pay("60")), (math.nextafter(midnight, 0), pay("60"))],
    )
    assert reasons(decisions) == ["ok", "cumulative_limit_exceeded"]  # both on June 3
    assert evaluate(envelope, decisions[-1].state, pay("60"), now=midnight).allowed


def test_hourly_spend() -> None:
    envelope = Envelope(spend_limits=(spend("10", "hour"),))
    decisions = run(
        envelope,
        [
            (utc(2024, 6, 3, 10, 0), pay("10")),
            (utc(2024, 6, 3, 10, 59, 59), pay("0.01")),
            (utc(2024, 6, 3, 11, 0), pay("10")),
        ],
    )
    assert reasons(decisions) == ["ok", "cumulative_limit_exceeded", "ok"]


def test_weekly_spend_follows_iso_weeks() -> None:
    envelope = Envelope(spend_limits=(spend("100", "week"),))
    decisions = run(
        envelope,
        [
            (utc(2020, 12, 31, 12, 0), pay("70")),  # Thursday of 2020-W53
            (utc(2021, 1, 3, 23, 59), pay("40")),  # Sunday, still 2020-W53
            (utc(2021, 1, 3, 23, 59), pay("30")),
            (utc(2021, 1, 4, 0, 0), pay("100")),  # Monday of 2021-W01
        ],
    )
    assert reasons(decisions) == ["ok", "cumulative_limit_exceeded", "ok", "ok"]


def test_monthly_spend() -> None:
    envelope = Envelope(spend_limits=(spend("100", "month"),), timezone=BERLIN)
    decisions = run(
        envelope,
        [
            (local(BERLIN, 2024, 1, 1, 0, 0), pay("100")),
            (local(BERLIN, 2024, 1, 31, 23, 59, 59), pay("0.01")),
            (local(BERLIN, 2024, 2, 1, 0, 0), pay("100")),
            (local(BERLIN, 2024, 2, 29, 12, 0), pay("1")),
            (local(BERLIN, 2024, 3, 1, 0, 0), pay("1")),
        ],
    )
    assert reasons(decisions) == [
        "ok",
        "cumulative_limit_exceeded",
        "ok",
        "cumulative_limit_exceeded",
        "ok",
    ]
    # 23:30 UTC on January 31 is already February in Berlin.
    in_berlin = run(
        envelope, [(utc(2024, 1, 31, 12), pay("100")), (utc(2024, 1, 31, 23, 30), pay("100"))]
    )
    assert reasons(in_berlin) == ["ok", "ok"]


def test_grant_spend_never_resets() -> None:
    envelope = Envelope(spend_limits=(spend("100", "grant"),))
    decisions = run(
        envelope,
        [(T0, pay("60")), (T0 + 366 * 86400, pay("40")), (T0 + 3650 * 86400, pay("0.01"))],
    )
    assert reasons(decisions) == ["ok", "ok", "cumulative_limit_exceeded"]


def test_several_spend_limits_each_hold() -> None:
    envelope = Envelope(spend_limits=(spend("100", "day"), spend("150", "week")))
    decisions = run(
        envelope,
        [
            (utc(2024, 6, 3, 12), pay("100")),  # Monday
            (utc(2024, 6, 3, 13), pay("1")),  # daily cap
            (utc(2024, 6, 4, 12), pay("50")),
            (utc(2024, 6, 4, 13), pay("1")),  # weekly cap
            (utc(2024, 6, 10, 0), pay("100")),  # next week
        ],
    )
    assert reasons(decisions) == [
        "ok",
        "cumulative_limit_exceeded",
        "ok",
        "cumulative_limit_exceeded",
        "ok",
    ]
    assert [d.remaining.spend for d in decisions] == [
        (Decimal(0), Decimal(50)),
        (Decimal(0), Decimal(50)),
        (Decimal(50), Decimal(0)),
        (Decimal(50), Decimal(0)),
        (Decimal(0), Decimal(50)),
    ]


def test_non_transactions_pass_spend_limits_and_keep_the_spend() -> None:
    envelope = Envelope(spend_limits=(spend("100", "day"),))
    decisions = run(envelope, [(T0, pay("90")), (T0 + 1, READ), (T0 + 2, pay("11"))])
    assert reasons(decisions) == ["ok", "ok", "cumulative_limit_exceeded"]
    assert decisions[1].remaining.spend == (Decimal(10),)


def test_a_late_action_from_the_previous_day_does_not_reset_todays_spend() -> None:
    # The state owner may see slightly out-of-order clocks (evaluate() says so for rate
    # limits). Two actions a few milliseconds apart around midnight must not let a third
    # spend today's cap again.
    envelope = Envelope(spend_limits=(spend("100", "day"),))
    midnight = utc(2024, 6, 4)
    steps = [
        (midnight + 0.001, pay("100")),
        (midnight - 0.001, pay("10")),
        (midnight + 1, pay("100")),
    ]
    decisions = run(envelope, steps)
    per_day: dict[str, Decimal] = defaultdict(Decimal)
    for (now, action), decision in zip(steps, decisions, strict=True):
        if decision.allowed:
            assert action.amount is not None
            per_day[datetime.fromtimestamp(now, UTC).date().isoformat()] += action.amount
    assert all(total <= 100 for total in per_day.values()), dict(per_day)


# --- expiry, order of rules, state ----------------------------------------------------------


def test_expiry_is_exclusive() -> None:
    envelope = Envelope(expires_at=T0)
    assert evaluate(envelope, UsageState(), READ, now=T0 - 1).allowed
    assert evaluate(envelope, UsageState(), READ, now=T0 - 0.001).allowed
    for now in (T0, T0 + 0.001, T0 + 86400):
        decision = evaluate(envelope, UsageState(), READ, now=now)
        assert (decision.allowed, decision.reason) == (False, "expired")


def test_expiry_is_a_date_in_every_zone() -> None:
    # The last accepted expiry, 9999-12-31 00:00 UTC, is still a date wherever it is read;
    # a later one (year 10000 and on) is no deadline at all and is refused.
    latest = 253_402_214_400
    assert datetime.fromtimestamp(latest, tz=UTC) == datetime(9999, 12, 31, tzinfo=UTC)
    for zone in ("Pacific/Kiritimati", "Etc/GMT-14", "Etc/GMT+12", "UTC"):
        envelope = Envelope(expires_at=latest, timezone=zone)
        assert datetime.fromtimestamp(latest, tz=envelope.zone).year == 9999
    for too_late in (latest + 1, 253_402_300_800, 10**12, 2**53 - 1):
        with pytest.raises(ValidationError, match="expires_at"):
            Envelope(expires_at=too_late)


MONDAY_NOON = local(BERLIN, 2024, 6, 3, 12, 0)
SATURDAY_NOON = local(BERLIN, 2024, 6, 8, 12, 0)
OFFICE = (TimeWindow(days=WEEKDAYS, start="09:00", end="17:00"),)
ONE_PER_MINUTE = (RateLimit(max_count=1, window_seconds=60),)
EUR_10 = Money(amount="10", currency="EUR")
EUR_5 = Money(amount="5", currency="EUR")


def _envelope(**fields: Any) -> Envelope:
    return Envelope(timezone=BERLIN, **fields)


def _state_after(envelope: Envelope, prior: tuple[Action, ...], now: float) -> UsageState:
    """The state after ``prior`` actions, all allowed, one second before ``now``."""
    decisions = run(envelope, [(now - 1, action) for action in prior])
    assert all(d.allowed for d in decisions)
    return decisions[-1].state if decisions else UsageState()


# (envelope, actions allowed just before, the action, when, the expected reason)
OrderCase = tuple[Envelope, tuple[Action, ...], Action, float, str]
ORDER_CASES: dict[str, OrderCase] = {
    "expired before outside_time_window": (
        _envelope(expires_at=int(SATURDAY_NOON) - 1, time_windows=OFFICE),
        (),
        pay("1"),
        SATURDAY_NOON,
        "expired",
    ),
    "outside_time_window before transaction_limit_exceeded": (
        _envelope(time_windows=OFFICE, max_per_transaction=EUR_10),
        (),
        pay("11"),
        SATURDAY_NOON,
        "outside_time_window",
    ),
    "transaction_limit_exceeded before step_up_required": (
        _envelope(max_per_transaction=EUR_10, step_up_threshold=EUR_5),
        (),
        pay("11"),
        MONDAY_NOON,
        "transaction_limit_exceeded",
    ),
    "currency_mismatch (per transaction) before step_up_required": (
        _envelope(max_per_transaction=Money(amount="10", currency="USD"), step_up_threshold=EUR_5),
        (),
        pay("6"),
        MONDAY_NOON,
        "currency_mismatch",
    ),
    "currency_mismatch (spend limit) before step_up_required": (
        _envelope(step_up_threshold=EUR_5, spend_limits=(spend("1000", "day", "USD"),)),
        (),
        pay("6"),
        MONDAY_NOON,
        "currency_mismatch",
    ),
    "step_up_required before rate_limited": (
        _envelope(step_up_threshold=EUR_5, rate_limits=ONE_PER_MINUTE),
        (READ,),
        pay("6"),
        MONDAY_NOON,
        "step_up_required",
    ),
    "currency_mismatch (spend limit) before rate_limited": (
        _envelope(rate_limits=ONE_PER_MINUTE, spend_limits=(spend("1000", "day", "USD"),)),
        (READ,),
        pay("1"),
        MONDAY_NOON,
        "currency_mismatch",
    ),
    "rate_limited before cumulative_limit_exceeded": (
        _envelope(rate_limits=ONE_PER_MINUTE, spend_limits=(spend("100", "day"),)),
        (pay("100"),),
        pay("1"),
        MONDAY_NOON,
        "rate_limited",
    ),
}


@pytest.mark.parametrize("case", list(ORDER_CASES))
def test_first_failing_rule_in_documented_order_names_the_reason(case: str) -> None:
    # The module docstring: expired -> outside_time_window -> transaction_limit_exceeded /
    # currency_mismatch -> step_up_required -> rate_limited -> cumulative_limit_exceeded.
    envelope, prior, action, now, reason = ORDER_CASES[case]
    state = _state_after(envelope, prior, now)
    decision = evaluate(envelope, state, action, now=now)
    assert (decision.allowed, decision.reason) == (False, reason)
    assert decision.state is state


DENIALS: dict[str, tuple[Envelope, tuple[Action, ...], Action]] = {
    "expired": (_envelope(expires_at=int(MONDAY_NOON)), (READ,), READ),
    "outside_time_window": (
        _envelope(time_windows=(TimeWindow(days=("mon",), start="11:00", end="12:00"),)),
        (READ,),
        READ,
    ),
    "transaction_limit_exceeded": (_envelope(max_per_transaction=EUR_5), (pay("1"),), pay("6")),
    "currency_mismatch": (
        _envelope(spend_limits=(spend("1000", "day", "USD"),)),
        (pay("1", "USD"),),
        pay("1"),
    ),
    "step_up_required": (_envelope(step_up_threshold=EUR_5), (pay("1"),), pay("6")),
    "rate_limited": (_envelope(rate_limits=ONE_PER_MINUTE), (READ,), READ),
    "cumulative_limit_exceeded": (
        _envelope(
            spend_limits=(spend("100", "day"),),
            rate_limits=(RateLimit(max_count=9, window_seconds=60),),
        ),
        (pay("100"),),
        pay("1"),
    ),
}


@pytest.mark.parametrize("reason", list(DENIALS))
def test_a_denial_leaves_the_state_unchanged(reason: str) -> None:
    envelope, prior, action = DENIALS[reason]
    state = _state_after(envelope, prior, MONDAY_NOON)
    decision = evaluate(envelope, state, action, now=MONDAY_NOON)
    assert (decision.allowed, decision.reason) == (False, reason)
    assert decision.state is state
    assert decision.retry_after is None or reason == "rate_limited"


def test_remaining_reports_every_rule_in_order() -> None:
    envelope = Envelope(
        rate_limits=(
            RateLimit(max_count=5, window_seconds=60),
            RateLimit(max_count=10, window_seconds=3600),
        ),
        spend_limits=(spend("100", "day"), spend("1000", "month")),
    )
    decisions = run(envelope, [(T0, pay("30")), (T0 + 1, READ), (T0 + 2, pay("20.5"))])
    assert [d.remaining for d in decisions] == [
        Remaining(rate=(4, 9), spend=(Decimal(70), Decimal(970))),
        Remaining(rate=(3, 8), spend=(Decimal(70), Decimal(970))),
        Remaining(rate=(2, 7), spend=(Decimal("49.5"), Decimal("949.5"))),
    ]
    assert decisions[-1].state.recent == (T0, T0 + 1, T0 + 2)
    # An hour later, the short window is empty and the spend still counts.
    later = evaluate(envelope, decisions[-1].state, READ, now=T0 + 3600)
    assert later.remaining == Remaining(rate=(4, 7), spend=(Decimal("49.5"), Decimal("949.5")))


# --- tightening (is_within) ------------------------------------------------------------------


def within(child: dict[str, Any], parent: dict[str, Any]) -> bool:
    return Envelope.model_validate(child).is_within(Envelope.model_validate(parent))


def test_no_rules_is_the_widest_envelope() -> None:
    strict = {
        "rate_limits": [{"max_count": 1, "window_seconds": 60}],
        "time_windows": [{"days": ["mon"], "start": "09:00", "end": "10:00"}],
        "max_per_transaction": {"amount": "1", "currency": "EUR"},
        "spend_limits": [{"amount": "1", "currency": "EUR", "period": "day"}],
        "step_up_threshold": {"amount": "1", "currency": "EUR"},
        "expires_at": T0,
    }
    assert within({}, {})
    assert within(strict, {})
    assert within(strict, strict)
    assert not within({}, strict)
    for rule in strict:
        loosened = {k: v for k, v in strict.items() if k != rule}
        assert not within(loosened, strict), rule


@pytest.mark.parametrize(
    ("child", "expected"),
    [
        ([(10, 60)], True),
        ([(5, 60)], True),
        ([(10, 120)], True),  # 10 per 2 min implies 10 per min
        ([(11, 60)], False),
        ([(10, 30)], False),  # 10 per 30 s allows 20 per min
        ([(20, 120)], False),
        ([(11, 60), (10, 60)], True),
        ([], False),
    ],
)
def test_rate_limit_tightening(child: list[tuple[int, int]], expected: bool) -> None:
    parent = {"rate_limits": [{"max_count": 10, "window_seconds": 60}]}
    limits = [{"max_count": n, "window_seconds": w} for n, w in child]
    assert within({"rate_limits": limits}, parent) is expected


def test_every_parent_rate_limit_needs_a_child_limit() -> None:
    parent = {
        "rate_limits": [
            {"max_count": 10, "window_seconds": 60},
            {"max_count": 100, "window_seconds": 3600},
        ]
    }
    assert not within({"rate_limits": [{"max_count": 10, "window_seconds": 60}]}, parent)
    assert within({"rate_limits": [{"max_count": 10, "window_seconds": 3600}]}, parent)


@pytest.mark.parametrize(
    ("child", "zone", "expected"),
    [
        ([("mon", "10:00", "12:00")], BERLIN, True),
        ([("mon", "09:00", "17:00"), ("fri", "16:00", "17:00")], BERLIN, True),
        ([("mon", "10:00", "12:00")], "UTC", False),  # same clock, another zone
        ([("sat", "10:00", "12:00")], BERLIN, False),
        ([("mon", "08:00", "12:00")], BERLIN, False),
        ([("mon", "16:00", "17:01")], BERLIN, False),
        ([("mon", "10:00", "12:00"), ("sun", "10:00", "12:00")], BERLIN, False),
        ([], BERLIN, False),  # no windows means any time
    ],
)
def test_time_window_tightening(
    child: list[tuple[str, str, str]], zone: str, expected: bool
) -> None:
    parent = {
        "time_windows": [{"days": list(WEEKDAYS), "start": "09:00", "end": "17:00"}],
        "timezone": BERLIN,
    }
    windows = [{"days": [d], "start": s, "end": e} for d, s, e in child]
    assert within({"time_windows": windows, "timezone": zone}, parent) is expected


def test_adding_time_windows_tightens() -> None:
    child = {"time_windows": [{"days": ["mon"], "start": "09:00", "end": "10:00"}]}
    assert within(child, {})


@pytest.mark.parametrize("rule", ["max_per_transaction", "step_up_threshold"])
@pytest.mark.parametrize(
    ("child", "expected"),
    [
        ({"amount": "100", "currency": "EUR"}, True),
        ({"amount": "100.00", "currency": "EUR"}, True),
        ({"amount": "0", "currency": "EUR"}, True),
        ({"amount": "100.000001", "currency": "EUR"}, False),
        ({"amount": "50", "currency": "USD"}, False),
        (None, False),
    ],
)
def test_money_tightening(rule: str, child: dict[str, str] | None, expected: bool) -> None:
    parent = {rule: {"amount": "100", "currency": "EUR"}}
    assert within({rule: child}, parent) is expected


@pytest.mark.parametrize(
    ("child", "parent", "expected"),
    [
        (("100", "day"), ("100", "day"), True),
        (("50", "day"), ("100", "day"), True),
        (("100.01", "day"), ("100", "day"), False),
        (("100", "hour"), ("100", "day"), False),  # 100 per hour allows 2400 per day
        (("100", "week"), ("100", "day"), True),
        (("100", "month"), ("100", "day"), True),
        (("100", "grant"), ("100", "day"), True),
        (("100", "month"), ("100", "week"), False),  # a week can straddle two months
        (("100", "week"), ("100", "month"), False),  # a month holds several weeks
        (("100", "day"), ("100", "week"), False),
        (("100", "grant"), ("100", "week"), True),
        (("100", "month"), ("100", "grant"), False),
        (("100", "grant"), ("100", "grant"), True),
        (("100", "day"), ("100", "hour"), True),
        (("100", "month"), ("100", "hour"), True),
    ],
)
def test_spend_period_tightening(
    child: tuple[str, str], parent: tuple[str, str], expected: bool
) -> None:
    def limits(amount: str, period: str) -> dict[str, Any]:
        return {"spend_limits": [{"amount": amount, "currency": "EUR", "period": period}]}

    assert within(limits(*child), limits(*parent)) is expected


def test_monthly_cap_does_not_imply_weekly_cap_in_practice() -> None:
    # Why is_within refuses it: a week straddling two months can spend the cap twice.
    monthly = Envelope(spend_limits=(spend("100", "month"),))
    weekly = Envelope(spend_limits=(spend("100", "week"),))
    assert not monthly.is_within(weekly)
    steps = [(utc(2024, 7, 31, 12), pay("100")), (utc(2024, 8, 1, 12), pay("100"))]  # Wed, Thu
    assert reasons(run(monthly, steps)) == ["ok", "ok"]
    assert reasons(run(weekly, steps)) == ["ok", "cumulative_limit_exceeded"]


def test_spend_tightening_needs_the_same_currency_and_zone() -> None:
    parent = {"spend_limits": [{"amount": "100", "currency": "EUR", "period": "day"}]}
    usd = {"spend_limits": [{"amount": "50", "currency": "USD", "period": "day"}]}
    assert not within(usd, parent)
    other_zone = {**parent, "timezone": BERLIN}
    assert not within(other_zone, parent)  # Berlin days are not UTC days
    lifetime = {"spend_limits": [{"amount": "100", "currency": "EUR", "period": "grant"}]}
    assert within({**lifetime, "timezone": BERLIN}, parent)


@pytest.mark.parametrize(
    ("child", "parent", "expected"),
    [
        (T0 - 1, T0, True),
        (T0, T0, True),
        (T0 + 1, T0, False),
        (None, T0, False),
        (T0, None, True),
        (None, None, True),
    ],
)
def test_expiry_tightening(child: int | None, parent: int | None, expected: bool) -> None:
    assert within({"expires_at": child}, {"expires_at": parent}) is expected


# --- properties -----------------------------------------------------------------------------

ZONES = ("UTC", BERLIN, "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe")
PERIODS = ("hour", "day", "week", "month", "grant")
LIMIT_AMOUNTS = ("0", "50", "100", "123.45", "250")
cents = st.integers(0, 15_000).map(lambda c: f"{c // 100}.{c % 100:02d}")
increments = st.one_of(
    st.sampled_from((0, 1, 59, 60, 1799, 3600, 3601, 86_399, 86_400, 7 * 86_400 + 5, 31 * 86_400)),
    st.integers(0, 3 * 86_400),
)


def bucket(period: str, zone: str, now: float) -> tuple[int, ...]:
    """The calendar period ``now`` falls in, computed independently of the module."""
    when = datetime.fromtimestamp(now, ZoneInfo(zone))
    if period == "hour":
        return (when.year, when.month, when.day, when.hour)
    if period == "day":
        return (when.year, when.month, when.day)
    if period == "week":
        return tuple(when.isocalendar()[:2])
    if period == "month":
        return (when.year, when.month)
    return ()


@st.composite
def spend_envelopes(draw: st.DrawFn) -> Envelope:
    limits = draw(
        st.lists(
            st.builds(
                spend,
                st.sampled_from(LIMIT_AMOUNTS),
                st.sampled_from(PERIODS),
                st.sampled_from(("EUR", "EUR", "EUR", "USD")),
            ),
            min_size=1,
            max_size=3,
        )
    )
    money = st.none() | st.builds(
        Money, amount=st.sampled_from(LIMIT_AMOUNTS), currency=st.just("EUR")
    )
    return Envelope(
        spend_limits=tuple(limits),
        timezone=draw(st.sampled_from(ZONES)),
        max_per_transaction=draw(money),
        step_up_threshold=draw(money),
        rate_limits=tuple(
            draw(
                st.lists(
                    st.builds(
                        RateLimit, max_count=st.integers(1, 5), window_seconds=st.integers(1, 600)
                    ),
                    max_size=1,
                )
            )
        ),
    )


@st.composite
def spend_steps(draw: st.DrawFn) -> list[tuple[int, Action, bool]]:
    now = draw(st.integers(1_577_836_800, 1_900_000_000))  # 2020 to 2030
    steps = []
    for _ in range(draw(st.integers(1, 30))):
        now += draw(increments)
        if draw(st.integers(0, 4)):
            action = pay(draw(cents), draw(st.sampled_from(("EUR", "EUR", "EUR", "USD"))))
        else:
            action = READ
        steps.append((now, action, draw(st.booleans())))
    return steps


def test_cumulative_spend_never_exceeds_its_limit() -> None:
    seen: Counter[str] = Counter()

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(envelope=spend_envelopes(), steps=spend_steps())
    def check(envelope: Envelope, steps: list[tuple[int, Action, bool]]) -> None:
        zone = envelope.timezone
        totals: dict[tuple[int, tuple[int, ...]], Decimal] = defaultdict(Decimal)
        state = UsageState()
        for now, action, approved in steps:
            decision = evaluate(envelope, state, action, now=now, step_up_approved=approved)
            keys = [bucket(cap.period, zone, now) for cap in envelope.spend_limits]
            if decision.allowed:
                seen["allowed"] += 1
                for i, cap in enumerate(envelope.spend_limits):
                    totals[i, keys[i]] += action.amount or 0
                    assert totals[i, keys[i]] <= cap.amount, (cap, now, totals)
                    assert decision.remaining.spend[i] == cap.amount - totals[i, keys[i]]
            else:
                assert decision.state == state
            if decision.reason == "cumulative_limit_exceeded":
                seen["cumulative_denied"] += 1
                # Denied only when it had to be: some limit would have been exceeded.
                assert action.amount is not None
                assert any(
                    totals[i, keys[i]] + action.amount > cap.amount
                    for i, cap in enumerate(envelope.spend_limits)
                )
            state = decision.state

    check()
    assert seen["allowed"] >= 300, seen
    assert seen["cumulative_denied"] >= 100, seen


def test_allowed_actions_in_any_sliding_window_never_exceed_max_count() -> None:
    seen: Counter[str] = Counter()
    limits = st.lists(
        st.builds(RateLimit, max_count=st.integers(1, 6), window_seconds=st.integers(1, 120)),
        min_size=1,
        max_size=3,
    )
    # Mostly forward in time, sometimes slightly backwards (out-of-order clocks).
    steps = st.lists(st.integers(0, 40) | st.integers(-3, 0), min_size=1, max_size=60)

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(rate_limits=limits, increments=steps)
    def check(rate_limits: list[RateLimit], increments: list[int]) -> None:
        envelope = Envelope(rate_limits=tuple(rate_limits))
        state = UsageState()
        allowed: list[int] = []
        now = T0
        for step in increments:
            now += step
            decision = evaluate(envelope, state, READ, now=now)
            if decision.allowed:
                seen["allowed"] += 1
                allowed.append(now)
            else:
                seen["denied"] += 1
                assert decision.reason == "rate_limited"
                assert decision.state == state
                assert decision.retry_after is not None
                assert decision.retry_after > 0
                if all(t <= now for t in allowed):
                    # In order, a denial is needed: allowing would overfill some window.
                    assert any(
                        sum(now - limit.window_seconds < t for t in allowed) >= limit.max_count
                        for limit in rate_limits
                    )
            state = decision.state
        for limit in rate_limits:
            for end in allowed:
                inside = [t for t in allowed if end - limit.window_seconds < t <= end]
                assert len(inside) <= limit.max_count, (limit, allowed)

    check()
    assert seen["denied"] >= 300, seen
    assert seen["allowed"] >= 300, seen


def test_local_helper_builds_the_intended_wall_clock() -> None:
    # Guard for the helpers above: a Berlin summer time is two hours ahead of UTC.
    assert local(BERLIN, 2024, 6, 3, 9, 0) == utc(2024, 6, 3, 7, 0)
    assert datetime.fromtimestamp(utc(2024, 6, 3), UTC) - datetime(2024, 6, 3, tzinfo=UTC) == (
        timedelta(0)
    )
