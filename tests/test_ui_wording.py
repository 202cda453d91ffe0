"""The approval page's plain words for capabilities, envelopes and step-ups (vectors)."""

from __future__ import annotations

from typing import Any
from zoneinfo import available_timezones

import pytest

from agentauth.protocol import Capability, Envelope, parse_capabilities
from agentauth.ui import describe_capability, describe_envelope, describe_step_up, money
from agentauth.ui._wording import describe_backup, per_window, spend_period, when

DASH = "\u2013"
MINUS = "\u2212"
NOW = 1_800_000_000  # 2027-01-15 08:00 UTC: when the person reads the words

ENVELOPES: list[tuple[dict[str, Any], list[dict[str, Any]], str]] = [
    (
        # The example.
        {
            "rate_limits": [{"max_count": 5, "window_seconds": 3600}],
            "max_per_transaction": {"amount": "50", "currency": "USD"},
            "spend_limits": [{"amount": "200", "currency": "USD", "period": "day"}],
            "time_windows": [
                {"days": ["mon", "tue", "wed", "thu", "fri"], "start": "09:00", "end": "17:00"}
            ],
            "timezone": "Europe/Berlin",
        },
        [{"kind": "transact", "resource": "payments/*"}],
        "up to 5 transactions an hour, at most $50 each and $200 a day, "
        f"weekdays 09:00{DASH}17:00 Europe/Berlin (UTC+01:00 or UTC+02:00 by season)",
    ),
    ({}, [{"kind": "read", "resource": "calendar"}], "no limits beyond the capabilities"),
    (
        {"rate_limits": [{"max_count": 1, "window_seconds": 60}]},
        [{"kind": "read", "resource": "calendar"}],
        "up to 1 request a minute",
    ),
    (
        {
            "rate_limits": [
                {"max_count": 100, "window_seconds": 900},
                {"max_count": 2000, "window_seconds": 86400},
            ]
        },
        [{"kind": "write", "resource": "notes/*"}],
        "up to 100 requests every 15 minutes and 2,000 a day",
    ),
    (
        {
            "spend_limits": [
                {"amount": "1000", "currency": "EUR", "period": "month"},
                {"amount": "5000.5", "currency": "EUR", "period": "grant"},
            ],
            "timezone": "Europe/Paris",
        },
        [{"kind": "transact", "resource": "shop"}],
        "at most €1,000 a month and €5,000.50 in total "
        "(Europe/Paris time, UTC+01:00 or UTC+02:00 by season)",
    ),
    (
        {
            "time_windows": [
                {"days": ["sat", "sun"], "start": "00:00", "end": "24:00"},
                {"days": ["mon", "wed", "fri"], "start": "18:00", "end": "22:30"},
            ],
            "timezone": "America/New_York",
        },
        [{"kind": "read", "resource": "*"}],
        f"weekends all day, Mon, Wed, Fri 18:00{DASH}22:30 America/New_York "
        f"(UTC{MINUS}05:00 or UTC{MINUS}04:00 by season)",
    ),
    (
        {
            "time_windows": [
                {"days": ["tue", "wed", "thu"], "start": "08:00", "end": "12:00"},
                {
                    "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
                    "start": "13:00",
                    "end": "14:00",
                },
            ]
        },
        [{"kind": "read", "resource": "*"}],
        f"Tue{DASH}Thu 08:00{DASH}12:00, every day 13:00{DASH}14:00 UTC",
    ),
    (
        {
            "step_up_threshold": {"amount": "30", "currency": "GBP"},
            "max_per_transaction": {"amount": "99.99", "currency": "GBP"},
            "expires_at": 1_800_000_000,
        },
        [{"kind": "transact", "resource": "shop/*"}],
        "at most £99.99 each, your passkey approval for each one above £30, "
        "until 2027-01-15 08:00 UTC",
    ),
    (
        # POSIX signs: Etc/GMT+12 is twelve hours behind UTC, which the offset makes plain.
        {
            "time_windows": [{"days": ["mon", "tue"], "start": "09:00", "end": "17:00"}],
            "timezone": "Etc/GMT+12",
            "expires_at": 1_800_000_000,
        },
        [{"kind": "read", "resource": "*"}],
        f"Mon, Tue 09:00{DASH}17:00 Etc/GMT+12 (UTC{MINUS}12:00), "
        f"until 2027-01-14 20:00 Etc/GMT+12 (UTC{MINUS}12:00)",
    ),
    (
        {
            "spend_limits": [{"amount": "10", "currency": "USD", "period": "day"}],
            "timezone": "Asia/Kathmandu",
        },
        [{"kind": "transact", "resource": "shop"}],
        "at most $10 a day (Asia/Kathmandu time, UTC+05:45)",
    ),
    (
        {"max_per_transaction": {"amount": "300", "currency": "CHF"}},
        [{"kind": "transact", "resource": "shop/*"}, {"kind": "read", "resource": "shop/*"}],
        "at most 300 CHF each",
    ),
]


