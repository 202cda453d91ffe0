"""Plain words for what a human approves: capabilities, envelopes, step-ups, usage.

Pure functions over the protocol's models: the page shows these sentences, and the tests
feed them vectors. For example an envelope reads "up to 5 transactions an hour, at most $50
each and $200 a day, weekdays 09:00-17:00 Europe/Berlin (UTC+01:00 or UTC+02:00 by
season)" (with an en dash in the range).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from ..protocol import Capability, Custom, Envelope, Read, Transact, Write

__all__ = [
    "action_noun",
    "describe_backup",
    "describe_capabilities",
    "describe_capability",
    "describe_envelope",
    "describe_step_up",
    "money",
    "per_window",
    "spend_period",
    "when",
]

# Symbols only for currencies whose symbol is unambiguous to most readers; the rest read
# "50 CHF", which is never wrong.
# Ranges of days and times take an en dash, as in print ("09:00\u201317:00").
_DASH = "\u2013"
_MINUS = "\u2212"  # a real minus sign, as in print: "UTC\u221212:00"
_SYMBOLS = {"USD": "$", "EUR": "€", "GBP": "£", "JPY": "¥"}
_UNITS = (("week", 7 * 86400), ("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_NAMES = {"mon": "Mon", "tue": "Tue", "wed": "Wed", "thu": "Thu", "fri": "Fri"}
_DAY_NAMES |= {"sat": "Sat", "sun": "Sun"}
_PER_PERIOD = {
    "hour": "an hour",
    "day": "a day",
    "week": "a week",
    "month": "a month",
    "grant": "in total",
}
_THIS_PERIOD = {
    "hour": "this hour",
    "day": "today",
    "week": "this week",
    "month": "this month",
    "grant": "in total",
}

# Double quotation marks outside the initial and final punctuation categories (Pi, Pf):
# the straight one, the low-9 ones (Ps), CJK and fullwidth ones.
_QUOTE_MARKS = frozenset('"\u201a\u201e\u301d\u301e\u301f\uff02')


def money(amount: Decimal | str, currency: str) -> str:
    """'$50', '$1,250.50', '€12.99', '300 CHF'."""
    value = Decimal(amount).normalize()
    if value == value.to_integral_value():
        text = f"{int(value):,}"
    else:
        exponent = value.as_tuple().exponent
        places = max(2, -exponent if isinstance(exponent, int) else 2)
        text = f"{value:,.{places}f}"
    symbol = _SYMBOLS.get(currency)
    return f"{symbol}{text}" if symbol else f"{text} {currency}"


def per_window(seconds: int) -> str:
    """'an hour', 'a day', 'every 15 minutes', 'every 90 seconds'."""
    for unit, size in _UNITS:
        if seconds % size == 0:
            count = seconds // size
            if count == 1:
                return f"{'an' if unit == 'hour' else 'a'} {unit}"
            return f"every {count} {unit}s"
    return f"every {seconds} seconds"  # pragma: no cover - 1 second divides every int


def spend_period(period: str) -> str:
    """How the current bucket of a spend period reads: 'today', 'this month', 'in total'."""
    return _THIS_PERIOD.get(period, period)


def action_noun(capabilities: Sequence[Capability]) -> tuple[str, str]:
    """Singular and plural noun for what a rate limit counts."""
    if capabilities and all(isinstance(c, Transact) for c in capabilities):
        return "transaction", "transactions"
    return "request", "requests"


def _resource(pattern: str) -> str:
    if pattern == "*":
        return "everything"
    if pattern.endswith("/*"):
        return f"everything under {pattern[:-1]}"
    return pattern


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _quoted(text: str) -> str:
    """Agent-chosen ``text`` in quotation marks it cannot close early: a quotation mark of
    its own is shown by its code point. Else a filter ``a” — only calendar/public``
    would read as the filter “a” followed by the page's own words narrowing the grant."""
    shown = "".join(
        f"\\u{ord(char):04x}"
        if char in _QUOTE_MARKS or unicodedata.category(char) in ("Pi", "Pf")
        else char
        for char in text
    )
    return f"“{shown}”"


