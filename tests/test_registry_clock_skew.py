"""A registry replica whose clock is behind Redis's (in process, real PostgreSQL and Redis).

Every replica judges a proof's age by its own clock, but the replay cache keeps a proof's
reservation for a lifetime counted on Redis's clock, the one all replicas share. A replica
running behind could otherwise find young a proof whose reservation has already expired on
Redis, and reserve it a second time: the replay cache refuses it as too old instead.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
import registry_world
from registry_inprocess import registry_in_process
from registry_world import World

import agentauth.registry._service as registry_service

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

BEHIND = 90  # seconds: past a proof's maximum age (60 s) and the 5 s tolerance


class _Behind:
    """The ``time`` module of a machine whose clock runs ``seconds`` behind."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def time(self) -> float:
        return time.time() - self._seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def world(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    data_dir = tmp_path_factory.mktemp("registry")
    async with registry_in_process(database_url, redis_url, data_dir, prefix="skew") as opened:
        yield opened.world


@pytest.mark.asyncio(loop_scope="session")
async def test_a_proof_young_by_a_late_replicas_clock_but_old_by_redis_is_too_old(
    world: World, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, agent, _, grant = await world.setup_grant()
    # The replay cache's memory must reach back before the late clock's proofs (else they
    # are refused as predating it): as on a Redis that has run for a while.
    redis = aioredis.Redis.from_url(redis_url)
    epoch = await redis.get("agentauth:jti-epoch")
    await redis.set("agentauth:jti-epoch", int(time.time()) - 3600)
    try:
        late = _Behind(BEHIND)
        monkeypatch.setattr(registry_service, "time", late)  # the replica's clock
        monkeypatch.setattr(registry_world, "time", late)  # the agent's, agreeing with it
        r = await world.token(agent, grant["id"])  # RFC 9449 §5: a 400 at the token endpoint
        assert (r.status_code, r.json()["error"], r.json()["reason"]) == (
            400,
            "invalid_dpop_proof",
            "too_old",
        ), r.text
        r = await world.as_agent(agent, "GET", "/v1/grants")  # elsewhere a 401
        assert (r.status_code, r.json()["reason"]) == (401, "too_old"), r.text
        assert "invalid_dpop_proof" in r.headers["www-authenticate"]
        monkeypatch.undo()  # clocks agree again: the same requests pass
        assert (await world.token(agent, grant["id"])).status_code == 200
    finally:
        if epoch is None:
            await redis.delete("agentauth:jti-epoch")
        else:
            await redis.set("agentauth:jti-epoch", epoch)
        await redis.aclose()
