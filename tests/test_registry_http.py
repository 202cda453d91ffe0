"""The registry's HTTP layer in process, over a stand-in for its service: the challenges of
its 401s, its token endpoint's error responses, the no-store mark on its answers, and HEAD.

The stand-in authenticates as the service does (a real DPoP proof check, a session or admin
token, a Basic credential) and answers the routes used here with documents of the real
shapes; what is under test is what the HTTP layer makes of them.
"""

from __future__ import annotations

import base64
import time
import types
from typing import Any, cast

import httpx
import pytest
from asgi_exchange import exchange
from fastapi.routing import APIRoute
from starlette.routing import Route

from agentauth.protocol import (
    DPoPVerifier,
    PrivateKey,
    ReplayDetected,
    Unauthenticated,
    create_dpop_proof,
)
from agentauth.registry import Registry
from agentauth.registry._http import create_app
from agentauth.registry._service import Agent

BASE = "https://registry.example"
AGENT = PrivateKey.generate()
SESSION = "ses_live"
ADMIN = "admin-token"
ALGS = 'algs="ES256 Ed25519 EdDSA"'
REALM = 'realm="agentauth-registry"'


class Keys:
    """The signing keys' documents, as the service publishes them."""

    async def refresh(self, *, force: bool = False) -> None:
        return None

    def jwks(self, now: float) -> dict[str, Any]:
        return {"keys": [AGENT.public_jwk()]}

    def audit_keys(self) -> Any:
        return types.SimpleNamespace(to_document=lambda: {"keys": [AGENT.public_jwk()]})


class StandIn:
    settings = types.SimpleNamespace(issuer=BASE, rp_id="registry.example")
    keys = Keys()

    def __init__(self) -> None:
        self.proofs = DPoPVerifier()
        self.used: set[str] = set()

    async def authenticate_agent(self, *, proof: str, htm: str, htu: str) -> Agent:
        verified = self.proofs.verify(proof, htm=htm, htu=htu, now=time.time())
        if verified.jti in self.used:
            raise ReplayDetected(reason="jti_reused")
        self.used.add(verified.jti)
        if verified.jkt != AGENT.thumbprint:
            raise Unauthenticated("unknown agent key", reason="unknown_agent")
        return Agent("agt_1", "hum_1", verified.jkt, "active")

    async def authenticate_session(self, token: str | None) -> str:
        if not token:
            raise Unauthenticated("a session is required", reason="missing_session")
        if token != SESSION:
            raise Unauthenticated("the session is invalid or expired", reason="bad_session")
        return "hum_1"

    def is_admin(self, token: str | None) -> bool:
        return token == ADMIN

    # Anonymous starts are never refused here: their limits have tests of their own.
    trusted_proxies = ()

    async def admit_anonymous(self, client: str) -> None:
        return None

    async def authenticate_provider(self, provider_id: str, secret: str) -> tuple[str, bool]:
        if (provider_id, secret) != ("prov_1", "s3cret"):
            raise Unauthenticated("bad provider credential", reason="bad_provider_credential")
        return provider_id, True

    async def issue_token(self, agent: Agent, grant_id: str) -> dict[str, Any]:
        return {"access_token": "a.b.c", "token_type": "DPoP", "expires_in": 300}

    async def request_grant(self, agent: Agent, body: Any) -> dict[str, Any]:
        return {"id": "grq_1", "provider_id": "prov_1", "status": "pending"}

    async def create_enrollment(self, principal_id: str, *, session_token: str) -> dict[str, Any]:
        return {"code": "enr_secret", "expires_at": int(time.time()) + 600}

    async def create_recovery(self, principal_id: str) -> dict[str, Any]:
        return {"code": "rec_secret", "expires_at": int(time.time()) + 600}

    async def list_agents(self, principal_id: str) -> list[dict[str, Any]]:
        return []

    async def get_agent(self, agent_id: str, **_: Any) -> dict[str, Any]:
        return {"id": agent_id, "name": "calendar bot", "status": "active"}

    async def list_revocations(self, since: int = 0) -> list[dict[str, Any]]:
        return []

    async def register_agent(self, **_: Any) -> dict[str, Any]:
        raise Unauthenticated("a DPoP proof by the new key is required", reason="missing_proof")


def client() -> httpx.AsyncClient:
    app = create_app(cast(Registry, StandIn()))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)


def proof(method: str, path: str, *, key: PrivateKey = AGENT) -> dict[str, str]:
    return {"DPoP": create_dpop_proof(key, htm=method, htu=BASE + path, now=time.time())}