def describe_capability(capability: Capability) -> str:
    """One capability in words, e.g. 'make transactions on payments/* up to $50 each'."""
    where = _resource(capability.resource)
    if isinstance(capability, Read):
        text = f"read {where}"
        if capability.filter is not None:
            text += f" (only with filter {_quoted(capability.filter)})"
        return text
    if isinstance(capability, Write):
        return f"create and change {where}"
    if isinstance(capability, Transact):
        text = f"make transactions on {where}"
        if capability.max_amount is not None and capability.currency is not None:
            text += f" up to {money(capability.max_amount, capability.currency)} each"
        if capability.payees is not None:
            text += f", only to {_join(list(capability.payees))}"
        return text
    if isinstance(capability, Custom):
        return f"“{capability.name}” on {where}"
    return f"{capability.kind} {where}"  # pragma: no cover - the four kinds above are all


def describe_capabilities(capabilities: Sequence[Capability]) -> str:
    return "; ".join(describe_capability(c) for c in capabilities) or "nothing"


def _days(days: Sequence[str]) -> str:
    chosen = [d for d in _DAYS if d in days]
    if len(chosen) == 7:
        return "every day"
    if chosen == list(_DAYS[:5]):
        return "weekdays"
    if chosen == list(_DAYS[5:]):
        return "weekends"
    first, last = _DAYS.index(chosen[0]), _DAYS.index(chosen[-1])
    if len(chosen) >= 3 and last - first + 1 == len(chosen):
        return f"{_DAY_NAMES[chosen[0]]}{_DASH}{_DAY_NAMES[chosen[-1]]}"
    return ", ".join(_DAY_NAMES[d] for d in chosen)


def _offset(offset: timedelta | None) -> str:
    """'UTC+02:00', 'UTC\u221212:00' (with a minus sign), 'UTC+05:45'."""
    seconds = int(offset.total_seconds()) if offset is not None else 0
    sign = "+" if seconds >= 0 else _MINUS
    hours, rest = divmod(abs(seconds), 3600)
    minutes, seconds = divmod(rest, 60)
    text = f"UTC{sign}{hours:02d}:{minutes:02d}"
    return text + (f":{seconds:02d}" if seconds else "")


def _zone_offsets(zone: str, *, now: float) -> str:
    """The offsets a zone takes in the year from ``now``, for rules that recur:
    'UTC+01:00 or UTC+02:00 by season' (Europe/Berlin), 'UTC\u221212:00' (Etc/GMT+12)."""
    info = ZoneInfo(zone)
    # Weekly samples see every offset in force for a week or more (daylight saving, for one).
    offsets = sorted(
        {datetime.fromtimestamp(now + week * 7 * 86400, tz=info).utcoffset() for week in range(53)},
        key=lambda offset: offset or timedelta(0),
    )
    words = [_offset(o) for o in offsets]
    return words[0] if len(words) == 1 else f"{_join_or(words)} by season"


def _join_or(items: Sequence[str]) -> str:
    return ", ".join(items[:-1]) + " or " + items[-1]


def when(timestamp: float, zone: str = "UTC") -> str:
    """A Unix time as '2026-05-01 17:00 Europe/Berlin (UTC+02:00)' or '2026-05-01 15:00 UTC'.

    The offset is there because a zone's name can mislead: POSIX 'Etc/GMT+12' is twelve
    hours behind UTC, not ahead, and an agent chooses the zone its envelope is read in.
    """
    local = datetime.fromtimestamp(timestamp, tz=UTC if zone == "UTC" else ZoneInfo(zone))
    # Seconds when there are any: a grant signed to end at 17:00:59 does not end at 17:00
    # (tightening an expiry by a duration lands on such times).
    shown = f"{local:%Y-%m-%d %H:%M}" + (f":{local:%S}" if local.second else "")
    if zone == "UTC":
        return f"{shown} UTC"
    return f"{shown} {zone} ({_offset(local.utcoffset())})"


