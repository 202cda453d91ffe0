"""Redis names the registry and the verifier share: the registry writes, verifiers read."""

from __future__ import annotations

__all__ = ["REVOCATION_CHANNEL", "grant_cache_key"]

# Pub/sub channel of revocations ({"kind", "target"}); the revocations table stays the
# durable record, this only makes verifiers hear of them at once.
REVOCATION_CHANNEL = "agentauth:revocations"


def grant_cache_key(grant_id: str) -> str:
    """Where verifiers cache a grant's status (active, revoked, absent), cache-aside."""
    return f"agentauth:grant:{grant_id}"
