"""The verifier on Ray Serve (2 replicas) with shard actors, PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from registry_world import Agent, Human, Provider, World

from agentauth.protocol import Capability, PrivateKey, create_dpop_proof

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.redis]

API = "https://api.example/v1/things"


@dataclass
class Setup:
    human: Human
    agent: Agent
    provider: Provider
    grant: dict[str, Any]
    token: str


@pytest_asyncio.fixture(loop_scope="session")
async def vworld(world: World, verifier_base: str) -> AsyncIterator[World]:
    world.verifier = verifier_base
    yield world


async def setup(
    world: World,
    *,
    capabilities: list[dict[str, Any]] | None = None,
    envelope: dict[str, Any] | None = None,
) -> Setup:
    human, agent, provider, grant = await world.setup_grant(
        capabilities=capabilities or [Capability.read("things/*").to_document()],
        envelope=envelope,
    )
    r = await world.token(agent, grant["id"])
    assert r.status_code == 200, r.text
    return Setup(human, agent, provider, grant, r.json()["access_token"])


def request_body(
    s: Setup,
    action: dict[str, Any],
    *,
    key: PrivateKey | None = None,
    token: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    token = token or s.token
    proof = create_dpop_proof(
        key or s.agent.key, htm="GET", htu=API, now=time.time(), access_token=token
    )
    return {"token": token, "proof": proof, "method": "GET", "url": API, "action": action, **extra}


async def verify(world: World, provider: Provider, body: dict[str, Any]) -> dict[str, Any]:
    r = await world.client.post(world.verifier + "/v1/verify", headers=provider.headers, json=body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


READ = {"kind": "read", "resource": "things/1"}


@pytest.mark.asyncio
async def test_happy_path_allows_and_records_the_decision(
    vworld: World, db: asyncpg.Connection
) -> None:
    s = await setup(vworld, envelope={"rate_limits": [{"max_count": 10, "window_seconds": 3600}]})
    answer = await verify(vworld, s.provider, request_body(s, READ))
    assert answer["decision"] == "allow", answer["reason"]
    assert answer["agent_id"] == s.agent.id and answer["grant_id"] == s.grant["id"]
    assert answer["remaining"]["rate"] == [9]
    chain, seq = answer["audit_event"].split(":")
    row = await db.fetchrow(
        "SELECT event, grant_id FROM audit_events WHERE chain = $1 AND seq = $2", chain, int(seq)
    )
    assert row["event"] == "verify.allow" and row["grant_id"] == s.grant["id"]
    # Outside the capability: denied, and that is recorded too.
    answer = await verify(
        vworld, s.provider, request_body(s, {"kind": "write", "resource": "things/1"})
    )
    assert answer["decision"] == "deny" and answer["reason"] == "insufficient_capability"
    assert answer["audit_event"]


@pytest.mark.asyncio
async def test_provider_must_authenticate_and_bad_input_is_a_400(vworld: World) -> None:
    s = await setup(vworld)
    url = vworld.verifier + "/v1/verify"
    r = await vworld.client.post(url, json=request_body(s, READ))
    assert r.status_code == 401
    r = await vworld.client.post(
        url, json=request_body(s, READ), headers={"Authorization": "Basic Zm9vOmJhcg=="}
    )
    assert r.status_code == 401
    r = await vworld.client.post(url, json={"token": 1}, headers=s.provider.headers)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    r = await vworld.client.post(
        url,
        content=b'{"token": "a", "token": "b"}',
        headers={**s.provider.headers, "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    # The route validates its body by hand (not through FastAPI): the same error shapes.
    for content, reason in ((b"", "bad_json"), (b"[1, 2]", "schema"), (b"{not json", "bad_json")):
        r = await vworld.client.post(
            url,
            content=content,
            headers={**s.provider.headers, "Content-Type": "application/json"},
        )
        assert r.status_code == 400, (content, r.text)
        assert (r.json()["error"], r.json().get("reason")) == ("invalid_request", reason)


@pytest.mark.asyncio
async def test_each_envelope_rule(vworld: World) -> None:
    # Rate: 2 per hour.
    s = await setup(vworld, envelope={"rate_limits": [{"max_count": 2, "window_seconds": 3600}]})
    reasons = [
        (await verify(vworld, s.provider, request_body(s, READ)))["reason"] for _ in range(3)
    ]
    assert reasons == ["ok", "ok", "rate_limited"]
    # Time window: only a window that excludes now.
    hour = time.gmtime().tm_hour
    other = (hour + 2) % 24
    window = {
        "days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"],
        "start": f"{other:02d}:00",
        "end": f"{other:02d}:30",
    }
    s = await setup(vworld, envelope={"time_windows": [window], "timezone": "UTC"})
    assert (await verify(vworld, s.provider, request_body(s, READ)))[
        "reason"
    ] == "outside_time_window"
    # Per-transaction maximum, cumulative limit and step-up.
    pay = Capability.transact("payments", max_amount="500", currency="USD").to_document()
    s = await setup(
        vworld,
        capabilities=[pay],
        envelope={
            "max_per_transaction": {"amount": "100", "currency": "USD"},
            "spend_limits": [{"amount": "150", "currency": "USD", "period": "day"}],
            "step_up_threshold": {"amount": "80", "currency": "USD"},
        },
    )
    tx = {"kind": "transact", "resource": "payments", "currency": "USD", "payee": "acme"}
    assert (await verify(vworld, s.provider, request_body(s, {**tx, "amount": "120"})))[
        "reason"
    ] == "transaction_limit_exceeded"
    assert (await verify(vworld, s.provider, request_body(s, {**tx, "amount": "70"})))[
        "reason"
    ] == "ok"
    assert (await verify(vworld, s.provider, request_body(s, {**tx, "amount": "90"})))[
        "reason"
    ] == "step_up_required"
    assert (await verify(vworld, s.provider, request_body(s, {**tx, "amount": "60"})))[
        "reason"
    ] == "ok"
    assert (await verify(vworld, s.provider, request_body(s, {**tx, "amount": "30"})))[
        "reason"
    ] == "cumulative_limit_exceeded"


@pytest.mark.asyncio
async def test_step_up_reference_is_bound_and_single_use(vworld: World) -> None:
    pay = Capability.transact("payments", max_amount="500", currency="USD").to_document()
    s = await setup(
        vworld,
        capabilities=[pay],
        envelope={"step_up_threshold": {"amount": "50", "currency": "USD"}},
    )
    r = await vworld.as_agent(
        s.agent,
        "POST",
        "/v1/step-ups",
        json={
            "grant_id": s.grant["id"],
            "resource": "payments",
            "amount": "120",
            "currency": "USD",
            "payee": "acme",
        },
    )
    step = r.json()
    r = await vworld.client.post(
        vworld.url(f"/v1/step-ups/{step['id']}/approval/begin"), headers=s.human.headers
    )
    credential = s.human.authenticator.get(r.json()["options"])
    r = await vworld.client.post(
        vworld.url(f"/v1/step-ups/{step['id']}/approval/finish"),
        headers=s.human.headers,
        json={"credential": credential},
    )
    assert r.status_code == 200, r.text
    ref = (await vworld.as_agent(s.agent, "GET", f"/v1/step-ups/{step['id']}")).json()[
        "approval_ref"
    ]
    tx = {"kind": "transact", "resource": "payments", "currency": "USD", "payee": "acme"}
    # Another amount or payee than approved: refused.
    assert (
        await verify(vworld, s.provider, request_body(s, {**tx, "amount": "130"}, step_up_ref=ref))
    )["reason"] == "step_up_invalid"
    assert (
        await verify(
            vworld,
            s.provider,
            request_body(s, {**tx, "amount": "120", "payee": "evil"}, step_up_ref=ref),
        )
    )["reason"] == "step_up_invalid"
    assert (
        await verify(vworld, s.provider, request_body(s, {**tx, "amount": "120"}, step_up_ref=ref))
    )["decision"] == "allow"
    again = await verify(
        vworld, s.provider, request_body(s, {**tx, "amount": "120"}, step_up_ref=ref)
    )
    assert again["reason"] == "step_up_invalid"


@pytest.mark.asyncio
async def test_1000_concurrent_copies_of_one_proof_allow_exactly_once(vworld: World) -> None:
    s = await setup(vworld)
    body = request_body(s, READ)
    limit = asyncio.Semaphore(64)

    async def once() -> str:
        async with limit:
            return (await verify(vworld, s.provider, body))["decision"]

    decisions = await asyncio.gather(*(once() for _ in range(1000)))
    assert decisions.count("allow") == 1, decisions.count("allow")


@pytest.mark.asyncio
async def test_concurrent_transactions_never_exceed_the_cumulative_limit(vworld: World) -> None:
    pay = Capability.transact("payments", max_amount="100", currency="USD").to_document()
    s = await setup(
        vworld,
        capabilities=[pay],
        envelope={"spend_limits": [{"amount": "500", "currency": "USD", "period": "day"}]},
    )
    amounts = [str(7 + (i % 13)) for i in range(100)]  # sums to ~1,300 > 500

    async def one(amount: str) -> tuple[str, int]:
        body = request_body(
            s, {"kind": "transact", "resource": "payments", "amount": amount, "currency": "USD"}
        )
        return (await verify(vworld, s.provider, body))["decision"], int(amount)

    results = await asyncio.gather(*(one(a) for a in amounts))
    allowed = sum(amount for decision, amount in results if decision == "allow")
    assert allowed <= 500
    assert allowed >= 500 - 19  # it does spend up to the limit, not stop early


@pytest.mark.asyncio
async def test_revocation_reaches_every_replica_within_a_second(vworld: World) -> None:
    s = await setup(vworld)
    assert (await verify(vworld, s.provider, request_body(s, READ)))["decision"] == "allow"
    r = await vworld.client.post(
        vworld.url("/v1/revocations"),
        headers=s.human.headers,
        json={"kind": "grant", "target": s.grant["id"]},
    )
    assert r.status_code == 200
    await asyncio.sleep(1.0)
    answers = await asyncio.gather(
        *(verify(vworld, s.provider, request_body(s, READ)) for _ in range(30))
    )
    assert {a["reason"] for a in answers} == {"revoked"}


async def answers_on_every_replica(world: World, s: Setup, provider: Provider) -> set[Any]:
    """30 verifications at once with this credential (HAProxy spreads them over both
    replicas): the decisions, or the reason of a 401 or 403."""

    async def one() -> Any:
        r = await world.client.post(
            world.verifier + "/v1/verify", headers=provider.headers, json=request_body(s, READ)
        )
        if r.status_code in (401, 403):
            return r.status_code, r.json()["reason"]
        assert r.status_code == 200, r.text
        return r.json()["decision"]

    return set(await asyncio.gather(*(one() for _ in range(30))))


async def rotate_secret(world: World, provider: Provider, overlap: int) -> Provider:
    r = await world.client.post(
        world.url(f"/v1/providers/{provider.id}/secret"),
        headers=world.admin,
        json={"previous_valid_for": overlap},
    )
    assert r.status_code == 200, r.text
    return Provider(provider.id, provider.audience, r.json()["secret"])


@pytest.mark.asyncio
async def test_a_provider_secret_rotation_reaches_every_replica_within_a_second(
    vworld: World,
) -> None:
    s = await setup(vworld)

    async def after(seconds: float, refused: list[Provider], allowed: list[Provider]) -> None:
        await asyncio.sleep(seconds)
        for provider in refused:
            assert await answers_on_every_replica(vworld, s, provider) == {
                (401, "bad_provider_credential")
            }
        for provider in allowed:
            assert await answers_on_every_replica(vworld, s, provider) == {"allow"}

    old = s.provider
    await after(0.0, [], [old])
    # No overlap (a leaked secret): the old one is refused everywhere, the new one works.
    new = await rotate_secret(vworld, old, 0)
    await after(1.0, [old], [new])

    # With an overlap both work, until the overlap is ended early...
    newer = await rotate_secret(vworld, new, 600)
    await after(1.0, [], [new, newer])
    r = await vworld.client.delete(
        vworld.url(f"/v1/providers/{old.id}/secret/previous"), headers=newer.headers
    )
    assert r.status_code == 200, r.text
    await after(1.0, [new], [newer])

    # ... or runs out, which the replicas enforce by the clock with nothing to reload.
    newest = await rotate_secret(vworld, newer, 2)
    await after(1.0, [], [newer])
    await after(1.5, [newer], [newest])


@pytest.mark.asyncio
async def test_a_provider_suspension_reaches_every_replica_within_a_second(
    vworld: World,
) -> None:
    s = await setup(vworld)
    path = vworld.url(f"/v1/providers/{s.provider.id}/suspension")
    assert await answers_on_every_replica(vworld, s, s.provider) == {"allow"}
    r = await vworld.client.put(path, headers=vworld.admin, json={"reason": "audit"})
    assert r.status_code == 200, r.text
    await asyncio.sleep(1.0)
    assert await answers_on_every_replica(vworld, s, s.provider) == {(403, "provider_suspended")}
    # Introspection too; and a wrong secret still learns nothing of the suspension.
    r = await vworld.client.post(
        vworld.verifier + "/v1/introspect", headers=s.provider.headers, json=request_body(s, READ)
    )
    assert (r.status_code, r.json()["reason"]) == (403, "provider_suspended")
    wrong = Provider(s.provider.id, s.provider.audience, "psk_wrong")
    assert await answers_on_every_replica(vworld, s, wrong) == {(401, "bad_provider_credential")}

    r = await vworld.client.delete(path, headers=vworld.admin)
    assert r.status_code == 200, r.text
    await asyncio.sleep(1.0)
    assert await answers_on_every_replica(vworld, s, s.provider) == {"allow"}


@pytest.mark.asyncio
async def test_stolen_token_and_wrong_audience_are_denied(vworld: World) -> None:
    s = await setup(vworld)
    thief = PrivateKey.generate()
    stolen = await verify(vworld, s.provider, request_body(s, READ, key=thief))
    assert stolen["decision"] == "deny" and "jkt_mismatch" in stolen["reason"]
    other = await vworld.provider()
    elsewhere = await verify(vworld, other, request_body(s, READ))
    assert elsewhere["decision"] == "deny" and "wrong_audience" in elsewhere["reason"]
    forged = s.token[:-4] + ("AAAA" if not s.token.endswith("AAAA") else "BBBB")
    bad = await verify(vworld, s.provider, request_body(s, READ, token=forged))
    assert bad["decision"] == "deny"


@pytest.mark.asyncio
async def test_killing_a_shard_lets_no_replay_through_and_loses_no_allow(
    vworld: World, db: asyncpg.Connection
) -> None:
    import ray

    from agentauth.actors import shard_for

    s = await setup(vworld)
    shard = shard_for(s.agent.id, 2)
    handle = ray.get_actor(f"agentauth-shard-{shard}", namespace="agentauth")
    used = request_body(s, READ)
    assert (await verify(vworld, s.provider, used))["decision"] == "allow"

    async def traffic() -> list[dict[str, Any]]:
        answers = []
        for _ in range(40):
            answers.append(await verify(vworld, s.provider, request_body(s, READ)))
            answers.append(await verify(vworld, s.provider, used))  # a replay, always
            await asyncio.sleep(0.05)
        return answers

    task = asyncio.create_task(traffic())
    await asyncio.sleep(0.5)
    ray.kill(handle, no_restart=False)  # Ray restarts it; its memory is gone
    answers = await task
    replays = answers[1::2]
    assert all(a["decision"] == "deny" for a in replays), [a["reason"] for a in replays]
    # Every allow a client received has its committed audit row.
    allows = [a for a in answers if a["decision"] == "allow"]
    for answer in allows:
        chain, seq = answer["audit_event"].split(":")
        assert (
            await db.fetchval(
                "SELECT count(*) FROM audit_events WHERE chain = $1 AND seq = $2", chain, int(seq)
            )
            == 1
        )
    # And it recovers by itself: fresh proofs are allowed again, on every replica (each
    # has its own link to the new shard; the tests after this one use them all).
    for _ in range(100):
        if await answers_on_every_replica(vworld, s, s.provider) == {"allow"}:
            break
        await asyncio.sleep(0.2)
    else:
        pytest.fail("the shard did not recover")


@pytest.mark.asyncio
async def test_introspection_answers_active_only_when_every_check_passes(vworld: World) -> None:
    s = await setup(vworld)
    url = vworld.verifier + "/v1/introspect"
    r = await vworld.client.post(url, headers=s.provider.headers, json=request_body(s, READ))
    assert r.status_code == 200
    body = r.json()
    assert body["active"] is True and body["sub"] == s.agent.id
    assert body["cnf"] == {"jkt": s.agent.key.thumbprint} and body["token_type"] == "DPoP"
    thief = PrivateKey.generate()
    r = await vworld.client.post(
        url, headers=s.provider.headers, json=request_body(s, READ, key=thief)
    )
    assert r.json()["active"] is False and "sub" not in r.json()


@pytest.mark.asyncio
async def test_stats_show_each_provider_only_its_own_decisions(vworld: World) -> None:
    """/v1/stats counts the caller's decisions only, whichever replica answers: a provider
    that asked nothing sees none, though other tests' providers were decided on both."""
    s = await setup(vworld)
    assert (await verify(vworld, s.provider, request_body(s, READ)))["reason"] == "ok"
    write = {"kind": "write", "resource": "things/1"}
    denied = await verify(vworld, s.provider, request_body(s, write))
    assert denied["reason"] == "insufficient_capability"
    quiet = await vworld.provider()
    url = vworld.verifier + "/v1/stats"
    for _ in range(8):  # one after another: both replicas answer some
        mine = await vworld.client.get(url, headers=s.provider.headers)
        theirs = await vworld.client.get(url, headers=quiet.headers)
        assert (mine.status_code, theirs.status_code) == (200, 200), (mine.text, theirs.text)
        assert theirs.json()["decisions"] == {}
        counted = mine.json()["decisions"]
        assert set(counted) <= {"ok", "insufficient_capability"}, counted
        assert sum(counted.values()) <= 2, counted
        assert {"batches", "checks"} <= theirs.json().keys()  # the replica's, for everyone


