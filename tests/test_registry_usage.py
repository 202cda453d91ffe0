"""A grant's use against its limits, as the approval page shows it (in process, real
PostgreSQL and Redis, no Ray)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from pydantic import ValidationError
from registry_inprocess import Opened, registry_in_process
from registry_world import PAYMENTS

from agentauth.registry import RegistrySettings
from agentauth.registry._limits import RecentAnswers

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def service(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Opened]:
    data_dir = tmp_path_factory.mktemp("registry")
    async with registry_in_process(database_url, redis_url, data_dir, prefix="usage") as opened:
        yield opened


@pytest.mark.asyncio(loop_scope="session")
async def test_spend_over_the_grants_life_counts_allows_older_than_a_week(
    service: Opened,
) -> None:
    """The spend came from the latest allow of the last seven days (the window of the
    hourly series): ten days after $400 of a $500 total, the page said none was spent."""
    world, registry = service.world, service.registry
    envelope = {"spend_limits": [{"amount": "500", "currency": "USD", "period": "grant"}]}
    human, _, _, grant = await world.setup_grant(capabilities=PAYMENTS, envelope=envelope)
    ten_days_ago = int((time.time() - 10 * 86400) * 1000)
    async with registry.pool.acquire() as conn, conn.transaction():
        # What a shard's allow records: the usage after it, per spend limit.
        await registry.audit.append(
            conn,
            event="verify.allow",
            actor="provider:shop",
            subject=f"grant:{grant['id']}",
            key=grant["agent_id"],
            agent_id=grant["agent_id"],
            grant_id=grant["id"],
            data={"usage": {"spend": [["grant", "400"]]}},
            time_ms=ten_days_ago,
        )
    r = await world.client.get(world.url(f"/v1/grants/{grant['id']}/usage"), headers=human.headers)
    assert r.status_code == 200, r.text
    usage = r.json()
    assert usage["spend"] == [
        {"amount": "500", "currency": "USD", "period": "grant", "used": "400"}
    ]
    assert sum(b["allow"] for b in usage["series"]) == 0  # the series is the last week's


async def _decisions(service: Opened, grant: dict[str, object], *events: tuple[str, int]) -> None:
    """Append verifier decisions (event name, time in ms) about ``grant``, as a shard does."""
    registry = service.registry
    async with registry.pool.acquire() as conn, conn.transaction():
        for event, time_ms in events:
            await registry.audit.append(
                conn,
                event=event,
                actor="provider:shop",
                subject=f"grant:{grant['id']}",
                key=str(grant["agent_id"]),
                agent_id=str(grant["agent_id"]),
                grant_id=str(grant["id"]),
                data={},
                time_ms=time_ms,
            )


@pytest.mark.asyncio(loop_scope="session")
async def test_a_rate_window_longer_than_a_week_counts_its_older_allows(service: Opened) -> None:
    """A rate limit's window may be up to 31 days, and the verifier counts every allow in
    it; the page counted only the last seven days' (the series' window), so ten days after
    3 of 10 monthly requests it said none was used, while the verifier had 7 left."""
    world = service.world
    month = 30 * 86400
    envelope = {"rate_limits": [{"max_count": 10, "window_seconds": month}]}
    human, _, _, grant = await world.setup_grant(envelope=envelope)
    now_ms = int(time.time() * 1000)
    ten_days_ago = now_ms - 10 * 86400 * 1000
    await _decisions(
        service,
        grant,
        *[("verify.allow", ten_days_ago + i) for i in range(3)],
        ("verify.allow", now_ms - 31 * 86400 * 1000),  # outside the window
    )
    r = await world.client.get(world.url(f"/v1/grants/{grant['id']}/usage"), headers=human.headers)
    assert r.status_code == 200, r.text
    assert r.json()["rate"] == [{"max_count": 10, "window_seconds": month, "used": 3}]
    assert r.json()["series"] == []  # the series is still the last week's


@pytest.mark.asyncio(loop_scope="session")
async def test_the_series_counts_voided_allows_as_denied(service: Opened) -> None:
    """Hourly allows and denies of the last week; an allow whose provider was told
    state_timeout (a verify.void naming it) shows as denied, and still counts against the
    rate limit, as in the shard."""
    world, registry = service.world, service.registry
    envelope = {"rate_limits": [{"max_count": 100, "window_seconds": 86400}]}
    human, _, _, grant = await world.setup_grant(envelope=envelope)
    hour = int(time.time()) // 3600 * 3600 - 2 * 3600
    at = hour * 1000 + 5
    await _decisions(
        service,
        grant,
        ("verify.allow", at),
        ("verify.allow", at + 1),
        ("verify.deny", at + 2),
        ("verify.allow", at + 3600_000),
    )
    voided = await registry.pool.fetchrow(
        "SELECT chain, seq FROM audit_events WHERE grant_id = $1 AND time_ms = $2",
        grant["id"],
        at + 1,
    )
    async with registry.pool.acquire() as conn, conn.transaction():
        await registry.audit.append(
            conn,
            event="verify.void",
            actor="provider:shop",
            subject=f"grant:{grant['id']}",
            key=str(grant["agent_id"]),
            agent_id=str(grant["agent_id"]),
            grant_id=str(grant["id"]),
            data={"voids": f"{voided['chain']}:{voided['seq']}"},
            time_ms=at + 10,
        )
    r = await world.client.get(world.url(f"/v1/grants/{grant['id']}/usage"), headers=human.headers)
    assert r.status_code == 200, r.text
    assert r.json()["series"] == [
        {"hour": hour, "allow": 1, "deny": 2},
        {"hour": hour + 3600, "allow": 1, "deny": 0},
    ]
    assert r.json()["rate"] == [{"max_count": 100, "window_seconds": 86400, "used": 3}]


@pytest.mark.asyncio(loop_scope="session")
async def test_usage_reads_counts_not_every_decision_of_the_week(service: Opened) -> None:
    """The usage of a busy grant read every verification of the last week, bodies and all,
    into the registry's memory (a grant verified 10 times a second has 6 million a week):
    the answer is a few counts, so the database sends a few rows."""
    world, registry = service.world, service.registry
    envelope = {"rate_limits": [{"max_count": 10_000, "window_seconds": 86400}]}
    human, _, _, grant = await world.setup_grant(envelope=envelope)
    now_ms = int(time.time() * 1000)
    await _decisions(service, grant, *[("verify.allow", now_ms - 1000 * i) for i in range(1, 501)])
    fetched: list[int] = []
    pool = registry.pool

    class Counting:
        """The registry's pool, counting the rows of each fetch."""

        def __getattr__(self, name: str) -> Any:
            return getattr(pool, name)

        async def fetch(self, *args: Any, **kwargs: Any) -> Any:
            rows = await pool.fetch(*args, **kwargs)
            fetched.append(len(rows))
            return rows

    registry.pool = Counting()  # type: ignore[assignment]
    try:
        r = await world.client.get(
            world.url(f"/v1/grants/{grant['id']}/usage"), headers=human.headers
        )
    finally:
        registry.pool = pool
    assert r.status_code == 200, r.text
    assert sum(b["allow"] for b in r.json()["series"]) == 500
    assert r.json()["rate"][0]["used"] == 500
    assert max(fetched, default=0) <= 200, fetched  # at most a week of hours


