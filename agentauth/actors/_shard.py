"""The state shard actor: check-and-reserve, audit append and group commit in one hop.

Each shard owns the per-agent state of the agents hashed to it and is the single writer of
its own audit chain (``verifier-<index>``). Batches are decided in arrival order by one
flusher, their events chained and committed to PostgreSQL in one transaction (calls that
arrive during a commit share the next one), and only then does the actor reply: no allow
leaves before its audit row is durable. If the commit fails, every decision of the batch
becomes a deny (``audit_unavailable``); state already reserved stays
reserved, which can only make later decisions stricter.

A restarted shard has lost its jti windows, so it refuses every proof issued up to the last
decision its chain records, plus the allowed clock skew (``shard_restarted``): any proof
the previous incarnation accepted is among those, because no allow leaves a shard before
its event is committed. It also rebuilds each grant's usage from its durable decision events
the first time it sees the grant again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from ..protocol import GENESIS_HASH, AuditEvent, Remaining, b64url_encode
from ._state import Check, Outcome, ShardState, usage_from_events, usage_to_json

__all__ = ["Result", "StateShard", "shard_for"]

log = logging.getLogger("agentauth.shard")


def shard_for(key: str, shards: int) -> int:
    """Stable shard index for an agent id (or any key)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % shards


@dataclass(frozen=True, slots=True)
class Result:
    allowed: bool
    reason: str
    remaining: dict[str, Any] | None = None
    retry_after: float | None = None
    audit_event: str | None = None


def _remaining_json(remaining: Remaining | None) -> dict[str, Any] | None:
    if remaining is None:
        return None
    return {
        "rate": list(remaining.rate),
        "spend": [format(amount, "f") for amount in remaining.spend],
    }


