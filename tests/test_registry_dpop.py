"""The registry's agent side against proofs and callers it must refuse (in process, real
PostgreSQL and Redis, no Ray): what is refused, in which order, and that a refusal writes
nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from registry_inprocess import Opened, registry_in_process
from registry_world import Agent as WorldAgent
from registry_world import World

from agentauth.protocol import Capability, Forbidden, PrivateKey, b64url_decode, b64url_encode
from agentauth.registry._models import GrantRequestIn, StepUpIn
from agentauth.registry._service import Agent
from agentauth.sdk import AgentAuthClient

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def service(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Opened]:
    data_dir = tmp_path_factory.mktemp("registry")
    async with registry_in_process(database_url, redis_url, data_dir, prefix="dpop") as opened:
        yield opened


def forged(proof: str) -> str:
    """The proof with its signature's first byte changed: no key signed this one."""
    header, claims, signature = proof.split(".")
    raw = b64url_decode(signature)
    return f"{header}.{claims}.{b64url_encode(bytes([raw[0] ^ 1]) + raw[1:])}"


def refused(r: httpx.Response, status: int, error: str, reason: str) -> None:
    assert r.status_code == status, r.text
    assert (r.json()["error"], r.json()["reason"]) == (error, reason), r.text


@pytest.mark.asyncio(loop_scope="session")
async def test_a_key_no_agent_has_is_refused_before_its_signature_is_checked(
    service: Opened,
) -> None:
    w = service.world
    agent = await w.agent(await w.human())
    stranger = PrivateKey.generate("ES256")
    before = await service.counts()
    r = await w.client.get(
        w.url("/v1/grants"), headers={"DPoP": forged(w.proof(stranger, "GET", "/v1/grants"))}
    )
    refused(r, 401, "unauthenticated", "unknown_agent")
    # An agent's key: its signature is checked, and a forged one refused.
    r = await w.client.get(
        w.url("/v1/grants"), headers={"DPoP": forged(w.proof(agent.key, "GET", "/v1/grants"))}
    )
    refused(r, 401, "invalid_dpop_proof", "bad_signature")
    assert await service.counts() == before
    assert (await w.as_agent(agent, "GET", "/v1/grants")).status_code == 200


# --- an agent disabled while its request is under way ------------------------------------


async def _authenticated(service: Opened, agent: WorldAgent, method: str, path: str) -> Agent:
    """The agent as the registry authenticated it for one request: what that request's
    handler holds while the agent's owner disables it."""
    w = service.world
    return await service.registry.authenticate_agent(
        proof=w.proof(agent.key, method, path), htm=method, htu=w.url(path)
    )


async def _disable(service: Opened, agent: WorldAgent) -> None:
    w = service.world
    r = await w.client.post(w.url(f"/v1/agents/{agent.id}/disable"), headers=agent.owner.headers)
    assert r.status_code == 200, r.text


@pytest.mark.asyncio(loop_scope="session")
async def test_a_grant_request_by_an_agent_disabled_meanwhile_is_refused(
    service: Opened,
) -> None:
    w = service.world
    agent = await w.agent(await w.human())
    provider = await w.provider()
    held = await _authenticated(service, agent, "POST", "/v1/grant-requests")
    await _disable(service, agent)
    before = await service.counts()
    body = GrantRequestIn.model_validate(
        {"provider_id": provider.id, "capabilities": [Capability.read("calendar").to_document()]}
    )
    with pytest.raises(Forbidden) as caught:
        await service.registry.request_grant(held, body)
    assert caught.value.reason == "agent_disabled"
    assert await service.counts() == before


@pytest.mark.asyncio(loop_scope="session")
async def test_a_step_up_by_an_agent_disabled_meanwhile_is_refused(service: Opened) -> None:
    w = service.world
    _, agent, _, grant = await w.payments_grant()
    held = await _authenticated(service, agent, "POST", "/v1/step-ups")
    await _disable(service, agent)
    before = await service.counts()
    body = StepUpIn.model_validate(
        {"grant_id": grant["id"], "resource": "payments", "amount": "60", "currency": "USD"}
    )
    with pytest.raises(Forbidden) as caught:
        await service.registry.request_step_up(held, body)
    assert caught.value.reason == "agent_disabled"
    assert await service.counts() == before


