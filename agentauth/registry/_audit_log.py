"""The registry's audit log in PostgreSQL: appends inside the caller's transaction.

Events spread over ``chains`` hash chains by subject, so concurrent transactions about
different agents do not queue on one lock; each chain is strictly serialized by its
``audit_heads`` row (SELECT ... FOR UPDATE), which is what rules out forks and gaps.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

from ..keys import AsyncSigner
from ..protocol import (
    CHECKPOINT_TYP,
    AuditEvent,
    Checkpoint,
    MerkleFrontier,
    b64url_encode,
    consistency_proof,
    inclusion_proof,
)
from ..protocol._jws import attach_signature, signing_input
from ..store import Conn

__all__ = ["AuditLog"]

_GENESIS = b"\x00" * 32


class AuditLog:
    def __init__(self, *, prefix: str = "registry", chains: int = 8) -> None:
        self.prefix = prefix
        self.chains = [f"{prefix}-{i}" for i in range(chains)]

    def chain_for(self, key: str) -> str:
        """The chain that holds events about ``key`` (an agent id, usually)."""
        digest = hashlib.sha256(key.encode()).digest()
        return self.chains[int.from_bytes(digest[:4], "big") % len(self.chains)]

    async def ensure_chains(self, conn: Conn) -> None:
        await conn.executemany(
            "INSERT INTO audit_heads (chain, size, head) VALUES ($1, 0, $2) "
            "ON CONFLICT (chain) DO NOTHING",
            [(chain, _GENESIS) for chain in self.chains],
        )

    async def append(
        self,
        conn: Conn,
        *,
        event: str,
        actor: str,
        subject: str,
        key: str,
        agent_id: str | None = None,
        grant_id: str | None = None,
        data: dict[str, Any] | None = None,
        time_ms: int | None = None,
    ) -> tuple[str, int]:
        """Append one event in the caller's open transaction; returns (chain, seq)."""
        chain = self.chain_for(key)
        head = await conn.fetchrow(
            "SELECT size, head FROM audit_heads WHERE chain = $1 FOR UPDATE", chain
        )
        if head is None:
            raise RuntimeError(f"audit chain {chain} is not initialized")
        record = AuditEvent(
            chain=chain,
            seq=head["size"],
            prev=b64url_encode(bytes(head["head"])),
            time_ms=time_ms if time_ms is not None else int(time.time() * 1000),
            event=event,
            actor=actor,
            subject=subject,
            data=data or {},
        )
        body = record.canonical_bytes()
        entry = record.entry_hash()
        # Event row and chain head in one statement: one round trip inside the lock.
        await conn.execute(
            "WITH event AS (INSERT INTO audit_events (chain, seq, entry_hash, body, event,"
            " agent_id, grant_id, time_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8))"
            " UPDATE audit_heads SET size = $2 + 1, head = $3 WHERE chain = $1",
            chain,
            record.seq,
            entry,
            body.decode("utf-8"),
            event,
            agent_id,
            grant_id,
            record.time_ms,
        )
        return chain, record.seq

    async def leaves(self, conn: Conn, chain: str, size: int) -> list[bytes]:
        rows = await conn.fetch(
            "SELECT entry_hash FROM audit_events WHERE chain = $1 AND seq < $2 ORDER BY seq",
            chain,
            size,
        )
        return [bytes(r["entry_hash"]) for r in rows]

    async def checkpoint(
        self, conn: Conn, chain: str, signer: AsyncSigner, *, now: int
    ) -> dict[str, Any] | None:
        """Sign a checkpoint of ``chain`` at its current size, if it grew since the last one.

        A transaction-level advisory lock per chain lets only one replica checkpoint a
        chain at a time.
        """
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", "ckpt:" + chain)
            head = await conn.fetchrow("SELECT size FROM audit_heads WHERE chain = $1", chain)
            last = await conn.fetchrow(
                "SELECT size, frontier FROM audit_checkpoints WHERE chain = $1 "
                "ORDER BY size DESC LIMIT 1",
                chain,
            )
            size = head["size"] if head else 0
            start = last["size"] if last else 0
            if size == start:
                return None
            frontier = (
                MerkleFrontier.from_state(start, [bytes(h) for h in last["frontier"]])
                if last
                else MerkleFrontier()
            )
            rows = await conn.fetch(
                "SELECT entry_hash FROM audit_events WHERE chain = $1 AND seq >= $2 AND seq < $3"
                " ORDER BY seq",
                chain,
                start,
                size,
            )
            for row in rows:
                frontier.append(bytes(row["entry_hash"]))
            root = frontier.root()
            checkpoint = Checkpoint(chain=chain, size=size, root=b64url_encode(root), time=now)
            signed = await sign_document(checkpoint, signer)
            await conn.execute(
                "INSERT INTO audit_checkpoints (chain, size, root, frontier, signed, time)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                chain,
                size,
                root,
                frontier.state(),
                signed,
                now,
            )
            return {"chain": chain, "size": size, "root": checkpoint.root, "signed": signed}

    async def inclusion(self, conn: Conn, chain: str, seq: int) -> dict[str, Any] | None:
        """The event, the latest checkpoint covering it, and its inclusion proof."""
        event = await conn.fetchrow(
            "SELECT body, entry_hash FROM audit_events WHERE chain = $1 AND seq = $2", chain, seq
        )
        if event is None:
            return None
        ckpt = await conn.fetchrow(
            "SELECT size, signed FROM audit_checkpoints WHERE chain = $1 AND size > $2"
            " ORDER BY size DESC LIMIT 1",
            chain,
            seq,
        )
        if ckpt is None:
            return {"event": event["body"], "checkpoint": None, "proof": None}
        leaves = await self.leaves(conn, chain, ckpt["size"])
        proof = inclusion_proof(leaves, seq)
        return {
            "event": event["body"],
            "leaf_hash": b64url_encode(bytes(event["entry_hash"])),
            "index": seq,
            "tree_size": ckpt["size"],
            "checkpoint": ckpt["signed"],
            "proof": [b64url_encode(h) for h in proof],
        }

    async def consistency(self, conn: Conn, chain: str, first: int, second: int) -> list[str]:
        leaves = await self.leaves(conn, chain, second)
        return [b64url_encode(h) for h in consistency_proof(leaves, first)]


async def sign_document(checkpoint: Checkpoint, signer: AsyncSigner) -> str:
    """Sign a checkpoint as a JWS with one of the registry's (async) key backends."""
    header = {"alg": signer.alg, "kid": signer.kid, "typ": CHECKPOINT_TYP}
    data = signing_input(header, checkpoint.model_dump(mode="json"))
    return attach_signature(data, await signer.sign(data))
