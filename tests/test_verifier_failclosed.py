"""Fail closed: every dependency failure is a deny with a reason, never an allow.

Each test counts fail-opens (allows while a dependency is down): it must be 0. The
verifier runs in-process here (the shard actors are the real Ray actors) so a test can
give it a Redis of its own to stop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest
import pytest_asyncio
from conftest import verifier_settings
from registry_world import World

from agentauth.protocol import (
    Capability,
    Grant,
    PrivateKey,
    b64url_decode,
    create_dpop_proof,
    mint_access_token,
)

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.redis]
API = "https://api.example/v1/things"
READ = {"kind": "read", "resource": "things/1"}


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisProcess:
    """A Redis server of the test's own, to stop and start again."""

    def __init__(self) -> None:
        self.port = _port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server") or "redis-server"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    server = RedisProcess()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def local_verifier(
    world: World, registry_settings: Any, own_redis: RedisProcess
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    from agentauth.deployments.verifier import shard_handles
    from agentauth.verifier import Verifier, create_app

    settings = verifier_settings(
        registry_settings, redis_url=f"redis://127.0.0.1:{own_redis.port}/0"
    )
    verifier = await Verifier.open(settings, shard_handles(settings))
    try:
        transport = httpx.ASGITransport(app=create_app(verifier))
        async with httpx.AsyncClient(transport=transport, base_url="http://verifier") as client:
            yield client, verifier
    finally:
        await verifier.close()


async def _setup(world: World) -> tuple[Any, Any, str]:
    _, agent, provider, grant = await world.setup_grant(
        capabilities=[Capability.read("things/*").to_document()]
    )
    token = (await world.token(agent, grant["id"])).json()["access_token"]
    return agent, provider, token


def _body(key: PrivateKey, token: str) -> dict[str, Any]:
    proof = create_dpop_proof(key, htm="GET", htu=API, now=time.time(), access_token=token)
    return {"token": token, "proof": proof, "method": "GET", "url": API, "action": READ}


async def _ask(
    client: httpx.AsyncClient, provider: Any, body: dict[str, Any]
) -> tuple[dict[str, Any], float]:
    started = time.monotonic()
    r = await client.post("/v1/verify", headers=provider.headers, json=body)
    assert r.status_code == 200, r.text
    return r.json(), time.monotonic() - started


@pytest.mark.asyncio
async def test_redis_down_denies_and_recovers_by_itself(
    world: World, local_verifier: tuple[httpx.AsyncClient, Any], own_redis: RedisProcess
) -> None:
    client, _ = local_verifier
    agent, provider, token = await _setup(world)
    assert (await _ask(client, provider, _body(agent.key, token)))[0]["decision"] == "allow"
    own_redis.stop()
    await asyncio.sleep(1.5)
    fail_opens, slowest = 0, 0.0
    for _ in range(30):
        answer, took = await _ask(client, provider, _body(agent.key, token))
        fail_opens += answer["decision"] == "allow"
        slowest = max(slowest, took)
        assert answer["reason"] == "revocation_state_stale", answer
    assert fail_opens == 0
    assert slowest < 1.0  # bounded: a dead Redis is never waited on for long
    own_redis.start()
    for _ in range(50):
        await asyncio.sleep(0.2)
        if (await _ask(client, provider, _body(agent.key, token)))[0]["decision"] == "allow":
            break
    else:
        pytest.fail("the verifier did not recover after Redis came back")


@pytest.mark.asyncio
async def test_unknown_kid_is_denied(
    world: World, local_verifier: tuple[httpx.AsyncClient, Any]
) -> None:
    client, _ = local_verifier
    agent, provider, token = await _setup(world)
    rogue = PrivateKey.generate(kid="rogue-key")
    claims = json.loads(b64url_decode(token.split(".")[1]))
    grant = Grant(
        grant_id=claims["grant_id"],
        agent_id=claims["sub"],
        principal_id="hum_x",
        provider_id=provider.id,
        audience=claims["aud"],
        capabilities=(Capability.read("things/*"),),
        created_at=0,
    )
    forged = mint_access_token(
        signer=rogue,
        issuer=claims["iss"],
        grant=grant,
        jkt=agent.key.thumbprint,
        receipt_hash=claims["receipt_hash"],
        now=int(time.time()),
        lifetime=60,
    )
    answer, _ = await _ask(client, provider, _body(agent.key, forged))
    assert answer["decision"] == "deny" and answer["reason"] == "invalid_token:unknown_kid"


