"""Races between the registry's writers, each forced into one interleaving: a request held
(an ``asyncio.Event``) at an await point, or a row lock held from a second connection.
Real PostgreSQL and Redis, the registry's service and HTTP API in process (no Ray)."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import asyncpg
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from registry_inprocess import ISSUER, registry_in_process
from registry_world import Provider, World
from softauthn import SoftAuthenticator

from agentauth.protocol import Capability, Conflict, PrivateKey, b64url_encode
from agentauth.registry import Registry, _service
from agentauth.registry._models import SuspensionIn
from agentauth.store import grant_cache_key
from agentauth.verifier import Verifier, VerifierSettings
from agentauth.verifier._service import _Revocations

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


class InProcess:
    def __init__(self, registry: Registry, world: World, url: str, redis_url: str) -> None:
        self.registry, self.world, self.url, self.redis_url = registry, world, url, redis_url

    async def events(self, event: str, subject: str) -> int:
        return int(
            await self.registry.pool.fetchval(
                "SELECT count(*) FROM audit_events"
                " WHERE event = $1 AND body::jsonb->>'subject' = $2",
                event,
                subject,
            )
        )


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def service(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[InProcess]:
    data_dir = tmp_path_factory.mktemp("registry")
    async with registry_in_process(database_url, redis_url, data_dir, prefix="races") as opened:
        yield InProcess(opened.registry, opened.world, opened.url, redis_url)


# --- provider credentials: checked again in the transaction that changes them -------------


def _as(provider: Provider, secret: str) -> dict[str, str]:
    return Provider(provider.id, provider.audience, secret).headers


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("change", ["rotate", "end_previous"])
@pytest.mark.parametrize(
    ("meanwhile", "refusal"),
    [
        # The admin's answer to a leak: the leaked secret stops at once.
        ("rotate_now", (401, "bad_provider_credential")),
        # A rotation with an overlap: the secret shown is now the previous one.
        ("rotate_with_overlap", (403, "previous_credential")),
        ("suspend", (403, "provider_suspended")),
    ],
)
async def test_a_credential_change_authenticated_before_the_admin_acted_is_refused_after(
    service: InProcess,
    monkeypatch: pytest.MonkeyPatch,
    change: str,
    meanwhile: str,
    refusal: tuple[int, str],
) -> None:
    """A provider's request, authenticated with its current secret S1 (leaked), is held
    between its authentication and its transaction while the admin rotates S1 away (or
    suspends the provider). Run afterwards, it must not make a secret of its own current
    and end the admin's, nor end a credential: it is refused as S1 would be now, and
    nothing is changed or recorded."""
    world, registry = service.world, service.registry
    provider = await world.provider()
    leaked = provider.secret
    authenticate = registry.authenticate_provider
    authenticated, release = asyncio.Event(), asyncio.Event()

    async def held(provider_id: str, secret: str) -> Any:
        credential = await authenticate(provider_id, secret)
        if secret == leaked and not release.is_set():
            authenticated.set()
            await release.wait()  # authenticated; its transaction has not begun
        return credential

    monkeypatch.setattr(registry, "authenticate_provider", held)
    path = world.url(
        f"/v1/providers/{provider.id}/secret" + ("" if change == "rotate" else "/previous")
    )
    method = "POST" if change == "rotate" else "DELETE"
    kwargs: dict[str, Any] = {"json": {"previous_valid_for": 0}} if change == "rotate" else {}
    attacker = asyncio.ensure_future(
        world.client.request(method, path, headers=_as(provider, leaked), **kwargs)
    )
    await asyncio.wait_for(authenticated.wait(), 10)

    admin_secret = leaked
    if meanwhile == "suspend":
        r = await world.client.put(
            world.url(f"/v1/providers/{provider.id}/suspension"),
            headers=world.admin,
            json={"reason": "compromise under investigation"},
        )
    else:
        r = await world.client.post(
            world.url(f"/v1/providers/{provider.id}/secret"),
            headers=world.admin,
            json={"previous_valid_for": 0 if meanwhile == "rotate_now" else 600},
        )
        admin_secret = r.json()["secret"]
    assert r.status_code == 200, r.text
    before = await registry.pool.fetchrow(
        "SELECT secret_hash, previous_secret_hash, previous_expires_at FROM providers"
        " WHERE id = $1",
        provider.id,
    )
    changes = await registry.pool.fetchval("SELECT epoch FROM provider_changes")

    release.set()
    r = await asyncio.wait_for(attacker, 10)
    assert (r.status_code, r.json()["reason"]) == refusal, r.text
    after = await registry.pool.fetchrow(
        "SELECT secret_hash, previous_secret_hash, previous_expires_at FROM providers"
        " WHERE id = $1",
        provider.id,
    )
    assert after == before
    assert await registry.pool.fetchval("SELECT epoch FROM provider_changes") == changes
    subject = f"provider:{provider.id}"
    assert await service.events("provider.secret_rotated", subject) == (
        0 if meanwhile == "suspend" else 1  # the admin's only
    )
    assert await service.events("provider.previous_secret_ended", subject) == 0
    if meanwhile != "suspend":  # the admin's secret is the provider's
        r = await world.client.get(
            world.url(f"/v1/providers/{provider.id}"), headers=_as(provider, admin_secret)
        )
        assert r.status_code == 200, r.text


@pytest.mark.asyncio(loop_scope="session")
async def test_the_current_secret_still_changes_credentials(service: InProcess) -> None:
    """The re-check refuses nothing it should let through: the provider rotates with its
    current secret, then ends the overlap with the new one."""
    world = service.world
    provider = await world.provider()
    r = await world.client.post(
        world.url(f"/v1/providers/{provider.id}/secret"),
        headers=provider.headers,
        json={"previous_valid_for": 600},
    )
    assert r.status_code == 200, r.text
    new = r.json()["secret"]
    r = await world.client.delete(
        world.url(f"/v1/providers/{provider.id}/secret/previous"), headers=_as(provider, new)
    )
    assert r.status_code == 200, r.text
    r = await world.client.get(world.url(f"/v1/providers/{provider.id}"), headers=provider.headers)
    assert (r.status_code, r.json()["reason"]) == (401, "bad_provider_credential")


# --- revocations: polled in commit order --------------------------------------------------


async def _until_blocked_by(
    pool: asyncpg.Pool, blocker: asyncpg.Connection, waiter: asyncio.Future[Any]
) -> None:
    """Return once some session waits for a lock the ``blocker`` connection holds; fail if
    ``waiter`` finishes first (it did not wait for that lock)."""
    pid = blocker.get_server_pid()
    for _ in range(500):
        if await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", pid
        ):
            return
        if waiter.done():
            raise AssertionError(f"finished without waiting for the held lock: {waiter!r}")
        await asyncio.sleep(0.02)
    raise AssertionError("nothing waited for the held lock")


def _about_grant(grant_id: str) -> Any:
    return SimpleNamespace(
        claims=SimpleNamespace(jti="tok_none", grant_id=grant_id, sub="agt_none")
    )


@pytest.mark.asyncio(loop_scope="session")
async def test_a_revocation_committed_after_a_burst_of_later_ones_is_still_polled(
    service: InProcess,
) -> None:
    """A grant revocation takes its id, then waits for its audit chain's lock (held here
    by a second connection); meanwhile 1,001 other revocations commit, the replica polls
    them, and only then does the first commit. A running replica's poll must still read
    it (polling by id, it looked back only 1,000 ids: with its Redis message lost too,
    the replica stayed fresh and never learned of it), and so must a provider resuming
    GET /v1/revocations from the last number it read."""
    world, registry = service.world, service.registry
    human, agent, _, grant = await world.setup_grant()
    replica = _Revocations(
        registry.pool, cast(Any, None), cast(Any, None), also=lambda: asyncio.sleep(0)
    )
    await replica._poll()
    blocker = await asyncpg.connect(service.url)
    try:
        async with blocker.transaction():
            await blocker.execute(
                "SELECT 1 FROM audit_heads WHERE chain = $1 FOR UPDATE",
                registry.audit.chain_for(agent.id),
            )
            revoking = asyncio.ensure_future(
                registry.revoke("grant", grant["id"], principal_id=human.principal_id, admin=False)
            )
            await _until_blocked_by(registry.pool, blocker, revoking)  # inserted, not committed
            await registry.pool.execute(
                "INSERT INTO revocations (kind, target, revoked_by)"
                " SELECT 'token', $1 || g, 'test' FROM generate_series(1, 1001) g",
                f"burst_{secrets.token_hex(4)}_",
            )
            await replica._poll()
            assert not replica.revoked(_about_grant(grant["id"]))
            listed = await registry.list_revocations()
            resume_from = max(r["seq"] for r in listed)
        await asyncio.wait_for(revoking, 10)  # the chain's lock is free: it commits
    finally:
        await blocker.close()
    await replica._poll()
    assert replica.revoked(_about_grant(grant["id"]))
    later = await registry.list_revocations(since=resume_from)
    assert [(r["kind"], r["target"]) for r in later] == [("grant", grant["id"])]


@pytest.mark.asyncio(loop_scope="session")
async def test_revoking_again_takes_no_id(service: InProcess) -> None:
    """Re-revoking changes nothing, so it takes nothing: not an id (burning ids is what
    let a waiting revocation fall behind the id poll), not a number, not an audit event."""
    world, registry = service.world, service.registry
    human, _, _, grant = await world.setup_grant()
    await registry.revoke("grant", grant["id"], principal_id=human.principal_id, admin=False)
    state = "SELECT (SELECT last_value FROM revocations_id_seq), (SELECT seq FROM revocation_log)"
    before = await registry.pool.fetchrow(state)
    for _ in range(3):
        await registry.revoke("grant", grant["id"], principal_id=human.principal_id, admin=False)
    assert await registry.pool.fetchrow(state) == before
    assert await service.events("grant.revoked", f"grant:{grant['id']}") == 1


# --- approvals: nothing approved for what died meanwhile ----------------------------------

# What each writer changes, done from a second connection that holds the row meanwhile.
_DEATHS = {
    "agent_disabled": "UPDATE agents SET status = 'disabled' WHERE id = $1",
    "provider_suspended": "UPDATE providers SET suspended_at = now(),"
    " suspension_reason = 'compromise' WHERE id = $1",
    "grant_revoked": "UPDATE grants SET revoked_at = now() WHERE id = $1",
}


async def _pending_grant_approval(world: World) -> tuple[Any, Any, Any, dict[str, Any], Any]:
    """A human, agent, provider, the agent's pending grant request and the human's signed
    (not yet sent) approval of it."""
    human = await world.human()
    agent = await world.agent(human)
    provider = await world.provider()
    request = await world.request(agent, provider)
    begun = await world.begin_approval(human, request["id"])
    return human, agent, provider, request, human.authenticator.get(begun["options"])


async def _pending_step_up_approval(world: World) -> tuple[Any, Any, Any, dict[str, Any], Any]:
    """The same for a step-up on a grant: human, agent, provider, the step-up (with its
    grant_id) and the human's signed approval."""
    human, agent, provider, grant = await world.payments_grant()
    step = await world.step_up(agent, grant["id"], "75.00")
    r = await world.client.post(
        world.url(f"/v1/step-ups/{step['id']}/approval/begin"), headers=human.headers
    )
    assert r.status_code == 200, r.text
    return human, agent, provider, step, human.authenticator.get(r.json()["options"])


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize(
    ("approving", "death"),
    [
        ("grant_request", "agent_disabled"),
        ("grant_request", "provider_suspended"),
        ("step_up", "agent_disabled"),
        ("step_up", "provider_suspended"),
        ("step_up", "grant_revoked"),
    ],
)
async def test_an_approval_waits_for_a_death_in_progress_and_then_refuses(
    service: InProcess, approving: str, death: str
) -> None:
    """The agent is being disabled (or the provider suspended, or the grant revoked): a
    second connection has changed its row and not committed. The approval's finish must
    wait for that row and then see the change (409, nothing approved), not read the old
    row and commit a receipt for something no token can use."""
    world, registry = service.world, service.registry
    pending = _pending_grant_approval if approving == "grant_request" else _pending_step_up_approval
    human, agent, provider, subject, credential = await pending(world)
    target = {"agent_disabled": agent.id, "provider_suspended": provider.id}.get(
        death, subject.get("grant_id")
    )
    finish = registry.approval_finish if approving == "grant_request" else registry.step_up_finish
    killer = await asyncpg.connect(service.url)
    try:
        async with killer.transaction():
            await killer.execute(_DEATHS[death], target)
            finishing = asyncio.ensure_future(finish(human.principal_id, subject["id"], credential))
            await _until_blocked_by(registry.pool, killer, finishing)
        with pytest.raises(Conflict) as refused:
            await asyncio.wait_for(finishing, 10)
    finally:
        await killer.close()
    assert refused.value.reason == death
    table = "grant_requests" if approving == "grant_request" else "step_ups"
    assert (
        await registry.pool.fetchval(f"SELECT status FROM {table} WHERE id = $1", subject["id"])
        == "pending"
    )
    assert not await registry.pool.fetchval(
        "SELECT count(*) FROM grants WHERE request_id = $1", subject["id"]
    )


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("approving", ["grant_request", "step_up"])
async def test_a_death_asked_for_during_an_approval_waits_for_it_and_covers_it(
    service: InProcess, monkeypatch: pytest.MonkeyPatch, approving: str
) -> None:
    """The other order, with the registry's own writers: the finish has checked the agent
    (and grant) and holds them; disabling the agent, or revoking the grant, asked for now
    waits for the approval to commit, then commits itself, without a deadlock on the
    audit chain both write to. What was approved is then dead like the rest."""
    world, registry = service.world, service.registry
    pending = _pending_grant_approval if approving == "grant_request" else _pending_step_up_approval
    human, agent, _, subject, credential = await pending(world)
    checked, release = asyncio.Event(), asyncio.Event()
    verify_assertion = registry._verify_assertion

    async def held(*args: Any, **kwargs: Any) -> Any:
        checked.set()  # the rows are read and locked; the assertion is next
        await release.wait()
        return await verify_assertion(*args, **kwargs)

    monkeypatch.setattr(registry, "_verify_assertion", held)
    finish = registry.approval_finish if approving == "grant_request" else registry.step_up_finish
    finishing = asyncio.ensure_future(finish(human.principal_id, subject["id"], credential))
    try:
        await asyncio.wait_for(checked.wait(), 10)
        if approving == "grant_request":
            killing = asyncio.ensure_future(
                registry.disable_agent(agent.id, principal_id=human.principal_id, admin=False)
            )
        else:
            killing = asyncio.ensure_future(
                registry.revoke(
                    "grant", subject["grant_id"], principal_id=human.principal_id, admin=False
                )
            )
        await asyncio.sleep(0.5)
        assert not killing.done()  # it waits on the row the approval holds
    finally:
        release.set()  # a failed test must not leave the approval's transaction open
    approved = await asyncio.wait_for(finishing, 10)
    await asyncio.wait_for(killing, 10)
    if approving == "grant_request":
        r = await world.token(agent, approved["id"])
        assert (r.status_code, r.json()["reason"]) == (403, "agent_disabled"), r.text
    else:
        assert approved["status"] == "approved"
        revoked = await registry.pool.fetchval(
            "SELECT revoked_at IS NOT NULL FROM grants WHERE id = $1", subject["grant_id"]
        )
        assert revoked


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("death", ["grant_revoked", "provider_suspended"])
async def test_a_step_up_asked_for_a_grant_that_died_meanwhile_is_refused_and_writes_nothing(
    service: InProcess, monkeypatch: pytest.MonkeyPatch, death: str
) -> None:
    """The agent asks for a step-up; its grant is read (standing), then revoked (or its
    provider suspended) before the step-up is inserted. The request read the grant only
    once, unlocked: it stored the step-up and its step_up.requested event and answered 200
    with the step-up "cancelled". It must be refused as a request for a dead grant is,
    with nothing written."""
    world, registry = service.world, service.registry
    human, agent, provider, grant = await world.payments_grant()
    get_grant = registry.get_grant
    read, release = asyncio.Event(), asyncio.Event()

    async def held(*args: Any, **kwargs: Any) -> Any:
        found = await get_grant(*args, **kwargs)
        read.set()  # read as standing; the step-up is not yet inserted
        await release.wait()
        return found

    monkeypatch.setattr(registry, "get_grant", held)
    payment = {"grant_id": grant["id"], "resource": "payments", "amount": "60"}
    asking = asyncio.ensure_future(
        world.as_agent(agent, "POST", "/v1/step-ups", json={**payment, "currency": "USD"})
    )
    try:
        await asyncio.wait_for(read.wait(), 10)
        if death == "grant_revoked":
            await registry.revoke(
                "grant", grant["id"], principal_id=human.principal_id, admin=False
            )
        else:
            await registry.suspend_provider(provider.id, SuspensionIn(reason="compromise"))
    finally:
        release.set()
    r = await asyncio.wait_for(asking, 10)
    assert (r.status_code, r.json().get("reason")) == (403, death), r.text
    written = await registry.pool.fetchval(
        "SELECT count(*) FROM step_ups WHERE grant_id = $1", grant["id"]
    )
    requested = await registry.pool.fetchval(
        "SELECT count(*) FROM audit_events WHERE event = 'step_up.requested' AND grant_id = $1",
        grant["id"],
    )
    assert (written, requested) == (0, 0)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_grant_request_to_a_provider_suspended_meanwhile_is_refused_and_writes_nothing(
    service: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent asks for a grant; the provider is read (not suspended), then suspended
    before the request is inserted. The request read the provider once, unlocked: it was
    stored, with its grant_request.created event, and answered 200 pending for a provider
    that takes no new requests (409 provider_suspended)."""
    world, registry = service.world, service.registry
    human = await world.human()
    agent = await world.agent(human)
    provider = await world.provider()
    hold_agent = _service._hold_agent
    held, release = asyncio.Event(), asyncio.Event()

    async def holding(conn: Any, who: Any) -> None:
        await hold_agent(conn, who)
        held.set()  # the provider was read before this, standing; nothing is inserted yet
        await release.wait()

    monkeypatch.setattr(_service, "_hold_agent", holding)
    asking = asyncio.ensure_future(
        world.as_agent(
            agent,
            "POST",
            "/v1/grant-requests",
            json={
                "provider_id": provider.id,
                "capabilities": [Capability.read("calendar").to_document()],
            },
        )
    )
    try:
        await asyncio.wait_for(held.wait(), 10)
        await registry.suspend_provider(provider.id, SuspensionIn(reason="compromise"))
    finally:
        release.set()
    r = await asyncio.wait_for(asking, 10)
    assert (r.status_code, r.json().get("reason")) == (409, "provider_suspended"), r.text
    written = await registry.pool.fetchval(
        "SELECT count(*) FROM grant_requests WHERE agent_id = $1", agent.id
    )
    assert written == 0


# --- a grant's cached status: a stale fill cannot undo a revocation -------------------------


class _HeldPool:
    """A verifier's pool whose grant lookup is held after PostgreSQL answered."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.read, self.release = asyncio.Event(), asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    async def fetch(self, query: str, *args: Any) -> Any:
        rows = await self._pool.fetch(query, *args)
        if "FROM grants WHERE id = ANY" in query and not self.release.is_set():
            self.read.set()
            await self.release.wait()
        return rows


def _verifier(service: InProcess, pool: Any, redis: aioredis.Redis) -> Verifier:
    """A verifier replica's grant lookups, without its shards (none are called here)."""
    settings = VerifierSettings(
        database_url=service.url, redis_url=service.redis_url, issuer=ISSUER
    )
    return Verifier(settings=settings, pool=pool, redis=redis, shards=cast(Any, None))


@pytest.mark.asyncio(loop_scope="session")
async def test_a_grant_status_read_before_its_revocation_is_not_cached_after_it(
    service: InProcess,
) -> None:
    """A replica reads the grant from PostgreSQL (active); the grant is revoked and the
    revocation commits; only then is the replica's fill written to Redis. It must not
    leave "active" there for other replicas to believe for a minute (the revocation
    deleted the key, and the fill put the stale status back)."""
    world, registry = service.world, service.registry
    human, _, _, grant = await world.setup_grant()
    key = grant_cache_key(grant["id"])
    redis = aioredis.Redis.from_url(service.redis_url)
    pool = await asyncpg.create_pool(service.url, min_size=1, max_size=2)
    assert pool is not None
    held = _HeldPool(pool)
    replica = _verifier(service, held, redis)
    try:
        await redis.delete(key)
        lookup = asyncio.ensure_future(replica._grant_active(grant["id"]))
        await asyncio.wait_for(held.read.wait(), 10)  # read "active"; not yet cached
        await registry.revoke("grant", grant["id"], principal_id=human.principal_id, admin=False)
        held.release.set()
        assert await asyncio.wait_for(lookup, 10)  # what it read, answered as read
        await asyncio.gather(*list(replica._tasks))  # its fill, written after the revocation
        assert await redis.get(key) == b"revoked"
        other = _verifier(service, pool, redis)  # another replica, nothing in its memory
        assert not await other._grant_active(grant["id"])
    finally:
        held.release.set()
        await pool.close()
        await redis.aclose()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_revocation_marks_a_cached_active_status_revoked(service: InProcess) -> None:
    """The usual order: "active" cached before the revocation is replaced by the mark."""
    world, registry = service.world, service.registry
    human, _, _, grant = await world.setup_grant()
    key = grant_cache_key(grant["id"])
    redis = aioredis.Redis.from_url(service.redis_url)
    pool = await asyncpg.create_pool(service.url, min_size=1, max_size=2)
    assert pool is not None
    try:
        await redis.delete(key)
        replica = _verifier(service, pool, redis)
        assert await replica._grant_active(grant["id"])
        await asyncio.gather(*list(replica._tasks))
        assert await redis.get(key) == b"active"
        await registry.revoke("grant", grant["id"], principal_id=human.principal_id, admin=False)
        assert await redis.get(key) == b"revoked"
        assert not await _verifier(service, pool, redis)._grant_active(grant["id"])
    finally:
        await pool.close()
        await redis.aclose()


# --- token issuance against a provider suspension -----------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_no_token_is_recorded_for_a_provider_suspended_while_it_was_signed(
    service: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A suspension that commits while the token is being signed: the transaction that
    records the token reads the provider again under its row lock and refuses. (It read
    only the grant's and agent's revocation there: the agent was answered 200 with a
    token for a provider suspended before it was recorded.)"""
    world, registry = service.world, service.registry
    _, agent, provider, grant = await world.setup_grant()
    signer_of = registry.keys.signer
    signing, release = asyncio.Event(), asyncio.Event()

    async def held(now: float) -> Any:
        signer = await signer_of(now)
        if not release.is_set():
            signing.set()  # checks passed; the token is about to be signed
            await release.wait()
        return signer

    monkeypatch.setattr(registry.keys, "signer", held)
    issuing = asyncio.ensure_future(world.token(agent, grant["id"]))
    try:
        await asyncio.wait_for(signing.wait(), 10)
        r = await world.client.put(
            world.url(f"/v1/providers/{provider.id}/suspension"),
            headers=world.admin,
            json={"reason": "compromise under investigation"},
        )
        assert r.status_code == 200, r.text
    finally:
        release.set()
    r = await asyncio.wait_for(issuing, 10)
    recorded = await registry.pool.fetchval(
        "SELECT count(*) FROM issued_tokens WHERE grant_id = $1", grant["id"]
    )
    assert (r.status_code, r.json().get("reason"), recorded) == (403, "provider_suspended", 0), (
        r.text
    )


# --- revoking an agent again --------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_revoking_an_agent_again_records_nothing(service: InProcess) -> None:
    """docs/registry.md: "Revoking what is already revoked changes and records nothing",
    and revoking an agent is disabling it. Three concurrent revocations of one agent,
    serialized on its row lock, record one change. (agent.disabled was appended on every
    call.)"""
    world, registry = service.world, service.registry
    human, agent, _, _ = await world.setup_grant()
    await asyncio.gather(
        *(
            registry.revoke("agent", agent.id, principal_id=human.principal_id, admin=False)
            for _ in range(3)
        )
    )
    subject = f"agent:{agent.id}"
    assert await service.events("agent.revoked", subject) == 1
    assert await service.events("agent.disabled", subject) == 1


# --- a session-authenticated change against the end of its session ----------------------


async def _sign_in(world: World, authenticator: SoftAuthenticator, passkey: Any) -> str:
    r = await world.client.post(world.url("/v1/sessions/begin"))
    assert r.status_code == 200, r.text
    credential = authenticator.get(r.json(), passkey=passkey)
    r = await world.client.post(world.url("/v1/sessions/finish"), json={"credential": credential})
    assert r.status_code == 200, r.text
    return str(r.json()["session"])


async def _confirm(world: World, session: str, **change: Any) -> dict[str, Any]:
    r = await world.client.post(
        world.url("/v1/passkeys/confirm"),
        headers={"Authorization": f"Bearer {session}"},
        json=change or {"change": "add"},
    )
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def _alice_with_two_passkeys(world: World) -> tuple[Any, Any, Any]:
    """Alice, signed up with one passkey (the first returned) and adding a second (the
    other): the one she may lose, and the one she keeps."""
    alice = await world.human("Alice")
    first = next(iter(alice.authenticator.passkeys.values()))
    r = await world.client.post(
        world.url("/v1/passkeys/begin"),
        headers=alice.headers,
        json={"credential": alice.authenticator.get(await _confirm(world, alice.session))},
    )
    assert r.status_code == 200, r.text
    r = await world.client.post(
        world.url("/v1/passkeys/finish"),
        headers=alice.headers,
        json={"credential": alice.authenticator.create(r.json())},
    )
    assert r.status_code == 200, r.text
    second = next(p for p in alice.authenticator.passkeys.values() if p is not first)
    return alice, first, second


async def _remove(world: World, alice: Any, removed: Any, confirmed_by: Any) -> None:
    """Alice removes one of her passkeys, confirmed by another, from her own session."""
    removed_id = b64url_encode(removed.credential_id)
    options = await _confirm(world, alice.session, change="remove", credential_id=removed_id)
    r = await world.client.request(
        "DELETE",
        world.url(f"/v1/passkeys/{removed_id}"),
        headers=alice.headers,
        json={"credential": alice.authenticator.get(options, passkey=confirmed_by)},
    )
    assert r.status_code == 200, r.text


@pytest.mark.asyncio(loop_scope="session")
async def test_a_passkey_added_with_a_session_ended_meanwhile_is_refused(
    service: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alice has passkeys X (lost: the thief has it and signed in with it) and Z. The
    thief's POST /v1/passkeys/finish (its registration begun with X's confirmation) is
    authenticated by session; meanwhile Alice removes X, which ends the thief's session.
    The finish's transaction holds the session again (it did not: the thief's passkey Y
    was added after the removal that was to lock the thief out), as the provider
    credential changes do under a lock."""
    world, registry = service.world, service.registry
    alice, lost, kept = await _alice_with_two_passkeys(world)

    # The thief signs in with X and begins adding its own passkey Y (confirmed by X).
    thief_session = await _sign_in(world, alice.authenticator, lost)
    thief_headers = {"Authorization": f"Bearer {thief_session}"}
    r = await world.client.post(
        world.url("/v1/passkeys/begin"),
        headers=thief_headers,
        json={
            "credential": alice.authenticator.get(
                await _confirm(world, thief_session), passkey=lost
            )
        },
    )
    assert r.status_code == 200, r.text
    thief_device = SoftAuthenticator(origin=world.origin)
    registration = thief_device.create(r.json())

    authenticate = registry.authenticate_session
    authenticated, release = asyncio.Event(), asyncio.Event()

    async def held(token: str | None) -> str:
        principal_id = await authenticate(token)
        if token == thief_session and not release.is_set():
            authenticated.set()  # the session was live; the finish's transaction is next
            await release.wait()
        return principal_id

    monkeypatch.setattr(registry, "authenticate_session", held)
    finishing = asyncio.ensure_future(
        world.client.post(
            world.url("/v1/passkeys/finish"),
            headers=thief_headers,
            json={"credential": registration},
        )
    )
    try:
        await asyncio.wait_for(authenticated.wait(), 10)
        # Alice removes X, confirmed by Z: the thief's session ends.
        await _remove(world, alice, lost, confirmed_by=kept)
        assert not await registry.pool.fetchval(
            "SELECT count(*) FROM sessions WHERE principal_id = $1 AND token_hash <> $2",
            alice.principal_id,
            hashlib.sha256(alice.session.encode()).digest(),
        )
    finally:
        release.set()
    r = await asyncio.wait_for(finishing, 10)
    r2 = await world.client.get(world.url("/v1/passkeys"), headers=alice.headers)
    listed = {p["credential_id"] for p in r2.json()}
    assert (r.status_code, r.json().get("reason")) == (401, "bad_session"), r.text
    assert listed == {b64url_encode(kept.credential_id)}


# --- recovery against a passkey removal: one lock order ----------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_a_recovery_and_a_passkey_removal_at_once_do_not_deadlock(
    service: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """remove_passkey deletes the human's other sessions and then appends passkey.removed
    to the human's audit chain; recovery_finish appends passkey.recovered to that chain
    and then deletes the human's sessions. Interleaved (the thief, holding passkey X,
    removes Alice's Z while Alice recovers with an admin's code), each waits for what the
    other held: PostgreSQL aborted one with a deadlock (an unmapped 500). Recovery now takes
    the sessions before the chain, as the module's lock order says."""
    world, registry = service.world, service.registry
    alice, stolen, other = await _alice_with_two_passkeys(world)
    thief_session = await _sign_in(world, alice.authenticator, stolen)
    other_id = b64url_encode(other.credential_id)
    removal = alice.authenticator.get(
        await _confirm(world, thief_session, change="remove", credential_id=other_id),
        passkey=stolen,
    )
    code, options = await world.recovery_options(alice.principal_id)
    registration = SoftAuthenticator(origin=world.origin).create(options)

    audit = registry._audit
    deleted, release = asyncio.Event(), asyncio.Event()

    async def held(conn: Any, **event: Any) -> None:
        if event["event"] == "passkey.removed" and not release.is_set():
            deleted.set()  # Alice's sessions are deleted (row locks held); chain next
            await release.wait()
        await audit(conn, **event)

    monkeypatch.setattr(registry, "_audit", held)
    removing = asyncio.ensure_future(
        registry.remove_passkey(alice.principal_id, other_id, removal, session_token=thief_session)
    )
    try:
        await asyncio.wait_for(deleted.wait(), 10)
        recovering = asyncio.ensure_future(registry.recovery_finish(code, registration))
        await asyncio.sleep(0.5)  # it waits on the passkeys the removal holds
    finally:
        release.set()
    results = await asyncio.wait_for(
        asyncio.gather(removing, recovering, return_exceptions=True), 20
    )
    assert not [e for e in results if isinstance(e, BaseException)], results


@pytest.mark.asyncio(loop_scope="session")
async def test_a_passkey_added_while_a_recovery_waits_is_removed_by_it(
    service: InProcess,
) -> None:
    """The thief, holding Alice's lost passkey X and a session it opened, adds its own
    passkey Y; the finish's transaction holds that session and has inserted Y (its audit
    chain's lock held here by a second connection) when Alice's recovery comes. The
    recovery read the passkeys to remove, then waited on the session the finish holds,
    and removed only X: Y, committed meanwhile, stayed and signed in (until 2026-12-01).
    Now the recovery waits for the finish before it reads the passkeys, and removes Y."""
    world, registry = service.world, service.registry
    alice = await world.human("Alice")
    lost = next(iter(alice.authenticator.passkeys.values()))
    thief_session = await _sign_in(world, alice.authenticator, lost)
    r = await world.client.post(
        world.url("/v1/passkeys/begin"),
        headers={"Authorization": f"Bearer {thief_session}"},
        json={
            "credential": alice.authenticator.get(
                await _confirm(world, thief_session), passkey=lost
            )
        },
    )
    assert r.status_code == 200, r.text
    thief_device = SoftAuthenticator(origin=world.origin)
    added = thief_device.create(r.json())
    code, options = await world.recovery_options(alice.principal_id)
    new_device = SoftAuthenticator(origin=world.origin)
    registration = new_device.create(options)

    blocker = await asyncpg.connect(service.url)
    try:
        async with blocker.transaction():
            await blocker.execute(
                "SELECT 1 FROM audit_heads WHERE chain = $1 FOR UPDATE",
                registry.audit.chain_for(alice.principal_id),
            )
            adding = asyncio.ensure_future(
                registry.passkey_finish(alice.principal_id, added, session_token=thief_session)
            )
            await _until_blocked_by(registry.pool, blocker, adding)  # Y inserted, held
            recovering = asyncio.ensure_future(registry.recovery_finish(code, registration))
            await asyncio.sleep(0.5)  # it waits for the finish (on its session, or its lock)
            assert not recovering.done(), recovering
        await asyncio.wait_for(asyncio.gather(adding, recovering), 20)
    finally:
        await blocker.close()
    recovered = {"Authorization": f"Bearer {recovering.result()['session']}"}
    r = await world.client.get(world.url("/v1/passkeys"), headers=recovered)
    assert [p["credential_id"] for p in r.json()] == [b64url_encode(k) for k in new_device.passkeys]
    r = await world.client.post(world.url("/v1/sessions/begin"))
    r = await world.client.post(
        world.url("/v1/sessions/finish"), json={"credential": thief_device.get(r.json())}
    )
    assert (r.status_code, r.json().get("reason")) == (400, "unknown_credential"), r.text


@pytest.mark.asyncio(loop_scope="session")
async def test_an_enrollment_asked_for_by_a_session_ended_meanwhile_is_refused(
    service: InProcess,
) -> None:
    """The same hold as for adding a passkey: the session that authenticated the request
    is read again in the transaction that mints the code, so a session a passkey removal
    ended meanwhile mints none (and nothing is written)."""
    from agentauth.protocol import Unauthenticated

    world, registry = service.world, service.registry
    alice = await world.human("Alice")
    before = await service.events("enrollment.created", f"human:{alice.principal_id}")
    await registry.end_session(alice.session)  # what the removal does to the thief's
    with pytest.raises(Unauthenticated) as refused:
        await registry.create_enrollment(alice.principal_id, session_token=alice.session)
    assert refused.value.reason == "bad_session"
    assert await service.events("enrollment.created", f"human:{alice.principal_id}") == before
    assert not await registry.pool.fetchval(
        "SELECT count(*) FROM enrollments WHERE principal_id = $1", alice.principal_id
    )


@pytest.mark.asyncio(loop_scope="session")
async def test_a_passkey_removal_ends_the_enrollment_codes_not_yet_used(
    service: InProcess,
) -> None:
    """Whoever held a lost passkey may have minted enrollment codes with their session
    before the owner removed it: the removal ends those sessions, and the codes with them
    (a code is the human's, not a session's, so every unused one goes)."""
    world = service.world
    alice, lost, kept = await _alice_with_two_passkeys(world)
    thief = {"Authorization": f"Bearer {await _sign_in(world, alice.authenticator, lost)}"}
    r = await world.client.post(world.url("/v1/enrollments"), headers=thief)
    assert r.status_code == 200, r.text
    code = r.json()["enrollment_code"]

    await _remove(world, alice, lost, confirmed_by=kept)

    key = PrivateKey.generate("ES256")
    r = await world.client.post(
        world.url("/v1/agents"),
        headers={"DPoP": world.proof(key, "POST", "/v1/agents")},
        json={"name": "bot", "public_jwk": key.public_jwk(), "enrollment_code": code},
    )
    assert (r.status_code, r.json().get("reason")) == (403, "bad_enrollment"), r.text
    await world.agent(alice)  # a code minted after the removal works


# --- an answer read after its change committed ---------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_an_approval_whose_answer_cannot_be_read_is_undone_not_left_standing(
    service: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The approval's answer (the new grant) is read in the approval's own transaction: if
    that read fails, the caller's error is the truth, nothing is approved, and the request
    can be approved again. (It was read after the commit: the human was told the approval
    failed while the grant stood, and a retry was refused 409 not_pending.)"""
    import asyncpg.connection

    from agentauth.registry import _service

    world, registry = service.world, service.registry
    human, _, request, credential = await world.signed_request()
    real = asyncpg.connection.Connection.fetchrow
    armed = [True]

    async def fetchrow(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if armed[0] and query.startswith(_service._GRANT_SELECT):
            armed[0] = False
            raise asyncpg.exceptions.ConnectionDoesNotExistError("injected: connection lost")
        return await real(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.connection.Connection, "fetchrow", fetchrow)
    r = await world.client.post(
        world.url(f"/v1/grant-requests/{request['id']}/approval/finish"),
        headers=human.headers,
        json={"credential": credential},
    )
    assert not armed[0], "the injected failure did not fire"
    assert r.status_code == 503, r.text
    assert not await registry.pool.fetchval(
        "SELECT count(*) FROM grants WHERE request_id = $1", request["id"]
    )
    granted = await world.approve(human, request["id"])  # a fresh approval goes through
    assert granted["revoked_at"] is None and granted["document"]["grant_id"] == granted["id"]
