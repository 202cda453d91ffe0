"""Limits on the registry's anonymous starts (passkey sign-up and sign-in, recovery, agent
registration): the bucket algorithm and the client address on their own, then through the
registry's FastAPI app in process over real PostgreSQL and Redis (no Ray)."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest
import redis.asyncio as aioredis
from registry_inprocess import ISSUER, registry_on_new_database

from agentauth.registry import Registry, RegistrySettings, create_app
from agentauth.registry._limits import Limit, LocalBuckets, client_address, take

# --- the algorithm, on time passed in ------------------------------------------------------

MS = 1_000  # microseconds: the unit take() counts in
MINUTE = 60_000 * MS


def test_a_bucket_admits_its_count_at_once_then_one_per_interval() -> None:
    limit = Limit(3, MINUTE)  # one every 20 s
    tats: list[int | None] = [None]
    for _ in range(3):
        taken = take(tats, [limit], 1_000 * MS)
        assert taken.wait_us == 0
        tats = list(taken.tats)
    assert take(tats, [limit], 1_000 * MS).wait_us == 20_000 * MS
    assert take(tats, [limit], 20_999 * MS).wait_us == 1 * MS
    assert take(tats, [limit], 21_000 * MS).wait_us == 0
    # Unused for a period: as good as new, all three at once again.
    assert tats == [61_000 * MS]
    assert take(tats, [limit], 61_000 * MS + MINUTE).tats == (MINUTE + (61_000 + 20_000) * MS,)


def test_a_refusal_by_one_bucket_takes_from_none() -> None:
    client, everyone = Limit(5, MINUTE), Limit(2, MINUTE)
    first = take([None, None], [client, everyone], 0)
    second = take(list(first.tats), [client, everyone], 0)
    assert (first.wait_us, second.wait_us) == (0, 0)
    refused = take(list(second.tats), [client, everyone], 0)
    assert refused.wait_us == 30_000 * MS and refused.tats == ()
    # The client bucket kept what it had: another client is refused by the global one only.
    assert take([None, second.tats[1]], [client, everyone], 0).wait_us == 30_000 * MS


@pytest.mark.parametrize(
    ("count", "period_s"),
    [(7_000, 60), (30_001, 60), (5_000, 1), (999_999, 1), (1_000_000, 60)],
)
def test_a_limit_that_does_not_divide_its_period_admits_what_it_says(
    count: int, period_s: int
) -> None:
    """Counted in milliseconds, the interval was rounded to a whole one: 7,000 a minute
    admitted 7,500, 30,001 a minute 60,000, and 5,000 a second only 1,000. Over two periods
    a bucket admits its burst and twice its count, give or take the rounding of a
    microsecond per interval."""
    limit = Limit(count, period_s * 1_000_000)
    tats: list[int | None] = [None]
    admitted, now = 0, 0
    while now < 2 * limit.period_us:  # the burst, then a period of steady refills
        taken = take(tats, [limit], now)
        if taken.wait_us == 0:
            admitted += 1
            tats = list(taken.tats)
        else:
            now += taken.wait_us
    assert 3 * count - 1 <= admitted <= 3 * count * 1.02 + 1, admitted


def test_local_buckets_admit_like_take_and_forget_expired_ones() -> None:
    buckets = LocalBuckets()
    limits = [Limit(2, 1_000 * MS), Limit(3, 1_000 * MS)]  # the global one refills every 333 ms
    assert [buckets.take([f"c:{i % 2}", "all"], limits, 0) for i in range(4)] == [
        0,
        0,
        0,
        333_332,
    ]
    assert buckets.take(["c:0", "all"], limits, 1_000 * MS) == 0
    # Thousands of clients, each once: the expired ones do not pile up.
    buckets = LocalBuckets()
    wide = [Limit(1, 1_000 * MS), Limit(1_000_000, 1_000 * MS)]
    for i in range(5_000):
        assert buckets.take([f"c:{i}", "all"], wide, 2_000 * MS * i) == 0
    assert len(buckets._tats) <= 1025


# --- the client's address -------------------------------------------------------------------

PROXIES = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


def scope(peer: str | None, *forwarded: str) -> dict[str, Any]:
    return {
        "client": None if peer is None else (peer, 4321),
        "headers": [(b"x-forwarded-for", value.encode()) for value in forwarded],
    }


@pytest.mark.parametrize(
    ("request_scope", "client"),
    [
        # Anyone else's header is theirs to invent: the peer is the client.
        (scope("198.51.100.7", "203.0.113.1"), "198.51.100.7"),
        # A trusted proxy's last hop is what it saw; hops before it, the client wrote.
        (scope("10.0.0.2", "1.2.3.4, 203.0.113.1"), "203.0.113.1"),
        (scope("10.0.0.2", "1.2.3.4", "203.0.113.1, 10.1.1.1"), "203.0.113.1"),
        (scope("10.0.0.2"), "10.0.0.2"),
        (scope("10.0.0.2", "10.9.9.9"), "10.9.9.9"),
        (scope("10.0.0.2", "203.0.113.1, not-an-address, 10.1.1.1"), "10.1.1.1"),
        # One host holds a whole IPv6 /64; an IPv4 peer may arrive mapped.
        (scope("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64"),
        (scope("fd00::1", "2001:db8::9"), "2001:db8::/64"),
        (scope("::ffff:198.51.100.7"), "198.51.100.7"),
        (scope(None), "unknown"),
        (scope("testclient"), "unknown"),
    ],
)
def test_client_address(request_scope: dict[str, Any], client: str) -> None:
    assert client_address(request_scope, PROXIES) == client


def test_trusted_proxies_are_read_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTAUTH_TRUSTED_PROXIES", "10.0.0.0/8, fd00::/8,")
    settings = RegistrySettings.from_env(
        database_url="postgresql://x/y",
        redis_url="redis://x",
        data_dir=tmp_path,
        issuer=ISSUER,
        admin_token="a" * 16,
    )
    assert settings.trusted_proxy_networks == tuple(PROXIES)


def test_settings_refuse_unusable_limits_and_proxies(tmp_path: Path) -> None:
    base = {
        "database_url": "postgresql://x/y",
        "redis_url": "redis://x",
        "data_dir": tmp_path,
        "issuer": ISSUER,
        "admin_token": "a" * 16,
    }
    settings = RegistrySettings(**base, trusted_proxies=(" 10.0.0.0/8", "::1"))
    assert settings.trusted_proxies == ("10.0.0.0/8", "::1/128")
    assert (settings.anonymous_client_limit, settings.anonymous_global_limit) == (30, 1200)
    for bad in (
        {"trusted_proxies": ("10.0.0.1/8",)},
        {"trusted_proxies": ("proxy.internal",)},
        {"anonymous_client_limit": 0},
        {"anonymous_global_limit": 0},
        {"anonymous_limit_period": 0},
        {"anonymous_fallback_limit": -1},
        {"max_anonymous_challenges": 0},
        # The cap is the count query's LIMIT, a bigint: until 2026-12-01 any value was
        # taken at start, and one past 2**63 - 1 made every sign-up and sign-in start a 500.
        {"max_anonymous_challenges": 1_000_001},
        {"max_anonymous_challenges": 2**63},
    ):
        with pytest.raises(pydantic.ValidationError):
            RegistrySettings(**base, **bad)
    assert RegistrySettings(**base, max_anonymous_challenges=1_000_000)


# --- through the registry -----------------------------------------------------------------

UNREACHABLE = "redis://127.0.0.1:1/0"


@asynccontextmanager
async def opened(
    database_url: str, redis_url: str, data_dir: Path, **settings: Any
) -> AsyncIterator[Registry]:
    if redis_url != UNREACHABLE:
        # The limits' keys are shared by every registry on this Redis: each test starts afresh.
        redis = aioredis.Redis.from_url(redis_url)
        try:
            keys = [key async for key in redis.scan_iter("agentauth:anon:*")]
            if keys:
                await redis.delete(*keys)
        finally:
            await redis.aclose()
    async with registry_on_new_database(
        database_url, redis_url, data_dir, prefix="limits", **settings
    ) as (registry, _):
        yield registry


def client(registry: Registry, peer: str = "198.51.100.7") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(registry), client=(peer, 4321))
    return httpx.AsyncClient(transport=transport, base_url=ISSUER)


async def challenges(registry: Registry) -> int:
    return int(await registry.pool.fetchval("SELECT count(*) FROM webauthn_challenges"))


def limited(response: httpx.Response, reason: str = "rate_limited") -> int:
    assert response.status_code == 429, response.text
    assert (response.json()["error"], response.json()["reason"]) == ("rate_limited", reason)
    return int(response.headers["retry-after"])


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio(loop_scope="session")
async def test_a_client_past_its_limit_is_refused_and_writes_nothing(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with (
        opened(database_url, redis_url, tmp_path, anonymous_client_limit=3) as registry,
        client(registry) as one,
        client(registry, "203.0.113.9") as other,
    ):
        # Sign-in and sign-up starts spend one budget: switching between them gains nothing.
        assert (await one.post("/v1/sessions/begin")).status_code == 200
        r = await one.post("/v1/signup/begin", json={"display_name": "Eve"})
        assert r.status_code == 200
        assert (await one.post("/v1/sessions/begin")).status_code == 200
        assert await challenges(registry) == 3
        for path, body in (
            ("/v1/sessions/begin", None),
            ("/v1/signup/begin", {"display_name": "Eve"}),
            ("/v1/recovery/begin", {"code": "rec_" + "x" * 32}),
            ("/v1/agents", {"name": "a", "public_jwk": {}, "enrollment_code": "e"}),
        ):
            retry_after = limited(await one.post(path, json=body))
            assert 1 <= retry_after <= 20  # one start back every 60 / 3 s
        assert await challenges(registry) == 3
        # Another address has its own budget.
        assert (await other.post("/v1/sessions/begin")).status_code == 200


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio(loop_scope="session")
async def test_the_global_limit_holds_across_clients_and_replicas(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with (
        opened(database_url, redis_url, tmp_path, anonymous_global_limit=4) as registry,
        opened(database_url, redis_url, tmp_path, anonymous_global_limit=4) as replica,
    ):
        statuses = []
        for i in range(6):
            async with client(registry if i % 2 else replica, f"198.51.100.{i}") as c:
                statuses.append((await c.post("/v1/sessions/begin")).status_code)
        assert statuses == [200, 200, 200, 200, 429, 429]
        assert await challenges(registry) + await challenges(replica) == 4


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio(loop_scope="session")
async def test_behind_a_trusted_proxy_the_forwarded_client_is_limited(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with (
        opened(
            database_url,
            redis_url,
            tmp_path,
            anonymous_client_limit=1,
            trusted_proxies=("10.0.0.0/8",),
        ) as registry,
        client(registry, "10.0.0.5") as proxy,
        client(registry, "198.51.100.7") as direct,
    ):

        async def begin(c: httpx.AsyncClient, forwarded: str) -> int:
            r = await c.post("/v1/sessions/begin", headers={"X-Forwarded-For": forwarded})
            return r.status_code

        assert await begin(proxy, "203.0.113.1") == 200
        assert await begin(proxy, "203.0.113.2") == 200
        assert await begin(proxy, "203.0.113.1") == 429
        # A client's own header, spoofed to another address, does not reach another budget.
        assert await begin(proxy, "203.0.113.3, 203.0.113.1") == 429
        assert await begin(direct, "203.0.113.9") == 200
        assert await begin(direct, "203.0.113.10") == 429


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio(loop_scope="session")
async def test_unexpired_anonymous_challenges_are_capped_and_expired_ones_swept(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with (
        opened(database_url, redis_url, tmp_path, max_anonymous_challenges=2) as registry,
        client(registry) as c,
    ):
        assert (await c.post("/v1/sessions/begin")).status_code == 200
        assert (await c.post("/v1/signup/begin", json={"display_name": "A"})).status_code == 200
        retry_after = limited(await c.post("/v1/sessions/begin"), "too_many_challenges")
        assert 1 <= retry_after <= registry.settings.challenge_ttl
        assert await challenges(registry) == 2
        # Expired ones neither count nor stay.
        await registry.pool.execute(
            "UPDATE webauthn_challenges SET expires_at = now() - interval '1 second'"
        )
        assert (await c.post("/v1/sessions/begin")).status_code == 200
        assert await challenges(registry) == 3
        assert await registry.sweep_expired() == 2
        assert await challenges(registry) == 1


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio(loop_scope="session")
async def test_without_redis_each_replica_admits_its_fallback_budget(
    database_url: str, tmp_path: Path
) -> None:
    async with (
        opened(database_url, UNREACHABLE, tmp_path, anonymous_fallback_limit=2) as registry,
        client(registry) as c,
    ):
        statuses = [(await c.post("/v1/sessions/begin")).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        assert await challenges(registry) == 2


@pytest.mark.postgres
@pytest.mark.asyncio(loop_scope="session")
async def test_without_redis_a_zero_fallback_refuses_every_start(
    database_url: str, tmp_path: Path
) -> None:
    async with (
        opened(database_url, UNREACHABLE, tmp_path, anonymous_fallback_limit=0) as registry,
        client(registry) as c,
    ):
        r = await c.post("/v1/sessions/begin")
        assert (r.status_code, r.json()["reason"]) == (503, "limits_unavailable")
        assert await challenges(registry) == 0


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio(loop_scope="session")
async def test_the_approval_page_passes_on_each_browsers_address(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    """The approval page starts every human's ceremony from its own server: trusted as a
    proxy, it names each browser, so one person's retries do not use up everyone's starts.
    Other calls name nobody."""
    from agentauth.ui import RegistryClient, RegistryError

    sent: list[str | None] = []
    async with opened(
        database_url,
        redis_url,
        tmp_path,
        anonymous_client_limit=1,
        trusted_proxies=("10.0.0.0/8",),
    ) as registry:
        app = create_app(registry)

        async def page_server(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                headers = dict(scope["headers"])
                sent.append(headers.get(b"x-forwarded-for", b"").decode() or None)
            await app(scope, receive, send)

        page = RegistryClient(
            ISSUER,
            transport=httpx.ASGITransport(app=page_server, client=("10.0.0.5", 4321)),
        )
        try:
            await page.login_begin(forwarded_for="203.0.113.1")
            await page.signup_begin("Ann", forwarded_for="203.0.113.2")
            with pytest.raises(RegistryError) as unknown:  # admitted, then no such code
                await page.recovery_begin("rec_" + "x" * 32, forwarded_for="203.0.113.3")
            assert unknown.value.status != 429
            with pytest.raises(RegistryError) as refused:
                await page.login_begin(forwarded_for="203.0.113.1")
            assert (refused.value.status, refused.value.reason) == (429, "rate_limited")
            await page.audit_keys()
        finally:
            await page.aclose()
    assert sent == ["203.0.113.1", "203.0.113.2", "203.0.113.3", "203.0.113.1", None]
