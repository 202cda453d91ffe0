"""What a verifier replica keeps in memory between requests stays bounded."""

from __future__ import annotations

from agentauth.verifier._service import _RecentGrants


def test_recent_grants_answer_active_only_within_their_ttl() -> None:
    recent = _RecentGrants(ttl=5.0)
    assert not recent.active("g1", 100.0)
    recent.add("g1", 100.0)
    assert recent.active("g1", 104.9)
    assert not recent.active("g1", 105.0)  # asked again from Redis or PostgreSQL
    recent.add("g1", 105.0)  # found active again: a new lease from then
    assert recent.active("g1", 109.9)


def test_recent_grants_forget_what_expired() -> None:
    # One new grant a millisecond for a minute: 60,000 grants seen, about 5,000 of them
    # within the last 5 s. The memory holds those, not every grant ever seen.
    recent = _RecentGrants(ttl=5.0)
    for i in range(60_000):
        recent.add(f"grant-{i}", i / 1000)
    assert 5_000 <= len(recent) <= 5_001
    assert recent.active("grant-59999", 60.0)
    assert not recent.active("grant-0", 60.0)


def test_a_grant_seen_again_is_kept_past_its_first_expiry() -> None:
    # Re-adding moves a grant to the back, so expiring the oldest never drops a live one.
    recent = _RecentGrants(ttl=5.0)
    recent.add("busy", 0.0)
    for i in range(1, 100):
        recent.add(f"other-{i}", i / 10)
        recent.add("busy", i / 10)
    assert recent.active("busy", 14.8)
    assert len(recent) <= 52  # the last 5 s of others, and busy
