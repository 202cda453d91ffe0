"""The verifier while PostgreSQL refuses connections (starting up, shutting down, too many
clients): a decision it can make is denied and recorded, and what it cannot answer is a
503, never a 500. No Ray: the replica's service layer in process (verifier_inprocess) with
a pool that fails as such a server does."""

from __future__ import annotations

import base64
import time
from typing import Any

import asyncpg
import httpx
import pytest
from verifier_inprocess import HTU, ask, basic, mint, verifier

from agentauth.protocol import PrivateKey
from agentauth.verifier import create_app


class _FailingPool:
    """PostgreSQL refusing connections the way a restarting server does."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def fetch(self, *args: Any, **kwargs: Any) -> Any:
        raise self.exc

    async def fetchrow(self, *args: Any, **kwargs: Any) -> Any:
        raise self.exc

    def acquire(self, *args: Any, **kwargs: Any) -> Any:
        raise self.exc


async def _post(v: Any, body: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
    transport = httpx.ASGITransport(app=create_app(v), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post("/v1/verify", json=body, headers=headers)


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
    v, shards = verifier(pool=_FailingPool(exc))
    rotated = PrivateKey.generate("ES256", kid="registry-es256-next")
    body = ask(mint(now=time.time(), signer=rotated)).model_dump(mode="json", exclude_none=True)
    response = await _post(v, body, basic("prov_a"))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["decision"], answer["reason"]) == ("deny", "dependency_unavailable")
    assert shards.recorded[-1].deny == "dependency_unavailable"


@pytest.mark.asyncio
async def test_an_unknown_provider_id_while_postgres_refuses_is_a_503() -> None:
    """Before any credential is checked: an unknown provider id (anyone can send one)
    makes the replica reload the provider table. That failing as a restarting server
    fails is a 503 (it was a 500: asyncpg's refusals of a server starting up or shutting
    down were not counted as the dependency failures they are)."""
    exc = asyncpg.exceptions.CannotConnectNowError("the database system is starting up")
    v, _ = verifier(pool=_FailingPool(exc))
    v._providers_loaded_at = -1e9  # no reload happened recently
    auth = {"Authorization": "Basic " + base64.b64encode(b"prov_new:whatever").decode()}
    body = {
        "token": "t",
        "proof": "p",
        "method": "GET",
        "url": HTU,
        "action": {"kind": "read", "resource": "calendar/events"},
    }
    response = await _post(v, body, auth)
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "temporarily_unavailable"
