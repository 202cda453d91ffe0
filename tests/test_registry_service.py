"""The registry's service and HTTP API in process, over real PostgreSQL and Redis (no Ray).

The registry is opened on a database of its own and driven through its FastAPI app with
httpx's ASGI transport, by the same ``World`` the Ray tests use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from registry_inprocess import registry_in_process, table_counts
from registry_world import PAYMENTS, STEP_UP_ABOVE_50, Human, World

from agentauth._logs import Throttle
from agentauth.protocol import ApprovalReceipt, Capability, Forbidden, Grant, b64url_encode
from agentauth.registry import Registry
from agentauth.registry._service import AHEAD_PER_TICK, Agent

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@dataclass
class InProcess:
    registry: Registry
    world: World
    url: str

    async def counts(self) -> dict[str, int]:
        tables = ("grant_requests", "grants", "step_ups", "webauthn_challenges", "audit_events")
        return await table_counts(self.registry.pool, tables)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def service(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[InProcess]:
    data_dir = tmp_path_factory.mktemp("registry")
    async with registry_in_process(database_url, redis_url, data_dir, prefix="service") as opened:
        yield InProcess(opened.registry, opened.world, opened.url)


def refused_for_precision(response: httpx.Response, field: str) -> None:
    assert response.status_code == 400, response.text
    body = response.json()
    assert (body["error"], body["reason"]) == ("invalid_request", "amount_precision")
    assert body["error_description"].startswith(field + ": ")


# --- amounts finer than their currency's minor unit --------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_a_grant_request_with_amounts_finer_than_the_currency_writes_nothing(
    service: InProcess,
) -> None:
    world = service.world
    human = await world.human()
    agent = await world.agent(human)
    provider = await world.provider()
    usd = {"currency": "USD"}
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {"capabilities": [Capability.transact("payments", max_amount="0.005", **usd)]},
            "capabilities[0].max_amount",
        ),
        (
            {"envelope": {"spend_limits": [{"amount": "1.005", "period": "day", **usd}]}},
            "envelope.spend_limits[0].amount",
        ),
        (
            {"envelope": {"max_per_transaction": {"amount": "1.5", "currency": "JPY"}}},
            "envelope.max_per_transaction.amount",
        ),
        (
            {"envelope": {"step_up_threshold": {"amount": "0.0005", "currency": "BHD"}}},
            "envelope.step_up_threshold.amount",
        ),
    ]
    before = await service.counts()
    for changes, field in cases:
        body: dict[str, Any] = {"provider_id": provider.id, "capabilities": PAYMENTS, **changes}
        if "capabilities" in changes:
            body["capabilities"] = [c.to_document() for c in changes["capabilities"]]
        r = await world.as_agent(agent, "POST", "/v1/grant-requests", json=body)
        refused_for_precision(r, field)
    assert await service.counts() == before
    # Whole cents (trailing zeros too), a whole yen, and a unit outside ISO 4217 are fine
    # (each in a request of its own: money rules in two currencies are refused).
    for fine in (
        {"amount": "1.50", "period": "day", **usd},
        {"amount": "1000", "period": "grant", "currency": "JPY"},
        {"amount": "0.000001", "period": "day", "currency": "TOK"},
    ):
        body = {
            "provider_id": provider.id,
            "capabilities": [Capability.transact("payments").to_document()],
            "envelope": {"spend_limits": [fine]},
        }
        r = await world.as_agent(agent, "POST", "/v1/grant-requests", json=body)
        assert r.status_code == 200, r.text


@pytest.mark.asyncio(loop_scope="session")
async def test_a_stored_request_finer_than_its_currency_is_approved_only_rounded_down(
    service: InProcess,
) -> None:
    """A request stored before the rule: its approval is refused (nothing written) until the
    person tightens the limit to whole cents; a tightening finer than a cent is refused too."""
    world = service.world
    human = await world.human()
    agent = await world.agent(human)
    provider = await world.provider()
    limit = {"amount": "10", "currency": "USD", "period": "day"}
    request = await world.request(agent, provider, PAYMENTS, {"spend_limits": [limit]})
    too_fine = {"spend_limits": [{**limit, "amount": "10.005"}]}
    await service.registry.pool.execute(
        "UPDATE grant_requests SET envelope = $2 WHERE id = $1", request["id"], too_fine
    )
    path = f"/v1/grant-requests/{request['id']}/approval/begin"
    before = await service.counts()
    r = await world.client.post(world.url(path), headers=human.headers)
    refused_for_precision(r, "envelope.spend_limits[0].amount")
    sub_cent = {"spend_limits": [{**limit, "amount": "9.995"}]}
    r = await world.client.post(world.url(path), headers=human.headers, json={"envelope": sub_cent})
    refused_for_precision(r, "envelope.spend_limits[0].amount")
    assert await service.counts() == before
    rounded = {"spend_limits": [{**limit, "amount": "10.00"}]}
    grant = await world.approve(human, request["id"], envelope=rounded)
    assert grant["document"]["envelope"]["spend_limits"][0]["amount"] == "10"


@pytest.mark.asyncio(loop_scope="session")
async def test_a_step_up_finer_than_the_currency_writes_nothing(service: InProcess) -> None:
    world = service.world
    _, agent, _, grant = await world.setup_grant(capabilities=PAYMENTS, envelope=STEP_UP_ABOVE_50)
    before = await service.counts()
    for amount, currency in (("60.005", "USD"), ("60.5", "JPY"), ("60.0001", "KWD")):
        payment = {"grant_id": grant["id"], "resource": "payments", "amount": amount}
        r = await world.as_agent(
            agent, "POST", "/v1/step-ups", json={**payment, "currency": currency}
        )
        refused_for_precision(r, "amount")
    assert await service.counts() == before
    assert (await world.step_up(agent, grant["id"], "60.50"))["status"] == "pending"


async def stored_document(service: InProcess, grant_id: str) -> dict[str, Any]:
    document = await service.registry.pool.fetchval(
        "SELECT document FROM grants WHERE id = $1", grant_id
    )
    return json.loads(document)  # type: ignore[no-any-return]


async def store_as_approved(
    service: InProcess, human: Human, grant_id: str, document: dict[str, Any]
) -> None:
    """Store ``document`` as grant ``grant_id`` with a receipt of ``human``'s passkey over
    it: what an approval under rules changed since left behind (none is made so today)."""
    grant = Grant.from_document(document)
    credential = human.authenticator.get({"challenge": grant.digest_b64()})
    response = credential["response"]
    pool = service.registry.pool
    public_key = await pool.fetchval(
        "SELECT public_key FROM passkey_credentials WHERE credential_id = $1", credential["rawId"]
    )
    receipt = ApprovalReceipt(
        credential_id=credential["rawId"],
        authenticator_data=response["authenticatorData"],
        client_data_json=response["clientDataJSON"],
        signature=response["signature"],
        credential_public_key=b64url_encode(bytes(public_key)),
        user_handle=response["userHandle"],
    )
    await pool.execute(
        "UPDATE grants SET document = $2, grant_hash = $3 WHERE id = $1",
        grant_id,
        grant.canonical_bytes().decode(),
        grant.digest_b64(),
    )
    await pool.execute(
        "UPDATE approval_receipts SET receipt = $2, receipt_hash = $3 WHERE grant_id = $1",
        grant_id,
        receipt.model_dump(mode="json", exclude_none=True),
        receipt.digest(),
    )


@pytest.mark.asyncio(loop_scope="session")
async def test_a_stored_grant_finer_than_its_currency_still_gets_tokens(
    service: InProcess,
) -> None:
    """Loading is not stricter than before: a grant approved before the rule keeps working
    (the verifier then refuses only payments nobody could make)."""
    world = service.world
    human, agent, _, grant = await world.setup_grant(
        capabilities=PAYMENTS, envelope=STEP_UP_ABOVE_50
    )
    document = await stored_document(service, grant["id"])
    document["envelope"]["step_up_threshold"]["amount"] = "49.995"
    document["capabilities"][0]["max_amount"] = "500.001"
    await store_as_approved(service, human, grant["id"], document)
    r = await world.token(agent, grant["id"])
    assert r.status_code == 200, r.text
    r = await world.client.get(
        world.url(f"/v1/grants/{grant['id']}"),
        headers=world.dpop(agent, "GET", f"/v1/grants/{grant['id']}"),
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("rewritten", ["document", "document and hash", "receipt key"])
@pytest.mark.asyncio(loop_scope="session")
async def test_a_grant_rewritten_after_its_approval_gets_no_token(
    service: InProcess, rewritten: str
) -> None:
    """Verifiers trust a token's capabilities as they are: a grant whose stored document is
    not the one its receipt's passkey signed (a row rewritten in the database, with its hash
    or with a receipt under a key the approver never registered) gets no token, and nothing
    is written. Until 2026-11-30 the token carried whatever the row said."""
    world = service.world
    _, agent, _, grant = await world.setup_grant()  # read "calendar" only
    pool = service.registry.pool
    document = await stored_document(service, grant["id"])
    document["capabilities"] = [Capability.read("*").to_document()]
    wider = Grant.from_document(document)
    await pool.execute(
        "UPDATE grants SET document = $2 WHERE id = $1",
        grant["id"],
        wider.canonical_bytes().decode(),
    )
    if rewritten != "document":
        await pool.execute(
            "UPDATE grants SET grant_hash = $2 WHERE id = $1", grant["id"], wider.digest_b64()
        )
    if rewritten == "receipt key":
        # A receipt that verifies on its own, over the wider grant, by a passkey of someone
        # else, under the approver's credential id.
        thief = await world.human("Mallory")
        credential = thief.authenticator.get({"challenge": wider.digest_b64()})
        key = await pool.fetchval(
            "SELECT public_key FROM passkey_credentials WHERE credential_id = $1",
            credential["rawId"],
        )
        stored = await pool.fetchval(
            "SELECT receipt FROM approval_receipts WHERE grant_id = $1", grant["id"]
        )
        response = credential["response"]
        receipt = ApprovalReceipt(
            credential_id=stored["credential_id"],
            authenticator_data=response["authenticatorData"],
            client_data_json=response["clientDataJSON"],
            signature=response["signature"],
            credential_public_key=b64url_encode(bytes(key)),
        )
        await pool.execute(
            "UPDATE approval_receipts SET receipt = $2, receipt_hash = $3 WHERE grant_id = $1",
            grant["id"],
            receipt.model_dump(mode="json", exclude_none=True),
            receipt.digest(),
        )
    before = await service.counts()
    r = await world.token(agent, grant["id"])
    assert (r.status_code, r.json().get("reason")) == (403, "grant_unusable"), r.text
    assert await service.counts() == before


@pytest.mark.asyncio(loop_scope="session")
async def test_a_rewritten_grant_asked_for_again_and_again_is_logged_once_a_while(
    service: InProcess, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal is checked before the grant's token limit, so nothing bounds how often an
    agent asks: until 2026-12-01 each ask wrote an ERROR line, and an agent (or a loop in
    its program) could fill the log at the rate it signs proofs."""
    world = service.world
    _, agent, _, grant = await world.setup_grant()
    document = await stored_document(service, grant["id"])
    document["capabilities"] = [Capability.read("*").to_document()]
    await service.registry.pool.execute(
        "UPDATE grants SET document = $2 WHERE id = $1",
        grant["id"],
        Grant.from_document(document).canonical_bytes().decode(),
    )
    monkeypatch.setattr(service.registry, "_said", Throttle(30.0))  # nothing said before
    caplog.set_level(logging.ERROR, logger="agentauth.registry")
    for _ in range(5):
        r = await world.token(agent, grant["id"])
        assert (r.status_code, r.json().get("reason")) == (403, "grant_unusable"), r.text
    said = [r for r in caplog.records if "not the one its receipt approved" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert grant["id"] in said[0].getMessage()


# --- the token endpoint's error codes ---------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_a_replayed_proof_at_the_token_endpoint_is_an_invalid_dpop_proof(
    service: InProcess,
) -> None:
    """RFC 6749 §5.2 (RFC 9449 §5): a token endpoint's error is a registered code, and
    replay_detected is none; a replayed proof is an invalid one (RFC 9449 §11.1), whose
    code RFC 9449 §12.2 registers. The reason keeps saying it was a replay, and no second
    token is recorded."""
    world = service.world
    _, agent, _, grant = await world.setup_grant()
    headers = world.dpop(agent, "POST", "/v1/token")
    first = await world.client.post(
        world.url("/v1/token"), headers=headers, json={"grant_id": grant["id"]}
    )
    assert first.status_code == 200, first.text
    again = await world.client.post(
        world.url("/v1/token"), headers=headers, json={"grant_id": grant["id"]}
    )
    assert again.status_code == 400, again.text
    assert (again.json()["error"], again.json()["reason"]) == ("invalid_dpop_proof", "jti_reused")
    assert "www-authenticate" not in again.headers
    assert await issued(service, grant["id"]) == 1