@pytest.mark.asyncio
async def test_decision_chains_are_checkpointed_and_verify(
    vworld: World, db: asyncpg.Connection
) -> None:
    from agentauth.protocol import AuditEvent, KeySet, verify_chain, verify_checkpoint

    s = await setup(vworld)
    for _ in range(3):
        await verify(vworld, s.provider, request_body(s, READ))
    r = await vworld.client.post(vworld.url("/v1/admin/checkpoints"), headers=vworld.admin)
    assert r.status_code == 200
    keys = KeySet.from_jwks((await vworld.client.get(vworld.url("/.well-known/jwks.json"))).json())
    for chain in ("verifier-0", "verifier-1"):
        rows = await db.fetch("SELECT body FROM audit_events WHERE chain = $1 ORDER BY seq", chain)
        head = verify_chain((AuditEvent.from_canonical(r["body"]) for r in rows), chain=chain)
        signed = await db.fetchval(
            "SELECT signed FROM audit_checkpoints WHERE chain = $1 ORDER BY size DESC LIMIT 1",
            chain,
        )
        checkpoint = verify_checkpoint(signed, keys=keys)
        assert checkpoint.size <= head.size
        prefix = verify_chain(
            (AuditEvent.from_canonical(r["body"]) for r in rows[: checkpoint.size]), chain=chain
        )
        assert prefix.root == checkpoint.root_bytes()


