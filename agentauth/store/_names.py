"""Redis names the registry and the verifier share: the registry writes, verifiers read."""

from __future__ import annotations

__all__ = ["GRANT_REVOKED_TTL", "REVOCATION_CHANNEL", "grant_cache_key"]

# Pub/sub channel of revocations ({"kind", "target"}); the revocations table stays the
# durable record, this only makes verifiers hear of them at once.
REVOCATION_CHANNEL = "agentauth:revocations"


def grant_cache_key(grant_id: str) -> str:
    """Where verifiers cache a grant's status (active, revoked, absent), cache-aside."""
    return f"agentauth:grant:{grant_id}"


# How long the registry's "revoked" mark on a grant's cached status lives. Verifiers fill
# the cache with SET NX, so a fill of "active" read from PostgreSQL before the revocation
# committed, and written after it, cannot overwrite the mark while it lives: it must
# outlast any fill in flight (a fill is written just after its read, within a second) and
# is at least the longest a fill may be kept (the verifier's grant_cache_ttl is capped at
# it). An hour costs one small key per grant revoked in the last hour.
GRANT_REVOKED_TTL = 3600