# --- token issuance against a concurrent revocation ------------------------------------------


async def service_agent(service: InProcess, agent_id: str) -> Agent:
    row = await service.registry.pool.fetchrow(
        "SELECT id, principal_id, jkt, status FROM agents WHERE id = $1", agent_id
    )
    return Agent(row["id"], row["principal_id"], row["jkt"], row["status"])


async def issued(service: InProcess, grant_id: str) -> int:
    return int(
        await service.registry.pool.fetchval(
            "SELECT count(*) FROM issued_tokens WHERE grant_id = $1", grant_id
        )
    )


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("revoked", ["grant", "agent"])
async def test_a_revocation_committed_while_a_token_is_signed_wins(
    service: InProcess, monkeypatch: pytest.MonkeyPatch, revoked: str
) -> None:
    """Issuance reads the grant (active), then signs; the grant (or its agent) is revoked
    and committed meanwhile. The token must not be recorded or returned."""
    world, registry = service.world, service.registry
    human, agent, _, grant = await world.setup_grant()
    signing, release = asyncio.Event(), asyncio.Event()
    real_signer = registry.keys.signer

    async def slow_signer(now: float) -> Any:
        signer = await real_signer(now)
        signing.set()  # the grant has been read as active
        await release.wait()
        return signer

    monkeypatch.setattr(registry.keys, "signer", slow_signer)
    issuance = asyncio.ensure_future(
        registry.issue_token(await service_agent(service, agent.id), grant["id"])
    )
    await asyncio.wait_for(signing.wait(), 10)
    target = grant["id"] if revoked == "grant" else agent.id
    await registry.revoke(revoked, target, principal_id=human.principal_id, admin=False)
    release.set()
    with pytest.raises(Forbidden) as caught:
        await asyncio.wait_for(issuance, 10)
    assert caught.value.reason == "grant_revoked"
    assert await issued(service, grant["id"]) == 0


