"""Bounds on what an authenticated caller may hold or pile up in the registry (in process,
real PostgreSQL and Redis, no Ray): step-up long polls open at once and how often each
reads the database, and a human's live enrollment codes and passkey ceremonies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from pydantic import ValidationError
from registry_inprocess import Opened, registry_in_process
from registry_world import Agent as WorldAgent
from registry_world import World
from softauthn import SoftAuthenticator

from agentauth.protocol import PrivateKey
from agentauth.registry import Registry, RegistrySettings

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

WAITS_PER_CALLER = 2
WAITS_PER_REPLICA = 3
LIVE_ENROLLMENTS = 3
HUMAN_CHALLENGES = 3


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def service(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Opened]:
    data_dir = tmp_path_factory.mktemp("registry")
    async with registry_in_process(
        database_url,
        redis_url,
        data_dir,
        prefix="limits",
        step_up_waits_per_caller=WAITS_PER_CALLER,
        step_up_waits_per_replica=WAITS_PER_REPLICA,
        max_live_enrollments=LIVE_ENROLLMENTS,
        max_human_challenges=HUMAN_CHALLENGES,
    ) as opened:
        yield opened


async def _wait_on(w: World, agent: WorldAgent, step_id: str, seconds: float) -> httpx.Response:
    return await w.as_agent(agent, "GET", f"/v1/step-ups/{step_id}?wait={seconds}")


async def _until_open(registry: Registry, waits: int) -> None:
    """Until this many step-up waits are held in the registry (each request has passed
    its authentication and is polling)."""
    for _ in range(400):
        if registry._step_up_waits._total == waits:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"{registry._step_up_waits._total} waits open, not {waits}")


def _refused_as_too_many(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert (r.json()["error"], r.json()["reason"]) == ("rate_limited", "too_many_waits")
    assert r.headers["retry-after"] == "5"


@pytest.mark.asyncio(loop_scope="session")
async def test_step_up_waits_are_bounded_per_caller_and_per_replica(service: Opened) -> None:
    w = service.world
    human, agent, _, grant = await w.payments_grant()
    step = await w.step_up(agent, grant["id"], "75")
    _, other, _, other_grant = await w.payments_grant()
    other_step = await w.step_up(other, other_grant["id"], "75")

    held = [asyncio.create_task(_wait_on(w, agent, step["id"], 4)) for _ in range(2)]
    await _until_open(service.registry, WAITS_PER_CALLER)
    before = await service.counts()
    # The agent's third wait, while its two are open: refused at once, nothing written.
    _refused_as_too_many(await _wait_on(w, agent, step["id"], 4))
    assert await service.counts() == before
    # A read that does not wait is no long poll: still answered.
    r = await _wait_on(w, agent, step["id"], 0)
    assert (r.status_code, r.json()["status"]) == (200, "pending")
    # Another agent has slots of its own, until the replica's run out: then even a caller
    # holding none is refused (the human, here).
    held.append(asyncio.create_task(_wait_on(w, other, other_step["id"], 4)))
    await _until_open(service.registry, WAITS_PER_REPLICA)
    r = await w.client.get(w.url(f"/v1/step-ups/{step['id']}?wait=4"), headers=human.headers)
    _refused_as_too_many(r)
    assert await service.counts() == before

    for r in await asyncio.gather(*held):
        assert (r.status_code, r.json()["status"]) == (200, "pending")
    # Each slot is free again as its wait ends.
    assert service.registry._step_up_waits._total == 0
    r = await _wait_on(w, agent, step["id"], 0.1)
    assert (r.status_code, r.json()["status"]) == (200, "pending")


class _CountingPool:
    """The registry's pool, counting the step-up reads that go through it."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self.step_up_reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    async def fetchrow(self, query: str, *args: Any) -> Any:
        if "FROM step_ups" in query:
            self.step_up_reads += 1
        return await self._pool.fetchrow(query, *args)