@pytest.mark.asyncio
async def test_a_retired_signing_key_verifies_nothing_after_its_retirement(
    world: World, local_verifier: tuple[httpx.AsyncClient, Any], db: Any
) -> None:
    """A key leaves every replica when it retires, though no token ever names an unknown kid
    then (a leaked key must stop minting usable tokens after a rotation)."""
    from agentauth.protocol._jws import attach_signature, signing_input

    client, _ = local_verifier
    agent, provider, token = await _setup(world)
    header, claims = (json.loads(b64url_decode(part)) for part in token.split(".")[:2])
    retiring = PrivateKey.generate(kid=f"retiring-{secrets.token_hex(4)}")
    retires_at = int(time.time()) + 4
    await db.execute(
        "INSERT INTO signing_keys (kid, alg, public_jwk, backend, created_at, activates_at,"
        " retires_at) VALUES ($1, 'ES256', $2::jsonb, 'test', 1, 1, $3)",
        # Activated long ago, so the registry never picks it to sign with.
        retiring.kid,
        json.dumps({**retiring.public_key.jwk, "kid": retiring.kid, "alg": "ES256"}),
        retires_at,
    )
    try:
        data = signing_input({**header, "kid": retiring.kid}, claims)
        signed = attach_signature(data, retiring.sign(data))
        answer, _ = await _ask(client, provider, _body(agent.key, signed))
        assert answer["decision"] == "allow", answer
        await asyncio.sleep(max(0.0, retires_at - time.time()) + 1.0)
        answer, _ = await _ask(client, provider, _body(agent.key, signed))
        assert (answer["decision"], answer["reason"]) == ("deny", "invalid_token:unknown_kid")
        # The registry's own key, never retired, still verifies.
        assert (await _ask(client, provider, _body(agent.key, token)))[0]["decision"] == "allow"
    finally:
        await db.execute("DELETE FROM signing_keys WHERE kid = $1", retiring.kid)


@pytest.mark.asyncio
async def test_unreachable_audit_store_and_dead_shard_deny(world: World) -> None:
    import ray

    from agentauth.actors import Check, ShardClient, StateShard

    # A shard whose database is unreachable cannot commit, so it decides nothing.
    blind = (
        ray.remote(StateShard)
        .options(num_cpus=0)
        .remote(index=99, database_url=f"postgresql://postgres@127.0.0.1:{_port()}/none")
    )
    check = Check(
        agent_id="a",
        provider_id="p",
        grant_id="g",
        jkt="k",
        jti="j",
        iat=time.time(),
        action=None,
        envelope=None,
    )
    results = await blind.check_batch.remote([check])
    assert [r.reason for r in results] == ["audit_unavailable"]
    # A dead shard: the client answers deny within its bound, never waits forever.
    client = ShardClient([blind], timeout=0.05)
    ray.kill(blind, no_restart=True)
    for _ in range(100):  # ray.kill is asynchronous: wait until the actor is really gone
        try:
            await blind.ping.remote()
        except ray.exceptions.RayActorError:
            break
        await asyncio.sleep(0.05)
    started = time.monotonic()
    result = await client.check(0, check)
    assert not result.allowed and result.reason in ("state_unavailable", "state_timeout")
    assert time.monotonic() - started < 1.0


@pytest.mark.asyncio
async def test_server_nonces_when_configured(world: World, registry_settings: Any) -> None:
    from agentauth.deployments.verifier import shard_handles
    from agentauth.verifier import Verifier, create_app

    settings = verifier_settings(
        registry_settings, dpop_nonces=True, nonce_secret="a-test-secret-of-enough-length-for-hmac"
    )
    verifier = await Verifier.open(settings, shard_handles(settings))
    try:
        transport = httpx.ASGITransport(app=create_app(verifier))
        async with httpx.AsyncClient(transport=transport, base_url="http://verifier") as client:
            agent, provider, token = await _setup(world)
            answer, _ = await _ask(client, provider, _body(agent.key, token))
            assert answer["decision"] == "deny"
            assert answer["reason"] == "use_dpop_nonce:nonce_required"
            proof = create_dpop_proof(
                agent.key,
                htm="GET",
                htu=API,
                now=time.time(),
                access_token=token,
                nonce=answer["dpop_nonce"],
            )
            body = {"token": token, "proof": proof, "method": "GET", "url": API, "action": READ}
            answer, _ = await _ask(client, provider, body)
            assert answer["decision"] == "allow", answer
    finally:
        await verifier.close()


