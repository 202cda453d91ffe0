"""The verifier's RFC 7662 answer (``Verifier.introspect``), its per-provider decision
counts (``/v1/stats``) and its DPoP nonces without Ray, PostgreSQL or Redis.

The replica's service layer runs for real (tests/verifier_inprocess.py).
"""

from __future__ import annotations

import base64
import time
from urllib.parse import quote, quote_plus

import httpx
import pytest
from pydantic import ValidationError
from verifier_inprocess import ask, basic, mint, verifier

from agentauth.protocol import PrivateKey
from agentauth.verifier import Verifier, VerifierSettings, create_app


@pytest.mark.asyncio
async def test_an_inactive_answer_says_nothing_of_why() -> None:
    """RFC 7662 §2.2. Above all, a provider asking about another provider's genuine token
    must not learn that it is genuine and unexpired (``wrong_audience``); the reason is
    still recorded with the decision."""
    v, shards = verifier()
    now = time.time()
    token = mint(now=now)
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    cases = [
        ("prov_b", ask(token), "invalid_token:wrong_audience"),
        ("prov_a", ask(mint(now=now - 2000)), "invalid_token:expired"),
        ("prov_a", ask(forged), "invalid_token:bad_signature"),
        ("prov_a", ask(token, key=PrivateKey.generate()), "invalid_dpop_proof:jkt_mismatch"),
    ]
    for provider, body, reason in cases:
        assert await v.introspect(provider, body) == {"active": False}
        assert shards.recorded[-1].deny == reason
    assert v.decisions.of("prov_a") == {reason: 1 for _, _, reason in cases[1:]}
    assert v.decisions.of("prov_b") == {"invalid_token:wrong_audience": 1}
    answer = await v.introspect("prov_a", ask(token))
    assert answer["active"] is True and answer["sub"] == "agent-1"


@pytest.mark.asyncio
async def test_an_inactive_answer_carries_the_nonce_the_provider_must_relay() -> None:
    """With server nonces on, a proof without one is refused with a fresh nonce, which the
    provider sends the agent in DPoP-Nonce (RFC 9449 §9). Introspection dropped it, so an
    introspecting provider had none to send and every request was refused for good."""
    v, _ = verifier(dpop_nonces=True, nonce_secret="n" * 32)
    token = mint(now=time.time())
    verified = await v.verify("prov_a", ask(token))
    assert verified["reason"] == "use_dpop_nonce:nonce_required"
    answer = await v.introspect("prov_a", ask(token))
    assert set(answer) == {"active", "dpop_nonce"} and answer["active"] is False
    # The nonce works: the agent's next proof carries it and the token is active.
    again = await v.introspect("prov_a", ask(token, nonce=answer["dpop_nonce"]))
    assert again["active"] is True


@pytest.mark.asyncio
async def test_an_allow_on_an_aging_nonce_hands_out_its_successor() -> None:
    """RFC 9449 §8.2: a server may send a new nonce with any answer. An agent was only
    ever given one by a refusal, so every 5 minutes one of its requests was refused and
    retried. An allow whose nonce is past half its lifetime carries the next one (as does
    an active introspection answer); a denial never does, since a provider reads
    ``dpop_nonce`` on a denial as a nonce challenge, which would hide the real reason."""
    v, shards = verifier(dpop_nonces=True, nonce_secret="n" * 32)
    nonces = v.proofs.nonces
    assert nonces is not None
    token = mint(now=time.time())
    young, aging = nonces.issue(time.time() - 10), nonces.issue(time.time() - 200)

    answer = await v.verify("prov_a", ask(token, nonce=young))
    assert answer["decision"] == "allow" and "dpop_nonce" not in answer
    answer = await v.verify("prov_a", ask(token, nonce=aging))
    assert answer["decision"] == "allow"
    successor = answer["dpop_nonce"]
    assert successor != aging and nonces.valid(successor, time.time() + 290)
    # The successor is young: a proof carrying it gets no further renewal.
    answer = await v.verify("prov_a", ask(token, nonce=successor))
    assert answer["decision"] == "allow" and "dpop_nonce" not in answer

    active = await v.introspect("prov_a", ask(token, nonce=aging))
    assert active["active"] is True and nonces.valid(active["dpop_nonce"], time.time())

    write = ask(token, nonce=aging).model_copy(
        update={"action": ask(token).action.model_copy(update={"kind": "write"})}
    )
    denied = await v.verify("prov_a", write)
    assert denied["reason"] == "insufficient_capability" and "dpop_nonce" not in denied
    assert await v.introspect("prov_a", write) == {"active": False}
    assert shards.recorded[-1].deny == "insufficient_capability"