@pytest.mark.parametrize(("envelope", "capabilities", "words"), ENVELOPES)
def test_envelopes_read_in_plain_words(
    envelope: dict[str, Any], capabilities: list[dict[str, Any]], words: str
) -> None:
    parsed = Envelope.model_validate(envelope)
    assert describe_envelope(parsed, parse_capabilities(capabilities), now=NOW) == words


ALL_DAY = {"start": "00:00", "end": "24:00"}
EVERY_DAY = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


@pytest.mark.parametrize(
    ("wider", "narrower"),
    [
        # Monday all day and Wednesday 09:00-17:00; Monday and Wednesday 09:00-17:00 only.
        (
            [{"days": ["mon"], **ALL_DAY}, {"days": ["wed"], "start": "09:00", "end": "17:00"}],
            [{"days": ["mon", "wed"], "start": "09:00", "end": "17:00"}],
        ),
        # Any time at all; Mondays 09:00-10:00 only (and every day 09:00-10:00).
        (
            [{"days": EVERY_DAY, **ALL_DAY}, {"days": ["mon"], "start": "09:00", "end": "10:00"}],
            [{"days": ["mon"], "start": "09:00", "end": "10:00"}],
        ),
    ],
)
def test_time_windows_that_allow_more_never_read_like_fewer(
    wider: list[dict[str, Any]], narrower: list[dict[str, Any]]
) -> None:
    """All-day windows left their hours out, and windows are listed with commas as days
    are: Monday all day beside Wednesday 09:00-17:00 read "Mon, Wed 09:00-17:00", the very
    words of a grant allowing Monday 09:00-17:00 only, so a person approved more than the
    page said."""
    wide = describe_envelope(Envelope.model_validate({"time_windows": wider}), now=NOW)
    narrow = describe_envelope(Envelope.model_validate({"time_windows": narrower}), now=NOW)
    assert "all day" in wide
    assert "all day" not in narrow
    assert wide != narrow


def test_weekly_spend_limits_say_their_weeks_begin_on_monday() -> None:
    """A spend week is an ISO week (protocol.period_key). Unsaid, a reader whose weeks
    begin on Sunday counts a Sunday in the week before: the cap spent on Sunday and again on
    Monday looked like twice the limit in one week."""
    weekly = {"spend_limits": [{"amount": "200", "currency": "USD", "period": "week"}]}
    assert describe_envelope(Envelope.model_validate(weekly), now=NOW) == (
        "at most $200 a week (UTC time, weeks from Monday)"
    )
    berlin = {**weekly, "timezone": "Europe/Berlin"}
    assert describe_envelope(Envelope.model_validate(berlin), now=NOW) == (
        "at most $200 a week (Europe/Berlin time, UTC+01:00 or UTC+02:00 by season,"
        " weeks from Monday)"
    )
    windowed = {**weekly, "time_windows": [{"days": ["mon"], **ALL_DAY}]}
    assert describe_envelope(Envelope.model_validate(windowed), now=NOW) == (
        "at most $200 a week (weeks from Monday), Mon all day UTC"
    )


def test_calendar_spend_limits_in_utc_name_the_zone() -> None:
    """A day, hour, week or month turns over in the envelope's zone. Other zones were named
    beside the limits, UTC was not: "at most $200 a day" read as the person's own day,
    while the agent could spend $200 before the UTC midnight and $200 after, within one
    evening of someone in New York."""
    daily = {"spend_limits": [{"amount": "200", "currency": "USD", "period": "day"}]}
    assert describe_envelope(Envelope.model_validate(daily), now=NOW) == (
        "at most $200 a day (UTC time)"
    )
    # A cap on the whole grant has no calendar, and a time window names the zone already.
    total = {"spend_limits": [{"amount": "200", "currency": "USD", "period": "grant"}]}
    assert describe_envelope(Envelope.model_validate(total), now=NOW) == "at most $200 in total"
    windowed = {**daily, "time_windows": [{"days": ["mon"], **ALL_DAY}]}
    assert describe_envelope(Envelope.model_validate(windowed), now=NOW) == (
        "at most $200 a day, Mon all day UTC"
    )


