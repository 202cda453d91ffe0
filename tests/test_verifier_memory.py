"""What a verifier replica keeps in memory between requests stays bounded."""

from __future__ import annotations

import asyncio
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
async def test_revocations_are_kept_while_their_tokens_can_live(
    migrated_database_url: str,
) -> None:
    """A replica's first poll reads the revocations table, but only the revocations of the
    last hour and some minutes: every token a revocation is about was issued before it and
    lives at most an hour, after which the token check refuses it as expired. Later,
    revocations are forgotten once that time has passed, and not a moment before."""
    import asyncpg

    from agentauth.verifier._service import _REVOCATION_MEMORY, _Revocations

    tag = secrets.token_hex(4)

    def token(jti: str = "tok_none", grant_id: str = "grt_none", sub: str = "agt_none") -> Any:
        return SimpleNamespace(claims=SimpleNamespace(jti=jti, grant_id=grant_id, sub=sub))

    old = {kind: f"{kind}_old_{tag}" for kind in ("token", "grant", "agent")}
    new = {kind: f"{kind}_new_{tag}" for kind in ("token", "grant", "agent")}

    def tokens(targets: dict[str, str]) -> list[Any]:
        return [
            token(jti=targets["token"]),
            token(grant_id=targets["grant"]),
            token(sub=targets["agent"]),
        ]

    pool = await asyncpg.create_pool(migrated_database_url, min_size=1, max_size=2)
    try:
        insert = (
            "INSERT INTO revocations (kind, target, revoked_by, revoked_at)"
            " VALUES ($1, $2, 'test', now() - $3 * interval '1 second')"
        )
        for kind, target in old.items():
            await pool.execute(insert, kind, target, _REVOCATION_MEMORY + 60)
            await pool.execute(insert, kind, new[kind], 10)
        revocations = _Revocations(
            pool, cast(Any, None), cast(Any, None), also=lambda: asyncio.sleep(0)
        )
        await revocations._poll()
        assert all(revocations.revoked(t) for t in tokens(new))
        assert not any(revocations.revoked(t) for t in tokens(old))  # expired long ago
        assert not revocations.revoked(token())

        revocations.forget_expired(time.time() + _REVOCATION_MEMORY - 60)
        assert all(revocations.revoked(t) for t in tokens(new))  # not a moment early
        revocations.forget_expired(time.time() + _REVOCATION_MEMORY)
        assert not any(revocations.revoked(t) for t in tokens(new))
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_revocation_freshness_is_timed_from_the_read_not_from_the_end_of_the_poll(
    migrated_database_url: str,
) -> None:
    """A poll reads the revocations, then syncs the provider and key tables (several
    lookups, bounded in all by seconds), and only then is done. What it read is as old as
    the read: stamped at the poll's end, a revocation committed just after the read, its
    Redis message lost (publishing is best effort), passed for the staleness bound after
    the sync ended, not after it committed."""
    import asyncpg

    from agentauth.verifier._service import _Revocations

    jti = f"tok_fresh_{secrets.token_hex(4)}"
    revoked = cast(Any, SimpleNamespace(claims=SimpleNamespace(jti=jti, grant_id="g", sub="a")))
    pool = await asyncpg.create_pool(migrated_database_url, min_size=1, max_size=2)
    committed: list[float] = []

    async def slow_table_sync() -> None:
        # Right after the poll's read the revocation commits; the sync then takes 0.9 s.
        await pool.execute(
            "INSERT INTO revocations (kind, target, revoked_by) VALUES ('token', $1, 'test')",
            jti,
        )
        committed.append(time.monotonic())
        await asyncio.sleep(0.9)

    settings = cast(Any, SimpleNamespace(revocation_max_staleness=1.0, revocation_poll=0.25))
    revocations = _Revocations(pool, cast(Any, None), settings, also=slow_table_sync)
    revocations._listening = True  # the channel is up; its message for this one was lost
    try:
        await revocations._poll()
        assert revocations.fresh() and not revocations.revoked(revoked)
        # Past the staleness bound after the revocation committed, with no poll since: the
        # replica must not decide on what it read before.
        await asyncio.sleep(committed[0] + 1.1 - time.monotonic())
        assert not revocations.fresh()
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_a_provider_table_load_that_began_earlier_does_not_replace_a_later_one(
    migrated_database_url: str,
) -> None:
    """A poll's table sync and an unknown provider id's reload can load the provider table
    at once. The load that began first may end last: its older rows must not replace the
    newer ones (here they would lift a suspension the newer load had seen)."""
    import asyncpg

    from agentauth.verifier import VerifierSettings
    from agentauth.verifier._service import Verifier

    provider = f"prov_order_{secrets.token_hex(4)}"
    pool = await asyncpg.create_pool(migrated_database_url, min_size=2, max_size=3)
    assert pool is not None
    await pool.execute(
        "INSERT INTO providers (id, audience, display_name, allowed_kinds, secret_hash)"
        " VALUES ($1, $2, 'order', ARRAY['read'], $3)",
        provider,
        f"https://{provider}.example",
        b"\0" * 32,
    )
    read, resume = asyncio.Event(), asyncio.Event()
    first = [True]
    real_acquire = pool.acquire

    class Held:
        """The first load's connection: its rows query answers, then waits."""

        def __init__(self, conn: Any) -> None:
            self._conn = conn

        async def fetchval(self, *args: Any) -> Any:
            return await self._conn.fetchval(*args)

        async def fetch(self, *args: Any) -> Any:
            rows = await self._conn.fetch(*args)
            read.set()
            await resume.wait()
            return rows

    class Acquired:
        def __init__(self) -> None:
            self._inner = real_acquire()
            self._held = first[0]
            first[0] = False

        async def __aenter__(self) -> Any:
            conn = await self._inner.__aenter__()
            return Held(conn) if self._held else conn

        async def __aexit__(self, *exc: Any) -> None:
            await self._inner.__aexit__(*exc)

    class Pool:
        def acquire(self) -> Acquired:
            return Acquired()

    settings = VerifierSettings(
        database_url=migrated_database_url,
        redis_url="redis://unused",
        issuer="http://r.test",
        lookup_timeout=5.0,
    )
    v = Verifier(
        settings=settings, pool=cast(Any, Pool()), redis=cast(Any, None), shards=cast(Any, None)
    )
    try:
        older = asyncio.create_task(v._load_providers())
        await read.wait()  # the first load has read the provider active
        await pool.execute(
            "UPDATE providers SET suspended_at = now(), suspension_reason = 'test' WHERE id = $1",
            provider,
        )
        await pool.execute("UPDATE provider_changes SET epoch = epoch + 1")
        await v._load_providers()  # begun later, ends first: sees the suspension
        assert v._providers[provider].suspended
        resume.set()
        await older
        assert v._providers[provider].suspended
    finally:
        resume.set()
        await pool.close()