class StateShard:
    """A Ray actor (created with ``ray.remote``); async, one batch at a time."""

    def __init__(self, *, index: int, database_url: str, idle_grants_after: float = 600.0) -> None:
        self.index = index
        self.chain = f"verifier-{index}"
        self.state = ShardState(started_at=time.time())
        self._database_url = database_url
        self._idle_grants_after = idle_grants_after
        self._pool: asyncpg.Pool | None = None
        self._size = 0
        self._head = GENESIS_HASH
        self._pending: list[tuple[list[Check], asyncio.Future[list[Result]]]] = []
        self._flushing = False
        self.batches = 0
        self._last_prune = time.monotonic()
        self._decisions = 0

    def ping(self) -> float:
        return self.state.started_at

    async def _connect(self) -> asyncpg.Pool:
        if self._pool is None:
            pool = await asyncpg.create_pool(
                self._database_url, min_size=1, max_size=2, command_timeout=2.0
            )
            assert pool is not None
            async with pool.acquire() as conn:
                await conn.execute(
                    "INSERT INTO audit_heads (chain, size, head) VALUES ($1, 0, $2)"
                    " ON CONFLICT (chain) DO NOTHING",
                    self.chain,
                    GENESIS_HASH,
                )
            self._pool = pool
            await self._reload_head()
        return self._pool

    async def _reload_head(self) -> None:
        assert self._pool is not None
        row = await self._pool.fetchrow(
            "SELECT size, head FROM audit_heads WHERE chain = $1", self.chain
        )
        if row is None:
            raise RuntimeError(f"audit chain {self.chain} has no head")
        self._size, self._head = row["size"], bytes(row["head"])
        last = await self._pool.fetchval(
            "SELECT time_ms FROM audit_events WHERE chain = $1 ORDER BY seq DESC LIMIT 1",
            self.chain,
        )
        # Only a new incarnation lost its jti window; a reconnect keeps it.
        if last is not None and self._decisions == 0:
            self.state.replay_floor = max(self.state.replay_floor, last / 1000.0)

    async def check_batch(self, checks: list[Check]) -> list[Result]:
        """Decide ``checks`` in arrival order; answer once their events are committed.

        Calls that arrive while a commit is in flight wait and are then decided and
        committed together (group commit): one transaction for many verifier batches.
        """
        future: asyncio.Future[list[Result]] = asyncio.get_running_loop().create_future()
        self._pending.append((checks, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                groups, self._pending = self._pending, []
                merged = [check for checks, _ in groups for check in checks]
                try:
                    results = await self._decide_and_commit(merged)
                except Exception:  # never leave a caller waiting: deny what failed
                    log.exception("shard %s failed a batch", self.index)
                    results = [Result(False, "audit_unavailable") for _ in merged]
                offset = 0
                for checks, future in groups:
                    if not future.done():
                        future.set_result(results[offset : offset + len(checks)])
                    offset += len(checks)
        finally:
            # No await between the empty-queue check above and this line, so no call can
            # slip in unserved.
            self._flushing = False

    async def _decide_and_commit(self, checks: list[Check]) -> list[Result]:
        try:
            pool = await self._connect()
            now = time.time()
            await self._restore(pool, checks, now)
        except Exception:  # database unreachable: nothing can be recorded, so deny all
            log.warning("shard %s cannot reach the database", self.index)
            return [Result(False, "audit_unavailable") for _ in checks]
        outcomes = [self.state.decide(check, now) for check in checks]
        events = self._chain(checks, outcomes, now)
        try:
            await self._commit(pool, checks, outcomes, events)
        except Exception:
            log.warning("shard %s failed to commit its audit batch", self.index)
            self._pool = None  # reconnect (and reload the head) next time
            return [Result(False, "audit_unavailable") for _ in checks]
        self._decisions += len(checks)
        self.batches += 1
        if time.monotonic() - self._last_prune > 5.0:
            self.state.prune(now, idle_grants_after=self._idle_grants_after)
            self._last_prune = time.monotonic()
        return [
            Result(
                o.allowed,
                o.reason,
                _remaining_json(o.remaining),
                o.retry_after,
                f"{e.chain}:{e.seq}",
            )
            for o, e in zip(outcomes, events, strict=True)
        ]

    async def _restore(self, pool: asyncpg.Pool, checks: list[Check], now: float) -> None:
        """Rebuild usage of grants this incarnation has not seen, and spent step-ups."""
        missing: dict[str, Check] = {}
        for check in checks:
            wanted = check.deny is None and check.grant_id and check.envelope is not None
            if wanted and check.grant_id and not self.state.knows(check.grant_id):
                missing.setdefault(check.grant_id, check)
        refs = [c.step_up_ref for c in checks if c.step_up_ref]
        if refs:
            rows = await pool.fetch(
                "SELECT approval_ref FROM verifier_step_up_uses WHERE approval_ref = ANY($1)",
                refs,
            )
            self.state.used_refs.update(r["approval_ref"] for r in rows)
        if not missing:
            return
        ids = list(missing)
        latest = await pool.fetch(
            "SELECT DISTINCT ON (grant_id) grant_id, body FROM audit_events"
            " WHERE grant_id = ANY($1) AND event = 'verify.allow'"
            " ORDER BY grant_id, time_ms DESC, seq DESC",
            ids,
        )
        spend = {r["grant_id"]: json.loads(r["body"])["data"].get("usage") for r in latest}
        windows = []
        for grant_id, check in missing.items():
            envelope = check.envelope
            assert envelope is not None
            longest = max((r.window_seconds for r in envelope.rate_limits), default=0)
            windows.append((grant_id, int((now - longest) * 1000), envelope.max_rate_count))
        recent_rows = await pool.fetch(
            "SELECT g.grant_id, e.time_ms FROM unnest($1::text[], $2::bigint[], $3::int[])"
            " AS g(grant_id, since, lim) CROSS JOIN LATERAL (SELECT time_ms FROM audit_events"
            " WHERE grant_id = g.grant_id AND event = 'verify.allow' AND time_ms > g.since"
            " ORDER BY time_ms DESC LIMIT g.lim) e",
            [w[0] for w in windows],
            [w[1] for w in windows],
            [w[2] for w in windows],
        )
        recent: dict[str, list[float]] = {g: [] for g in ids}
        for row in recent_rows:
            recent[row["grant_id"]].append(row["time_ms"] / 1000.0)
        for grant_id in ids:
            self.state.restore(
                grant_id, usage_from_events(spend.get(grant_id), recent[grant_id]), now
            )

    def _chain(self, checks: list[Check], outcomes: list[Outcome], now: float) -> list[AuditEvent]:
        events = []
        size, head = self._size, self._head
        time_ms = int(now * 1000)
        for check, outcome in zip(checks, outcomes, strict=True):
            data: dict[str, Any] = {"reason": outcome.reason}
            if check.grant_id:
                data["grant_id"] = check.grant_id
            if check.token_jti:
                data["token_jti"] = check.token_jti
            if check.action is not None:
                data["action"] = check.action.model_dump(mode="json", exclude_none=True)
            if check.step_up_ref:
                data["step_up_ref"] = check.step_up_ref
            if outcome.allowed and outcome.usage is not None:
                data["usage"] = usage_to_json(outcome.usage)
            event = AuditEvent(
                chain=self.chain,
                seq=size,
                prev=b64url_encode(head),
                time_ms=time_ms,
                event="verify.allow" if outcome.allowed else "verify.deny",
                actor=f"provider:{check.provider_id}",
                subject=f"agent:{check.agent_id}",
                data=data,
            )
            head = event.entry_hash()
            size += 1
            events.append(event)
        return events

    async def _commit(
        self,
        pool: asyncpg.Pool,
        checks: list[Check],
        outcomes: list[Outcome],
        events: list[AuditEvent],
    ) -> None:
        if not events:
            return
        bodies = [e.canonical_bytes() for e in events]
        hashes = [e.entry_hash() for e in events]
        used = [
            (c.step_up_ref, c.grant_id)
            for c, o in zip(checks, outcomes, strict=True)
            if o.allowed and c.step_up_ref
        ]
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO audit_events (chain, seq, entry_hash, body, event, agent_id,"
                " grant_id, time_ms) SELECT * FROM unnest($1::text[], $2::bigint[],"
                " $3::bytea[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bigint[])",
                [e.chain for e in events],
                [e.seq for e in events],
                hashes,
                [b.decode("utf-8") for b in bodies],
                [e.event for e in events],
                [c.agent_id for c in checks],
                [c.grant_id for c in checks],
                [e.time_ms for e in events],
            )
            # Optimistic check that this actor is still the chain's only writer.
            status = await conn.execute(
                "UPDATE audit_heads SET size = $2, head = $3 WHERE chain = $1 AND size = $4",
                self.chain,
                self._size + len(events),
                hashes[-1],
                self._size,
            )
            if status != "UPDATE 1":
                # Another writer (a second cluster during an upgrade, a zombie actor) has
                # decided on this chain: its jti window is not ours, so reload as a new
                # incarnation would, raising the replay floor to its last decision.
                self._decisions = 0
                raise RuntimeError("audit chain moved under this shard")
            if used:
                await conn.executemany(
                    "INSERT INTO verifier_step_up_uses (approval_ref, grant_id) VALUES ($1, $2)",
                    used,
                )
        self._size += len(events)
        self._head = hashes[-1]

    def stats(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "started_at": self.state.started_at,
            "grants": len(self.state.grants),
            "jtis": len(self.state.jtis),
            "memory_bytes": self.state.memory_bytes(),
            "decisions": self._decisions,
            "commits": self.batches,
            "chain_size": self._size,
        }
