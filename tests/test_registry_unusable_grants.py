"""Nothing is approved that no token could use (docs/registry.md, Flow 8), in process (real
PostgreSQL and Redis, no Ray). Each of these was accepted and put before the human's
passkey until 2026-11-30, and is now refused up front with nothing written:

- a grant whose access tokens are larger than every verifier accepts
  (``TokenPolicy.max_token_bytes``): approved, then every token refused ``token_too_large``;
- a request whose envelope's ``expires_at`` has passed (asked so, passed while pending, or
  tightened so): approved, then every token refused ``grant_expired``;
- a step-up no payment of its grant could use (no threshold, not above it, over a limit,
  another currency, a resource or payee the capabilities do not allow), and more pending
  step-ups than a person can be asked to look at;
- money rules in more than one currency, or a transact capability in another currency than
  them: every payment refused ``currency_mismatch``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from registry_inprocess import ISSUER, registry_in_process, table_counts
from registry_world import PAYMENTS, STEP_UP_ABOVE_50, World

from agentauth import AgentAuthClient
from agentauth.protocol import AccessTokenVerifier, Capability, Forbidden, KeySet, TokenPolicy
from agentauth.registry import Registry, _service, create_app

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@dataclass
class InProcess:
    registry: Registry
    world: World

    async def counts(self) -> dict[str, int]:
        tables = (
            "grant_requests",
            "grants",
            "approval_receipts",
            "issued_tokens",
            "step_ups",
            "webauthn_challenges",
            "audit_events",
        )
        return await table_counts(self.registry.pool, tables)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def service(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[InProcess]:
    data_dir = tmp_path_factory.mktemp("registry")
    async with registry_in_process(database_url, redis_url, data_dir, prefix="unusable") as opened:
        yield InProcess(opened.registry, opened.world)


def refused(r: httpx.Response, status: int, error: str, reason: str) -> None:
    assert r.status_code == status, r.text[:300]
    body = r.json()
    assert (body["error"], body.get("reason")) == (error, reason), r.text[:300]
    assert body["error_description"], r.text[:300]


async def ask(world: World, agent: Any, provider: Any, **body: Any) -> httpx.Response:
    return await world.as_agent(
        agent, "POST", "/v1/grant-requests", json={"provider_id": provider.id, **body}
    )


def reads(count: int, length: int) -> list[dict[str, Any]]:
    """``count`` read capabilities, each a resource ``length`` characters long."""
    return [
        Capability.read(f"drive/{i:02d}/" + "d" * (length - 9)).to_document() for i in range(count)
    ]


# --- tokens larger than every verifier accepts ------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_a_grant_whose_tokens_would_be_too_large_is_refused_when_asked_for(
    service: InProcess,
) -> None:
    """64 read capabilities of 100-character resources (well under the body and capability
    caps) made an 11 KiB token: approved by the human, then refused by every verifier."""
    world = service.world
    human = await world.human()
    agent = await world.agent(human)
    provider = await world.provider()
    before = await service.counts()
    r = await ask(world, agent, provider, capabilities=reads(64, 100))
    refused(r, 400, "invalid_request", "grant_too_large")
    assert await service.counts() == before


@pytest.mark.asyncio(loop_scope="session")
async def test_the_largest_grant_accepted_gets_a_token_its_verifier_accepts(
    service: InProcess,
) -> None:
    """The bound is the verifier's, reckoned with the longest values a token can carry: the
    largest grant accepted gets a token that verifies, and one only a little under the cap
    (the bound is not so cautious that it refuses grants whose tokens would fit)."""
    world = service.world
    human = await world.human()
    agent = await world.agent(human)
    provider = await world.provider()
    low, high = 10, 200  # accepted at low, refused at high
    while high - low > 1:
        middle = (low + high) // 2
        r = await ask(world, agent, provider, capabilities=reads(64, middle))
        assert r.status_code in (200, 400), r.text
        low, high = (middle, high) if r.status_code == 200 else (low, middle)
    request = (await ask(world, agent, provider, capabilities=reads(64, low))).json()
    grant = await world.approve(human, request["id"])
    r = await world.token(agent, grant["id"])
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    limit = TokenPolicy().max_token_bytes
    # One character more in each of the 64 resources is 86 more bytes of token.
    assert limit - 250 < len(token) <= limit, len(token)
    jwks = (await world.client.get(world.url("/.well-known/jwks.json"))).json()
    verifier = AccessTokenVerifier(keys=KeySet.from_jwks(jwks), issuer=ISSUER)
    verifier.verify(token, audience=provider.audience, now=time.time())


@pytest.mark.asyncio(loop_scope="session")
async def test_an_envelope_tightened_past_the_token_size_is_refused_at_the_approval(
    service: InProcess,
) -> None:
    """Tightening adds limits, and limits are carried in every token: a request that fits
    can become a grant that does not. Refused before any challenge is stored."""
    world = service.world
    human = await world.human()
    agent = await world.agent(human)
    provider = await world.provider()
    request = (await ask(world, agent, provider, capabilities=reads(40, 50))).json()
    assert request["status"] == "pending"
    every_day = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    tightened = {
        "rate_limits": [{"max_count": 100 - i, "window_seconds": 3600 + i} for i in range(16)],
        "time_windows": [
            {"days": every_day, "start": f"{i:02d}:00", "end": "24:00"} for i in range(16)
        ],
        "spend_limits": [
            {"amount": str(1000 + i), "currency": "USD", "period": "day"} for i in range(16)
        ],
    }
    before = await service.counts()
    r = await world.client.post(
        world.url(f"/v1/grant-requests/{request['id']}/approval/begin"),
        headers=human.headers,
        json={"envelope": tightened},
    )
    refused(r, 400, "invalid_request", "grant_too_large")
    assert await service.counts() == before
    await world.approve(human, request["id"])  # as asked, it fits


@pytest.mark.asyncio(loop_scope="session")
async def test_a_stored_grant_too_large_for_a_token_is_refused_a_token_not_a_500(
    service: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grant approved before the bound was checked: the token endpoint refuses it with its
    reason, before signing, rather than minting what every verifier refuses."""
    world = service.world
    monkeypatch.setattr(_service, "_check_token_size", lambda *a, **k: None, raising=False)
    _, agent, _, grant = await world.setup_grant(capabilities=reads(64, 100))
    monkeypatch.undo()
    before = await service.counts()
    r = await world.token(agent, grant["id"])
    refused(r, 403, "forbidden", "grant_too_large")
    assert await service.counts() == before