@pytest.mark.asyncio(loop_scope="session")
async def test_an_unanswered_step_up_wait_reads_the_database_less_and_less_often(
    service: Opened,
) -> None:
    w = service.world
    human, agent, _, grant = await w.payments_grant()
    step = await w.step_up(agent, grant["id"], "75")
    registry = service.registry
    real = registry.pool
    counting = _CountingPool(real)
    registry.pool = counting
    try:
        r = await _wait_on(w, agent, step["id"], 4)
    finally:
        registry.pool = real
    assert (r.status_code, r.json()["status"]) == (200, "pending")
    # Reads at 0, 0.25, 0.75, 1.75, 3.75 s and at the deadline; every 0.25 s would be 17.
    assert counting.step_up_reads <= 7, counting.step_up_reads

    # An answer is still seen while waiting, without waiting out the deadline.
    wait = asyncio.create_task(_wait_on(w, agent, step["id"], 20))
    await _until_open(registry, 1)
    r = await w.client.post(w.url(f"/v1/step-ups/{step['id']}/deny"), headers=human.headers)
    assert r.status_code == 200, r.text
    r = await asyncio.wait_for(wait, timeout=5)
    assert (r.status_code, r.json()["status"]) == (200, "denied")


def test_a_per_caller_wait_bound_above_the_replica_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="step_up_waits_per_caller exceeds"):
        RegistrySettings(
            database_url="postgresql://x/y",
            redis_url="redis://x",
            data_dir=tmp_path,
            issuer="http://r.test",
            admin_token="t" * 32,
            step_up_waits_per_caller=10,
            step_up_waits_per_replica=5,
        )


@pytest.mark.asyncio(loop_scope="session")
async def test_a_human_holds_a_bounded_number_of_live_enrollment_codes(
    service: Opened,
) -> None:
    w = service.world
    human = await w.human()
    other = await w.human("Bob")

    async def mint(who: Any = human) -> httpx.Response:
        return await w.client.post(w.url("/v1/enrollments"), headers=who.headers)

    for _ in range(LIVE_ENROLLMENTS):
        r = await mint()
        assert r.status_code == 200, r.text
    before = await service.counts()
    r = await mint()
    assert r.status_code == 409, r.text
    assert (r.json()["error"], r.json()["reason"]) == ("conflict", "too_many_enrollments")
    assert await service.counts() == before
    # Another human's codes are their own.
    assert (await mint(other)).status_code == 200

    # A code expired, or used for an agent, no longer counts.
    await service.registry.pool.execute(
        "UPDATE enrollments SET expires_at = now() - interval '1 second' WHERE code_hash = ("
        "SELECT code_hash FROM enrollments WHERE principal_id = $1 AND used_at IS NULL"
        " LIMIT 1)",
        human.principal_id,
    )
    r = await mint()
    assert r.status_code == 200, r.text
    assert (await mint()).status_code == 409
    key = PrivateKey.generate("ES256")
    r = await w.client.post(
        w.url("/v1/agents"),
        headers={"DPoP": w.proof(key, "POST", "/v1/agents")},
        json={
            "name": "bot",
            "public_jwk": key.public_jwk(),
            "enrollment_code": r.json()["enrollment_code"],
        },
    )
    assert r.status_code == 200, r.text
    assert (await mint()).status_code == 200
    assert (await mint()).status_code == 409


@pytest.mark.asyncio(loop_scope="session")
async def test_a_human_holds_a_bounded_number_of_live_passkey_ceremonies(
    service: Opened,
) -> None:
    """Every approval's begin and passkey change's confirmation stores a challenge (an
    approval's with the whole grant), and nothing bounded how many one session stored:
    whoever held it could fill the table at request speed, where the anonymous ones are
    capped."""
    w = service.world
    human = await w.human()
    other = await w.human("Bob")

    async def confirm(who: Any = human) -> httpx.Response:
        return await w.client.post(
            w.url("/v1/passkeys/confirm"), headers=who.headers, json={"change": "add"}
        )

    for _ in range(HUMAN_CHALLENGES):
        r = await confirm()
        assert r.status_code == 200, r.text
    before = await service.counts()
    r = await confirm()
    assert r.status_code == 429, r.text
    assert (r.json()["error"], r.json()["reason"]) == ("rate_limited", "too_many_challenges")
    assert 1 <= int(r.headers["retry-after"]) <= 300
    assert await service.counts() == before
    # An approval's begin is refused alike, and writes nothing.
    agent = await w.agent(human)
    request = await w.request(agent, await w.provider())
    before = await service.counts()
    r = await w.client.post(
        w.url(f"/v1/grant-requests/{request['id']}/approval/begin"), headers=human.headers
    )
    assert r.status_code == 429, r.text
    assert await service.counts() == before
    # Another human's ceremonies are their own.
    assert (await confirm(other)).status_code == 200

    # An expired challenge no longer counts.
    await service.registry.pool.execute(
        "UPDATE webauthn_challenges SET expires_at = now() - interval '1 second'"
        " WHERE challenge = (SELECT challenge FROM webauthn_challenges WHERE principal_id = $1"
        " LIMIT 1)",
        human.principal_id,
    )
    assert (await confirm()).status_code == 200
    assert (await confirm()).status_code == 429