class _GoneShard:
    """A shard handle whose endpoint cannot be had: the shard is gone."""

    class _Endpoint:
        def remote(self) -> Any:
            async def gone() -> Any:
                raise ConnectionError("no such shard")

            return gone()

    endpoint = _Endpoint()


@pytest.mark.asyncio
async def test_a_deny_its_shard_could_not_record_keeps_its_own_reason(
    world: World, local_verifier: tuple[httpx.AsyncClient, Any]
) -> None:
    """A request denied before the shard (a proof for another URL) still goes to its shard
    to be recorded. When the shard cannot record it, the answer keeps its own reason (a
    retry would be denied the same way) and names no audit event; a request only the
    shard could decide is denied ``state_unavailable``."""
    from agentauth.actors import ShardClient

    client, verifier = local_verifier
    agent, provider, token = await _setup(world)

    def elsewhere() -> dict[str, Any]:
        proof = create_dpop_proof(
            agent.key, htm="GET", htu=API + "/other", now=time.time(), access_token=token
        )
        return {**_body(agent.key, token), "proof": proof}

    recorded, _ = await _ask(client, provider, elsewhere())
    assert recorded["decision"] == "deny" and recorded["audit_event"] is not None
    reason = recorded["reason"]
    assert reason.startswith("invalid_dpop_proof")

    own = verifier.shards
    verifier.shards = ShardClient([_GoneShard()] * own.shards, timeout=0.05)
    try:
        unrecorded, _ = await _ask(client, provider, elsewhere())
        undecided, _ = await _ask(client, provider, _body(agent.key, token))
    finally:
        verifier.shards.close()
        verifier.shards = own
    assert (unrecorded["decision"], unrecorded["reason"]) == ("deny", reason)
    assert unrecorded["audit_event"] is None
    assert (undecided["decision"], undecided["reason"]) == ("deny", "state_unavailable")
    assert undecided["audit_event"] is None


@pytest.mark.asyncio
async def test_a_revocation_committed_after_a_later_one_is_still_polled(
    migrated_database_url: str,
) -> None:
    """Revocation ids are taken at insert, and a revocation's transaction may commit after
    one with a higher id (the registry's also waits for the audit chain's lock). The poll,
    the backstop when a pub/sub message is lost, must still find the earlier one."""
    import asyncpg

    from agentauth.verifier._service import _Revocations

    def token(jti: str) -> Any:
        return SimpleNamespace(claims=SimpleNamespace(jti=jti, grant_id="grt_none", sub="agt_none"))

    early, late = f"tok_early_{secrets.token_hex(4)}", f"tok_late_{secrets.token_hex(4)}"
    pool = await asyncpg.create_pool(migrated_database_url, min_size=1, max_size=2)
    slow = await asyncpg.connect(migrated_database_url)
    try:
        revocations = _Revocations(
            pool, cast(Any, None), cast(Any, None), also=lambda: asyncio.sleep(0)
        )
        await revocations._poll()
        insert = "INSERT INTO revocations (kind, target, revoked_by) VALUES ('token', $1, 'test')"
        async with slow.transaction():
            await slow.execute(insert, early)  # takes the lower id, commits last
            await pool.execute(insert, late)
            await revocations._poll()
            assert revocations.revoked(token(late)) and not revocations.revoked(token(early))
        await revocations._poll()
        assert revocations.revoked(token(early))
    finally:
        await slow.close()
        await pool.close()


