"""A grant's use against its limits, as the approval page shows it (in process, real
PostgreSQL and Redis, no Ray)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from registry_inprocess import Opened, registry_in_process
from registry_world import PAYMENTS

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