def describe_envelope(
    envelope: Envelope, capabilities: Sequence[Capability] = (), *, now: float
) -> str:
    """The envelope as one sentence; an empty envelope says so. ``now`` (Unix time) is when
    the person reads it: a zone's offsets are given for the year from then."""
    singular, plural = action_noun(capabilities)
    parts: list[str] = []

    rates = []
    for i, limit in enumerate(envelope.rate_limits):
        noun = singular if limit.max_count == 1 else plural
        count = f"{limit.max_count:,}"
        rates.append(
            f"up to {count} {noun} {per_window(limit.window_seconds)}"
            if i == 0
            else f"{count} {per_window(limit.window_seconds)}"
        )
    if rates:
        parts.append(_join(rates))

    amounts = []
    if envelope.max_per_transaction is not None:
        cap = envelope.max_per_transaction
        amounts.append(f"{money(cap.amount, cap.currency)} each")
    amounts += [
        f"{money(s.amount, s.currency)} {_PER_PERIOD[s.period]}" for s in envelope.spend_limits
    ]
    if amounts:
        text = "at most " + _join(amounts)
        calendar = any(s.period != "grant" for s in envelope.spend_limits)
        # A day (hour, week, month) turns over in the envelope's zone, UTC included: unnamed,
        # "$200 a day" reads as the person's own day, and across the UTC midnight an agent
        # can spend it twice within one evening of theirs. (The windows name the zone.)
        notes = []
        if calendar and not envelope.time_windows and envelope.timezone == "UTC":
            notes.append("UTC time")
        elif calendar and not envelope.time_windows:
            offsets = _zone_offsets(envelope.timezone, now=now)
            notes.append(f"{envelope.timezone} time, {offsets}")
        # Weeks are ISO weeks: a reader whose weeks begin on Sunday would otherwise count
        # Sunday in the week before, and see twice the cap spent over one weekend.
        if any(s.period == "week" for s in envelope.spend_limits):
            notes.append("weeks from Monday")
        if notes:
            text += f" ({', '.join(notes)})"
        parts.append(text)

    if envelope.time_windows:
        windows = []
        for window in envelope.time_windows:
            days = _days(window.days)
            # "all day" said, not left out: windows are listed with commas, as days are, so
            # Monday all day and Wednesday 09:00-17:00 read "Mon, Wed 09:00-17:00", the
            # words of Monday and Wednesday 09:00-17:00 only (and "every day, Mon
            # 09:00-10:00" hid that any time is allowed).
            all_day = window.start == "00:00" and window.end == "24:00"
            hours = "all day" if all_day else f"{window.start}{_DASH}{window.end}"
            windows.append(f"{days} {hours}")
        zone = envelope.timezone
        if zone != "UTC":
            zone += f" ({_zone_offsets(zone, now=now)})"
        parts.append(", ".join(windows) + f" {zone}")

    if envelope.step_up_threshold is not None:
        threshold = money(envelope.step_up_threshold.amount, envelope.step_up_threshold.currency)
        parts.append(f"your passkey approval for each one above {threshold}")

    if envelope.expires_at is not None:
        parts.append(f"until {when(envelope.expires_at, envelope.timezone)}")

    return ", ".join(parts) if parts else "no limits beyond the capabilities"


def describe_step_up(document: Mapping[str, Any]) -> str:
    """A step-up document as 'pay $120 to acme for payments/invoices/7'."""
    amount = money(str(document["amount"]), str(document["currency"]))
    payee = document.get("payee")
    to = f" to {payee}" if payee else ""
    return f"pay {amount}{to} for {document['resource']}"


def describe_backup(*, backup_eligible: bool | None, backed_up: bool | None) -> str | None:
    """How a passkey is kept, from the backup flags the registry stored at its last use
    (WebAuthn BE and BS): 'synced', 'not synced yet' or 'this device only'; None when
    there is nothing true to say yet.

    BE (``backup_eligible``) None is a passkey registered before the registry stored BE;
    what it said at registration about being backed up still reads until it is next used.
    """
    if backup_eligible is False:
        return "this device only"
    if backed_up:
        return "synced"
    if backup_eligible:
        return "not synced yet"
    return None
