"""The registry over HTTP on a real Ray Serve app, with real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from registry_world import PAYMENTS, STEP_UP_ABOVE_50, Human, World
from softauthn import SoftAuthenticator

from agentauth.protocol import (
    AccessTokenVerifier,
    ApprovalReceipt,
    AuditEvent,
    AuditKeys,
    Capability,
    Grant,
    KeySet,
    PrivateKey,
    b64url_decode,
    b64url_encode,
    verify_chain,
    verify_checkpoint,
    verify_inclusion,
    verify_receipt,
)
from agentauth.registry import RegistrySettings
from agentauth.store import grant_cache_key

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.redis]

TABLES = (
    "principals",
    "passkey_credentials",
    "sessions",
    "enrollments",
    "agents",
    "providers",
    "grant_requests",
    "grants",
    "approval_receipts",
    "issued_tokens",
    "revocations",
    "step_ups",
    "audit_events",
)


async def counts(db: asyncpg.Connection) -> dict[str, int]:
    return {t: await db.fetchval(f"SELECT count(*) FROM {t}") for t in TABLES}


async def each_decision_refused_as_expired(
    world: World, db: asyncpg.Connection, path: str, human: Human, credential: Any
) -> None:
    """Finishing an approval begun in time, beginning one, refusing: each 409 ``expired``,
    nothing written, and the refused finish's challenge not consumed."""
    before = await counts(db)
    challenges = await db.fetchval("SELECT count(*) FROM webauthn_challenges")
    for action, kwargs in (
        ("/approval/finish", {"json": {"credential": credential}}),
        ("/approval/begin", {}),
        ("/deny", {}),
    ):
        r = await world.client.post(world.url(path + action), headers=human.headers, **kwargs)
        assert (r.status_code, r.json().get("reason")) == (409, "expired"), (action, r.text)
    assert await counts(db) == before
    assert await db.fetchval("SELECT count(*) FROM webauthn_challenges") == challenges


async def jwks(world: World) -> KeySet:
    r = await world.client.get(world.url("/.well-known/jwks.json"))
    assert r.status_code == 200
    return KeySet.from_jwks(r.json())


async def audit_keys(world: World) -> AuditKeys:
    """Every key the registry signed checkpoints with: unlike the JWKS, it survives rotations."""
    r = await world.client.get(world.url("/.well-known/agentauth-audit-keys.json"))
    assert r.status_code == 200
    return AuditKeys.from_document(r.json())


# --- the full flow ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_full_flow_register_request_approve_token(
    world: World, db: asyncpg.Connection
) -> None:
    human = await world.human("Alice")
    agent = await world.agent(human, alg="Ed25519")
    provider = await world.provider()
    envelope = {
        "rate_limits": [{"max_count": 5, "window_seconds": 3600}],
        "timezone": "Europe/Berlin",
    }
    request = await world.request(
        agent, provider, [Capability.read("calendar/*").to_document()], envelope
    )
    assert request["status"] == "pending"

    # The human sees it pending, approves with a passkey over the grant hash.
    r = await world.client.get(
        world.url("/v1/grant-requests?status=pending"), headers=human.headers
    )
    assert [x["id"] for x in r.json()] == [request["id"]]
    begun = await world.begin_approval(human, request["id"])
    grant = Grant.from_document(begun["grant"])
    assert b64url_decode(begun["options"]["challenge"]) == grant.digest()
    credential = human.authenticator.get(begun["options"])
    r = await world.client.post(
        world.url(f"/v1/grant-requests/{request['id']}/approval/finish"),
        headers=human.headers,
        json={"credential": credential},
    )
    assert r.status_code == 200, r.text
    stored = r.json()
    assert stored["document"] == grant.document()

    # Anyone can check offline that this passkey approved exactly this grant.
    receipt = ApprovalReceipt.model_validate(stored["receipt"])
    verified = verify_receipt(
        receipt, grant, rp_id="localhost", origin=world.origin, require_uv=True
    )
    assert verified.user_verified

    # The agent exchanges it for a DPoP-bound token, checkable from the JWKS alone.
    r = await world.token(agent, grant.grant_id)
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    verifier = AccessTokenVerifier(keys=await jwks(world), issuer=world.base)
    access = verifier.verify(token, audience=provider.audience, now=time.time())
    assert access.jkt == agent.key.thumbprint
    assert access.claims.grant_hash == grant.digest_b64()
    assert access.claims.receipt_hash == receipt.digest()
    assert access.claims.sub == agent.id

    # Any JOSE library can check the signature against the JWKS (joserfc here).
    from joserfc import jws
    from joserfc.jwk import KeySet as JoseKeySet

    r = await world.client.get(world.url("/.well-known/jwks.json"))
    compact = jws.deserialize_compact(
        token, JoseKeySet.import_key_set(r.json()), algorithms=["ES256"]
    )
    assert json.loads(compact.payload)["cnf"]["jkt"] == agent.key.thumbprint

    # Every change is in the audit log, chained and covered by a signed checkpoint.
    r = await world.client.post(world.url("/v1/admin/checkpoints"), headers=world.admin)
    assert r.status_code == 200
    r = await world.client.get(
        world.url(f"/v1/audit/events?agent_id={agent.id}"), headers=human.headers
    )
    events = [e["event"] for e in r.json()]
    assert events[:3] == ["agent.registered", "grant_request.created", "grant.approved"]
    assert "token.issued" in events
    last = r.json()[-1]
    r = await world.client.get(
        world.url(f"/v1/audit/events/{last['chain']}/{last['seq']}/proof"), headers=human.headers
    )
    proof = r.json()
    checkpoint = verify_checkpoint(proof["checkpoint"], keys=await jwks(world))
    event = AuditEvent.from_canonical(proof["event"])
    verify_inclusion(
        leaf_hash=event.entry_hash(),
        index=proof["index"],
        tree_size=checkpoint.size,
        proof=[b64url_decode(h) for h in proof["proof"]],
        root=checkpoint.root_bytes(),
    )


