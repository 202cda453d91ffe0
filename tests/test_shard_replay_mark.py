"""A restarted shard's replay floor is its chain's replay mark, not a guess ten seconds wide.

The new incarnation has lost its jti window. What it must refuse is every proof a
predecessor may have accepted; each commit records the newest such proof's issue time with
the head it moves (migration 0011), so the new incarnation refuses exactly those, and the
agents it owns are served again as soon as Ray has restarted it. A head without a mark of
its own (moved by an older release, or as the migration found it) falls back to the old
bound: the last decision plus the skew a proof may be dated ahead.
"""

from __future__ import annotations

import dataclasses
import secrets

import asyncpg
import pytest
from shard_checks import a_check, fail_once_after_the_head_read, frozen_clock

from agentauth.actors import Check, StateShard, _shard
from agentauth.protocol import Action, Envelope

ENVELOPE = Envelope.model_validate({"rate_limits": [{"max_count": 3, "window_seconds": 60}]})
NOW = 1_900_000_000.0


def _proof(iat: float, tag: str = "mark") -> Check:
    # A grant of its own per proof: grants are restored from every chain, and the rate
    # limit is not what these tests are about (but for the one that asks for it).
    return a_check(
        f"{tag}_{secrets.token_hex(4)}",
        iat=iat,
        action=Action(kind="read", resource="calendar/events"),
        envelope=ENVELOPE,
        token_jti=None,
    )


