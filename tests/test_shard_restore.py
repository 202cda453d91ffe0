"""A restarted shard rebuilds each grant's usage from its committed decision events.

Its memory is gone, but not the audit chain: the latest allow of a grant carries its spend
buckets and the allow times inside the rate window are the rate counter. A new incarnation
must enforce the same limits the old one would have.
"""

from __future__ import annotations

import math
import secrets
import time

import pytest
from shard_checks import a_check, frozen_clock, payment

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


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_proof_from_the_last_millisecond_before_a_restart_is_refused(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old incarnation accepts a proof issued up to its clock plus the skew, and a
    proof's iat may carry fractions of a millisecond. The new incarnation's floor comes
    from the time its chain holds, so that time must be the one decided on, not up to a
    millisecond earlier."""
    decided = math.floor(time.time()) + 0.0009  # late in its millisecond
    now = frozen_clock(monkeypatch, decided)
    old = StateShard(index=714, database_url=database_url)
    skew = old.state.policy.future_skew
    proof = a_check("edge", iat=decided + skew, token_jti=None)  # at the skew's edge
    try:
        assert (await old.check_batch([proof]))[0].allowed
    finally:
        await old.close()

    now[0] = decided + 1
    new = StateShard(index=714, database_url=database_url)
    try:
        [again] = await new.check_batch([proof])
        assert (again.allowed, again.reason) == (False, "shard_restarted")
    finally:
        await new.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_restored_rate_windows_are_the_live_ones(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart rebuilds a grant's allow times from the chain: they must be the times the
    live shard counted, to the fraction of a millisecond, or an allow would leave its
    window early and the new incarnation allow what the old one would have refused."""
    grant = f"grt_window_{secrets.token_hex(3)}"
    base = math.floor(time.time())
    now = frozen_clock(monkeypatch, base)
    old = StateShard(index=715, database_url=database_url)
    try:
        for offset in (0.0007, 1.2003, 2.5009):
            now[0] = base + offset
            assert (await old.check_batch([_pay(grant, "1", now[0])]))[0].allowed
        live = old.state.usage(grant)
    finally:
        await old.close()

    now[0] = base + 20
    new = StateShard(index=715, database_url=database_url)
    try:
        # Refused by the floor, and the grant restored on the way.
        [first] = await new.check_batch([_pay(grant, "1", base + 2.5)])
        assert first.reason == "shard_restarted"
        assert new.state.usage(grant) == live
    finally:
        await new.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_forgotten_step_up_reference_stays_spent(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard forgets a spent step-up reference with the proof that spent it: from then on
    the durable record (verifier_step_up_uses, looked up for every batch's references, its
    primary key checked by every commit) keeps it spent."""
    grant, ref = f"grt_step_{secrets.token_hex(3)}", f"sur_{secrets.token_hex(8)}"
    stepped = Envelope.model_validate({"step_up_threshold": {"amount": "50", "currency": "EUR"}})
    now = frozen_clock(monkeypatch, time.time())
    shard = StateShard(index=713, database_url=database_url)

    def spend() -> Check:
        return a_check(
            "step",
            grant_id=grant,
            action=payment("90"),
            envelope=stepped,
            step_up_ref=ref,
            step_up_valid=True,
            token_jti=None,
        )

    try:
        assert (await shard.check_batch([spend()]))[0].allowed
        now[0] += shard.state.policy.max_age + shard.state.policy.future_skew + 1
        shard._last_prune = 0.0  # due after the next batch
        assert (await shard.check_batch([a_check("step", token_jti=None)]))[0].allowed
        assert ref not in shard.state.used_refs
        [again] = await shard.check_batch([spend()])
        assert (again.allowed, again.reason) == (False, "step_up_invalid")
    finally:
        await shard.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_grant_moved_to_another_shard_and_back_keeps_its_limit(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shard actors outlive a change of the shard count. Changed (after the pause for the
    DPoP window), an agent's grant moves to another shard, which rebuilds it from every
    chain and spends more; changed back within ten minutes, the grant returned to a shard
    that still held its usage from before the move and never read the chains again: a
    100 EUR grant ended with 140 EUR committed."""
    grant = f"grt_move_{secrets.token_hex(3)}"
    envelope = Envelope.model_validate(
        {"spend_limits": [{"amount": "100", "currency": "EUR", "period": "grant"}]}
    )
    now = frozen_clock(monkeypatch, time.time())
    home, other = (StateShard(index=i, database_url=database_url) for i in (716, 717))

    def pay(amount: str) -> Check:
        return a_check(
            "move", grant_id=grant, iat=now[0], action=payment(amount), envelope=envelope
        )

    try:
        [first] = await home.check_batch([pay("60")])
        assert first.allowed
        now[0] += 71  # traffic paused for the DPoP window; the agent's grant moves
        [moved] = await other.check_batch([pay("40")])
        assert moved.allowed and moved.remaining["spend"] == ["0"]
        now[0] += 71  # paused again, the shard count changed back: the grant returns
        [back] = await home.check_batch([pay("40")])
        assert (back.allowed, back.reason) == (False, "cumulative_limit_exceeded")
    finally:
        await home.close()
        await other.close()