@pytest.mark.asyncio
async def test_discovery_and_jwks_are_public_everything_else_is_not(world: World) -> None:
    for path in (
        "/healthz",
        "/.well-known/jwks.json",
        "/.well-known/agentauth-audit-keys.json",
        "/.well-known/agentauth-configuration",
    ):
        r = await world.client.get(world.url(path))
        assert r.status_code == 200, path
    d = (await world.client.get(world.url("/.well-known/agentauth-configuration"))).json()
    assert d["issuer"] == world.base and d["token_endpoint"] == world.url("/v1/token")
    protected = [
        ("GET", "/v1/passkeys"),
        ("POST", "/v1/passkeys/begin"),
        ("POST", "/v1/enrollments"),
        ("GET", "/v1/agents"),
        ("GET", "/v1/agents/agt_x"),
        ("POST", "/v1/agents/agt_x/disable"),
        ("POST", "/v1/providers"),
        ("GET", "/v1/providers/p"),
        ("POST", "/v1/providers/p/secret"),
        ("DELETE", "/v1/providers/p/secret/previous"),
        ("PUT", "/v1/providers/p/suspension"),
        ("DELETE", "/v1/providers/p/suspension"),
        ("POST", "/v1/grant-requests"),
        ("GET", "/v1/grant-requests"),
        ("GET", "/v1/grant-requests/grq_x"),
        ("POST", "/v1/grant-requests/grq_x/approval/begin"),
        ("POST", "/v1/grant-requests/grq_x/approval/finish"),
        ("POST", "/v1/grant-requests/grq_x/deny"),
        ("GET", "/v1/grants"),
        ("GET", "/v1/grants/grt_x"),
        ("POST", "/v1/token"),
        ("POST", "/v1/revocations"),
        ("GET", "/v1/revocations"),
        ("POST", "/v1/step-ups"),
        ("GET", "/v1/step-ups"),
        ("GET", "/v1/step-ups/stp_x"),
        ("POST", "/v1/step-ups/stp_x/approval/begin"),
        ("POST", "/v1/step-ups/stp_x/deny"),
        ("GET", "/v1/audit/events?agent_id=a"),
        ("GET", "/v1/audit/events/registry-0/0/proof"),
        ("GET", "/v1/audit/checkpoints"),
        ("GET", "/v1/audit/consistency?chain=registry-0&first=1&second=2"),
        ("POST", "/v1/admin/keys/rotate"),
        ("POST", "/v1/admin/checkpoints"),
        ("POST", "/v1/admin/recoveries"),
        ("POST", "/v1/passkeys/confirm"),
        ("POST", "/v1/passkeys/finish"),
        ("DELETE", "/v1/passkeys/cred_x"),
        ("DELETE", "/v1/sessions/current"),
        ("GET", "/v1/grants/grt_x/usage"),
        ("GET", "/v1/grants/grt_x/tokens"),
        ("POST", "/v1/step-ups/stp_x/approval/finish"),
    ]
    for method, path in protected:
        body = {} if method == "POST" else None
        r = await world.client.request(method, world.url(path), json=body)
        assert r.status_code in (400, 401), (method, path, r.status_code, r.text)
        # The token endpoint's code for a caller that did not authenticate is RFC 6749 §5.2's.
        unauthenticated = "invalid_client" if path == "/v1/token" else "unauthenticated"
        assert r.json()["error"] in (unauthenticated, "invalid_request"), (method, path)
        if r.status_code == 400:  # schema checked first: retry with a valid-shaped body
            continue
        # RFC 9110 §11.6.1: a 401 names a scheme to authenticate with; no error without
        # credentials (RFC 6750 §3.1).
        assert r.headers["www-authenticate"], (method, path)
        assert "error=" not in r.headers["www-authenticate"], (method, path)
        # A forged session is refused the same way.
        r = await world.client.request(
            method, world.url(path), json=body, headers={"Authorization": "Bearer ses_forged"}
        )
        assert r.status_code == 401, (method, path)


# --- who may do what -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_cross_owner_access_is_refused_and_writes_nothing(
    world: World, db: asyncpg.Connection
) -> None:
    alice, agent_a, provider_a, grant_a = await world.setup_grant()
    bob = await world.human("Bob")
    agent_b = await world.agent(bob)
    provider_b = await world.provider()
    pending = await world.request(agent_a, provider_a)
    before = await counts(db)

    # Human B on A's things.
    for method, path in [
        ("GET", f"/v1/grant-requests/{pending['id']}"),
        ("POST", f"/v1/grant-requests/{pending['id']}/approval/begin"),
        ("POST", f"/v1/grant-requests/{pending['id']}/deny"),
        ("GET", f"/v1/grants/{grant_a['id']}"),
        ("GET", f"/v1/agents/{agent_a.id}"),
        ("POST", f"/v1/agents/{agent_a.id}/disable"),
        ("GET", f"/v1/audit/events?agent_id={agent_a.id}"),
    ]:
        r = await world.client.request(method, world.url(path), headers=bob.headers)
        assert r.status_code == 404, (method, path, r.text)
    r = await world.client.post(
        world.url("/v1/revocations"),
        headers=bob.headers,
        json={"kind": "grant", "target": grant_a["id"]},
    )
    assert r.status_code == 404
    r = await world.client.get(world.url("/v1/grant-requests"), headers=bob.headers)
    assert r.json() == []

    # Agent X on Y's grant: no token, no view.
    r = await world.token(agent_b, grant_a["id"])
    assert r.status_code == 404
    r = await world.as_agent(agent_b, "GET", f"/v1/grants/{grant_a['id']}")
    assert r.status_code == 404
    # An agent cannot act as a human or an admin.
    r = await world.as_agent(agent_b, "POST", f"/v1/grant-requests/{pending['id']}/deny")
    assert r.status_code == 403
    r = await world.as_agent(
        agent_b,
        "POST",
        "/v1/providers",
        json={"id": "x", "audience": "x", "display_name": "x", "allowed_kinds": ["read"]},
    )
    assert r.status_code == 403

    # A provider on another provider's data, or on the humans' API.
    r = await world.client.get(
        world.url(f"/v1/providers/{provider_b.id}"), headers=provider_a.headers
    )
    assert r.status_code == 403
    r = await world.client.get(world.url("/v1/grants"), headers=provider_a.headers)
    assert r.status_code == 403
    r = await world.client.get(
        world.url(f"/v1/providers/{provider_a.id}"), headers=provider_a.headers
    )
    assert r.status_code == 200
    # A human is not an admin.
    r = await world.client.post(world.url("/v1/admin/keys/rotate"), headers=alice.headers)
    assert r.status_code == 403

    assert await counts(db) == before