@pytest.mark.asyncio(loop_scope="session")
async def test_a_revocation_begun_while_a_token_is_recorded_waits_for_it(
    service: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other order: issuance has checked the grant inside its transaction; a revocation
    asked for now commits after the token (which it then covers), without a deadlock on
    the audit chain both write to."""
    world, registry = service.world, service.registry
    human, agent, _, grant = await world.setup_grant()
    recording, release = asyncio.Event(), asyncio.Event()
    real_audit = registry._audit

    async def slow_audit(conn: Any, **event: Any) -> None:
        if event["event"] == "token.issued":
            recording.set()
            await release.wait()
        await real_audit(conn, **event)

    monkeypatch.setattr(registry, "_audit", slow_audit)
    issuance = asyncio.ensure_future(
        registry.issue_token(await service_agent(service, agent.id), grant["id"])
    )
    await asyncio.wait_for(recording.wait(), 10)
    revocation = asyncio.ensure_future(
        registry.revoke("grant", grant["id"], principal_id=human.principal_id, admin=False)
    )
    await asyncio.sleep(0.5)
    assert not revocation.done()  # it waits on the grant row the issuance holds
    release.set()
    token = await asyncio.wait_for(issuance, 10)
    assert (await asyncio.wait_for(revocation, 10))["revoked"]
    assert token["grant_id"] == grant["id"] and await issued(service, grant["id"]) == 1
    # The token was recorded first; the revocation, committed after, covers it.
    r = await world.token(agent, grant["id"])
    assert (r.status_code, r.json()["reason"]) == (403, "grant_revoked")


# --- one pending approval per payment -----------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_asking_again_for_a_payment_still_waiting_finds_the_same_approval(
    service: InProcess,
) -> None:
    """A retry (a timeout, a restarted agent process) must not put a second card for the same
    payment in front of the human, who could approve both and so let it be paid twice."""
    world = service.world
    human, agent, _, grant = await world.payments_grant()
    first = await world.step_up(agent, grant["id"], "75", payee="acme")
    before = await service.counts()
    # The same payment, asked again and twice at once: one approval waits.
    again = await world.step_up(agent, grant["id"], "75.00", payee="acme")
    both = await asyncio.gather(
        *(world.step_up(agent, grant["id"], "75", payee="acme") for _ in range(2))
    )
    assert {first["id"], again["id"], *(s["id"] for s in both)} == {first["id"]}
    assert await service.counts() == before  # no row, no audit event
    # Another amount, payee or resource is another payment.
    others = [
        await world.step_up(agent, grant["id"], "76", payee="acme"),
        await world.step_up(agent, grant["id"], "75", payee="other"),
        await world.step_up(agent, grant["id"], "75"),
    ]
    assert len({first["id"], *(s["id"] for s in others)}) == 4
    # Once decided, asking again is a new payment.
    r = await world.client.post(
        world.url(f"/v1/step-ups/{first['id']}/deny"), headers=human.headers
    )
    assert r.status_code == 200, r.text
    assert (await world.step_up(agent, grant["id"], "75", payee="acme"))["id"] != first["id"]


@pytest.mark.asyncio(loop_scope="session")
async def test_the_checkpoint_loop_checks_new_events_ahead_in_slices(service: InProcess) -> None:
    """Between checkpoints the loop checks new events of every chain, at most
    AHEAD_PER_TICK a chain a round, so each checkpoint has little left to check."""
    registry = service.registry
    chain = registry.audit.chain_for("ahead")
    other = next(c for c in registry.audit.chains if c != chain)
    key = next(k for k in (f"k{i}" for i in range(1000)) if registry.audit.chain_for(k) == other)
    async with registry.pool.acquire() as conn:
        for k in ("ahead", key):  # each chain checkpointed by this replica, nothing new
            async with conn.transaction():
                await registry.audit.append(conn, event="t.e", actor="t", subject="s", key=k)
        await registry.checkpoint_all()
        for _ in range(AHEAD_PER_TICK + 300):
            async with conn.transaction():
                await registry.audit.append(conn, event="t.e", actor="t", subject="s", key="ahead")
        async with conn.transaction():
            await registry.audit.append(conn, event="t.e", actor="t", subject="s", key=key)
    assert await registry.verify_ahead() == AHEAD_PER_TICK + 1
    assert await registry.verify_ahead() == 300
    assert await registry.verify_ahead() == 0
    made = {c["chain"]: c["size"] for c in await registry.checkpoint_all()}
    heads = await registry.pool.fetch("SELECT chain, size FROM audit_heads")
    assert made == {r["chain"]: r["size"] for r in heads if r["chain"] in (chain, other)}


# --- ids of someone else's, swapped into a query ----------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_audit_events_name_only_the_callers_agent_and_grant(service: InProcess) -> None:
    """Every id a human names must be theirs, each answered 404 as an absent one: the
    grant was not checked when an agent was named too (an empty list, where a grant of the
    caller's would have shown its events)."""
    world = service.world
    alice, alices_agent, _, alices_grant = await world.setup_grant()
    _, bobs_agent, _, bobs_grant = await world.setup_grant()
    events = world.url("/v1/audit/events")
    for query in (
        {"agent_id": alices_agent.id, "grant_id": bobs_grant["id"]},
        {"agent_id": bobs_agent.id, "grant_id": alices_grant["id"]},
        {"grant_id": bobs_grant["id"]},
        {"agent_id": alices_agent.id, "grant_id": "grt_absent"},
    ):
        r = await world.client.get(events, headers=alice.headers, params=query)
        assert (r.status_code, r.json().get("error")) == (404, "not_found"), (query, r.text)
    r = await world.client.get(
        events,
        headers=alice.headers,
        params={"agent_id": alices_agent.id, "grant_id": alices_grant["id"]},
    )
    assert r.status_code == 200 and r.json(), r.text


# --- dead rows the sweep deletes ----------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_the_sweep_deletes_revocations_of_tokens_expired_a_day_ago(
    service: InProcess,
) -> None:
    """A token revocation outlives its token: the sweep deletes it only once the token's
    record has gone (a day after the token expired). Grant revocations stay, and a token
    revocation whose token is still recorded stays however old it is."""
    world, registry = service.world, service.registry
    pool = registry.pool
    human, agent, _, grant = await world.setup_grant()
    jtis = []
    for _ in range(2):
        r = await world.token(agent, grant["id"])
        assert r.status_code == 200, r.text
        jtis.append(r.json()["jti"])
    dead, live = jtis
    for jti in jtis:
        await registry.revoke("token", jti, principal_id=human.principal_id, admin=False)
    await registry.revoke("grant", grant["id"], principal_id=human.principal_id, admin=False)
    # Both revoked two days ago; only the dead token expired (more than a day ago).
    await pool.execute(
        "UPDATE revocations SET revoked_at = now() - interval '2 days' WHERE target = ANY($1)",
        [*jtis, grant["id"]],
    )
    await pool.execute(
        "UPDATE issued_tokens SET expires_at = extract(epoch FROM now())::bigint - 90000"
        " WHERE jti = $1",
        dead,
    )
    await registry.sweep_expired()
    left = await pool.fetch(
        "SELECT kind, target FROM revocations WHERE target = ANY($1)", [*jtis, grant["id"]]
    )
    assert {(r["kind"], r["target"]) for r in left} == {("token", live), ("grant", grant["id"])}


@pytest.mark.asyncio(loop_scope="session")
async def test_the_sweep_forgets_spent_step_ups_a_day_after_they_expire(
    service: InProcess,
) -> None:
    """verifier_step_up_uses keeps a spent approval from being used twice; once its step-up
    has expired (and the verifier refuses it for that alone) a day ago, it goes. The marks
    of step-ups still valid, or expired only just, stay."""
    world, registry = service.world, service.registry
    pool = registry.pool
    _, agent, _, grant = await world.payments_grant()
    now = int(time.time())
    ages = {"long-expired": now - 90_000, "just-expired": now - 60, "valid": now + 600}
    refs = {}
    for n, (label, expires_at) in enumerate(ages.items()):
        step = await world.step_up(agent, grant["id"], str(60 + n))
        ref = refs[label] = f"{label}:{step['id']}"
        await pool.execute(
            "UPDATE step_ups SET status = 'approved', approval_ref = $2, expires_at = $3"
            " WHERE id = $1",
            step["id"],
            ref,
            expires_at,
        )
        await pool.execute(
            "INSERT INTO verifier_step_up_uses (approval_ref, grant_id) VALUES ($1, $2)",
            ref,
            grant["id"],
        )
    await registry.sweep_expired()
    left = await pool.fetch(
        "SELECT approval_ref FROM verifier_step_up_uses WHERE grant_id = $1", grant["id"]
    )
    assert {r["approval_ref"] for r in left} == {refs["just-expired"], refs["valid"]}


@pytest.mark.asyncio(loop_scope="session")
async def test_the_sweep_deletes_requests_and_step_ups_left_unanswered_a_month_past_expiry(
    service: InProcess,
) -> None:
    """An agent may leave max_pending_* unanswered every ttl, forever, and each row is one
    more in every listing of its human's: those expired over 30 days ago go. Answered ones
    stay (a human's decisions), and so do those expired more recently, or set to expire
    early by hand but asked for recently (still read as "expired")."""
    world, registry = service.world, service.registry
    pool = registry.pool
    _, agent, provider, grant = await world.payments_grant()
    now = int(time.time())
    month, ttl = 31 * 86400, registry.settings.grant_request_ttl
    # Step-ups: (seconds since asked, seconds since expired, status).
    steps = {
        "gone": (month + 600, month, "pending"),
        "recent": (86400 + 600, 86400, "pending"),
        "set back": (60, month, "pending"),
        "denied": (month + 600, month, "denied"),
    }
    step_ids = {}
    for n, (label, (asked, expired, status)) in enumerate(steps.items()):
        step = await world.step_up(agent, grant["id"], str(60 + n))
        step_ids[label] = step["id"]
        await pool.execute(
            "UPDATE step_ups SET created_at = now() - $2 * interval '1 second',"
            " expires_at = $3, status = $4 WHERE id = $1",
            step["id"],
            float(asked),
            now - expired,
            status,
        )
    # Grant requests: (seconds since asked, status); the one approved (above) stays too.
    requests = {"gone": (ttl + month, "pending"), "recent": (ttl + 86400, "pending")}
    requests["denied"] = (ttl + month, "denied")
    request_ids = {}
    for label, (asked, status) in requests.items():
        request = await world.request(agent, provider)
        request_ids[label] = request["id"]
        await pool.execute(
            "UPDATE grant_requests SET created_at = now() - $2 * interval '1 second',"
            " status = $3 WHERE id = $1",
            request["id"],
            float(asked),
            status,
        )
    await pool.execute(
        "UPDATE grant_requests SET created_at = now() - $2 * interval '1 second'"
        " WHERE id = (SELECT request_id FROM grants WHERE id = $1)",
        grant["id"],
        float(ttl + month),
    )
    await registry.sweep_expired()
    left_steps = await pool.fetch(
        "SELECT id FROM step_ups WHERE id = ANY($1)", list(step_ids.values())
    )
    assert {r["id"] for r in left_steps} == {step_ids[k] for k in ("recent", "set back", "denied")}
    left_requests = await pool.fetch("SELECT id FROM grant_requests WHERE agent_id = $1", agent.id)
    assert {r["id"] for r in left_requests} == {
        request_ids["recent"],
        request_ids["denied"],
        await pool.fetchval("SELECT request_id FROM grants WHERE id = $1", grant["id"]),
    }
    r = await world.as_agent(agent, "GET", f"/v1/step-ups/{step_ids['recent']}")
    assert r.status_code == 200 and r.json()["status"] == "expired", r.text
