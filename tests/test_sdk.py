"""The agent SDK and the provider helpers against the live stack (Serve, PostgreSQL, Redis).

The sample provider from examples/ runs in-process; it asks the real verifier on Serve.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from conftest import sample_provider, verifier_settings
from registry_world import Human, Provider, World

from agentauth import AgentAuthClient, AgentAuthClientSync, Capability
from agentauth.protocol import Forbidden, NotFound
from agentauth.sdk import STEP_UP_HEADER, OfflineVerifier, VerifierClient

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.redis]


class Stack:
    def __init__(self, world: World, verifier_base: str, tmp: Path) -> None:
        self.world, self.verifier_base, self.tmp = world, verifier_base, tmp

    async def agent_with_provider(
        self, *, envelope: dict[str, Any] | None = None, home: Path | None = None
    ) -> tuple[AgentAuthClient, Human, Provider]:
        human = await self.world.human()
        provider = await self.world.provider(kinds=("read", "transact"))
        code = (
            await self.world.client.post(self.world.url("/v1/enrollments"), headers=human.headers)
        ).json()
        client = AgentAuthClient(self.world.base, home=home or self.tmp / provider.id)
        await client.register(enrollment_code=code["enrollment_code"], name="sdk test")
        return client, human, provider

    async def approve_pending(self, human: Human) -> None:
        r = await self.world.client.get(
            self.world.url("/v1/grant-requests?status=pending"), headers=human.headers
        )
        for request in r.json():
            await self.world.approve(human, request["id"])

    def provider_api(
        self, provider: Provider, client: AgentAuthClient, *, verifier: Any = None
    ) -> httpx.AsyncClient:
        module = sample_provider()
        checker = verifier or VerifierClient(
            self.verifier_base, provider_id=provider.id, secret=provider.secret
        )
        app = module.build_app(checker, public_url=provider.audience)
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url=provider.audience,
            auth=client.auth(provider.id),
        )


@pytest_asyncio.fixture(loop_scope="session")
async def stack(world: World, verifier_base: str, tmp_path: Path) -> AsyncIterator[Stack]:
    yield Stack(world, verifier_base, tmp_path)


CAPS = [Capability.read("calendar"), Capability.transact("payments", max_amount=50, currency="USD")]


@pytest.mark.asyncio
async def test_register_request_approve_token_call_provider(stack: Stack) -> None:
    client, human, provider = await stack.agent_with_provider()
    key_file = client.home / "agent-key.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    request = await client.request_grant(
        service_provider_id=provider.id,
        capabilities=CAPS,
        envelope={"rate_limits": [{"max_count": 3, "window_seconds": 3600}]},
    )
    assert request.status == "pending"
    progress: list[str] = []
    waiter = asyncio.create_task(
        client.wait_for_approval(request, interval=0.2, on_progress=lambda s, _: progress.append(s))
    )
    await asyncio.sleep(0.5)
    await stack.approve_pending(human)
    approval = await waiter
    assert approval.provider_id == provider.id and "pending" in progress
    async with stack.provider_api(provider, client) as api:
        r = await api.get("/api/events")
        assert r.status_code == 200, r.text
        assert r.json()["agent"] == client.agent_id
        r = await api.post("/api/payments", params={"amount": "20", "payee": "acme"})
        assert r.status_code == 200, r.text
        # Over the capability's $50 per transaction: refused, with the verifier's reason.
        r = await api.post("/api/payments", params={"amount": "80", "payee": "acme"})
        assert r.status_code == 403 and r.json()["detail"]["reason"] == "insufficient_capability"
        # Over the rate limit (3 an hour, two used above plus the refused one is not counted).
        r = await api.get("/api/events")
        assert r.status_code == 200
        r = await api.get("/api/events")
        assert r.status_code == 429 and r.json()["detail"]["reason"] == "rate_limited"
    # Unsigned and forged requests never get through.
    module = sample_provider()
    app = module.build_app(
        VerifierClient(stack.verifier_base, provider_id=provider.id, secret=provider.secret),
        public_url=provider.audience,
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url=provider.audience
    ) as anonymous:
        r = await anonymous.get("/api/events")
        assert r.status_code == 401 and "DPoP" in r.headers["www-authenticate"]
    await client.aclose()


async def answer_step_ups(world: World, human: Human, *, approve: bool) -> None:
    """The human, on their page: approve (with the passkey) or refuse what is pending."""
    while True:
        r = await world.client.get(world.url("/v1/step-ups?status=pending"), headers=human.headers)
        if r.json():
            break
        await asyncio.sleep(0.1)
    for step in r.json():
        base = world.url(f"/v1/step-ups/{step['id']}")
        if not approve:
            assert (await world.client.post(base + "/deny", headers=human.headers)).is_success
            continue
        begun = await world.client.post(base + "/approval/begin", headers=human.headers)
        credential = human.authenticator.get(begun.json()["options"])
        r = await world.client.post(
            base + "/approval/finish", headers=human.headers, json={"credential": credential}
        )
        assert r.status_code == 200, r.text


@pytest.mark.asyncio
async def test_a_payment_above_the_threshold_goes_through_with_a_step_up(
    stack: Stack, db: Any
) -> None:
    client, human, provider = await stack.agent_with_provider()
    await client.request_grant(
        provider.id, CAPS, envelope={"step_up_threshold": {"amount": "30", "currency": "USD"}}
    )
    await stack.approve_pending(human)
    pay = {"amount": "40", "payee": "acme"}
    async with stack.provider_api(provider, client) as api:
        r = await api.post("/api/payments", params=pay)
        assert r.status_code == 403 and r.json()["detail"]["reason"] == "step_up_required"
        # The human approves this one payment; the agent presents the reference with it.
        human_answers = asyncio.create_task(answer_step_ups(stack.world, human, approve=True))
        ref = await client.request_step_up(
            provider.id, resource="payments", amount="40", currency="USD", payee="acme"
        )
        await human_answers
        r = await api.post("/api/payments", params=pay, headers={STEP_UP_HEADER: ref})
        assert r.status_code == 200, r.text
        # Once only, and only for the payment approved.
        r = await api.post("/api/payments", params=pay, headers={STEP_UP_HEADER: ref})
        assert r.status_code == 403 and r.json()["detail"]["reason"] == "step_up_invalid"
        other = {"amount": "45", "payee": "acme"}
        r = await api.post("/api/payments", params=other, headers={STEP_UP_HEADER: ref})
        assert r.status_code == 403 and r.json()["detail"]["reason"] == "step_up_invalid"
        headers = await client.authenticate_headers(
            provider.id, "POST", "/api/payments?amount=45&payee=acme", step_up_ref=ref
        )
        assert headers[STEP_UP_HEADER] == ref

    # Refused by the human: the SDK says so.
    human_answers = asyncio.create_task(answer_step_ups(stack.world, human, approve=False))
    with pytest.raises(Forbidden) as refused:
        await client.request_step_up(provider.id, resource="payments", amount="41", currency="USD")
    await human_answers
    assert refused.value.reason == "denied"

    # Left unanswered past its deadline: expired, and the SDK stops waiting at once.
    async def expire_it() -> None:
        while not await db.fetchval(
            "UPDATE step_ups SET expires_at = 0 WHERE agent_id = $1 AND status = 'pending'"
            " RETURNING true",
            client.agent_id,
        ):
            await asyncio.sleep(0.1)

    expiring = asyncio.create_task(expire_it())
    started = time.monotonic()
    with pytest.raises(Forbidden) as expired:
        await client.request_step_up(
            provider.id, resource="payments", amount="42", currency="USD", timeout=60
        )
    await expiring
    assert expired.value.reason == "expired"
    assert time.monotonic() - started < 10
    await client.aclose()


@pytest.mark.asyncio
async def test_waiting_on_a_request_nobody_answers_in_time_ends(stack: Stack, db: Any) -> None:
    client, _, provider = await stack.agent_with_provider()
    request = await client.request_grant(provider.id, [Capability.read("calendar")])
    await db.execute(
        "UPDATE grant_requests SET created_at = now() - interval '8 days' WHERE id = $1",
        request.id,
    )
    with pytest.raises(Forbidden) as expired:
        await client.wait_for_approval(request, timeout=30)
    assert expired.value.reason == "expired"
    await client.aclose()


@pytest.mark.asyncio
async def test_seed_example_works_as_written(stack: Stack) -> None:
    registered, human, provider = await stack.agent_with_provider()
    await registered.aclose()
    # As in the seed document, with the agent's saved identity:
    client = AgentAuthClient(stack.world.base, home=stack.tmp / provider.id)
    grant = await client.request_grant(
        service_provider_id=provider.id,
        capabilities=[Capability.read("calendar")],
    )
    await stack.approve_pending(human)
    await client.wait_for_approval(grant, interval=0.2)
    headers = await client.authenticate_headers(provider.id, "POST", "/api/events")
    assert headers["Authorization"].startswith("DPoP ") and headers["DPoP"].count(".") == 2
    from agentauth.protocol import DPoPVerifier

    proof = DPoPVerifier().verify(
        headers["DPoP"], htm="POST", htu=provider.audience + "/api/events", now=time.time()
    )
    assert proof.jkt == client.key.thumbprint
    await client.aclose()


@pytest.mark.asyncio
async def test_errors_carry_the_servers_code(stack: Stack) -> None:
    client, _, _ = await stack.agent_with_provider()
    with pytest.raises(NotFound) as caught:
        await client.request_grant("no-such-provider", [Capability.read("x")])
    assert caught.value.error == "not_found"
    await client.aclose()


@pytest.mark.asyncio
async def test_token_is_cached_and_refreshed_before_expiry(stack: Stack) -> None:
    client, human, provider = await stack.agent_with_provider()
    await client.request_grant(provider.id, [Capability.read("calendar")])
    await stack.approve_pending(human)
    first = await client.get_token(provider.id)
    assert await client.get_token(provider.id) == first  # cached
    # Let the token come within the 30 s refresh margin of its expiry (instead of waiting
    # 90 s: the proofs must keep the real time, which the registry checks).
    client._tokens[provider.id].expires_at = time.time() + 29
    second = await client.get_token(provider.id)
    assert second != first
    assert await client.get_token(provider.id) == second
    await client.aclose()


@pytest.mark.asyncio
async def test_dpop_nonce_challenge_is_answered_once(stack: Stack, registry_settings: Any) -> None:
    from agentauth.deployments.verifier import shard_handles
    from agentauth.verifier import Verifier, create_app

    settings = verifier_settings(
        registry_settings, dpop_nonces=True, nonce_secret="nonce-secret-for-the-sdk-test-0123456789"
    )
    verifier = await Verifier.open(settings, shard_handles(settings))
    client, human, provider = await stack.agent_with_provider()
    await client.request_grant(provider.id, [Capability.read("calendar")])
    await stack.approve_pending(human)
    seen: list[int] = []

    async def record(response: httpx.Response) -> None:
        seen.append(response.status_code)

    try:
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(verifier)), base_url="http://verifier"
        )
        checker = VerifierClient(
            "http://verifier", provider_id=provider.id, secret=provider.secret, http=http
        )
        async with stack.provider_api(provider, client, verifier=checker) as api:
            api.event_hooks["response"] = [record]
            r = await api.get("/api/events")
            assert r.status_code == 200, r.text
            assert seen == [401, 200]  # challenged once, answered with the nonce
            r = await api.get("/api/events")
            assert r.status_code == 200 and seen[-1] == 200 and len(seen) == 3  # nonce reused
    finally:
        await verifier.close()
        await client.aclose()


@pytest.mark.asyncio
async def test_sync_facade(stack: Stack) -> None:
    client, human, provider = await stack.agent_with_provider()
    await client.aclose()
    home = client.home

    def as_a_script() -> tuple[int, str]:
        with AgentAuthClientSync(stack.world.base, home=home) as sync:
            pending = sync.request_grant(provider.id, [Capability.read("calendar")])
            return 0, pending.id

    _, request_id = await asyncio.to_thread(as_a_script)
    await stack.approve_pending(human)

    def use_it() -> int:
        with AgentAuthClientSync(stack.world.base, home=home) as sync:
            sync.wait_for_approval(request_id, interval=0.2)
            token = sync.get_token(provider.id)
            assert token.count(".") == 2
            module = sample_provider()
            app = module.build_app(
                VerifierClient(
                    stack.verifier_base, provider_id=provider.id, secret=provider.secret
                ),
                public_url=provider.audience,
            )
            # A sync httpx client cannot drive an ASGI app; sign and check the headers instead.
            headers = sync.authenticate_headers(provider.id, "GET", "/api/events")
            assert app and headers["DPoP"]
            return 200

    assert await asyncio.to_thread(use_it) == 200


@pytest.mark.asyncio
async def test_offline_mode_checks_binding_but_not_replay(stack: Stack) -> None:
    client, human, provider = await stack.agent_with_provider()
    await client.request_grant(provider.id, [Capability.read("calendar")])
    await stack.approve_pending(human)
    jwks = (await stack.world.client.get(stack.world.url("/.well-known/jwks.json"))).json()
    offline = OfflineVerifier(jwks=jwks, issuer=stack.world.base, audience=provider.audience)
    from agentauth.protocol import Action

    headers = await client.authenticate_headers(provider.id, "GET", "/api/events")
    lower = {k.lower(): v for k, v in headers.items()}
    url = provider.audience + "/api/events"
    action = Action(kind="read", resource="calendar")
    first = await offline.verify_request(method="GET", url=url, headers=lower, action=action)
    assert first.allowed
    # Documented weakness: no replay store, so the same proof passes again offline.
    assert (
        await offline.verify_request(method="GET", url=url, headers=lower, action=action)
    ).allowed
    stolen = {**lower, "dpop": lower["dpop"][:-3] + "AAA"}
    assert not (
        await offline.verify_request(method="GET", url=url, headers=stolen, action=action)
    ).allowed
    await client.aclose()