@pytest.mark.asyncio
async def test_an_events_proof_is_only_for_who_may_read_the_event(
    world: World, db: asyncpg.Connection
) -> None:
    """The proof endpoint returns the event itself: only its readers get it, everyone else
    the 404 of a missing event (chains and sequence numbers are easy to enumerate)."""
    alice, agent_a, provider_a, grant_a = await world.setup_grant()
    bob = await world.human("Bob")
    agent_b = await world.agent(bob)
    provider_b = await world.provider()
    r = await world.client.get(
        world.url(f"/v1/audit/events?agent_id={agent_a.id}"), headers=alice.headers
    )
    by_name = {e["event"]: e for e in r.json()}
    registered, approved = by_name["agent.registered"], by_name["grant.approved"]
    assert approved["subject"] == f"grant:{grant_a['id']}"

    async def proof(event: dict[str, Any], headers: dict[str, str] | None = None) -> int:
        path = f"/v1/audit/events/{event['chain']}/{event['seq']}/proof"
        if headers is None:  # the agent signs each request with its key instead
            return (await world.as_agent(agent_a, "GET", path)).status_code
        return (await world.client.get(world.url(path), headers=headers)).status_code

    for event in (registered, approved):
        assert await proof(event, alice.headers) == 200
        assert await proof(event, world.admin) == 200
        assert await proof(event) == 200  # the agent it is about
        for stranger in (bob.headers, provider_b.headers):
            assert await proof(event, stranger) == 404
        path = f"/v1/audit/events/{event['chain']}/{event['seq']}/proof"
        assert (await world.as_agent(agent_b, "GET", path)).status_code == 404
    # The grant's provider reads its grant's events, not the rest of the agent's.
    assert await proof(approved, provider_a.headers) == 200
    assert await proof(registered, provider_a.headers) == 404
    # An event about nobody's agent or grant (a provider's registration) is the admin's.
    outsider = await db.fetchrow(
        "SELECT chain, seq FROM audit_events WHERE event = 'provider.registered'"
        " AND agent_id IS NULL AND grant_id IS NULL LIMIT 1"
    )
    assert outsider is not None and await proof(dict(outsider), world.admin) == 200
    for headers in (alice.headers, bob.headers, provider_a.headers):
        assert await proof(outsider, headers) == 404


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_bad_input_gets_4xx_with_a_code_and_writes_nothing(
    world: World, db: asyncpg.Connection
) -> None:
    human = await world.human()
    agent = await world.agent(human)
    provider = await world.provider(kinds=("read",))
    await asyncio.sleep(0)  # every setup write is done before counting
    before = await counts(db)
    path = "/v1/grant-requests"
    good = {"provider_id": provider.id, "capabilities": [{"kind": "read", "resource": "calendar"}]}
    cases: list[tuple[str, Any, int]] = [
        ("malformed JSON", b"{not json", 400),
        ("duplicate member", b'{"provider_id": "a", "provider_id": "b", "capabilities": []}', 400),
        ("oversized", b'{"x": "' + b"a" * 70_000 + b'"}', 413),
        ("not an object", b"[1, 2]", 400),
        ("wrong type", {**good, "capabilities": "read"}, 400),
        ("unknown member", {**good, "extra": 1}, 400),
        ("missing member", {"provider_id": provider.id}, 400),
        ("empty capabilities", {**good, "capabilities": []}, 400),
        (
            "bad resource pattern",
            {**good, "capabilities": [{"kind": "read", "resource": "a/*/b"}]},
            400,
        ),
        (
            "float amount",
            {
                **good,
                "capabilities": [
                    {"kind": "transact", "resource": "p", "max_amount": 1.5, "currency": "USD"}
                ],
            },
            400,
        ),
        ("unknown zone", {**good, "envelope": {"timezone": "Mars/Olympus"}}, 400),
        (
            "kind not offered",
            {**good, "capabilities": [{"kind": "write", "resource": "calendar"}]},
            403,
        ),
        ("unknown provider", {**good, "provider_id": "nope"}, 404),
    ]
    for name, body, status in cases:
        kwargs: dict[str, Any] = (
            {"content": body, "headers": {"Content-Type": "application/json"}}
            if isinstance(body, bytes)
            else {"json": body}
        )
        r = await world.as_agent(agent, "POST", path, **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text[:300])
        payload = r.json()
        assert isinstance(payload.get("error"), str) and payload["error"] != "server_error", name

    # Unknown ids are 404 for their owner too; a bad agent JWK is a 400.
    r = await world.client.get(world.url("/v1/grant-requests/grq_nope"), headers=human.headers)
    assert r.status_code == 404
    r = await world.client.post(world.url("/v1/enrollments"), headers=human.headers)
    code = r.json()["enrollment_code"]
    before = await counts(db)
    from agentauth.protocol import PrivateKey

    key = PrivateKey.generate()
    bad_jwk = {**key.public_jwk(), "x": "AAAA"}
    r = await world.client.post(
        world.url("/v1/agents"),
        headers={"DPoP": world.proof(key, "POST", "/v1/agents")},
        json={"name": "b", "public_jwk": bad_jwk, "enrollment_code": code},
    )
    assert r.status_code == 400, r.text
    # A proof by another key than the one registered: no proof of possession.
    other = PrivateKey.generate()
    r = await world.client.post(
        world.url("/v1/agents"),
        headers={"DPoP": world.proof(other, "POST", "/v1/agents")},
        json={"name": "b", "public_jwk": key.public_jwk(), "enrollment_code": code},
    )
    assert r.status_code == 401, r.text
    assert await counts(db) == before


@pytest.mark.asyncio
async def test_expired_challenges_sessions_and_codes_are_deleted(
    world: World, db: asyncpg.Connection
) -> None:
    """Anyone can start a sign-in, so its challenges must not pile up; dead sessions and
    enrollment codes go the same way. The live ones stay (the session registry sweeps
    every second here, every minute by default)."""
    owner, agent, _, grant = await world.setup_grant()
    tokens = [(await world.token(agent, grant["id"])).json()["access_token"] for _ in range(2)]
    jtis = [json.loads(b64url_decode(t.split(".")[1]))["jti"] for t in tokens]
    human = await world.human()
    other = await world.human()
    r = await world.client.post(world.url("/v1/enrollments"), headers=human.headers)
    assert r.status_code == 200
    for _ in range(2):
        assert (await world.client.post(world.url("/v1/sessions/begin"))).status_code == 200
    old = []
    for _ in range(3):
        r = await world.client.post(world.url("/v1/sessions/begin"))
        old.append(b64url_decode(r.json()["challenge"]))
    # Their time passes: three challenges, one session, every code of one human.
    await db.execute(
        "UPDATE webauthn_challenges SET expires_at = now() - interval '1 second'"
        " WHERE challenge = ANY($1)",
        old,
    )
    await db.execute(
        "UPDATE sessions SET expires_at = now() - interval '1 second' WHERE principal_id = $1",
        human.principal_id,
    )
    await db.execute(
        "UPDATE enrollments SET expires_at = now() - interval '1 second' WHERE principal_id = $1",
        human.principal_id,
    )
    # One token expired two days ago (its record goes), one an hour ago (kept a day).
    for jti, age in zip(jtis, (2 * 86400, 3600), strict=True):
        await db.execute(
            "UPDATE issued_tokens SET expires_at = extract(epoch FROM now())::bigint - $2"
            " WHERE jti = $1",
            jti,
            age,
        )
    deadline = time.monotonic() + 10
    while await db.fetchval(
        "SELECT (SELECT count(*) FROM webauthn_challenges WHERE expires_at < now())"
        " + (SELECT count(*) FROM sessions WHERE expires_at < now())"
        " + (SELECT count(*) FROM enrollments WHERE expires_at < now())"
        " + (SELECT count(*) FROM issued_tokens WHERE jti = $1)",
        jtis[0],
    ):
        assert time.monotonic() < deadline, "expired rows are still there"
        await asyncio.sleep(0.2)
    assert not await db.fetchval(
        "SELECT count(*) FROM webauthn_challenges WHERE challenge = ANY($1)", old
    )
    assert await db.fetchval("SELECT count(*) FROM webauthn_challenges") >= 2  # the live ones
    assert await db.fetchval("SELECT count(*) FROM issued_tokens WHERE jti = $1", jtis[1]) == 1
    # Revoking the token whose record went is a 404 (it can never be used again anyway).
    r = await world.client.post(
        world.url("/v1/revocations"),
        headers=owner.headers,
        json={"kind": "token", "target": jtis[0]},
    )
    assert r.status_code == 404, r.text
    # The other human's session is live and still works; the expired one is refused.
    assert (await world.client.get(world.url("/v1/agents"), headers=other.headers)).is_success
    r = await world.client.get(world.url("/v1/agents"), headers=human.headers)
    assert (r.status_code, r.json()["reason"]) == (401, "bad_session")