# --- an expiry already past -----------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_a_request_whose_expiry_has_passed_is_refused_when_asked_for(
    service: InProcess,
) -> None:
    world = service.world
    human = await world.human()
    agent = await world.agent(human)
    provider = await world.provider()
    before = await service.counts()
    for past in (int(time.time()) - 60, 0):
        r = await ask(
            world,
            agent,
            provider,
            capabilities=[Capability.read("calendar").to_document()],
            envelope={"expires_at": past},
        )
        refused(r, 400, "invalid_request", "already_expired")
    assert await service.counts() == before


@pytest.mark.asyncio(loop_scope="session")
async def test_a_request_whose_expiry_passed_while_pending_cannot_be_approved(
    service: InProcess,
) -> None:
    """Refused at the approval's begin and, for one begun before, at its finish: every token
    of the grant would be refused grant_expired. Refusing it stays possible."""
    world = service.world
    human = await world.human()
    agent = await world.agent(human)
    provider = await world.provider()
    expires_at = int(time.time()) + 3600
    request = await world.request(agent, provider, envelope={"expires_at": expires_at})
    begun = await world.begin_approval(human, request["id"])
    credential = human.authenticator.get(begun["options"])
    # The hour passes (the registry reads the request's expiry against the database's clock).
    await service.registry.pool.execute(
        "UPDATE grant_requests SET envelope = jsonb_set(envelope, '{expires_at}',"
        " to_jsonb(extract(epoch FROM now())::bigint - 1)) WHERE id = $1",
        request["id"],
    )
    base = world.url(f"/v1/grant-requests/{request['id']}")
    before = await service.counts()
    r = await world.client.post(base + "/approval/begin", headers=human.headers)
    refused(r, 409, "conflict", "grant_expired")
    r = await world.client.post(
        base + "/approval/finish", headers=human.headers, json={"credential": credential}
    )
    refused(r, 409, "conflict", "grant_expired")
    assert await service.counts() == before
    r = await world.client.post(base + "/deny", headers=human.headers)
    assert r.status_code == 200 and r.json()["status"] == "denied", r.text