@pytest.mark.asyncio
async def test_grant_usage_reflects_committed_decisions(vworld: World) -> None:
    pay = Capability.transact("payments", max_amount="100", currency="USD").to_document()
    s = await setup(
        vworld,
        capabilities=[pay],
        envelope={
            "rate_limits": [{"max_count": 10, "window_seconds": 3600}],
            "spend_limits": [{"amount": "200", "currency": "USD", "period": "day"}],
        },
    )
    tx = {"kind": "transact", "resource": "payments", "currency": "USD"}
    for amount in ("30", "45"):
        assert (await verify(vworld, s.provider, request_body(s, {**tx, "amount": amount})))[
            "decision"
        ] == "allow"
    assert (await verify(vworld, s.provider, request_body(s, {**tx, "amount": "500"})))[
        "decision"
    ] == "deny"
    r = await vworld.client.get(
        vworld.url(f"/v1/grants/{s.grant['id']}/usage"), headers=s.human.headers
    )
    usage = r.json()
    assert usage["rate"] == [{"max_count": 10, "window_seconds": 3600, "used": 2}]
    assert usage["spend"][0]["used"] == "75"
    assert (
        sum(b["allow"] for b in usage["series"]) == 2
        and sum(b["deny"] for b in usage["series"]) == 1
    )
    other = await vworld.human("Mallory")
    r = await vworld.client.get(
        vworld.url(f"/v1/grants/{s.grant['id']}/usage"), headers=other.headers
    )
    assert r.status_code == 404


