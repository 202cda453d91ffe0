"""Ray actors that own per-agent mutable state, sharded by agent id.

``StateShard`` (one per shard) does the atomic check-and-reserve of a verification: replay
window, rate and spend usage, one-time step-up approvals; it is also the single writer of
its audit chain and commits each batch before replying. ``ShardClient`` micro-batches the
calls from a verifier replica. ``ShardState`` is the pure core, testable without Ray.
"""

from ._client import ShardClient
from ._shard import Result, StateShard, shard_for
from ._state import Check, Outcome, ShardState

__all__ = ["Check", "Outcome", "Result", "ShardClient", "ShardState", "StateShard", "shard_for"]