def basic(provider_id: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{provider_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


TOKEN = {"grant_id": "grt_1"}
CODE = {"enrollment_code": "enr_0123456789abcdef"}
GRANT_REQUEST = {"provider_id": "prov_1", "capabilities": [{"kind": "read", "resource": "x"}]}


@pytest.mark.asyncio
async def test_every_401_challenges_for_the_schemes_its_route_accepts() -> None:
    """RFC 9110 §11.6.1: a 401 carries at least one challenge. The scheme the caller tried
    carries the error code; a caller with no credentials gets none (RFC 6750 §3.1, which
    RFC 9449 §7.1 applies to DPoP); DPoP challenges list the proof algorithms (§7.1)."""
    agent_route = ("POST", "/v1/grant-requests", GRANT_REQUEST)
    human_route = ("GET", "/v1/agents", None)
    anyone_route = ("GET", "/v1/revocations", None)
    cases: list[tuple[tuple[str, str, Any], dict[str, str], str, str]] = [
        (agent_route, {}, "missing_session", f"DPoP {REALM}, {ALGS}"),
        (
            agent_route,
            proof("POST", "/v1/elsewhere"),
            "htu_mismatch",
            f'DPoP {REALM}, error="invalid_dpop_proof", {ALGS}',
        ),
        (
            agent_route,
            proof("POST", "/v1/grant-requests", key=PrivateKey.generate()),
            "unknown_agent",
            f'DPoP {REALM}, error="invalid_dpop_proof", {ALGS}',
        ),
        (human_route, {}, "missing_session", f"Bearer {REALM}"),
        (
            human_route,
            {"Authorization": "Bearer ses_ended"},
            "bad_session",
            f'Bearer {REALM}, error="invalid_token"',
        ),
        (
            anyone_route,
            basic("prov_1", "wrong"),
            "bad_provider_credential",
            f'DPoP {REALM}, {ALGS}, Bearer {REALM}, Basic {REALM}, charset="UTF-8"',
        ),
        (
            ("POST", "/v1/agents", {"name": "a", "public_jwk": AGENT.public_jwk(), **CODE}),
            {},
            "missing_proof",
            f"DPoP {REALM}, {ALGS}",
        ),
    ]
    async with client() as c:
        for (method, path, body), headers, reason, challenge in cases:
            r = await c.request(method, path, json=body, headers=headers)
            assert (r.status_code, r.json()["reason"]) == (401, reason), (path, r.text)
            assert r.headers["www-authenticate"] == challenge, (path, reason)


@pytest.mark.asyncio
async def test_dpop_failures_at_the_token_endpoint_are_400_error_responses() -> None:
    """RFC 9449 §5: the token endpoint answers a bad proof with an RFC 6749 §5.2 error
    response, 400 ``invalid_dpop_proof``, not a resource server's 401 challenge. A caller
    that did not authenticate is §5.2's ``invalid_client``: 400 for a key of no agent, 401
    with its challenge for a missing credential."""
    async with client() as c:
        r = await c.post("/v1/token", json=TOKEN, headers=proof("POST", "/v1/other"))
        assert r.status_code == 400, r.text
        assert (r.json()["error"], r.json()["reason"]) == ("invalid_dpop_proof", "htu_mismatch")
        assert "www-authenticate" not in r.headers
        replayed = proof("POST", "/v1/token")
        assert (await c.post("/v1/token", json=TOKEN, headers=replayed)).status_code == 200
        r = await c.post("/v1/token", json=TOKEN, headers=replayed)
        # A replay too: replay_detected is no RFC 6749 §5.2 code; the reason says replay.
        assert (r.status_code, r.json()["error"], r.json()["reason"]) == (
            400,
            "invalid_dpop_proof",
            "jti_reused",
        )
        assert "www-authenticate" not in r.headers
        stranger = proof("POST", "/v1/token", key=PrivateKey.generate())
        r = await c.post("/v1/token", json=TOKEN, headers=stranger)
        assert (r.status_code, r.json()["error"], r.json()["reason"]) == (
            400,
            "invalid_client",
            "unknown_agent",
        )
        assert "www-authenticate" not in r.headers
        r = await c.post("/v1/token", json=TOKEN)
        assert (r.status_code, r.json()["error"]) == (401, "invalid_client")
        assert r.headers["www-authenticate"] == f"DPoP {REALM}, {ALGS}"


@pytest.mark.asyncio
async def test_answers_carrying_secrets_are_not_stored() -> None:
    """RFC 6749 §5.1: a token response carries ``Cache-Control: no-store`` (and ``Pragma:
    no-cache``); so does every registry answer, the other secrets' too."""
    async with client() as c:
        answers = [
            await c.post("/v1/token", json=TOKEN, headers=proof("POST", "/v1/token")),
            await c.post("/v1/enrollments", headers={"Authorization": f"Bearer {SESSION}"}),
            await c.post(
                "/v1/admin/recoveries",
                json={"principal_id": "hum_1"},
                headers={"Authorization": f"Bearer {ADMIN}"},
            ),
            await c.post("/v1/token", json=TOKEN),  # an error too
            await c.get("/healthz"),
        ]
    assert answers[0].json()["access_token"] == "a.b.c"
    assert answers[1].json()["code"] == "enr_secret"
    assert answers[2].json()["code"] == "rec_secret"
    for r in answers:
        assert r.headers.get_list("cache-control") == ["no-store"], r.request.url
        assert r.headers.get("pragma") == "no-cache", r.request.url


def sample_path(route: Route) -> str:
    """The route's path with a valid value in each of its parameters."""
    return route.path_format.format(**dict.fromkeys(route.param_convertors, "1"))


@pytest.mark.asyncio
async def test_every_get_route_answers_head_as_it_answers_get_without_the_content() -> None:
    """RFC 9110 §9.1: a general-purpose server MUST support HEAD; §9.3.2: its answer is the
    GET's, headers included (Content-Length, the no-store mark, a 401's challenge), without
    the content. Anonymous, a public route answers 200 and the others their 401."""
    app = create_app(cast(Registry, StandIn()))
    get_routes = [r for r in app.routes if isinstance(r, Route) and "GET" in (r.methods or ())]
    assert len(get_routes) > 20
    statuses = set()
    for route in get_routes:
        path = sample_path(route)
        get = await exchange(app, "GET", path)
        head = await exchange(app, "HEAD", path)
        assert head == (get[0], get[1], b""), path
        assert get[2], path
        statuses.add(get[0])
    assert statuses == {200, 401}


@pytest.mark.asyncio
async def test_head_authenticates_as_get_does() -> None:
    """A HEAD needs the GET's credentials, and a DPoP proof for it names HEAD (RFC 9449
    §4.2 ``htm``): a proof made for a GET does not authenticate it."""
    app = create_app(cast(Registry, StandIn()))
    session = {"Authorization": f"Bearer {SESSION}"}
    get = await exchange(app, "GET", "/v1/agents", session)
    assert await exchange(app, "HEAD", "/v1/agents", session) == (200, get[1], b"")
    get = await exchange(app, "GET", "/v1/agents/agt_1", proof("GET", "/v1/agents/agt_1"))
    head = await exchange(app, "HEAD", "/v1/agents/agt_1", proof("HEAD", "/v1/agents/agt_1"))
    assert head == (200, get[1], b"")
    status, headers, content = await exchange(
        app, "HEAD", "/v1/agents/agt_1", proof("GET", "/v1/agents/agt_1")
    )
    assert (status, content) == (401, b"")
    challenge = dict(headers)[b"www-authenticate"].decode()
    assert challenge.startswith(f'DPoP {REALM}, error="invalid_dpop_proof"'), challenge


@pytest.mark.asyncio
async def test_a_405_lists_every_method_of_the_path_head_with_get() -> None:
    """RFC 9110 §10.2.1 and §15.5.6: ``Allow`` lists the methods the resource takes, all of
    its routes' (Starlette names the first route's only), and HEAD wherever GET is."""
    async with client() as c:
        for method, path, allowed in (
            ("PUT", "/healthz", "GET, HEAD"),
            ("DELETE", "/v1/agents", "GET, HEAD, POST"),
            ("PATCH", "/v1/revocations", "GET, HEAD, POST"),
            ("HEAD", "/v1/token", "POST"),
            ("GET", "/v1/providers/prov_1/suspension", "DELETE, PUT"),
        ):
            r = await c.request(method, path)
            assert (r.status_code, r.headers.get("allow")) == (405, allowed), (method, path)


@pytest.mark.asyncio
async def test_head_is_no_operation_of_its_own_in_the_openapi_document() -> None:
    """HEAD is implied by every GET: listing it would repeat each GET operation under the
    same operationId."""
    app = create_app(cast(Registry, StandIn()))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as c:
        document = (await c.get("/openapi.json")).json()
    operations = {(path, method) for path, item in document["paths"].items() for method in item}
    documented = {
        (r.path_format, m.lower())
        for r in app.routes
        if isinstance(r, APIRoute) and r.include_in_schema
        for m in r.methods
    }
    assert operations == documented
    assert not any(method == "head" for _, method in operations)
    assert ("/healthz", "get") in operations
