"""Chaos experiments for AgentAuth: break one dependency under load, count fail-opens.

``python -m chaos`` runs them all on one private stack (embedded PostgreSQL, its own
redis-server, a local Ray cluster with Serve); ``python -m chaos redis_down`` runs one.
Each experiment prints its hypothesis, the decisions (allow/deny by reason), its fail-opens
(must be 0) and its recovery time; see docs/chaos.md.
"""

from __future__ import annotations

__all__ = ["EXPERIMENTS"]

# Run order: clock skew first (a later shard restart moves the replay floor of its shard
# by the 10 s skew), the slow signer last (it deploys and removes an application).
EXPERIMENTS = (
    "clock_skew",
    "replica_kill",
    "shard_kill",
    "shard_stall",
    "redis_down",
    "postgres_down",
    "slow_signer",
)