async def _head(database_url: str, chain: str) -> asyncpg.Record:
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT size, replay_mark_ms, replay_mark_size FROM audit_heads WHERE chain = $1",
            chain,
        )
    finally:
        await conn.close()
    assert row is not None
    return row


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_new_incarnation_refuses_what_was_reserved_and_serves_younger_proofs_at_once(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = frozen_clock(monkeypatch, NOW)
    old = StateShard(index=760, database_url=database_url)
    # Allowed three times, then reserved though denied (the grant's rate limit is 3).
    one = _proof(NOW - 2)
    seen = [one] + [
        dataclasses.replace(one, jti=secrets.token_urlsafe(12), iat=iat)
        for iat in (NOW - 1, NOW + 0.25, NOW)
    ]
    try:
        answers = [(await old.check_batch([p]))[0] for p in seen]
        assert [a.reason for a in answers] == ["ok", "ok", "ok", "rate_limited"]
    finally:
        await old.close()
    head = await _head(database_url, "verifier-760")
    assert (head["replay_mark_ms"], head["replay_mark_size"]) == (
        int(NOW * 1000) + 250,
        head["size"],
    )

    # Restarted a second later: every proof the old incarnation saw is refused, by the
    # floor, though the new one has no jti of them ...
    now[0] = NOW + 1
    new = StateShard(index=760, database_url=database_url)
    try:
        again = [(await new.check_batch([p]))[0] for p in seen]
        assert {a.reason for a in again} == {"shard_restarted"}
        # ... and a proof issued after the newest of them is served at once, not ten
        # seconds after the last decision as the old bound had it.
        [fresh] = await new.check_batch([_proof(NOW + 0.5, "fresh")])
        assert (fresh.allowed, fresh.reason) == (True, "ok")
    finally:
        await new.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_proof_dated_ahead_and_refused_does_not_move_the_mark(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone holding a token can send a proof dated an hour ahead; refused before its
    reservation, it must not become the next incarnation's floor (which would deny every
    agent of the shard for that hour)."""
    frozen_clock(monkeypatch, NOW)
    old = StateShard(index=761, database_url=database_url)
    skew = old.state.policy.future_skew
    try:
        [ok] = await old.check_batch([_proof(NOW - 1)])
        [ahead] = await old.check_batch([_proof(NOW + skew + 3600)])
        assert ok.allowed and ahead.reason == "invalid_dpop_proof:iat_in_future"
    finally:
        await old.close()
    assert (await _head(database_url, "verifier-761"))["replay_mark_ms"] == int(NOW * 1000) - 1000

    new = StateShard(index=761, database_url=database_url)
    try:
        [fresh] = await new.check_batch([_proof(NOW, "fresh")])
        assert fresh.allowed
    finally:
        await new.close()


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
@pytest.mark.parametrize("how", ["as migration 0011 found it", "moved by an older release"])
async def test_a_head_without_its_own_mark_falls_back_to_the_last_decision_plus_the_skew(
    database_url: str, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    index = 762 if how.startswith("as") else 763
    chain = f"verifier-{index}"
    now = frozen_clock(monkeypatch, NOW)
    old = StateShard(index=index, database_url=database_url)
    skew = old.state.policy.future_skew
    try:
        assert (await old.check_batch([_proof(NOW - 1)]))[0].allowed
    finally:
        await old.close()
    conn = await asyncpg.connect(database_url)
    try:
        if how.startswith("as"):
            update = "UPDATE audit_heads SET replay_mark_ms = NULL, replay_mark_size = NULL"
        else:
            # A writer that does not keep the mark appended one more decision: the mark
            # belongs to the head before it.
            update = "UPDATE audit_heads SET replay_mark_size = size - 1"
        await conn.execute(update + " WHERE chain = $1", chain)
    finally:
        await conn.close()

    now[0] = NOW + 1
    new = StateShard(index=index, database_url=database_url)
    try:
        # The old incarnation accepted proofs up to its clock plus the skew: without the
        # mark, that is all the new one knows.
        [edge] = await new.check_batch([_proof(NOW + skew, "edge")])
        assert edge.reason == "shard_restarted"
        [past] = await new.check_batch([_proof(NOW + skew + 0.01, "past")])
        assert past.allowed
    finally:
        await new.close()
    # The new incarnation's commits carry a mark of their own again, covering that floor.
    head = await _head(database_url, chain)
    assert head["replay_mark_size"] == head["size"]
    assert head["replay_mark_ms"] >= int((NOW + skew + 0.01) * 1000)


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_new_incarnation_whose_connect_fails_after_reading_the_head_still_refuses(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head is taken as the shard's own only with the floor that goes with it. (It
    used to be recorded before a second query; that query failing, the retry found "its
    own" head and kept a floor of 0: the predecessor's proof was allowed again.)"""
    now = frozen_clock(monkeypatch, NOW)
    old = StateShard(index=764, database_url=database_url)
    proof = _proof(NOW - 1)
    try:
        assert (await old.check_batch([proof]))[0].allowed
    finally:
        await old.close()

    now[0] = NOW + 1
    left = fail_once_after_the_head_read(monkeypatch)
    new = StateShard(index=764, database_url=database_url)
    try:
        [again] = await new.check_batch([proof])
        assert left == [0], "the injected fault did not fire"
        assert (again.allowed, again.reason) == (False, "shard_restarted")
    finally:
        await new.close()


# The commit statement of the release before the mark (2ec9007), which moves the head and
# leaves the mark as it was; made to take and ignore the argument the mark is passed in.
_OLD_COMMIT = (
    "WITH appended AS (INSERT INTO audit_events (chain, seq, entry_hash, body,"
    " event, agent_id, grant_id, time_ms) SELECT * FROM unnest($1::text[],"
    " $2::bigint[], $3::bytea[], $4::text[], $5::text[], $6::text[], $7::text[],"
    " $8::bigint[])),"
    " spent AS (INSERT INTO verifier_step_up_uses (approval_ref, grant_id)"
    " SELECT * FROM unnest($9::text[], $10::text[])),"
    " moved AS (UPDATE audit_heads SET size = $11, head = $12"
    " WHERE chain = $13 AND size = $14 AND $15::bigint IS NOT NULL RETURNING 1)"
    " SELECT 1 / count(*) FROM moved"
)


@pytest.mark.asyncio
@pytest.mark.usefixtures("migrated_database_url")
async def test_a_rolling_upgrade_an_older_writer_after_a_marked_head_is_still_covered(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard of this release marks the chain; one of the release before (the real old
    statement) then allows a proof dated ahead within the skew, past that mark. The next
    incarnation must not trust the mark, which is no longer the head's."""
    frozen_clock(monkeypatch, NOW)
    first = StateShard(index=765, database_url=database_url)
    skew = first.state.policy.future_skew
    try:
        assert (await first.check_batch([_proof(NOW - 3)]))[0].allowed
    finally:
        await first.close()
    ahead = _proof(NOW + skew - 0.0004)
    with monkeypatch.context() as patched:
        patched.setattr(_shard, "_COMMIT", _OLD_COMMIT)
        older = StateShard(index=765, database_url=database_url)
        try:
            [ok] = await older.check_batch([ahead])
            assert ok.allowed and ok.audit_event == "verifier-765:1"
        finally:
            await older.close()
    head = await _head(database_url, "verifier-765")
    assert head["replay_mark_size"] == head["size"] - 1
    after = StateShard(index=765, database_url=database_url)
    try:
        [again] = await after.check_batch([ahead])
        assert (again.allowed, again.reason) == (False, "shard_restarted")
    finally:
        await after.close()