@pytest.mark.asyncio
async def test_grant_usage_shows_a_voided_allow_as_the_deny_its_provider_got(
    vworld: World,
) -> None:
    """An allow whose provider was answered ``state_timeout`` (its shard call overran) gets
    a ``verify.void`` on the chain: the series shows what the provider was told, while
    the limits still count what the allow reserved, as the shard does."""
    import ray

    from agentauth.actors import Check

    s = await setup(vworld, envelope={"rate_limits": [{"max_count": 10, "window_seconds": 3600}]})
    first, second = [await verify(vworld, s.provider, request_body(s, READ)) for _ in range(2)]
    assert first["decision"] == second["decision"] == "allow"
    chain = first["audit_event"].rsplit(":", 1)[0]
    shard = ray.get_actor(f"agentauth-shard-{chain.removeprefix('verifier-')}", "agentauth")
    # What a replica sends when that answer comes back too late (ShardClient._void).
    void = Check(
        agent_id=s.agent.id,
        provider_id=s.provider.id,
        grant_id=s.grant["id"],
        deny="state_timeout",
        voids=first["audit_event"],
    )
    [recorded] = await shard.check_batch.remote([void])
    assert (recorded.allowed, recorded.reason) == (False, "state_timeout")
    assert recorded.audit_event.startswith(chain + ":")
    r = await vworld.client.get(
        vworld.url(f"/v1/grants/{s.grant['id']}/usage"), headers=s.human.headers
    )
    usage = r.json()
    assert usage["rate"] == [{"max_count": 10, "window_seconds": 3600, "used": 2}]
    series = usage["series"]
    assert (sum(b["allow"] for b in series), sum(b["deny"] for b in series)) == (1, 1)


@pytest.mark.asyncio(loop_scope="session")
async def test_verifier_replicas_run_with_the_collector_settled(vworld: World) -> None:
    """Each replica, once open, has frozen what it started with and makes full collections
    rare: its caches' objects would otherwise be walked by one every few thousand new
    tokens, a pause of tens of milliseconds (docs/verifier-bench.md)."""
    import ray

    from agentauth.deployments.verifier import FULL_COLLECTION_AFTER

    replicas = [
        actor
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith("SERVE_REPLICA::verifier#")
    ]
    assert len(replicas) == 2
    for actor in replicas:
        handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
        # A lambda travels by value (a function of this module would be imported there).
        threshold, frozen = await handle.__ray_call__.remote(
            lambda _: (__import__("gc").get_threshold(), __import__("gc").get_freeze_count())
        )
        assert threshold[2] == FULL_COLLECTION_AFTER > 10  # Python's default is 10
        assert frozen > 10_000  # Ray, Serve, FastAPI and the verifier, at least