@pytest.mark.asyncio(loop_scope="session")
async def test_an_expiry_tightened_to_the_past_is_refused_and_one_passing_before_the_finish(
    service: InProcess,
) -> None:
    world = service.world
    human = await world.human()
    agent = await world.agent(human)
    provider = await world.provider()
    request = await world.request(agent, provider)
    base = world.url(f"/v1/grant-requests/{request['id']}")
    before = await service.counts()
    r = await world.client.post(
        base + "/approval/begin",
        headers=human.headers,
        json={"envelope": {"expires_at": int(time.time()) - 1}},
    )
    refused(r, 400, "invalid_request", "already_expired")
    assert await service.counts() == before
    # Tightened to a moment away: it passes between the begin and the finish.
    soon = int(time.time()) + 2
    begun = await world.begin_approval(human, request["id"], envelope={"expires_at": soon})
    credential = human.authenticator.get(begun["options"])
    await asyncio.sleep(max(0.0, soon - time.time()) + 0.2)
    before = await service.counts()
    r = await world.client.post(
        base + "/approval/finish", headers=human.headers, json={"credential": credential}
    )
    refused(r, 409, "conflict", "grant_expired")
    assert await service.counts() == before
    await world.approve(human, request["id"])  # as asked, with no expiry, it still can be


# --- step-ups no payment could use -----------------------------------------------------------

PAYEES = [Capability.transact("payments/*", max_amount="400", currency="USD", payees=["acme"])]
LIMITS = {
    "step_up_threshold": {"amount": "50", "currency": "USD"},
    "max_per_transaction": {"amount": "300", "currency": "USD"},
    "spend_limits": [{"amount": "280", "currency": "USD", "period": "day"}],
}
PAYMENT = {"resource": "payments/7", "amount": "75", "currency": "USD", "payee": "acme"}


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize(
    ("capabilities", "envelope", "payment"),
    [
        pytest.param(
            PAYEES,
            {k: v for k, v in LIMITS.items() if k != "step_up_threshold"},
            {},
            id="the-grant-has-no-threshold",
        ),
        pytest.param([Capability.read("calendar")], STEP_UP_ABOVE_50, {}, id="read-only-grant"),
        pytest.param(PAYEES, LIMITS, {"amount": "10"}, id="below-the-threshold"),
        pytest.param(PAYEES, LIMITS, {"amount": "50.00"}, id="at-the-threshold"),
        pytest.param(PAYEES, LIMITS, {"amount": "310"}, id="over-max-per-transaction"),
        pytest.param(PAYEES, LIMITS, {"amount": "290"}, id="over-a-spend-limit"),
        pytest.param(
            [Capability.transact("payments/*", max_amount="100", currency="USD")],
            LIMITS,
            {"amount": "150"},
            id="over-the-capability-max",
        ),
        pytest.param(PAYEES, LIMITS, {"currency": "EUR"}, id="another-currency"),
        pytest.param(PAYEES, LIMITS, {"resource": "admin/wire"}, id="resource-not-granted"),
        pytest.param(PAYEES, LIMITS, {"payee": "mallory"}, id="payee-not-allowed"),
        pytest.param(PAYEES, LIMITS, {"payee": None}, id="no-payee-where-payees-are-listed"),
    ],
)
async def test_a_step_up_no_payment_of_its_grant_could_use_is_refused(
    service: InProcess,
    capabilities: list[Capability],
    envelope: dict[str, Any],
    payment: dict[str, Any],
) -> None:
    """A hostile agent could put any payment before the human's passkey ("pay $100,000 for
    admin/wire" under a read-only grant); approved, no token could use it."""
    world = service.world
    human, agent, _, grant = await world.setup_grant(
        capabilities=[c.to_document() for c in capabilities], envelope=envelope
    )
    body = {k: v for k, v in {**PAYMENT, **payment}.items() if v is not None}
    before = await service.counts()
    r = await world.as_agent(agent, "POST", "/v1/step-ups", json={"grant_id": grant["id"], **body})
    refused(r, 403, "forbidden", "step_up_not_applicable")
    assert await service.counts() == before
    listed = await world.client.get(world.url("/v1/step-ups"), headers=human.headers)
    assert listed.json() == []