@pytest.mark.asyncio
async def test_a_token_past_its_exp_is_inactive_and_recorded_as_a_denial() -> None:
    """RFC 7662 §2.2: active means not expired. The token check allows 30 s after ``exp``
    for the registry's clock against ours, so introspection answered ``active: true`` with
    an ``exp`` already past. It checks ``exp`` without leeway, before the shard: the audit
    record is the denial the provider was told, and nothing is allowed or spent."""
    v, shards = verifier()
    now = time.time()
    lapsed = mint(now=now - 600, lifetime=580)  # exp 20 s ago: inside the leeway
    assert await v.introspect("prov_a", ask(lapsed)) == {"active": False}
    assert [c.deny for c in shards.recorded] == ["invalid_token:expired"]
    # /v1/verify keeps the leeway: the same token is still allowed there.
    assert (await v.verify("prov_a", ask(lapsed)))["decision"] == "allow"
    current = mint(now=now - 560, lifetime=580)  # exp in 20 s
    answer = await v.introspect("prov_a", ask(current))
    assert answer["active"] is True and answer["exp"] > time.time()


@pytest.mark.asyncio
async def test_a_provider_sees_only_its_own_decision_counts() -> None:
    """/v1/stats showed every provider the replica's decisions of all providers: how often
    another provider's agents were allowed, refused or rate-limited. Each sees its own now;
    the replica's shard-link counters, about no provider, stay for everyone."""
    v, _ = verifier()
    token = mint(now=time.time())
    await v.verify("prov_a", ask(token))
    await v.verify("prov_a", ask(token))
    await v.verify("prov_a", ask(token, key=PrivateKey.generate()))
    await v.verify("prov_b", ask(token))
    transport = httpx.ASGITransport(app=create_app(v))
    async with httpx.AsyncClient(transport=transport, base_url="http://verifier") as c:
        a = (await c.get("/v1/stats", headers=basic("prov_a"))).json()
        b = (await c.get("/v1/stats", headers=basic("prov_b"))).json()
    assert a["decisions"] == {"ok": 2, "invalid_dpop_proof:jkt_mismatch": 1}
    assert b["decisions"] == {"invalid_token:wrong_audience": 1}
    assert a.keys() == b.keys() >= {"batches", "checks", "checks_given_up", "void_checks"}


@pytest.mark.asyncio
async def test_the_nonce_secret_rotates_without_replicas_refusing_each_others_nonces() -> None:
    """A replica accepted only nonces of its own ``nonce_secret``: while a new secret was
    rolled out, replicas with the old one and with the new one refused each other's
    nonces, and an agent sent from one to the other got a new nonce on every retry (the
    docs said nonces rotate with a list of secrets). Now a replica may accept other
    secrets' nonces, and issues with its own alone."""
    old, new = "o" * 32, "n" * 32
    token = mint(now=time.time())

    async def nonce_of(v: Verifier) -> str:
        answer = await v.verify("prov_a", ask(token))
        assert answer["reason"] == "use_dpop_nonce:nonce_required"
        return str(answer["dpop_nonce"])

    async def reason(v: Verifier, nonce: str) -> str:
        return str((await v.verify("prov_a", ask(token, nonce=nonce)))["reason"])

    before, _ = verifier(dpop_nonces=True, nonce_secret=old)
    # First every replica accepts the new secret, then they issue with it.
    accepting, _ = verifier(dpop_nonces=True, nonce_secret=old, accepted_nonce_secrets=(new,))
    issuing, _ = verifier(dpop_nonces=True, nonce_secret=new, accepted_nonce_secrets=(old,))
    assert await reason(issuing, await nonce_of(before)) == "ok"
    assert await reason(accepting, await nonce_of(issuing)) == "ok"
    assert await reason(issuing, await nonce_of(accepting)) == "ok"
    # Once the old secret is dropped its nonces are refused, with one of the new secret.
    after, _ = verifier(dpop_nonces=True, nonce_secret=new)
    assert await reason(after, await nonce_of(before)) == "use_dpop_nonce:nonce_required"
    assert await reason(after, await nonce_of(issuing)) == "ok"
    with pytest.raises(ValidationError, match="accepted_nonce_secrets"):
        VerifierSettings(
            database_url="postgresql://x/y",
            redis_url="redis://x",
            issuer="https://registry.test/registry",
            dpop_nonces=True,
            nonce_secret=new,
            accepted_nonce_secrets=(old, "short"),
        )


