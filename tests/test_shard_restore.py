"""A restarted shard rebuilds each grant's usage from its committed decision events.

Its memory is gone, but not the audit chain: the latest allow of a grant carries its spend
buckets and the allow times inside the rate window are the rate counter. A new incarnation
must enforce the same limits the old one would have.
"""

from __future__ import annotations

import secrets
import time

import pytest
from shard_checks import a_check, payment

from agentauth.actors import Check, StateShard
from agentauth.protocol import Envelope

INDEX = 702
ENVELOPE = Envelope.model_validate(
    {
        "rate_limits": [{"max_count": 3, "window_seconds": 3600}],
        "spend_limits": [{"amount": "100", "currency": "EUR", "period": "day"}],
    }
)


def _pay(grant: str, amount: str, iat: float) -> Check:
    return a_check(
        "restore",
        grant_id=grant,
        iat=iat,
        action=payment(amount),
        envelope=ENVELOPE,
        token_jti=None,
    )


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_limits_survive_a_restart(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spent, fresh = f"grt_spent_{secrets.token_hex(3)}", f"grt_fresh_{secrets.token_hex(3)}"
    old = StateShard(index=INDEX, database_url=database_url)
    try:
        answers = await old.check_batch(
            [_pay(spent, "60", time.time()), _pay(spent, "1", time.time())]
        )
        assert [a.allowed for a in answers] == [True, True]
    finally:
        await old.close()

    # The new incarnation runs 11 s later (its clock, not a sleep): its proofs are issued
    # after the old one's last decision plus the skew it allows.
    later = time.time() + 11
    clock = time.time
    monkeypatch.setattr(time, "time", lambda: clock() + 11)
    new = StateShard(index=INDEX, database_url=database_url)
    try:
        first = await new.check_batch(
            [_pay(spent, "40", later), _pay(spent, "1", later), _pay(fresh, "99", later)]
        )
        # 61 spent before the restart: 40 more would pass 100; 1 more fits, and is the
        # third allow of the hour, the rate limit's last.
        assert [(a.allowed, a.reason) for a in first] == [
            (False, "cumulative_limit_exceeded"),
            (True, "ok"),
            (True, "ok"),  # a grant never used starts from nothing
        ]
        assert first[1].remaining == {"rate": [0], "spend": ["38"]}
        [limited] = await new.check_batch([_pay(spent, "1", later)])
        assert (limited.allowed, limited.reason) == (False, "rate_limited")
    finally:
        await new.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_clock_stepped_back_does_not_hide_the_latest_spend(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wall clock steps back 30 s between two allows (NTP, or a restart on a node whose
    clock is behind). The chain's times must not go back with it: a restart restores a
    grant's usage from its latest allow by time, and an earlier-looking later allow would
    hand the new incarnation the smaller spend."""
    grant = f"grt_clock_{secrets.token_hex(3)}"
    index = 10_000 + secrets.randbelow(1_000_000)  # a chain of its own: no floor to pass
    clock = time.time
    old = StateShard(index=index, database_url=database_url)
    try:
        [first] = await old.check_batch([_pay(grant, "60", clock())])
        monkeypatch.setattr(time, "time", lambda: clock() - 30)
        [second] = await old.check_batch([_pay(grant, "30", time.time())])
        assert first.allowed and second.allowed
    finally:
        await old.close()

    monkeypatch.setattr(time, "time", lambda: clock() + 11)  # past the new floor
    new = StateShard(index=index, database_url=database_url)
    try:
        [third] = await new.check_batch([_pay(grant, "20", time.time())])
        # 90 spent: 20 more would pass 100.
        assert (third.allowed, third.reason) == (False, "cumulative_limit_exceeded")
    finally:
        await new.close()