@pytest.mark.asyncio(loop_scope="session")
async def test_a_step_up_a_payment_could_use_is_asked(service: InProcess) -> None:
    world = service.world
    _, agent, _, grant = await world.setup_grant(
        capabilities=[c.to_document() for c in PAYEES], envelope=LIMITS
    )
    for amount in ("50.01", "75", "280"):
        payment = {**PAYMENT, "amount": amount, "grant_id": grant["id"]}
        r = await world.as_agent(agent, "POST", "/v1/step-ups", json=payment)
        assert r.status_code == 200 and r.json()["status"] == "pending", r.text


@pytest.mark.asyncio(loop_scope="session")
async def test_the_sdk_hands_a_refused_step_up_to_its_caller_at_once(
    service: InProcess, tmp_path: Path
) -> None:
    """The agent learns why, at once, instead of waiting on a card no human would be shown."""
    world = service.world
    _, agent, provider, _ = await world.payments_grant()
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(service.registry)))
    async with AgentAuthClient(
        ISSUER, key=agent.key, agent_id=agent.id, http=http, home=tmp_path
    ) as client:
        with pytest.raises(Forbidden) as caught:
            await client.request_step_up(
                provider.id, resource="payments", amount="10", currency="USD", timeout=5
            )
    await http.aclose()
    assert caught.value.reason == "step_up_not_applicable"
    assert "step-up threshold" in caught.value.description


@pytest.mark.asyncio(loop_scope="session")
async def test_pending_step_ups_per_grant_are_bounded(service: InProcess) -> None:
    """An agent cannot flood its human's page with payments to approve: past the bound, a
    new one is refused until one is decided; asking again for one waiting still finds it."""
    world = service.world
    bound = 20  # RegistrySettings.max_pending_step_ups, by default
    human, agent, _, grant = await world.payments_grant()
    steps = [await world.step_up(agent, grant["id"], str(51 + i)) for i in range(bound)]
    before = await service.counts()
    payment = {"grant_id": grant["id"], "resource": "payments", "currency": "USD"}
    r = await world.as_agent(agent, "POST", "/v1/step-ups", json={**payment, "amount": "99"})
    refused(r, 409, "conflict", "too_many_step_ups")
    assert await service.counts() == before
    assert (await world.step_up(agent, grant["id"], "51"))["id"] == steps[0]["id"]
    r = await world.client.post(
        world.url(f"/v1/step-ups/{steps[0]['id']}/deny"), headers=human.headers
    )
    assert r.status_code == 200, r.text
    assert (await world.step_up(agent, grant["id"], "99"))["status"] == "pending"


# --- money rules in more than one currency ---------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize(
    ("capabilities", "envelope"),
    [
        pytest.param(
            PAYMENTS,
            {
                "max_per_transaction": {"amount": "100", "currency": "USD"},
                "spend_limits": [{"amount": "500", "currency": "EUR", "period": "day"}],
            },
            id="envelope-in-two-currencies",
        ),
        pytest.param(
            PAYMENTS,
            {"step_up_threshold": {"amount": "50", "currency": "EUR"}},
            id="capability-in-another-currency",
        ),
    ],
)
async def test_money_rules_no_payment_could_meet_are_refused_when_asked_for(
    service: InProcess, capabilities: list[dict[str, Any]], envelope: dict[str, Any]
) -> None:
    """Every payment under an envelope with rules in two currencies is refused
    currency_mismatch, and so is every one a USD capability allows under EUR rules."""
    world = service.world
    human = await world.human()
    agent = await world.agent(human)
    provider = await world.provider()
    before = await service.counts()
    r = await ask(world, agent, provider, capabilities=capabilities, envelope=envelope)
    refused(r, 400, "invalid_request", "currency_mismatch")
    assert await service.counts() == before