@pytest.mark.asyncio(loop_scope="session")
async def test_usage_asked_again_and_again_is_counted_once_in_a_while(service: Opened) -> None:
    """Anyone who may see a grant could ask for its usage as fast as it liked (an agent's
    SDK never does; an agent whose key was taken can, at the rate it signs proofs), and
    each answer counted the grant's decisions again: about 205 ms of PostgreSQL a call at
    250,000 decisions in the week. Asked again within ``usage_cache_seconds`` the answer
    counted for the grant is given again, to every caller who may see it, and callers at
    the same moment share one count; whether the caller may see it is asked every time."""
    world, registry = service.world, service.registry
    envelope = {"rate_limits": [{"max_count": 100, "window_seconds": 86400}]}
    human, agent, _, grant = await world.setup_grant(envelope=envelope)
    now_ms = int(time.time() * 1000)
    await _decisions(service, grant, *[("verify.allow", now_ms - 1000 * i) for i in range(1, 6)])
    counted: list[str] = []
    pool = registry.pool

    class Counting:
        """The registry's pool, recording each query that reads the audit log."""

        def __getattr__(self, name: str) -> Any:
            method = getattr(pool, name)
            if name not in ("fetch", "fetchval", "fetchrow"):
                return method

            async def recorded(query: str, *args: Any, **kwargs: Any) -> Any:
                if "audit_events" in query:
                    counted.append(query)
                return await method(query, *args, **kwargs)

            return recorded

    path = f"/v1/grants/{grant['id']}/usage"
    registry.pool = Counting()  # type: ignore[assignment]
    try:
        together = await asyncio.gather(*(world.as_agent(agent, "GET", path) for _ in range(5)))
        after = [await world.as_agent(agent, "GET", path) for _ in range(3)]
        human_reads = [await world.client.get(world.url(path), headers=human.headers)]
        stranger = await world.human("Mallory")
        refused = await world.client.get(world.url(path), headers=stranger.headers)
    finally:
        registry.pool = pool
    answers = [*together, *after, *human_reads]
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert all(r.json() == answers[0].json() for r in answers)
    assert answers[0].json()["rate"][0]["used"] == 5
    assert refused.status_code == 404, refused.text
    # One count: the rate limit's, the latest allow's spend, the hourly series.
    assert len(counted) == 3, counted


@pytest.mark.asyncio(loop_scope="session")
async def test_recent_answers_are_computed_again_after_their_time_or_a_failure() -> None:
    """The memo behind usage, on a clock the test moves: an answer holds for ``ttl_us``;
    a failed computation is not kept; an asker that goes away does not cancel the
    computation the others await."""
    answers = RecentAnswers[int](ttl_us=1_000)
    runs: list[int] = []

    async def compute() -> int:
        runs.append(len(runs))
        await asyncio.sleep(0.01)
        return len(runs)

    assert await answers.get("g", 0, compute) == 1
    assert await answers.get("g", 999, compute) == 1  # still within its time
    assert await answers.get("g", 1_000, compute) == 2  # computed again
    assert await answers.get("other", 1_000, compute) == 3  # each key its own

    async def failing() -> int:
        runs.append(len(runs))
        raise ConnectionError("PostgreSQL went away")

    with pytest.raises(ConnectionError):
        await answers.get("f", 0, failing)
    assert await answers.get("f", 1, compute) == 5  # the failure was not kept

    gone = asyncio.ensure_future(answers.get("c", 0, compute))
    waiting = asyncio.ensure_future(answers.get("c", 0, compute))
    await asyncio.sleep(0)
    gone.cancel()
    assert await waiting == 6
    assert await answers.get("c", 1, compute) == 6
    assert len(runs) == 6


@pytest.mark.parametrize("value", [-1, 61])
def test_the_usage_cache_setting_is_bounded(value: float) -> None:
    with pytest.raises(ValidationError):
        RegistrySettings(
            database_url="postgresql://localhost/x",
            redis_url="redis://localhost:6379/0",
            issuer="http://r.test",
            admin_token="x" * 32,
            usage_cache_seconds=value,
        )