@pytest.mark.parametrize(
    ("capability", "words"),
    [
        (Capability.read("calendar/*"), "read everything under calendar/"),
        (Capability.read("*"), "read everything"),
        (
            Capability.read("mail/inbox", filter="from:boss"),
            "read mail/inbox (only with filter “from:boss”)",
        ),
        # A quotation mark of the filter's own cannot close its quotes early.
        (
            Capability.read("*", filter="a” — only calendar/public"),
            "read everything (only with filter “a\\u201d — only calendar/public”)",
        ),
        (
            Capability.read("*", filter='status="open"'),
            "read everything (only with filter “status=\\u0022open\\u0022”)",
        ),
        (Capability.write("notes/*"), "create and change everything under notes/"),
        (Capability.transact("shop"), "make transactions on shop"),
        (
            Capability.transact("payments/*", max_amount=50, currency="USD", payees=["b", "a"]),
            "make transactions on everything under payments/ up to $50 each, only to a and b",
        ),
        (Capability.custom("deploy", "apps/web"), "“deploy” on apps/web"),
    ],
)
def test_capabilities_read_in_plain_words(capability: Any, words: str) -> None:
    assert describe_capability(capability) == words


@pytest.mark.parametrize(
    ("amount", "currency", "words"),
    [
        ("50", "USD", "$50"),
        ("1250.5", "USD", "$1,250.50"),
        ("0.001", "EUR", "€0.001"),
        ("12.99", "JPY", "¥12.99"),
        ("300", "CHF", "300 CHF"),
        ("1000000", "GBP", "£1,000,000"),
    ],
)
def test_money(amount: str, currency: str, words: str) -> None:
    assert money(amount, currency) == words


@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        (1, "a second"),
        (60, "a minute"),
        (3600, "an hour"),
        (86400, "a day"),
        (604800, "a week"),
        (900, "every 15 minutes"),
        (7200, "every 2 hours"),
        (90, "every 90 seconds"),
        (1209600, "every 2 weeks"),
    ],
)
def test_rate_windows(seconds: int, words: str) -> None:
    assert per_window(seconds) == words


def test_step_ups_periods_and_times() -> None:
    step = {"amount": "120", "currency": "USD", "payee": "acme", "resource": "shop/orders/7"}
    assert describe_step_up(step) == "pay $120 to acme for shop/orders/7"
    assert describe_step_up({**step, "payee": None}) == "pay $120 for shop/orders/7"
    assert [spend_period(p) for p in ("hour", "day", "week", "month", "grant")] == [
        "this hour",
        "today",
        "this week",
        "this month",
        "in total",
    ]
    assert when(1_800_000_000, "Europe/Berlin") == "2027-01-15 09:00 Europe/Berlin (UTC+01:00)"
    assert when(1_800_000_000, "Etc/GMT+12") == f"2027-01-14 20:00 Etc/GMT+12 (UTC{MINUS}12:00)"
    assert when(1_800_000_000) == "2027-01-15 08:00 UTC"


def test_an_expiry_with_seconds_is_shown_with_them() -> None:
    """The page showed times to the minute: a grant signed to end at 08:00:59 read as
    ending at 08:00 (tightening an expiry by a duration lands on such times)."""
    assert when(1_800_000_059) == "2027-01-15 08:00:59 UTC"
    assert when(1_800_000_059, "Europe/Berlin") == "2027-01-15 09:00:59 Europe/Berlin (UTC+01:00)"


def test_the_latest_expiry_reads_in_every_zone() -> None:
    # The envelope's last accepted expiry must never make the words (and so the page) fail.
    latest = Envelope(expires_at=253_402_214_400)
    for zone in sorted(available_timezones()):
        envelope = latest.model_copy(update={"timezone": zone})
        assert describe_envelope(envelope, now=NOW).startswith("until 9999-12-3")


@pytest.mark.parametrize(
    ("reason", "words"),
    [
        ("expired", "has expired and can no longer be decided"),
        ("provider_suspended", "suspended this provider"),
        ("not_pending", "already decided"),
        ("unsupported_key", "only Ed25519 and P-256 passkeys"),
        ("backup_eligibility_changed", "a genuine passkey never does"),
        ("invalid_backup_flags", "claims its passkey is synced while saying it cannot be"),
        (None, "the request was already decided"),
    ],
)
def test_the_registrys_refusals_read_in_plain_words(reason: str | None, words: str) -> None:
    from agentauth.ui._registry import RegistryError

    error = RegistryError(409, "conflict", "the request was already decided", reason)
    assert words in error.message


@pytest.mark.parametrize(
    ("backup_eligible", "backed_up", "words"),
    [
        (True, True, "synced"),
        (True, False, "not synced yet"),
        (False, False, "this device only"),
        # Registered before the registry stored BE: what BS said then, until the next use.
        (None, True, "synced"),
        (None, False, None),
    ],
)
def test_a_passkeys_backup_reads_from_its_stored_flags(
    backup_eligible: bool | None, backed_up: bool, words: str | None
) -> None:
    assert describe_backup(backup_eligible=backup_eligible, backed_up=backed_up) == words
