"""Tokens minted per grant are limited (``token_limit`` in ``token_limit_period``).

Until 2026-11-30 `POST /v1/token` minted as fast as the registry could sign: one agent could
fill `issued_tokens` and the audit log and take the signing capacity all agents share.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from pydantic import ValidationError
from registry_inprocess import Opened, registry_in_process

from agentauth.registry import RegistrySettings

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

LIMIT = 3


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def opened(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Opened]:
    data_dir = tmp_path_factory.mktemp("registry")
    async with registry_in_process(
        database_url, redis_url, data_dir, prefix="toklimit", token_limit=LIMIT
    ) as o:
        yield o


@pytest.mark.asyncio(loop_scope="session")
async def test_past_its_limit_a_grant_gets_no_token_and_nothing_is_written(
    opened: Opened,
) -> None:
    world = opened.world
    human, agent, provider, grant = await world.setup_grant()
    for _ in range(LIMIT):
        r = await world.token(agent, grant["id"])
        assert r.status_code == 200, r.text
    before = await opened.counts()
    refused = await world.token(agent, grant["id"])
    assert refused.status_code == 429, refused.text
    assert refused.json()["reason"] == "token_rate_limited"
    # The next token of a limit of 3 per 300 s is due in about 100 s.
    assert 1 <= int(refused.headers["retry-after"]) <= 100
    assert await opened.counts() == before  # no token row, no audit event
    # The limit is the grant's: another grant of the same agent is not held back by it.
    request = await world.request(agent, provider)
    other = await world.approve(human, request["id"])
    r = await world.token(agent, other["id"])
    assert r.status_code == 200, r.text


@pytest.mark.asyncio(loop_scope="session")
async def test_a_limit_that_cannot_be_read_refuses_the_token(
    opened: Opened, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis failing at the limit's bucket (after the proof's reservation succeeded): 503,
    nothing signed or written; never a token the limit did not count."""
    world = opened.world
    _, agent, _, grant = await world.setup_grant()
    registry = opened.registry
    take = registry._take_script

    async def failing(*, keys: list[str], args: list[int]) -> int:
        if keys[0].startswith("agentauth:tokens:"):
            raise ConnectionError("Redis went away")
        return int(await take(keys=keys, args=args))

    monkeypatch.setattr(registry, "_take_script", failing)
    before = await opened.counts()
    refused = await world.token(agent, grant["id"])
    assert refused.status_code == 503, refused.text
    assert refused.json()["reason"] == "limits_unavailable"
    assert await opened.counts() == before


@pytest.mark.parametrize("field", ["token_limit", "token_limit_period"])
@pytest.mark.parametrize("value", [0, -1, 2_000_000])
def test_the_token_limit_settings_are_bounded(field: str, value: int) -> None:
    with pytest.raises(ValidationError):
        RegistrySettings(
            database_url="postgresql://localhost/x",
            redis_url="redis://localhost:6379/0",
            issuer="http://r.test",
            admin_token="x" * 32,
            **{field: value},  # type: ignore[arg-type]
        )
