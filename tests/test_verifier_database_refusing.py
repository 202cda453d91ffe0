"""The verifier while PostgreSQL refuses connections (starting up, shutting down, too many
clients): a decision it can make is denied and recorded, and what it cannot answer is a
503, never a 500. No Ray: the replica's service layer in process (verifier_inprocess) with
a pool that fails as such a server does."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import asyncpg
import httpx
import pytest
from verifier_inprocess import HTU, REGISTRY, ask, basic, mint, verifier

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


class _KeyTable:
    """The signing-key table behind a PostgreSQL that refuses until ``up``. Each read is
    counted, and waits for ``answer`` when one is given (a read still in flight)."""

    def __init__(self, *keys: PrivateKey) -> None:
        self.keys = (REGISTRY, *keys)
        self.up = False
        self.reads = 0
        self.answer: asyncio.Event | None = None

    async def fetch(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        self.reads += 1
        if self.answer is not None:
            await self.answer.wait()
        if not self.up:
            raise asyncpg.exceptions.CannotConnectNowError("the database system is starting up")
        return [{"public_jwk": key.public_jwk()} for key in self.keys]


@pytest.mark.asyncio
@pytest.mark.parametrize("hangs", [False, True], ids=["refused", "timed_out"])
async def test_unknown_kids_after_a_failed_key_reload_are_unavailable_until_one_succeeds(
    hangs: bool,
) -> None:
    """A failed reload is followed by no other for ``key_refresh_min_interval``. A kid
    asked about meanwhile was denied ``invalid_token:unknown_kid``, the provider told not to
    retry, though nothing had looked: it is ``dependency_unavailable`` like the request
    whose reload failed. Once a reload succeeds, a kid it lacks is unknown again."""
    table = _KeyTable()
    table.answer = asyncio.Event() if hangs else None  # never set: past lookup_timeout
    v, shards = verifier(pool=table, lookup_timeout=0.05)
    made_up = PrivateKey.generate("ES256", kid="made-up")

    async def reason() -> str:
        answer = await v.verify("prov_a", ask(mint(now=time.time(), signer=made_up)))
        assert answer["decision"] == "deny"
        return str(answer["reason"])

    assert [await reason() for _ in range(3)] == ["dependency_unavailable"] * 3
    assert table.reads == 1  # still one reload per interval
    table.up, table.answer = True, None
    v._keys_loaded_at = -1e9  # the interval has passed
    assert [await reason() for _ in range(3)] == ["invalid_token:unknown_kid"] * 3
    assert table.reads == 2
    assert [c.deny for c in shards.recorded] == [
        *["dependency_unavailable"] * 3,
        *["invalid_token:unknown_kid"] * 3,
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("up", "decision", "reason"),
    [(False, "deny", "dependency_unavailable"), (True, "allow", "ok")],
    ids=["reload_fails", "reload_finds_the_key"],
)
async def test_a_kid_asked_about_during_its_key_reload_waits_for_the_reload(
    up: bool, decision: str, reason: str
) -> None:
    """A request naming a kid while another's reload for it is in flight was told at once
    ``invalid_token:unknown_kid``: for a key just rotated in that the reload was bringing,
    or while the reload was failing. It shares the reload and its outcome now."""
    rotated = PrivateKey.generate("ES256", kid="registry-es256-next")
    table = _KeyTable(rotated)
    table.up, table.answer = up, asyncio.Event()
    v, _ = verifier(pool=table)

    async def verify() -> tuple[str, str]:
        answer = await v.verify("prov_a", ask(mint(now=time.time(), signer=rotated)))
        return answer["decision"], answer["reason"]

    first = asyncio.create_task(verify())
    while table.reads == 0:
        await asyncio.sleep(0)
    second = asyncio.create_task(verify())
    await asyncio.sleep(0.01)
    assert not second.done(), second.result()
    table.answer.set()
    assert [await first, await second] == [(decision, reason)] * 2
    assert table.reads == 1