@pytest.mark.asyncio(loop_scope="session")
async def test_the_sdk_waiting_on_a_request_of_an_agent_disabled_meanwhile_stops_at_once(
    service: Opened, tmp_path: Path
) -> None:
    """The request turns ``cancelled`` for its human, but a disabled agent can no longer
    read it: each poll is refused ``agent_disabled``, the reason the SDK's wait ends with
    (the docs said ``cancelled``, an answer the registry never gives that agent)."""
    w = service.world
    agent = await w.agent(await w.human())
    pending = await w.request(agent, await w.provider())
    await _disable(service, agent)
    client = AgentAuthClient(w.base, key=agent.key, agent_id=agent.id, http=w.client, home=tmp_path)
    with pytest.raises(Forbidden) as caught:
        await client.wait_for_approval(pending["id"], timeout=30.0, interval=0.01)
    assert caught.value.reason == "agent_disabled"
    r = await w.client.get(
        w.url(f"/v1/grant-requests/{pending['id']}"), headers=agent.owner.headers
    )
    assert r.json()["status"] == "cancelled", r.text


@pytest.mark.asyncio(loop_scope="session")
async def test_an_agent_key_whose_kid_is_past_an_ids_bound_is_refused(service: Opened) -> None:
    """The kid is the one member of an agent's JWK kept as sent, and listed back with the
    agent: only the body's 64 KiB cap bounded it."""
    w = service.world
    owner = await w.human()
    for kid, status in (("k" * 257, 400), ("k" * 256, 200)):
        r = await w.client.post(w.url("/v1/enrollments"), headers=owner.headers)
        code = r.json()["enrollment_code"]
        key = PrivateKey.generate("ES256")
        before = await service.counts()
        r = await w.client.post(
            w.url("/v1/agents"),
            headers={"DPoP": w.proof(key, "POST", "/v1/agents")},
            json={
                "name": "bot",
                "public_jwk": {**key.public_jwk(), "kid": kid},
                "enrollment_code": code,
            },
        )
        assert r.status_code == status, r.text
        if status == 400:
            refused(r, 400, "invalid_request", "bad_jwk")
            assert await service.counts() == before


# --- registration --------------------------------------------------------------------------


async def _register(w: World, key: PrivateKey, code: str, proof: str) -> httpx.Response:
    body = {"name": "bot", "public_jwk": key.public_jwk(), "enrollment_code": code}
    return await w.client.post(w.url("/v1/agents"), headers={"DPoP": proof}, json=body)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_registration_with_a_code_that_cannot_register_is_refused_before_the_signature(
    service: Opened,
) -> None:
    w = service.world
    human = await w.human()
    key = PrivateKey.generate("ES256")
    before = await service.counts()
    r = await _register(w, key, "enr_" + "A" * 32, forged(w.proof(key, "POST", "/v1/agents")))
    refused(r, 403, "forbidden", "bad_enrollment")
    assert await service.counts() == before
    # A code that can register: the forged proof is refused, and the code is left unspent.
    r = await w.client.post(w.url("/v1/enrollments"), headers=human.headers)
    code = r.json()["enrollment_code"]
    before = await service.counts()
    r = await _register(w, key, code, forged(w.proof(key, "POST", "/v1/agents")))
    refused(r, 401, "invalid_dpop_proof", "bad_signature")
    assert await service.counts() == before
    r = await _register(w, key, code, w.proof(key, "POST", "/v1/agents"))
    assert r.status_code == 200, r.text


# --- pending grant requests -------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_an_agent_cannot_bury_its_human_under_pending_grant_requests(
    service: Opened,
) -> None:
    w = service.world
    human = await w.human()
    agent = await w.agent(human)
    provider = await w.provider()
    limit = service.registry.settings.max_pending_grant_requests
    body = {"provider_id": provider.id, "capabilities": [Capability.read("calendar").to_document()]}
    before = await service.counts()
    answers = await asyncio.gather(
        *(w.as_agent(agent, "POST", "/v1/grant-requests", json=body) for _ in range(limit + 5))
    )
    assert sorted(r.status_code for r in answers) == [200] * limit + [409] * 5
    for r in answers:
        if r.status_code == 409:
            refused(r, 409, "conflict", "too_many_grant_requests")
    after = await service.counts()
    assert after["grant_requests"] - before["grant_requests"] == limit
    # Once one is decided, the agent may ask again.
    asked = next(r.json() for r in answers if r.status_code == 200)
    r = await w.client.post(w.url(f"/v1/grant-requests/{asked['id']}/deny"), headers=human.headers)
    assert r.status_code == 200, r.text
    r = await w.as_agent(agent, "POST", "/v1/grant-requests", json=body)
    assert r.status_code == 200, r.text
