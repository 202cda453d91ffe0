"""The registry's replay cache (a Lua script in Redis): reservations live, and proofs age,
on Redis's clock, so replicas whose clocks disagree cannot accept one proof twice."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from agentauth.registry import _service as registry_service
from agentauth.registry._service import _RESERVE_LUA, Registry

pytestmark = [pytest.mark.redis]
MAX_AGE, SKEW, TOLERANCE = 60, 10, 5
LIFETIME = MAX_AGE + TOLERANCE + 1


@pytest_asyncio.fixture
async def reserve(redis_url: str) -> AsyncIterator[tuple[aioredis.Redis, object, list[str]]]:
    client = aioredis.Redis.from_url(redis_url)
    tag = secrets.token_hex(6)
    keys = [f"test:jti:{tag}", f"test:jti-epoch:{tag}"]
    try:
        yield client, client.register_script(_RESERVE_LUA), keys
    finally:
        await client.delete(*keys)
        await client.aclose()


async def redis_now(client: aioredis.Redis) -> int:
    seconds, _ = await client.time()
    return int(seconds)


async def call(script: object, keys: list[str], iat: int) -> int:
    # No caller's time: the script runs on Redis's clock alone.
    return int(await script(keys=keys, args=[iat, SKEW, LIFETIME, TOLERANCE]))  # type: ignore[operator]


@pytest.mark.asyncio
async def test_a_reservation_lives_until_the_proof_is_too_old_on_redis_clock(
    reserve: tuple[aioredis.Redis, object, list[str]],
) -> None:
    client, script, keys = reserve
    now = await redis_now(client)
    await client.set(keys[1], now - 3600)  # a Redis up for an hour
    assert await call(script, keys, now) == 1
    assert await call(script, keys, now) == 0  # the same proof again
    assert LIFETIME - 2 <= await client.ttl(keys[0]) <= LIFETIME


@pytest.mark.asyncio
async def test_a_replica_with_a_slow_clock_cannot_reserve_an_expired_proof_again(
    reserve: tuple[aioredis.Redis, object, list[str]],
) -> None:
    """A proof reserved near the end of its life, its reservation gone: a replica whose own
    clock runs behind would still find the proof young, but Redis's clock says it is too
    old, so it is refused, not reserved a second time."""
    client, script, keys = reserve
    now = await redis_now(client)
    await client.set(keys[1], now - 3600)
    iat = now - LIFETIME + 1  # one second of reservation left
    assert await call(script, keys, iat) == 1
    await asyncio.sleep(2.2)
    assert await client.exists(keys[0]) == 0
    # Asked again by a replica whose clock says the proof is 30 s old: the script takes no
    # caller's time, so only Redis's clock decides.
    assert await call(script, keys, iat) == -2
    assert await client.exists(keys[0]) == 0  # refused, nothing written


@pytest.mark.asyncio
async def test_a_proof_from_before_the_caches_memory_is_refused(
    reserve: tuple[aioredis.Redis, object, list[str]],
) -> None:
    client, script, keys = reserve
    now = await redis_now(client)
    # No epoch yet: the first call dates it, and proofs up to it plus the skew predate it.
    assert await call(script, keys, now + SKEW - 1) == -1
    epoch = int(await client.get(keys[1]))
    assert now <= epoch <= now + 1  # Redis's clock may have ticked since it was read
    assert await call(script, keys, epoch + SKEW + TOLERANCE) == -1
    assert await call(script, keys, epoch + SKEW + TOLERANCE + 1) == 1


@pytest.mark.asyncio
async def test_a_proof_a_fast_replica_took_before_the_memory_began_is_refused(
    reserve: tuple[aioredis.Redis, object, list[str]],
) -> None:
    """A replica whose clock runs TOLERANCE seconds ahead of Redis accepts proofs dated up
    to its own time plus the skew, so just before Redis restarted empty it took one dated
    that far past the restart. With the skew alone as the margin, that proof passed for
    newer than the memory and was reserved, and accepted, a second time."""
    client, script, keys = reserve
    now = await redis_now(client)
    await client.set(keys[1], now)  # Redis's memory began now
    taken_before = now + TOLERANCE + SKEW  # the fast replica's now + skew, at the restart
    assert await call(script, keys, taken_before) == -1
    assert await client.exists(keys[0]) == 0


@pytest.mark.asyncio
async def test_a_replica_with_a_slow_clock_cannot_date_the_memory_back(
    reserve: tuple[aioredis.Redis, object, list[str]],
) -> None:
    """Redis has restarted empty: the reservations of the seconds before are gone. The
    first replica to reserve dated the new memory by its own clock, here 30 s slow, so a
    proof made 5 s ago (reserved before the restart, sent again now to a replica whose
    clock is right) passed for newer than the memory and was reserved and accepted a
    second time. The memory is dated by Redis's clock, like the reservations."""
    client, script, keys = reserve
    now = await redis_now(client)
    slow_replica_now = now - 30
    assert await call(script, keys, slow_replica_now) == -1
    assert await call(script, keys, now - 5) == -1  # the replay
    assert await client.exists(keys[0]) == 0


@pytest.mark.asyncio
async def test_a_registry_with_a_slow_clock_dates_the_memory_by_redis_clock(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry replica starting beside a Redis that has lost its memory dates that
    memory from Redis's start: by its own clock, 30 s slow, that start was 30 s early, and
    the proofs of those 30 s, reserved before, could be reserved again as new."""
    client = aioredis.Redis.from_url(redis_url)
    saved = await client.get("agentauth:jti-epoch")
    slow = SimpleNamespace(time=lambda: time.time() - 30)
    try:
        await client.delete("agentauth:jti-epoch")
        now = await redis_now(client)
        started = now - int((await client.info("server"))["uptime_in_seconds"])
        monkeypatch.setattr(registry_service, "time", slow)
        await Registry._init_replay_epoch(cast(Any, SimpleNamespace(redis=client)))
        monkeypatch.undo()
        assert started - 1 <= int(await client.get("agentauth:jti-epoch")) <= started + 1
    finally:
        if saved is None:
            await client.delete("agentauth:jti-epoch")
        else:
            await client.set("agentauth:jti-epoch", saved)
        await client.aclose()
