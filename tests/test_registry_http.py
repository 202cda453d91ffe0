"""The registry's HTTP layer in process, over a stand-in for its service: the challenges of
its 401s, its token endpoint's error responses, and the no-store mark on its answers.

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


class StandIn:
    settings = types.SimpleNamespace(issuer=BASE, rp_id="registry.example")

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