@pytest.mark.asyncio
async def test_a_revocation_that_arrives_during_the_grant_lookup_counts(
    world: World, local_verifier: tuple[httpx.AsyncClient, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token is revoked while its request waits on the grant lookup (a slow database):
    the revocation reaches the replica before the decision, so the decision is a deny."""
    client, verifier = local_verifier
    agent, provider, token = await _setup(world)
    jti = json.loads(b64url_decode(token.split(".")[1]))["jti"]
    lookup = verifier._grant_active

    async def slow_lookup(grant_id: str) -> bool:
        active = await lookup(grant_id)
        # The token is revoked meanwhile, and the replica learns of it (here by its poll).
        await verifier.pool.execute(
            "INSERT INTO revocations (kind, target, revoked_by) VALUES ('token', $1, 't')", jti
        )
        await verifier.revocations._poll()
        return active

    monkeypatch.setattr(verifier, "_grant_active", slow_lookup)
    answer, _ = await _ask(client, provider, _body(agent.key, token))
    assert (answer["decision"], answer["reason"]) == ("deny", "revoked")


@pytest.mark.asyncio
async def test_a_grant_revocation_past_the_replicas_memory_still_denies(
    world: World, local_verifier: tuple[httpx.AsyncClient, Any]
) -> None:
    """A replica forgets a revocation once every token issued before it has expired (the
    token check refuses them by then). Nothing rests on that memory alone: the grant's own
    status still says revoked, and the registry issues no new token for it, however old
    the revocation."""
    from agentauth.verifier._service import _REVOCATION_MEMORY

    client, verifier = local_verifier
    human, agent, provider, grant = await world.setup_grant(
        capabilities=[Capability.read("things/*").to_document()]
    )
    token = (await world.token(agent, grant["id"])).json()["access_token"]
    r = await world.client.post(
        world.url("/v1/revocations"),
        headers=human.headers,
        json={"kind": "grant", "target": grant["id"]},
    )
    assert r.status_code == 200
    await asyncio.sleep(0.5)  # the message, and a poll, reach the replica
    answer, _ = await _ask(client, provider, _body(agent.key, token))
    assert (answer["decision"], answer["reason"]) == ("deny", "revoked")

    # As if the revocation were older than any token can live: backdated in the table (so
    # no poll brings it back) and past its time in the replica's memory.
    await verifier.pool.execute(
        "UPDATE revocations SET revoked_at = now() - $2 * interval '1 second'"
        " WHERE kind = 'grant' AND target = $1",
        grant["id"],
        _REVOCATION_MEMORY + 60,
    )
    verifier.revocations.forget_expired(time.time() + _REVOCATION_MEMORY + 1)
    await verifier.revocations._poll()
    answer, _ = await _ask(client, provider, _body(agent.key, token))
    assert (answer["decision"], answer["reason"]) == ("deny", "grant_inactive")
    r = await world.token(agent, grant["id"])
    assert r.status_code == 403 and r.json()["reason"] == "grant_revoked"


@pytest.mark.asyncio
async def test_a_hung_lookup_is_a_deny_within_the_lookup_timeout(
    world: World, local_verifier: tuple[httpx.AsyncClient, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grant lookup that never returns (Redis or PostgreSQL unreachable without a reset:
    a dropped network, not a dead process) is a deny once ``lookup_timeout`` has passed,
    not a wait for a connect or command timeout of seconds."""
    client, verifier = local_verifier
    agent, provider, token = await _setup(world)

    async def hangs(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(30)

    monkeypatch.setattr(verifier.redis, "mget", hangs)
    answer, took = await _ask(client, provider, _body(agent.key, token))
    assert (answer["decision"], answer["reason"]) == ("deny", "dependency_unavailable")
    assert verifier.settings.lookup_timeout <= took < verifier.settings.lookup_timeout + 1.0


@pytest.mark.asyncio
async def test_unknown_provider_ids_reload_the_provider_table_at_most_once_a_second(
    world: World, local_verifier: tuple[httpx.AsyncClient, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unknown provider id costs nothing to send; each used to reload the whole provider
    table. Now requests share one reload a second, and a provider registered meanwhile is
    still found."""
    client, verifier = local_verifier
    loads = 0
    load = verifier._load_providers

    async def counted() -> None:
        nonlocal loads
        loads += 1
        await load()

    monkeypatch.setattr(verifier, "_load_providers", counted)
    await asyncio.sleep(verifier.settings.key_refresh_min_interval)

    def basic(provider_id: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{provider_id}:x".encode()).decode()}

    unknown = await asyncio.gather(
        *(client.post("/v1/verify", headers=basic(f"prov_no_{i}"), json={}) for i in range(30))
    )
    assert {r.status_code for r in unknown} == {401}
    assert loads == 1
    # A provider registered since is found: by the revocation poll, which reloads the table
    # when a provider changes, or by its first request, which waits for the next reload.
    agent, provider, token = await _setup(world)
    answer, _ = await _ask(client, provider, _body(agent.key, token))
    assert answer["decision"] == "allow"
    assert loads >= 2


@pytest.mark.asyncio
async def test_a_replica_that_cannot_read_provider_credentials_denies_until_it_can(
    world: World, local_verifier: tuple[httpx.AsyncClient, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rotated or ended provider credential reaches a replica through its revocation
    poll; a replica that cannot read the provider table must not go on trusting the copy it
    has, so its poll fails and it denies as stale, and recovers once the read works."""
    client, verifier = local_verifier
    agent, provider, token = await _setup(world)
    assert (await _ask(client, provider, _body(agent.key, token)))[0]["decision"] == "allow"
    sync = verifier.revocations._also

    async def broken() -> None:
        raise ConnectionError("provider table unreadable")

    monkeypatch.setattr(verifier.revocations, "_also", broken)
    await asyncio.sleep(verifier.settings.revocation_max_staleness + 0.5)
    answer, _ = await _ask(client, provider, _body(agent.key, token))
    assert (answer["decision"], answer["reason"]) == ("deny", "revocation_state_stale")
    monkeypatch.setattr(verifier.revocations, "_also", sync)
    await asyncio.sleep(4 * verifier.settings.revocation_poll)
    assert (await _ask(client, provider, _body(agent.key, token)))[0]["decision"] == "allow"


@pytest.mark.asyncio
async def test_introspection_answers_with_the_token_its_decision_checked(
    world: World, local_verifier: tuple[httpx.AsyncClient, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An allow is committed and its proof spent: the introspection answer is built from
    the token that decision checked. (It used to check the token a second time, which at
    the token's expiry could turn an allow already committed into a 401.)"""
    from agentauth.protocol import InvalidToken

    client, verifier = local_verifier
    agent, provider, token = await _setup(world)
    check = verifier.tokens.verify
    calls = 0

    def expires_after_one_check(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise InvalidToken("token expired", reason="expired")
        return check(*args, **kwargs)

    monkeypatch.setattr(verifier.tokens, "verify", expires_after_one_check)
    r = await client.post("/v1/introspect", headers=provider.headers, json=_body(agent.key, token))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["active"] is True and answer["audit_event"] is not None
    assert answer["sub"] == agent.id and calls == 1


@pytest.mark.asyncio
async def test_an_outage_denial_waits_briefly_for_its_record_and_is_still_recorded(
    world: World,
    local_verifier: tuple[httpx.AsyncClient, Any],
    db: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A denial the replica makes because a dependency failed (here: its revocation state
    gone stale) goes to the shard only to be recorded. It waits for that record at most
    ``outage_record_wait``: a shard slow in the outage (its database may be what is down)
    must not hold the answer to its own timeout. The record still lands."""
    client, verifier = local_verifier
    agent, provider, token = await _setup(world)
    grant_id = json.loads(b64url_decode(token.split(".")[1]))["grant_id"]

    async def recorded() -> int:
        return int(
            await db.fetchval(
                "SELECT count(*) FROM audit_events WHERE grant_id = $1 AND event = 'verify.deny'"
                " AND body::jsonb -> 'data' ->> 'reason' = 'revocation_state_stale'",
                grant_id,
            )
        )

    monkeypatch.setattr(verifier.revocations, "fresh", lambda: False)
    # A shard in time: the answer names the event that records it.
    patient = verifier.settings.model_copy(update={"outage_record_wait": 2.0})
    monkeypatch.setattr(verifier, "settings", patient)
    answer, _ = await _ask(client, provider, _body(agent.key, token))
    assert (answer["decision"], answer["reason"]) == ("deny", "revocation_state_stale")
    assert answer["audit_event"] is not None
    assert await recorded() == 1

    # A slow shard: answered after the short wait, without an event id; recorded later.
    monkeypatch.setattr(
        verifier, "settings", patient.model_copy(update={"outage_record_wait": 0.01})
    )
    check = verifier.shards.check

    async def slow(shard: int, c: Any) -> Any:
        await asyncio.sleep(0.5)
        return await check(shard, c)

    monkeypatch.setattr(verifier.shards, "check", slow)
    answer, took = await _ask(client, provider, _body(agent.key, token))
    assert (answer["decision"], answer["reason"]) == ("deny", "revocation_state_stale")
    assert answer["audit_event"] is None
    assert took < 0.4  # not the shard's 0.5 s
    for _ in range(50):
        await asyncio.sleep(0.1)
        if await recorded() == 2:
            break
    assert await recorded() == 2