@pytest.mark.asyncio
async def test_introspection_takes_every_body_verify_takes() -> None:
    """The docs say /v1/introspect takes /v1/verify's body. /v1/verify reads it whatever
    the Content-Type says; introspection left the body to FastAPI, which reads JSON only
    when told it is JSON, and refused the same request (400 schema) with no Content-Type
    or a ``text/plain`` one. Both read it the same way now, and the OpenAPI document
    still describes it."""
    v, _ = verifier()
    token = mint(now=time.time())
    transport = httpx.ASGITransport(app=create_app(v))
    async with httpx.AsyncClient(transport=transport, base_url="http://verifier") as c:
        for content_type in ({}, {"Content-Type": "text/plain"}, {"Content-Type": "x/y"}):
            headers = {**basic("prov_a"), **content_type}
            for route, key in (("/v1/verify", "decision"), ("/v1/introspect", "active")):
                body = ask(token).model_dump_json(exclude_none=True)
                r = await c.post(route, content=body, headers=headers)
                assert r.status_code == 200, (route, content_type, r.text)
                assert r.json()[key] in ("allow", True), (route, r.text)
        document = (await c.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    for route in ("/v1/verify", "/v1/introspect"):
        body = document["paths"][route]["post"]["requestBody"]["content"]["application/json"]
        assert schemas[body["schema"]["$ref"].rsplit("/", 1)[1]]["title"] == "VerifyIn"
    assert schemas["VerifyIn"]["properties"]["action"]["$ref"].endswith("/Action")
    assert "Action" in schemas


@pytest.mark.asyncio
async def test_an_rfc_7662_form_request_is_refused_and_decides_nothing() -> None:
    """docs/verifier.md: a form-encoded ``token`` (with or without ``token_type_hint``) is
    refused 400 ``invalid_request``: a DPoP-bound token is active only with its proof, for
    an action, so a token alone must never be answered ``active``."""
    v, shards = verifier()
    token = mint(now=time.time())
    transport = httpx.ASGITransport(app=create_app(v))
    async with httpx.AsyncClient(transport=transport, base_url="http://verifier") as c:
        for form in ({"token": token}, {"token": token, "token_type_hint": "access_token"}):
            r = await c.post("/v1/introspect", data=form, headers=basic("prov_a"))
            assert r.status_code == 400, r.text
            assert r.json()["error"] == "invalid_request" and "active" not in r.json()
    assert shards.recorded == []


@pytest.mark.asyncio
async def test_basic_credentials_form_encoded_as_rfc_6749_has_them_are_accepted() -> None:
    """RFC 7662 §2.1 has a protected resource authenticate as an OAuth client, and RFC 6749
    §2.3.1 form-encodes the client id and secret before they go into Basic: OAuth client
    libraries send ``billing%40acme`` for the provider ``billing@acme`` (an id may hold an
    ``@``). Read as is, that id was unknown and every call was refused 401. Neither a
    provider id nor a secret the registry issues can hold ``%`` or ``+``, so the two forms
    cannot be confused: both are accepted, and a wrong secret is refused either way."""
    v, _ = verifier()
    v._providers["billing@acme"] = v._providers.pop("prov_a")
    token = mint(now=time.time())
    transport = httpx.ASGITransport(app=create_app(v))

    def auth(user: str, password: str) -> dict[str, str]:
        raw = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {raw}"}

    accepted = [
        auth("billing@acme", "secret-a"),  # as the SDK sends it
        auth(quote("billing@acme", safe=""), quote("secret-a", safe="")),
        auth(quote_plus("billing@acme"), quote_plus("secret-a")),
    ]
    refused = [
        auth(quote("billing@acme", safe=""), "secret-b"),
        auth("billing%40acme", "secret%2Da%00"),
        auth("billing%4", "secret-a"),
    ]
    async with httpx.AsyncClient(transport=transport, base_url="http://verifier") as c:
        for headers in accepted:
            body = ask(token).model_dump_json(exclude_none=True)
            r = await c.post("/v1/introspect", content=body, headers=headers)
            assert r.status_code == 200 and r.json()["active"] is True, r.text
        for headers in refused:
            body = ask(token).model_dump_json(exclude_none=True)
            r = await c.post("/v1/introspect", content=body, headers=headers)
            assert r.status_code == 401, r.text
            assert r.json()["reason"] == "bad_provider_credential"
    assert v.decisions.of("billing@acme") == {"ok": 3}


@pytest.mark.asyncio
async def test_a_provider_that_did_not_authenticate_is_an_invalid_client() -> None:
    """RFC 7662 §2.3: a protected resource whose credentials are missing or wrong is
    answered as RFC 6749 §5.2 answers a client, 401 ``invalid_client`` with a challenge
    for the scheme it used. Introspection said ``unauthenticated``, a code no OAuth client
    library knows. /v1/verify, not an RFC 7662 endpoint, keeps its code."""
    v, shards = verifier()
    body = ask(mint(now=time.time())).model_dump_json(exclude_none=True)
    wrong = {"Authorization": "Basic " + base64.b64encode(b"prov_a:secret-b").decode()}
    transport = httpx.ASGITransport(app=create_app(v))
    async with httpx.AsyncClient(transport=transport, base_url="http://verifier") as c:
        for headers, reason in (({}, "missing_credentials"), (wrong, "bad_provider_credential")):
            r = await c.post("/v1/introspect", content=body, headers=headers)
            assert r.status_code == 401, r.text
            assert (r.json()["error"], r.json()["reason"]) == ("invalid_client", reason)
            assert r.headers["www-authenticate"].startswith('Basic realm="agentauth-verifier"')
            r = await c.post("/v1/verify", content=body, headers=headers)
            assert (r.status_code, r.json()["error"]) == (401, "unauthenticated")
    assert shards.recorded == []