@pytest.mark.asyncio(loop_scope="session")
async def test_an_envelope_tightened_into_another_currency_is_refused_at_the_approval(
    service: InProcess,
) -> None:
    world = service.world
    human = await world.human()
    agent = await world.agent(human)
    provider = await world.provider()
    request = await world.request(agent, provider, PAYMENTS, STEP_UP_ABOVE_50)
    euro_cap = [{"amount": "9", "currency": "EUR", "period": "day"}]
    before = await service.counts()
    r = await world.client.post(
        world.url(f"/v1/grant-requests/{request['id']}/approval/begin"),
        headers=human.headers,
        json={"envelope": {**STEP_UP_ABOVE_50, "spend_limits": euro_cap}},
    )
    refused(r, 400, "invalid_request", "currency_mismatch")
    assert await service.counts() == before
    # Capabilities in several currencies, with no money rules, each stay usable.
    mixed = [
        Capability.transact("payments", max_amount="5", currency="USD").to_document(),
        Capability.transact("refunds", max_amount="5", currency="EUR").to_document(),
    ]
    assert (await world.request(agent, provider, mixed))["status"] == "pending"


# --- what no longer stands leaves the human's page --------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_a_step_up_whose_grant_was_revoked_no_longer_waits(service: InProcess) -> None:
    """A pending payment stayed "pending" after its grant was revoked: a card on the human's
    page whose Approve could only fail, and an agent waiting on it until its deadline."""
    world = service.world
    human, agent, _, grant = await world.payments_grant()
    step = await world.step_up(agent, grant["id"], "75")
    r = await world.client.post(
        world.url("/v1/revocations"),
        headers=human.headers,
        json={"kind": "grant", "target": grant["id"]},
    )
    assert r.status_code == 200, r.text
    r = await world.as_agent(agent, "GET", f"/v1/step-ups/{step['id']}")
    assert r.json()["status"] == "cancelled", r.text
    r = await world.client.get(world.url("/v1/step-ups?status=pending"), headers=human.headers)
    assert step["id"] not in [s["id"] for s in r.json()]
    r = await world.client.get(world.url("/v1/step-ups?status=cancelled"), headers=human.headers)
    assert [s["id"] for s in r.json()] == [step["id"]], r.text
    r = await world.client.post(
        world.url(f"/v1/step-ups/{step['id']}/approval/begin"), headers=human.headers
    )
    refused(r, 409, "conflict", "grant_revoked")


@pytest.mark.asyncio(loop_scope="session")
async def test_a_request_whose_agent_was_disabled_no_longer_waits(service: InProcess) -> None:
    world = service.world
    human = await world.human()
    agent = await world.agent(human)
    request = await world.request(agent, await world.provider())
    r = await world.client.post(world.url(f"/v1/agents/{agent.id}/disable"), headers=human.headers)
    assert r.status_code == 200, r.text
    r = await world.client.get(
        world.url(f"/v1/grant-requests/{request['id']}"), headers=human.headers
    )
    assert r.json()["status"] == "cancelled", r.text
    r = await world.client.get(
        world.url("/v1/grant-requests?status=pending"), headers=human.headers
    )
    assert request["id"] not in [q["id"] for q in r.json()]
    r = await world.client.get(
        world.url("/v1/grant-requests?status=cancelled"), headers=human.headers
    )
    assert [q["id"] for q in r.json()] == [request["id"]], r.text
    r = await world.client.post(
        world.url(f"/v1/grant-requests/{request['id']}/approval/begin"), headers=human.headers
    )
    refused(r, 409, "conflict", "agent_disabled")


# --- a resource named in a form refused since ---------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_a_stored_grant_on_a_name_refused_since_gets_no_token_and_no_500(
    service: InProcess,
) -> None:
    """'files/a%3Ab' was a valid second name of 'files/a:b' until 2026-11-30: a grant
    approved on it is refused a token as the grant it is (403, not the agent's 400: its
    request was well formed), with nothing written."""
    world = service.world
    _, agent, _, grant = await world.setup_grant(
        capabilities=[Capability.read("files/a:b").to_document()]
    )
    await service.registry.pool.execute(
        "UPDATE grants SET document = replace(document::text, 'files/a:b', 'files/a%3Ab')::jsonb"
        " WHERE id = $1",
        grant["id"],
    )
    before = await service.counts()
    refused(await world.token(agent, grant["id"]), 403, "forbidden", "grant_unusable")
    assert await service.counts() == before