# --- approvals ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_one_assertion_submitted_20_times_concurrently_makes_one_grant(
    world: World, db: asyncpg.Connection
) -> None:
    human, _, request, credential = await world.signed_request()

    async def submit() -> httpx.Response:
        return await world.client.post(
            world.url(f"/v1/grant-requests/{request['id']}/approval/finish"),
            headers=human.headers,
            json={"credential": credential},
        )

    responses = await asyncio.gather(*(submit() for _ in range(20)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == 1, statuses
    assert all(s == 409 for s in statuses if s != 200), statuses
    assert (
        await db.fetchval("SELECT count(*) FROM grants WHERE request_id = $1", request["id"]) == 1
    )
    # Replaying it later is a 409 too.
    assert (await submit()).status_code == 409


@pytest.mark.asyncio
async def test_assertion_for_one_grant_cannot_approve_another(world: World) -> None:
    human = await world.human()
    agent = await world.agent(human)
    provider = await world.provider()
    first = await world.request(agent, provider)
    second = await world.request(agent, provider, [Capability.write("calendar").to_document()])
    begun_a = await world.begin_approval(human, first["id"])
    await world.begin_approval(human, second["id"])
    credential = human.authenticator.get(begun_a["options"])
    r = await world.client.post(
        world.url(f"/v1/grant-requests/{second['id']}/approval/finish"),
        headers=human.headers,
        json={"credential": credential},
    )
    assert r.status_code == 409 and r.json()["reason"] == "challenge_used"
    r = await world.client.get(
        world.url(f"/v1/grant-requests/{second['id']}"), headers=human.headers
    )
    assert r.json()["status"] == "pending"


@pytest.mark.asyncio
async def test_signing_out_ends_that_session_only_and_at_once(world: World) -> None:
    human = await world.human("Sam")
    # A second session of the same human, as from another device.
    r = await world.client.post(world.url("/v1/sessions/begin"))
    r = await world.client.post(
        world.url("/v1/sessions/finish"), json={"credential": human.authenticator.get(r.json())}
    )
    assert r.status_code == 200, r.text
    other = {"Authorization": f"Bearer {r.json()['session']}"}
    passkeys = world.url("/v1/passkeys")
    assert (await world.client.get(passkeys, headers=human.headers)).status_code == 200

    r = await world.client.delete(world.url("/v1/sessions/current"), headers=human.headers)
    assert r.status_code == 200 and r.json() == {"signed_out": True}, r.text
    r = await world.client.get(passkeys, headers=human.headers)
    assert r.status_code == 401 and r.json()["reason"] == "bad_session", r.text
    assert (await world.client.get(passkeys, headers=other)).status_code == 200

    # Ending it again, or with no session, or as the admin, is refused with a code.
    for headers, status, reason in (
        (human.headers, 401, "bad_session"),
        ({}, 401, "missing_session"),
        (world.admin, 403, "wrong_caller"),
    ):
        r = await world.client.delete(world.url("/v1/sessions/current"), headers=headers)
        assert (r.status_code, r.json()["reason"]) == (status, reason), r.text
    assert (await world.client.get(passkeys, headers=other)).status_code == 200


async def sign_in(world: World, human: Human, passkey: Any = None) -> httpx.Response:
    r = await world.client.post(world.url("/v1/sessions/begin"))
    credential = human.authenticator.get(r.json(), passkey=passkey)
    finish = world.url("/v1/sessions/finish")
    return await world.client.post(finish, json={"credential": credential})


@pytest.mark.asyncio
async def test_a_passkey_is_added_or_removed_only_with_another_ones_confirmation(
    world: World,
) -> None:
    """A session alone cannot change who approves for a human: a thief holding only the
    session token can neither add a passkey nor remove the owner's. Each change is
    confirmed by one of the human's passkeys over a challenge bound to that change."""
    alice = await world.human("Alice")
    thief = await world.human("Mallory")  # has passkeys, just none of Alice's
    url = world.url

    async def confirm(headers: dict[str, str], **change: Any) -> dict[str, Any]:
        r = await world.client.post(
            url("/v1/passkeys/confirm"), headers=headers, json=change or {"change": "add"}
        )
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    # With Alice's session: no confirmation, or one signed by the thief's own passkey.
    r = await world.client.post(url("/v1/passkeys/begin"), headers=alice.headers)
    assert r.status_code == 400 and r.json()["error"] == "invalid_request", r.text
    stranger = next(iter(thief.authenticator.passkeys.values()))
    forged = thief.authenticator.get(await confirm(alice.headers), passkey=stranger)
    r = await world.client.post(
        url("/v1/passkeys/begin"), headers=alice.headers, json={"credential": forged}
    )
    assert r.status_code == 400 and r.json()["reason"] == "unknown_credential", r.text

    # Alice confirms with her passkey and adds a second one.
    first = next(iter(alice.authenticator.passkeys.values()))
    confirmation = alice.authenticator.get(await confirm(alice.headers))
    r = await world.client.post(
        url("/v1/passkeys/begin"), headers=alice.headers, json={"credential": confirmation}
    )
    assert r.status_code == 200, r.text
    r = await world.client.post(
        url("/v1/passkeys/finish"),
        headers=alice.headers,
        json={"credential": alice.authenticator.create(r.json())},
    )
    assert r.status_code == 200, r.text
    second = alice.authenticator.passkeys[b64url_decode(r.json()["credential_id"])]
    # The confirmation was single use.
    r = await world.client.post(
        url("/v1/passkeys/begin"), headers=alice.headers, json={"credential": confirmation}
    )
    assert r.status_code == 409 and r.json()["reason"] == "challenge_used", r.text

    # A second device signed in with the new passkey.
    other = await sign_in(world, alice, second)
    assert other.status_code == 200, other.text
    other_session = {"Authorization": f"Bearer {other.json()['session']}"}

    # Removing the first: a confirmation for adding, or for removing another passkey, does
    # not do; one for removing this one does, and signs out every other session.
    first_id = b64url_encode(first.credential_id)
    second_id = b64url_encode(second.credential_id)
    for wrong in (
        await confirm(alice.headers),
        await confirm(alice.headers, change="remove", credential_id=second_id),
    ):
        r = await world.client.request(
            "DELETE",
            url(f"/v1/passkeys/{first_id}"),
            headers=alice.headers,
            json={"credential": alice.authenticator.get(wrong, passkey=second)},
        )
        assert r.status_code == 409 and r.json()["reason"] == "challenge_used", r.text
    options = await confirm(alice.headers, change="remove", credential_id=first_id)
    r = await world.client.request(
        "DELETE",
        url(f"/v1/passkeys/{first_id}"),
        headers=alice.headers,
        json={"credential": alice.authenticator.get(options, passkey=second)},
    )
    assert r.status_code == 200, r.text
    r = await world.client.get(url("/v1/passkeys"), headers=alice.headers)
    assert [p["credential_id"] for p in r.json()] == [second_id]
    r = await world.client.get(url("/v1/passkeys"), headers=other_session)
    assert r.status_code == 401 and r.json()["reason"] == "bad_session", r.text
    assert (await sign_in(world, alice, first)).json()["reason"] == "unknown_credential"
    # The last one stays, and one that is not hers is not there: refused before any signing.
    for credential_id, status, reason in ((second_id, 409, "last_passkey"), (first_id, 404, None)):
        r = await world.client.post(
            url("/v1/passkeys/confirm"),
            headers=alice.headers,
            json={"change": "remove", "credential_id": credential_id},
        )
        assert r.status_code == status and r.json().get("reason") == reason, r.text
    for bad in ({"change": "remove"}, {"change": "add", "credential_id": first_id}, {}):
        r = await world.client.post(url("/v1/passkeys/confirm"), headers=alice.headers, json=bad)
        assert r.status_code == 400, (bad, r.text)


@pytest.mark.asyncio
async def test_a_human_who_lost_every_passkey_recovers_with_a_one_time_code(
    world: World,
) -> None:
    """Only the admin issues a recovery code; whoever holds it registers a new passkey for
    that human from the sign-in page (no session needed) and is signed in, once; every
    other session and passkey of the human ends."""
    alice = await world.human("Alice")
    url = world.url
    issue = url("/v1/admin/recoveries")
    mine = {"principal_id": alice.principal_id}
    r = await world.client.post(issue, headers=alice.headers, json=mine)
    assert r.status_code == 403, r.text  # a human cannot issue one, even for herself
    r = await world.client.post(issue, headers=world.admin, json={"principal_id": "hum_nobody"})
    assert r.status_code == 404, r.text
    r = await world.client.post(issue, headers=world.admin, json=mine)
    assert r.status_code == 200, r.text
    code = r.json()["recovery_code"]

    wrong = await world.client.post(url("/v1/recovery/begin"), json={"code": "rec_" + "x" * 32})
    assert wrong.status_code == 403 and wrong.json()["reason"] == "bad_recovery", wrong.text
    new_device = SoftAuthenticator(origin=world.origin)
    r = await world.client.post(url("/v1/recovery/begin"), json={"code": code})
    assert r.status_code == 200, r.text
    credential = new_device.create(r.json())
    r = await world.client.post(
        url("/v1/recovery/finish"), json={"code": code, "credential": credential}
    )
    assert r.status_code == 200 and r.json()["principal_id"] == alice.principal_id, r.text
    recovered = {"Authorization": f"Bearer {r.json()['session']}"}
    listed = (await world.client.get(url("/v1/passkeys"), headers=recovered)).json()
    assert [p["credential_id"] for p in listed] == [credential["id"]]
    # The lost passkey is removed: whoever holds it signs in no more.
    assert (await sign_in(world, alice)).json()["reason"] == "unknown_credential"
    r = await world.client.get(url("/v1/passkeys"), headers=alice.headers)
    assert r.status_code == 401 and r.json()["reason"] == "bad_session", r.text
    # The code worked once; the new passkey signs in.
    r = await world.client.post(url("/v1/recovery/begin"), json={"code": code})
    assert r.status_code == 403 and r.json()["reason"] == "bad_recovery", r.text
    begun = await world.client.post(url("/v1/sessions/begin"))
    r = await world.client.post(
        url("/v1/sessions/finish"), json={"credential": new_device.get(begun.json())}
    )
    assert r.status_code == 200 and r.json()["principal_id"] == alice.principal_id, r.text


@pytest.mark.asyncio
async def test_an_agent_key_nobody_holds_cannot_be_registered(
    world: World, db: asyncpg.Connection
) -> None:
    """The Ed25519 identity point is a valid encoding of a key of small order: the signature
    (R = identity, S = 0) verifies every message, so a "proof of possession" for it can be
    made without any private key. Registration refuses the key itself."""
    human = await world.human()
    r = await world.client.post(world.url("/v1/enrollments"), headers=human.headers)
    code = r.json()["enrollment_code"]
    identity = b"\x01" + bytes(31)  # y = 1, x = 0, little-endian
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(identity)}
    header = {"typ": "dpop+jwt", "alg": "Ed25519", "jwk": jwk}
    claims = {
        "jti": "forged",
        "htm": "POST",
        "htu": world.url("/v1/agents"),
        "iat": int(time.time()),
    }
    forged = (
        ".".join(b64url_encode(json.dumps(part).encode()) for part in (header, claims))
        + "."
        + b64url_encode(identity + bytes(32))
    )
    before = await db.fetchval("SELECT count(*) FROM agents")
    r = await world.client.post(
        world.url("/v1/agents"),
        headers={"DPoP": forged},
        json={"name": "ghost", "public_jwk": jwk, "enrollment_code": code},
    )
    assert r.status_code == 400 and r.json()["reason"] == "bad_jwk", r.text
    assert await db.fetchval("SELECT count(*) FROM agents") == before
    # The code was not spent: the human's real agent still registers with it.
    key = PrivateKey.generate("Ed25519")
    r = await world.client.post(
        world.url("/v1/agents"),
        headers={"DPoP": world.proof(key, "POST", "/v1/agents")},
        json={"name": "real", "public_jwk": key.public_jwk(), "enrollment_code": code},
    )
    assert r.status_code == 200, r.text


@pytest.mark.asyncio
async def test_user_verification_is_required_by_policy(world: World) -> None:
    human = await world.human()
    agent = await world.agent(human)
    provider = await world.provider()
    request = await world.request(agent, provider)
    begun = await world.begin_approval(human, request["id"])
    human.authenticator.user_verification = False
    r = await world.client.post(
        world.url(f"/v1/grant-requests/{request['id']}/approval/finish"),
        headers=human.headers,
        json={"credential": human.authenticator.get(begun["options"])},
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_receipt", r.text
    r = await world.client.get(
        world.url(f"/v1/grant-requests/{request['id']}"), headers=human.headers
    )
    assert r.json()["status"] == "pending"


@pytest.mark.asyncio
async def test_sign_count_regression_is_flagged_and_refused(
    world: World, db: asyncpg.Connection
) -> None:
    human = await world.human()
    agent = await world.agent(human)
    provider = await world.provider()
    first = await world.request(agent, provider)
    await world.approve(human, first["id"])  # counter now 1
    second = await world.request(agent, provider)
    begun = await world.begin_approval(human, second["id"])
    passkey = next(iter(human.authenticator.passkeys.values()))
    credential = human.authenticator.get(begun["options"], passkey=passkey, counter=1)
    r = await world.client.post(
        world.url(f"/v1/grant-requests/{second['id']}/approval/finish"),
        headers=human.headers,
        json={"credential": credential},
    )
    assert r.status_code == 403 and r.json()["reason"] == "sign_count_regression", r.text
    flagged = await db.fetchval(
        "SELECT flagged_at FROM passkey_credentials WHERE principal_id = $1", human.principal_id
    )
    assert flagged is not None


@pytest.mark.asyncio
async def test_a_grant_request_left_unanswered_expires_and_cannot_be_decided(
    world: World, db: asyncpg.Connection
) -> None:
    human, agent, request, credential = await world.signed_request()
    # A week passes (the registry's clock is the database's).
    await db.execute(
        "UPDATE grant_requests SET created_at = now() - interval '7 days 1 second' WHERE id = $1",
        request["id"],
    )
    await each_decision_refused_as_expired(
        world, db, f"/v1/grant-requests/{request['id']}", human, credential
    )
    r = await world.as_agent(agent, "GET", f"/v1/grant-requests/{request['id']}")
    assert r.json()["status"] == "expired" and r.json()["grant_id"] is None
    for status, ids in (("pending", []), ("expired", [request["id"]]), ("approved", [])):
        r = await world.client.get(
            world.url(f"/v1/grant-requests?status={status}"), headers=human.headers
        )
        assert [x["id"] for x in r.json()] == ids, status
    # A new request for the same thing is answered as usual.
    again = {"provider_id": request["provider_id"], "capabilities": request["capabilities"]}
    r = await world.as_agent(agent, "POST", "/v1/grant-requests", json=again)
    assert r.status_code == 200, r.text
    assert (await world.approve(human, r.json()["id"]))["agent_id"] == agent.id


@pytest.mark.asyncio
async def test_tighten_before_approving_never_widen(world: World) -> None:
    human = await world.human()
    agent = await world.agent(human)
    provider = await world.provider()
    envelope = {"rate_limits": [{"max_count": 10, "window_seconds": 3600}]}
    request = await world.request(
        agent,
        provider,
        [Capability.read("calendar/*").to_document(), Capability.write("calendar").to_document()],
        envelope,
    )
    narrower = {"rate_limits": [{"max_count": 5, "window_seconds": 3600}]}
    r = await world.client.post(
        world.url(f"/v1/grant-requests/{request['id']}/approval/begin"),
        headers=human.headers,
        json={"envelope": {"rate_limits": [{"max_count": 50, "window_seconds": 3600}]}},
    )
    assert r.status_code == 403 and r.json()["reason"] == "widening"
    r = await world.client.post(
        world.url(f"/v1/grant-requests/{request['id']}/approval/begin"),
        headers=human.headers,
        json={"capabilities": [{"kind": "read", "resource": "*"}]},
    )
    assert r.status_code == 403
    grant = await world.approve(
        human,
        request["id"],
        envelope=narrower,
        capabilities=[Capability.read("calendar/events/*").to_document()],
    )
    assert grant["document"]["envelope"]["rate_limits"] == [
        {"max_count": 5, "window_seconds": 3600}
    ]
    assert grant["document"]["capabilities"] == [{"kind": "read", "resource": "calendar/events/*"}]

    # Re-requesting more never changes the approved grant: it is a new pending request.
    again = await world.request(agent, provider, [Capability.read("*").to_document()])
    assert again["status"] == "pending"
    r = await world.as_agent(agent, "GET", f"/v1/grants/{grant['id']}")
    assert r.json()["document"] == grant["document"]
    r = await world.token(agent, grant["id"])
    claims = json.loads(b64url_decode(r.json()["access_token"].split(".")[1]))
    assert claims["capabilities"] == [{"kind": "read", "resource": "calendar/events/*"}]


# --- tokens, replay, revocation ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_token_endpoint_refuses_replayed_and_foreign_proofs(world: World) -> None:
    _, agent, _, grant = await world.setup_grant()
    proof = world.proof(agent.key, "POST", "/v1/token")
    first = await world.client.post(
        world.url("/v1/token"), headers={"DPoP": proof}, json={"grant_id": grant["id"]}
    )
    assert first.status_code == 200
    again = await world.client.post(
        world.url("/v1/token"), headers={"DPoP": proof}, json={"grant_id": grant["id"]}
    )
    # A token endpoint's DPoP failures are RFC 6749 §5.2 error responses: 400 (RFC 9449 §5),
    # coded invalid_dpop_proof, a replay's too (its reason says which).
    assert again.status_code == 400
    assert (again.json()["error"], again.json()["reason"]) == ("invalid_dpop_proof", "jti_reused")
    wrong_url = world.proof(agent.key, "POST", "/v1/grants")
    r = await world.client.post(
        world.url("/v1/token"), headers={"DPoP": wrong_url}, json={"grant_id": grant["id"]}
    )
    assert r.status_code == 400 and r.json()["error"] == "invalid_dpop_proof"
    two = {"DPoP": world.proof(agent.key, "POST", "/v1/token")}
    r = await world.client.post(
        world.url("/v1/token"),
        headers=[("DPoP", two["DPoP"]), ("DPoP", two["DPoP"])],
        json={"grant_id": grant["id"]},
    )
    assert r.status_code == 400 and r.json()["reason"] == "multiple_proofs"
    assert first.headers["cache-control"] == "no-store"


@pytest.mark.asyncio
async def test_revocation_is_published_listed_and_stops_issuance(
    world: World, redis_url: str
) -> None:
    human, agent, provider, grant = await world.setup_grant()
    client = aioredis.Redis.from_url(redis_url)
    # What a verifier's cache-aside lookup leaves behind for this grant.
    cached = grant_cache_key(grant["id"])
    await client.set(cached, b"active", ex=60)
    pubsub = client.pubsub()
    await pubsub.subscribe("agentauth:revocations")
    await pubsub.get_message(timeout=1.0)  # the subscribe confirmation
    r = await world.client.post(
        world.url("/v1/revocations"),
        headers=human.headers,
        json={"kind": "grant", "target": grant["id"]},
    )
    assert r.status_code == 200
    # The revocation marked the cached status revoked (not deleted, so a verifier's fill of
    # an "active" it read before cannot put that back: its fills are SET NX).
    assert await client.get(cached) == b"revoked"
    message = None
    for _ in range(20):
        message = await pubsub.get_message(timeout=0.5)
        if message and message["type"] == "message":
            break
    assert message is not None and json.loads(message["data"]) == {
        "kind": "grant",
        "target": grant["id"],
    }
    await pubsub.aclose()
    await client.aclose()
    r = await world.client.get(world.url("/v1/revocations"), headers=provider.headers)
    assert {"kind": "grant", "target": grant["id"]} in [
        {"kind": x["kind"], "target": x["target"]} for x in r.json()
    ]
    r = await world.token(agent, grant["id"])
    assert r.status_code == 403 and r.json()["reason"] == "grant_revoked"
    # Disabling the agent revokes it and locks it out.
    r = await world.client.post(world.url(f"/v1/agents/{agent.id}/disable"), headers=human.headers)
    assert r.status_code == 200
    r = await world.as_agent(agent, "GET", "/v1/grants")
    assert r.status_code == 403 and r.json()["reason"] == "agent_disabled"


@pytest.mark.asyncio
async def test_revoking_an_agent_locks_it_out_as_disabling_does(world: World) -> None:
    human, agent, provider, grant = await world.setup_grant()
    r = await world.client.post(
        world.url("/v1/revocations"),
        headers=human.headers,
        json={"kind": "agent", "target": agent.id},
    )
    assert r.status_code == 200
    r = await world.client.get(world.url(f"/v1/agents/{agent.id}"), headers=human.headers)
    assert r.json()["status"] == "disabled"
    # Not only refused tokens: it cannot ask for anything more for the human to sign.
    for method, path, body in [
        ("GET", "/v1/grants", None),
        ("POST", "/v1/grant-requests", {"provider_id": provider.id, "capabilities": []}),
        ("POST", "/v1/step-ups", {"grant_id": grant["id"]}),
    ]:
        r = await world.as_agent(agent, method, path, json=body)
        assert r.status_code == 403 and r.json()["reason"] == "agent_disabled", (path, r.text)
    r = await world.client.get(world.url("/v1/revocations"), headers=provider.headers)
    assert {"kind": "agent", "target": agent.id} in [
        {"kind": x["kind"], "target": x["target"]} for x in r.json()
    ]


@pytest.mark.asyncio
async def test_a_step_up_approval_begun_twice_is_one_challenge(world: World) -> None:
    """A reload or a second device begins again: the same challenge (it is the payment's
    hash), renewed, not a 500; one passkey signature approves, the other ceremony is spent."""
    human, agent, _, grant = await world.payments_grant()
    step = await world.step_up(agent, grant["id"], "75.00")
    begin = world.url(f"/v1/step-ups/{step['id']}/approval/begin")
    first = await world.client.post(begin, headers=human.headers)
    second = await world.client.post(begin, headers=human.headers)
    assert first.status_code == second.status_code == 200, second.text
    options = [r.json()["options"] for r in (first, second)]
    assert options[0]["challenge"] == options[1]["challenge"]
    finish = world.url(f"/v1/step-ups/{step['id']}/approval/finish")
    signed = [human.authenticator.get(o) for o in options]
    r = await world.client.post(finish, headers=human.headers, json={"credential": signed[1]})
    assert r.status_code == 200 and r.json()["status"] == "approved", r.text
    r = await world.client.post(finish, headers=human.headers, json={"credential": signed[0]})
    assert r.status_code == 409 and r.json()["reason"] == "challenge_used", r.text


@pytest.mark.asyncio
async def test_nothing_is_approved_that_no_token_could_use(
    world: World, db: asyncpg.Connection
) -> None:
    """A step-up on a revoked or expired grant, a request or step-up of a disabled agent:
    refused at the approval's begin and at its finish, so no receipt says a human approved
    it. Refusing them stays possible."""
    human, agent, provider, grant = await world.payments_grant()
    revoked_step = await world.step_up(agent, grant["id"], "75")
    finish_later = await world.client.post(
        world.url(f"/v1/step-ups/{revoked_step['id']}/approval/begin"), headers=human.headers
    )
    assert finish_later.status_code == 200
    r = await world.client.post(
        world.url("/v1/revocations"),
        headers=human.headers,
        json={"kind": "grant", "target": grant["id"]},
    )
    assert r.status_code == 200
    r = await world.client.post(
        world.url(f"/v1/step-ups/{revoked_step['id']}/approval/begin"), headers=human.headers
    )
    assert r.status_code == 409 and r.json()["reason"] == "grant_revoked", r.text
    r = await world.client.post(
        world.url(f"/v1/step-ups/{revoked_step['id']}/approval/finish"),
        headers=human.headers,
        json={"credential": human.authenticator.get(finish_later.json()["options"])},
    )
    assert r.status_code == 409 and r.json()["reason"] == "grant_revoked", r.text

    # A grant that expires while its step-up waits.
    expiring = {**STEP_UP_ABOVE_50, "expires_at": int(time.time()) + 3}
    request = await world.request(agent, provider, capabilities=PAYMENTS, envelope=expiring)
    short = await world.approve(human, request["id"])
    late_step = await world.step_up(agent, short["id"], "75")
    await asyncio.sleep(max(0.0, expiring["expires_at"] - time.time()) + 0.5)
    r = await world.client.post(
        world.url(f"/v1/step-ups/{late_step['id']}/approval/begin"), headers=human.headers
    )
    assert r.status_code == 409 and r.json()["reason"] == "grant_expired", r.text
    r = await world.as_agent(
        agent,
        "POST",
        "/v1/step-ups",
        json={"grant_id": short["id"], "resource": "payments", "amount": "75", "currency": "USD"},
    )
    assert r.status_code == 403 and r.json()["reason"] == "grant_expired", r.text

    # The agent is disabled with a request and a step-up pending.
    request = await world.request(agent, provider, capabilities=PAYMENTS, envelope=STEP_UP_ABOVE_50)
    live = await world.approve(human, request["id"])
    live_step = await world.step_up(agent, live["id"], "75")
    pending = await world.request(agent, provider)
    r = await world.client.post(world.url(f"/v1/agents/{agent.id}/disable"), headers=human.headers)
    assert r.status_code == 200
    for path in (
        f"/v1/grant-requests/{pending['id']}/approval/begin",
        f"/v1/step-ups/{live_step['id']}/approval/begin",
    ):
        r = await world.client.post(world.url(path), headers=human.headers)
        assert r.status_code == 409 and r.json()["reason"] == "agent_disabled", (path, r.text)
    assert await db.fetchval("SELECT count(*) FROM grants WHERE agent_id = $1", agent.id) == 3
    for path in (
        f"/v1/grant-requests/{pending['id']}/deny",
        f"/v1/step-ups/{live_step['id']}/deny",
        f"/v1/step-ups/{late_step['id']}/deny",
    ):
        r = await world.client.post(world.url(path), headers=human.headers)
        assert r.status_code == 200, (path, r.text)


@pytest.mark.asyncio
async def test_rotation_publishes_first_and_keeps_old_tokens_verifiable(
    world: World, registry_settings: RegistrySettings
) -> None:
    _, agent, provider, grant = await world.setup_grant()
    old_token = (await world.token(agent, grant["id"])).json()["access_token"]
    old_kid = json.loads(b64url_decode(old_token.split(".")[0]))["kid"]
    r = await world.client.post(world.url("/v1/admin/keys/rotate"), headers=world.admin)
    assert r.status_code == 200
    new_kid = r.json()["kid"]
    keys = await jwks(world)
    assert {old_kid, new_kid} <= set(keys)  # published before it signs anything
    # Until the publish-ahead interval passes, the old key still signs.
    token = (await world.token(agent, grant["id"])).json()["access_token"]
    assert json.loads(b64url_decode(token.split(".")[0]))["kid"] == old_kid
    await asyncio.sleep(registry_settings.key_publish_ahead + 5.5)  # replicas refresh every 5 s
    token = (await world.token(agent, grant["id"])).json()["access_token"]
    assert json.loads(b64url_decode(token.split(".")[0]))["kid"] == new_kid
    verifier = AccessTokenVerifier(keys=await jwks(world), issuer=world.base)
    for t in (old_token, token):
        verifier.verify(t, audience=provider.audience, now=time.time())


@pytest.mark.asyncio
async def test_the_audit_key_list_is_public_keeps_every_key_and_verifies_checkpoints(
    world: World, db: asyncpg.Connection
) -> None:
    r = await world.client.get(world.url("/.well-known/agentauth-audit-keys.json"))
    assert r.status_code == 200 and r.json()["format"] == "agentauth.audit-keys.v1"
    keys = AuditKeys.from_document(r.json())
    # Every key ever recorded, with its window; the JWKS is the part that may sign tokens.
    rows = await db.fetch("SELECT kid, activates_at, retires_at FROM signing_keys")
    assert {(k["kid"], k["activates_at"], k["retires_at"]) for k in r.json()["keys"]} == {
        (row["kid"], row["activates_at"], row["retires_at"]) for row in rows
    }
    assert set(await jwks(world)) <= set(keys)
    r = await world.client.post(world.url("/v1/admin/checkpoints"), headers=world.admin)
    assert r.status_code == 200
    r = await world.client.get(world.url("/v1/audit/checkpoints"), headers=world.admin)
    assert r.status_code == 200 and r.json()
    for latest in r.json():  # each inside its key's signing window
        assert keys.verify(latest["signed"]).chain == latest["chain"]
    d = (await world.client.get(world.url("/.well-known/agentauth-configuration"))).json()
    assert d["audit_keys_uri"] == world.url("/.well-known/agentauth-audit-keys.json")


# --- step-up --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_step_up_flow_gives_the_agent_a_one_time_reference(world: World) -> None:
    human, agent, _, grant = await world.payments_grant()
    step = await world.step_up(agent, grant["id"], "120.00", payee="acme")
    assert step["status"] == "pending" and step["document"]["amount"] == "120"

    async def approve_later() -> None:
        await asyncio.sleep(1.0)
        r = await world.client.post(
            world.url(f"/v1/step-ups/{step['id']}/approval/begin"), headers=human.headers
        )
        assert r.status_code == 200, r.text
        credential = human.authenticator.get(r.json()["options"])
        r = await world.client.post(
            world.url(f"/v1/step-ups/{step['id']}/approval/finish"),
            headers=human.headers,
            json={"credential": credential},
        )
        assert r.status_code == 200, r.text

    approver = asyncio.create_task(approve_later())
    r = await world.as_agent(agent, "GET", f"/v1/step-ups/{step['id']}?wait=10")  # long poll
    await approver
    assert r.json()["status"] == "approved", r.text
    assert r.json()["approval_ref"].startswith("sur_")
    r = await world.client.get(world.url(f"/v1/step-ups/{step['id']}"), headers=human.headers)
    assert "approval_ref" not in r.json()  # only the agent receives it


@pytest.mark.asyncio
async def test_a_step_up_left_unanswered_expires_and_cannot_be_decided(
    world: World, db: asyncpg.Connection
) -> None:
    human, agent, _, grant = await world.payments_grant()
    step = await world.step_up(agent, grant["id"], "90")
    base = world.url(f"/v1/step-ups/{step['id']}")
    r = await world.client.post(base + "/approval/begin", headers=human.headers)
    assert r.status_code == 200, r.text
    credential = human.authenticator.get(r.json()["options"])
    # Its deadline passes (the registry's clock is the database's).
    await db.execute(
        "UPDATE step_ups SET expires_at = extract(epoch FROM now())::bigint - 1 WHERE id = $1",
        step["id"],
    )
    await each_decision_refused_as_expired(
        world, db, f"/v1/step-ups/{step['id']}", human, credential
    )
    assert await db.fetchval("SELECT status FROM step_ups WHERE id = $1", step["id"]) == "pending"

    started = time.monotonic()
    r = await world.as_agent(agent, "GET", f"/v1/step-ups/{step['id']}?wait=10")
    assert r.json()["status"] == "expired" and "approval_ref" not in r.json()
    assert time.monotonic() - started < 5  # the long poll ends at once
    listed = await world.client.get(world.url("/v1/step-ups"), headers=human.headers)
    assert [s["status"] for s in listed.json()] == ["expired"]
    for status, ids in (("pending", []), ("expired", [step["id"]])):
        r = await world.client.get(
            world.url(f"/v1/step-ups?status={status}"), headers=human.headers
        )
        assert [s["id"] for s in r.json()] == ids, status


# --- the audit chain under load ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_1000_concurrent_changes_leave_chains_and_checkpoints_whole(
    world: World, db: asyncpg.Connection
) -> None:
    human = await world.human()
    provider = await world.provider()
    agents = [await world.agent(human) for _ in range(8)]
    limit = asyncio.Semaphore(48)

    async def change(i: int) -> int:
        async with limit:
            r = await world.as_agent(
                agents[i % len(agents)],
                "POST",
                "/v1/grant-requests",
                json={
                    "provider_id": provider.id,
                    "capabilities": [{"kind": "read", "resource": f"r{i}"}],
                },
            )
            return r.status_code

    statuses = await asyncio.gather(*(change(i) for i in range(1000)))
    assert statuses.count(200) == 1000, sorted(set(statuses))
    r = await world.client.post(world.url("/v1/admin/checkpoints"), headers=world.admin)
    assert r.status_code == 200
    # Checkpoints from the whole session: the rotation test's old key may be retired by now.
    keys = await audit_keys(world)
    chains = [
        row["chain"] for row in await db.fetch("SELECT chain FROM audit_heads ORDER BY chain")
    ]
    total = 0
    for chain in chains:
        rows = await db.fetch(
            "SELECT seq, body FROM audit_events WHERE chain = $1 ORDER BY seq", chain
        )
        head = verify_chain((AuditEvent.from_canonical(r["body"]) for r in rows), chain=chain)
        total += head.size
        assert head.size == await db.fetchval(
            "SELECT size FROM audit_heads WHERE chain = $1", chain
        )
        checkpoints = await db.fetch(
            "SELECT size, signed FROM audit_checkpoints WHERE chain = $1 ORDER BY size", chain
        )
        if head.size == 0:  # a shard's chain with no decision yet: nothing to checkpoint
            assert not checkpoints
            continue
        for cp in checkpoints:
            verified = keys.verify(cp["signed"])
            sub = verify_chain(
                (AuditEvent.from_canonical(r["body"]) for r in rows[: cp["size"]]),
                chain=chain,
            )
            assert verified.root_bytes() == sub.root
        assert checkpoints and checkpoints[-1]["size"] == head.size
        if len(checkpoints) >= 2:
            a, b = checkpoints[-2]["size"], checkpoints[-1]["size"]
            r = await world.client.get(
                world.url(f"/v1/audit/consistency?chain={chain}&first={a}&second={b}"),
                headers=world.admin,
            )
            assert r.status_code == 200, r.text
            from agentauth.protocol import verify_consistency

            verify_consistency(
                old_size=a,
                new_size=b,
                old_root=keys.verify(r.json()["first"]).root_bytes(),
                new_root=keys.verify(r.json()["second"]).root_bytes(),
                proof=[b64url_decode(h) for h in r.json()["proof"]],
            )
    assert total >= 1000
