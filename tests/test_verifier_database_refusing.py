"""The verifier while PostgreSQL refuses connections (starting up, shutting down, too many
clients): a decision it can make is denied and recorded, and what it cannot answer is a
503, never a 500. No Ray: the Verifier driven in process with a pool that fails."""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any, cast

import asyncpg
import httpx
import pytest

from agentauth.actors import Check, Result, ShardClient
from agentauth.protocol import (
    Capability,
    Grant,
    KeySet,
    PrivateKey,
    PublicKey,
    b64url_encode,
    create_dpop_proof,
    mint_access_token,
)
from agentauth.verifier import Verifier, VerifierSettings, create_app
from agentauth.verifier._service import _Provider

ISSUER = "https://registry.example"
AUDIENCE = "https://api.example"
HTU = "https://api.example/v1/calendar/events"
REGISTRY = PrivateKey.generate("ES256", kid="registry-es256")
AGENT = PrivateKey.generate("ES256")


class _Shards:
    shards = 4
    batches = checks = given_up = void_checks = overruns = unacknowledged = 0

    def __init__(self) -> None:
        self.recorded: list[Check] = []

    def queue_depth(self) -> int:
        return 0

    async def check(self, shard: int, check: Check) -> Result:
        self.recorded.append(check)
        if check.deny is not None:
            return Result(False, check.deny, audit_event=f"verifier-{shard}:1")
        return Result(True, "ok", audit_event=f"verifier-{shard}:1")


class _Fresh:
    def fresh(self) -> bool:
        return True

    def revoked(self, token: Any) -> bool:
        return False


class _FailingPool:
    """PostgreSQL refusing connections the way a restarting server does."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def fetch(self, *args: Any, **kwargs: Any) -> Any:
        raise self.exc

    async def fetchrow(self, *args: Any, **kwargs: Any) -> Any:
        raise self.exc


def _secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def _verifier(pool: Any) -> tuple[Verifier, _Shards]:
    config = VerifierSettings(
        database_url="postgresql://unused", redis_url="redis://unused", issuer=ISSUER
    )
    shards = _Shards()
    v = Verifier(
        settings=config, pool=pool, redis=cast(Any, None), shards=cast(ShardClient, shards)
    )
    v.tokens.set_keys(KeySet([PublicKey.from_jwk(REGISTRY.public_jwk())]))
    v.revocations = cast(Any, _Fresh())
    v._known_grants.add("grant-1", time.monotonic())
    v._providers = {
        "prov_a": _Provider(AUDIENCE, _secret_hash("s-a"), _secret_hash("no"), 0.0, False)
    }
    return v, shards


def _mint(signer: PrivateKey, now: float) -> str:
    grant = Grant(
        grant_id="grant-1",
        agent_id="agent-1",
        principal_id="human-1",
        provider_id="prov_a",
        audience=AUDIENCE,
        capabilities=(Capability.read("calendar/*"),),
        created_at=int(now) - 100,
    )
    return mint_access_token(
        signer=signer,
        issuer=ISSUER,
        grant=grant,
        jkt=AGENT.thumbprint,
        receipt_hash=b64url_encode(hashlib.sha256(b"receipt").digest()),
        now=int(now),
        lifetime=600,
    )


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
        asyncpg.exceptions.TooManyConnectionsError("too many clients"),
    ],
    ids=["starting_up", "admin_shutdown", "too_many_connections"],
)
async def test_a_token_of_a_new_key_while_postgres_refuses_is_denied_and_recorded(
    exc: Exception,
) -> None:
    """A token whose kid the replica has not loaded yet (a just-rotated registry key) makes
    it reload the keys. That read failing is a dependency failure like the others on the
    path: deny ``dependency_unavailable``, recorded on the chain. (The read was outside
    every guard: the provider got a 500 and no shard recorded anything.)"""
    v, shards = _verifier(_FailingPool(exc))
    now = time.time()
    rotated = PrivateKey.generate("ES256", kid="registry-es256-next")
    token = _mint(rotated, now)
    proof = create_dpop_proof(AGENT, htm="GET", htu=HTU, now=now, access_token=token)
    body = {
        "token": token,
        "proof": proof,
        "method": "GET",
        "url": HTU,
        "action": {"kind": "read", "resource": "calendar/events"},
    }
    auth = {"Authorization": "Basic " + base64.b64encode(b"prov_a:s-a").decode()}
    transport = httpx.ASGITransport(app=create_app(v), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/v1/verify", json=body, headers=auth)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["decision"], answer["reason"]) == ("deny", "dependency_unavailable")
    assert shards.recorded[-1].deny == "dependency_unavailable"


class _RefusingAcquirePool(_FailingPool):
    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        raise self.exc


@pytest.mark.asyncio
async def test_an_unknown_provider_id_while_postgres_refuses_is_a_503() -> None:
    """Before any credential is checked: an unknown provider id (anyone can send one)
    makes the replica reload the provider table. That failing as a restarting server
    fails is a 503 (it was a 500: asyncpg's refusals of a server starting up or shutting
    down were not counted as the dependency failures they are)."""
    exc = asyncpg.exceptions.CannotConnectNowError("the database system is starting up")
    v, _ = _verifier(_RefusingAcquirePool(exc))
    v._providers_loaded_at = -1e9  # no reload happened recently
    auth = {"Authorization": "Basic " + base64.b64encode(b"prov_new:whatever").decode()}
    body = {
        "token": "t",
        "proof": "p",
        "method": "GET",
        "url": HTU,
        "action": {"kind": "read", "resource": "calendar/events"},
    }
    transport = httpx.ASGITransport(app=create_app(v), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/v1/verify", json=body, headers=auth)
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "temporarily_unavailable"
