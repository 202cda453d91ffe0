"""What a verifier replica keeps in memory between requests stays bounded."""

from __future__ import annotations

import secrets
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest

from agentauth.verifier._service import _Expiring


def test_recent_grants_answer_active_only_within_their_ttl() -> None:
    recent = _Expiring(ttl=5.0)
    assert not recent.active("g1", 100.0)
    recent.add("g1", 100.0)
    assert recent.active("g1", 104.9)
    assert not recent.active("g1", 105.0)  # asked again from Redis or PostgreSQL
    recent.add("g1", 105.0)  # found active again: a new lease from then
    assert recent.active("g1", 109.9)


def test_recent_grants_forget_what_expired() -> None:
    # One new grant a millisecond for a minute: 60,000 grants seen, about 5,000 of them
    # within the last 5 s. The memory holds those, not every grant ever seen.
    recent = _Expiring(ttl=5.0)
    for i in range(60_000):
        recent.add(f"grant-{i}", i / 1000)
    assert 5_000 <= len(recent) <= 5_001
    assert recent.active("grant-59999", 60.0)
    assert not recent.active("grant-0", 60.0)


def test_a_grant_seen_again_is_kept_past_its_first_expiry() -> None:
    # Re-adding moves a grant to the back, so expiring the oldest never drops a live one.
    recent = _Expiring(ttl=5.0)
    recent.add("busy", 0.0)
    for i in range(1, 100):
        recent.add(f"other-{i}", i / 10)
        recent.add("busy", i / 10)
    assert recent.active("busy", 14.8)
    assert len(recent) <= 52  # the last 5 s of others, and busy


@pytest.mark.asyncio
async def test_token_revocations_are_kept_while_their_tokens_can_live(
    migrated_database_url: str,
) -> None:
    """A replica's first poll reads the revocations table: every grant and agent ever
    revoked, but only the token revocations whose tokens could still be valid (a token
    lives at most an hour; after that the token check refuses it as expired). Later, token
    revocations are forgotten once that time has passed; grant revocations never are."""
    import asyncpg

    from agentauth.verifier._service import _TOKEN_REVOCATION_MEMORY, _Revocations

    tag = secrets.token_hex(4)
    old_token, new_token, old_grant = f"tok_old_{tag}", f"tok_new_{tag}", f"grt_old_{tag}"

    def token(jti: str, grant_id: str = "grt_none") -> Any:
        return SimpleNamespace(claims=SimpleNamespace(jti=jti, grant_id=grant_id, sub="agt_x"))

    pool = await asyncpg.create_pool(migrated_database_url, min_size=1, max_size=2)
    try:
        insert = (
            "INSERT INTO revocations (kind, target, revoked_by, revoked_at)"
            " VALUES ($1, $2, 'test', now() - $3 * interval '1 second')"
        )
        long_ago = _TOKEN_REVOCATION_MEMORY + 60
        await pool.execute(insert, "token", old_token, long_ago)
        await pool.execute(insert, "grant", old_grant, long_ago)
        await pool.execute(insert, "token", new_token, 10)
        revocations = _Revocations(pool, cast(Any, None), cast(Any, None))
        await revocations._poll()
        assert revocations.revoked(token(new_token))
        assert revocations.revoked(token("tok_unrevoked", grant_id=old_grant))
        assert not revocations.revoked(token(old_token))  # its token expired long ago

        revocations.forget_expired(time.time() + _TOKEN_REVOCATION_MEMORY - 60)
        assert revocations.revoked(token(new_token))  # not a moment early
        revocations.forget_expired(time.time() + _TOKEN_REVOCATION_MEMORY)
        assert not revocations.revoked(token(new_token))
        assert revocations.revoked(token("tok_unrevoked", grant_id=old_grant))
    finally:
        await pool.close()