@pytest.mark.asyncio(loop_scope="session")
async def test_a_recovery_begins_whatever_ceremonies_a_lost_passkeys_session_holds(
    service: Opened,
) -> None:
    """Whoever holds Alice's lost passkey has a session, and one confirmation every few
    seconds keeps her ceremonies at the bound: her recovery's begin, the one way to lock
    that holder out, was refused with them (429, until 2026-12-01). A recovery's begins
    are bounded among themselves, and count against the other ceremonies."""
    w = service.world
    alice = await w.human("Alice")

    async def confirm() -> httpx.Response:
        return await w.client.post(
            w.url("/v1/passkeys/confirm"), headers=alice.headers, json={"change": "add"}
        )

    while (await confirm()).status_code == 200:
        pass
    code, options = await w.recovery_options(alice.principal_id)

    async def begin() -> httpx.Response:
        return await w.client.post(w.url("/v1/recovery/begin"), json={"code": code})

    device = SoftAuthenticator(origin=w.origin)
    registration = device.create(options)
    for _ in range(HUMAN_CHALLENGES - 1):
        assert (await begin()).status_code == 200
    before = await service.counts()
    r = await begin()
    assert (r.status_code, r.json().get("reason")) == (429, "too_many_challenges"), r.text
    assert await service.counts() == before
    r = await w.client.post(
        w.url("/v1/recovery/finish"), json={"code": code, "credential": registration}
    )
    assert r.status_code == 200, r.text


@pytest.mark.asyncio(loop_scope="session")
async def test_the_latest_checkpoints_read_one_row_a_chain_not_every_checkpoint(
    service: Opened,
) -> None:
    """Any agent or provider may ask for the latest checkpoints as often as it likes, and
    a chain gains one every 10 s while it has events (8,640 a day). The query read and
    sorted every checkpoint ever made, once a call (200,000: 313 ms, 67 MB sorted on
    disk); it must read one a chain, whatever the history."""
    registry = service.registry
    await registry.pool.execute(
        "INSERT INTO audit_checkpoints (chain, size, root, frontier, signed, time)"
        " SELECT chain, 1000000 + n, '\\x00', '{}', 'cp' || n, n FROM audit_heads,"
        " generate_series(1, 2500) n"
    )
    await registry.pool.execute("ANALYZE audit_checkpoints")
    chains = int(await registry.pool.fetchval("SELECT count(*) FROM audit_heads"))
    queries: list[str] = []
    pool = registry.pool

    class Recording:
        """The registry's pool, recording each query it fetches."""

        def __getattr__(self, name: str) -> Any:
            return getattr(pool, name)

        async def fetch(self, query: str, *args: Any, **kwargs: Any) -> Any:
            queries.append(query)
            return await pool.fetch(query, *args, **kwargs)

    world = service.world
    _, agent, _, _ = await world.setup_grant()
    registry.pool = Recording()  # type: ignore[assignment]
    try:
        r = await world.as_agent(agent, "GET", "/v1/audit/checkpoints")
    finally:
        registry.pool = pool
    assert r.status_code == 200, r.text
    assert [c["signed"] for c in r.json()] == ["cp2500"] * chains  # each chain's latest
    (query,) = [q for q in queries if "audit_checkpoints" in q]
    plan = await pool.fetchval("EXPLAIN (ANALYZE, FORMAT JSON) " + query)
    read = 0
    nodes = [json.loads(plan)[0]["Plan"]]
    while nodes:
        node = nodes.pop()
        nodes.extend(node.get("Plans", ()))
        if node.get("Relation Name") == "audit_checkpoints":
            read += node["Actual Rows"] * node["Actual Loops"]
    assert 0 < read <= chains, plan
