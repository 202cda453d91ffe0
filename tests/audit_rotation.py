"""A registry database whose audit log spans a routine key rotation, for the audit checks.

The registry's first key (A) signs checkpoints "a day ago"; then it is rotated out, as
``POST /v1/admin/keys/rotate`` does, and the new key (B) signs the chains that grew since.
One chain stays quiet after the rotation, so its latest checkpoint is still A's. The keys
the registry publishes are fetched from its own FastAPI app in process (no Ray): by now the
JWKS holds B only, and the audit key list holds both, each with its signing window.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from registry_inprocess import registry_on_new_database

from agentauth.protocol import Checkpoint, MerkleFrontier, b64url_encode
from agentauth.registry import Registry, create_app
from agentauth.registry._audit_log import sign_document

CHAINS = 3
QUIET = "registry-0"  # no event after the rotation: its latest checkpoint is A's
ISSUER = "http://r.test"


AUDIT_KEYS_PATH = "/.well-known/agentauth-audit-keys.json"


async def published(registry: Registry, path: str) -> Any:
    """A public document, as the registry's HTTP API serves it (its app, in process)."""
    transport = httpx.ASGITransport(app=create_app(registry))
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as client:
        response = await client.get(path)
    assert response.status_code == 200, response.text
    return response.json()


@dataclass
class RotatedRegistry:
    url: str
    registry: Registry
    old_kid: str
    new_kid: str
    #: When A signed its checkpoints, and when B took over (both in the past).
    signed_by_old_at: int
    rotated_at: int

    async def audit_keys(self) -> dict[str, Any]:
        document: dict[str, Any] = await published(self.registry, AUDIT_KEYS_PATH)
        return document

    async def jwks(self) -> dict[str, Any]:
        document: dict[str, Any] = await published(self.registry, "/.well-known/jwks.json")
        return document

    async def append(self, keys: list[str], *, time_ms: int | None = None) -> None:
        for i, key in enumerate(keys):
            async with self.registry.pool.acquire() as conn, conn.transaction():
                await self.registry.audit.append(
                    conn,
                    event="test.event",
                    actor="test",
                    subject=f"s{i}",
                    key=key,
                    data={"i": i},
                    time_ms=time_ms,
                )

    async def checkpoint_with_old_key(self, *, at: int) -> None:
        """Sign every grown chain with A, dated ``at`` (inside A's window: the checkpointer
        signs nothing its key's window does not cover; a thief uses ``seal_with_old_key``)."""
        signer = await self.registry.keys.signer(self.signed_by_old_at)
        assert signer.kid == self.old_kid
        keys = await self.registry.checkpoint_keys()
        async with self.registry.pool.acquire() as conn:
            for chain in self.registry.audit.chains:
                await self.registry.audit.checkpoint(conn, chain, signer, keys=keys, now=at)

    async def backdate_with_old_key(self, chain: str) -> None:
        """What a thief of A could do after the rotation: sign ``chain`` as it is now, dated
        inside A's signing window (by hand: the registry's checkpointer would not)."""
        await self.seal_with_old_key(chain, at=self.signed_by_old_at)

    async def seal_with_old_key(self, chain: str, *, at: int) -> None:
        """What a thief of A could do: sign ``chain`` as it is now with A, dated ``at``, and
        store the checkpoint (by hand: the registry's checkpointer signs nothing outside its
        key's window)."""
        signer = await self.registry.keys.signer(self.signed_by_old_at)
        leaves = [
            bytes(r["entry_hash"])
            for r in await self.execute(
                "SELECT entry_hash FROM audit_events WHERE chain = $1 ORDER BY seq", chain
            )
        ]
        frontier = MerkleFrontier()
        for leaf in leaves:
            frontier.append(leaf)
        checkpoint = Checkpoint(
            chain=chain,
            size=len(leaves),
            root=b64url_encode(frontier.root()),
            time=at,
        )
        await self.execute(
            "INSERT INTO audit_checkpoints (chain, size, root, frontier, signed, time)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            chain,
            len(leaves),
            frontier.root(),
            frontier.state(),
            await sign_document(checkpoint, signer),
            checkpoint.time,
        )

    async def execute(self, sql: str, *args: object) -> Any:
        conn = await asyncpg.connect(self.url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()


def keys_on_chains(registry: Registry, chains: set[str], count: int) -> list[str]:
    """``count`` subject keys whose events land on ``chains``."""
    found: list[str] = []
    i = 0
    while len(found) < count:
        key = f"agent-{i}"
        if registry.audit.chain_for(key) in chains:
            found.append(key)
        i += 1
    return found


@asynccontextmanager
async def rotated_registry(
    database_url: str, redis_url: str, data_dir: Path
) -> AsyncIterator[RotatedRegistry]:
    async with registry_on_new_database(
        database_url, redis_url, data_dir, prefix="rotated", audit_chains=CHAINS
    ) as (registry, url):
        now = int(time.time())
        day_ago, rotated_at = now - 86_400, now - 43_200
        # The first key was made a day ago (as if the registry had run since).
        await registry.pool.execute(
            "UPDATE signing_keys SET created_at = $1, activates_at = $1", day_ago
        )
        await registry.keys.refresh(force=True)
        old_kid = (await registry.keys.signer(day_ago)).kid
        rotated = RotatedRegistry(url, registry, old_kid, "", day_ago + 60, rotated_at)
        everywhere = keys_on_chains(registry, set(registry.audit.chains), 30)
        await rotated.append(everywhere, time_ms=(day_ago + 30) * 1000)
        await rotated.checkpoint_with_old_key(at=day_ago + 60)
        rotated.new_kid = await registry.keys.rotate(now=rotated_at)
        # After the rotation only the other chains grow; B signs them now.
        busy = set(registry.audit.chains) - {QUIET}
        await rotated.append(keys_on_chains(registry, busy, 20))
        await registry.checkpoint_all()
        yield rotated
