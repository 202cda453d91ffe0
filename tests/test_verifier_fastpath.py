"""POST /v1/verify is answered by VerifyFastPath before FastAPI routes it.

In-process ASGI with a stand-in for the Verifier's two calls the route makes (provider
authentication and the decision): what is under test is the HTTP layer's dispatch and its
error answers, which must be those of the FastAPI handlers. The real Verifier behind Serve
answers the same route in test_verifier.py.
"""

from __future__ import annotations

import base64
import json
import types
from typing import Any, cast

import httpx
import pytest
from asgi_exchange import exchange
from starlette.types import Receive, Scope, Send

from agentauth.protocol import InvalidToken, Unauthenticated
from agentauth.verifier import Verifier, VerifyIn, create_app
from agentauth.verifier._http import VerifyFastPath
from agentauth.verifier._service import _DecisionCounts

AUTH = {"Authorization": "Basic " + base64.b64encode(b"prov_1:s3cret").decode()}
BODY = {
    "token": "t",
    "proof": "p",
    "method": "GET",
    "url": "https://api.example/x",
    "action": {"kind": "read", "resource": "things/1"},
}
ANSWER = {"decision": "allow", "reason": "ok", "audit_event": "c:1"}


class StandIn:
    """The two Verifier calls the verify route makes; raises what it is told to."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.calls: list[tuple[str, VerifyIn]] = []

    async def authenticate_provider(self, provider_id: str, secret: str) -> str:
        if (provider_id, secret) != ("prov_1", "s3cret"):
            raise Unauthenticated("bad provider credential", reason="bad_provider_credential")
        return provider_id

    async def verify(self, provider_id: str, body: VerifyIn) -> dict[str, Any]:
        self.calls.append((provider_id, body))
        if self.fail is not None:
            raise self.fail
        return ANSWER


def client(verifier: StandIn) -> httpx.AsyncClient:
    # Serve mounts the app under its route prefix: the path keeps the prefix, root_path names it.
    app = create_app(cast(Verifier, verifier))
    transport = httpx.ASGITransport(app=app, root_path="/verifier")
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def post(verifier: StandIn, content: bytes, headers: dict[str, str]) -> httpx.Response:
    async with client(verifier) as c:
        return await c.post(
            "/verifier/v1/verify",
            content=content,
            headers={**headers, "Content-Type": "application/json"},
        )


@pytest.mark.asyncio
async def test_verify_is_answered_before_routing_and_other_paths_are_not() -> None:
    reached: list[tuple[str, str]] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append((scope["method"], scope["path"]))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    stand_in = StandIn()
    app = VerifyFastPath(inner, cast(Verifier, stand_in))
    transport = httpx.ASGITransport(app=app, root_path="/verifier")
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        # No body parsed upstream (no BodyGuard here): the fast path still answers, 400.
        r = await c.post("/verifier/v1/verify", headers=AUTH)
        assert (r.status_code, r.json()["reason"]) == (400, "bad_json")
        for method, path in (
            ("GET", "/verifier/v1/verify"),
            ("POST", "/verifier/v1/introspect"),
            ("POST", "/verifier/v1/verify/x"),
            ("GET", "/verifier/healthz"),
        ):
            assert (await c.request(method, path)).status_code == 204
    assert reached == [
        ("GET", "/verifier/v1/verify"),
        ("POST", "/verifier/v1/introspect"),
        ("POST", "/verifier/v1/verify/x"),
        ("GET", "/verifier/healthz"),
    ]


@pytest.mark.asyncio
async def test_allow_answer_is_the_verifiers_document() -> None:
    stand_in = StandIn()
    r = await post(stand_in, json.dumps(BODY).encode(), AUTH)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    assert r.json() == ANSWER
    assert stand_in.calls == [("prov_1", VerifyIn.model_validate(BODY))]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("content", "headers", "status", "reason"),
    [
        (json.dumps(BODY).encode(), {}, 401, "missing_credentials"),
        (json.dumps(BODY).encode(), {"Authorization": "Basic !!"}, 401, "bad_provider_credential"),
        (
            json.dumps(BODY).encode(),
            {"Authorization": "Basic " + base64.b64encode(b"prov_1:wrong").decode()},
            401,
            "bad_provider_credential",
        ),
        (b"", AUTH, 400, "bad_json"),
        (b"{not json", AUTH, 400, "bad_json"),
        (b'{"token": "a", "token": "b"}', AUTH, 400, "bad_json"),
        (b"[1, 2]", AUTH, 400, "schema"),
        (json.dumps({**BODY, "extra": 1}).encode(), AUTH, 400, "schema"),
    ],
)
async def test_bad_calls_get_the_handlers_answers_and_reach_no_decision(
    content: bytes, headers: dict[str, str], status: int, reason: str
) -> None:
    stand_in = StandIn()
    r = await post(stand_in, content, headers)
    assert r.status_code == status, r.text
    assert r.json().get("reason") == reason, r.text
    assert stand_in.calls == []
    if status == 401:
        assert r.headers["www-authenticate"] == BASIC_CHALLENGE


BASIC_CHALLENGE = 'Basic realm="agentauth-verifier", charset="UTF-8"'


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "auth", [{}, {"Authorization": "Basic " + base64.b64encode(b"prov_1:wrong").decode()}]
)
async def test_every_401_challenges_for_the_providers_basic_credential(
    auth: dict[str, str],
) -> None:
    """RFC 9110 §11.6.1: a 401 carries a challenge. Providers authenticate with Basic
    (RFC 7617, UTF-8 credentials), on every route: the fast path and the routed ones."""
    async with client(StandIn()) as c:
        for method, path in (
            ("POST", "/verifier/v1/verify"),
            ("POST", "/verifier/v1/introspect"),
            ("GET", "/verifier/v1/stats"),
        ):
            content = json.dumps(BODY).encode() if method == "POST" else None
            r = await c.request(
                method, path, content=content, headers={**auth, "Content-Type": "application/json"}
            )
            assert r.status_code == 401, (path, r.text)
            assert r.headers["www-authenticate"] == BASIC_CHALLENGE, path


@pytest.mark.asyncio
async def test_schema_errors_name_the_failing_field() -> None:
    r = await post(StandIn(), json.dumps({**BODY, "method": ""}).encode(), AUTH)
    assert r.status_code == 400
    assert [d["loc"] for d in r.json()["details"]] == [["method"]]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fail", "status", "error"),
    [
        (InvalidToken("expired", reason="token_expired"), 401, "invalid_token"),
        (OSError("connection refused"), 503, "temporarily_unavailable"),
        (TimeoutError(), 503, "temporarily_unavailable"),
        (RuntimeError("secret detail"), 500, "server_error"),
    ],
)
async def test_failures_in_the_decision_map_to_coded_errors_without_details(
    fail: Exception, status: int, error: str
) -> None:
    r = await post(StandIn(fail), json.dumps(BODY).encode(), AUTH)
    assert r.status_code == status, r.text
    assert r.json()["error"] == error
    if status == 401:
        assert r.headers["www-authenticate"] == BASIC_CHALLENGE
    assert "secret detail" not in r.text and "Traceback" not in r.text


@pytest.mark.parametrize("secret", [None, "", "short-secret"])
def test_server_nonces_need_a_secret_of_their_own(secret: str | None) -> None:
    """With no secret (or a short one) the nonce key would come from a public constant,
    and anyone could mint nonces the verifier accepts: such settings are refused."""
    from pydantic import ValidationError

    from agentauth.verifier import VerifierSettings

    fields = {
        "database_url": "postgresql://x/y",
        "redis_url": "redis://x",
        "issuer": "https://registry.test/registry",
    }
    with pytest.raises(ValidationError, match="nonce_secret"):
        VerifierSettings(**fields, dpop_nonces=True, nonce_secret=secret)
    assert VerifierSettings(**fields, dpop_nonces=True, nonce_secret="s" * 32).dpop_nonces


class Introspecting(StandIn):
    """Also answers the routed calls: introspection, and what /v1/stats reads."""

    def __init__(self, fail: Exception | None = None) -> None:
        super().__init__(fail)
        self.decisions = _DecisionCounts()
        self.shards = types.SimpleNamespace(
            batches=0,
            checks=0,
            given_up=0,
            void_checks=0,
            overruns=0,
            unacknowledged=0,
            queue_depth=lambda: 0,
        )
        self.revocations = types.SimpleNamespace(fresh=lambda: True)

    async def introspect(self, provider_id: str, body: VerifyIn) -> dict[str, Any]:
        if self.fail is not None:
            raise self.fail
        return {"active": False}


@pytest.mark.asyncio
@pytest.mark.parametrize("fail", [None, InvalidToken(reason="expired"), RuntimeError("boom")])
async def test_no_answer_of_the_verifier_may_be_stored(fail: Exception | None) -> None:
    """A decision or an introspection answer says what a token may do now (RFC 7662 §4); a
    cache that kept an allow would repeat it past a revocation. Every answer carries
    ``Cache-Control: no-store``: the fast path's and its refusals, the routed ones, the body
    guard's, a 404 and a 500 alike."""
    app = create_app(cast(Verifier, Introspecting(fail)))
    # A 500 is still answered when the app re-raises its exception (as Starlette does).
    transport = httpx.ASGITransport(app=app, root_path="/verifier", raise_app_exceptions=False)
    body = json.dumps(BODY).encode()
    json_type = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        answers = [
            await c.post("/verifier/v1/verify", content=body, headers={**AUTH, **json_type}),
            await c.post("/verifier/v1/verify", content=body, headers=json_type),
            await c.post("/verifier/v1/verify", content=b"{", headers={**AUTH, **json_type}),
            await c.post("/verifier/v1/introspect", content=body, headers={**AUTH, **json_type}),
            await c.post("/verifier/v1/introspect", content=b"[]", headers={**AUTH, **json_type}),
            await c.get("/verifier/v1/stats", headers=AUTH),
            await c.get("/verifier/v1/stats"),
            await c.get("/verifier/v1/nothing-here"),
            await c.get("/verifier/healthz"),
        ]
    statuses = [r.status_code for r in answers]
    expected = {
        None: [200, 401, 400, 200, 400, 200, 401, 404, 200],
        InvalidToken: [401, 401, 400, 401, 400, 200, 401, 404, 200],
        RuntimeError: [500, 401, 400, 500, 400, 200, 401, 404, 200],
    }
    assert statuses == expected[type(fail) if fail else None]
    for r in answers:
        assert r.headers.get_list("cache-control") == ["no-store"], (r.request.url, r.status_code)
        assert r.headers.get("pragma") == "no-cache", (r.request.url, r.status_code)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("resource", "why"),
    [
        ("things/a%3Ab", "second name of ':'"),  # 'things/a:b' is the path's one name
        ("things/%C3", "well-formed UTF-8"),
    ],
)
async def test_an_action_on_a_name_that_is_not_canonical_is_refused_undecided(
    resource: str, why: str
) -> None:
    stand_in = StandIn()
    body = {**BODY, "action": {"kind": "read", "resource": resource}}
    r = await post(stand_in, json.dumps(body).encode(), AUTH)
    answer = r.json()
    assert (r.status_code, answer["error"], answer["reason"]) == (400, "invalid_request", "schema")
    [detail] = answer["details"]
    assert detail["loc"] == ["action", "resource"] and why in detail["msg"]
    assert stand_in.calls == []


@pytest.mark.asyncio
async def test_a_method_a_route_does_not_take_is_answered_with_the_methods_it_does() -> None:
    """RFC 9110 §15.5.6: a 405 MUST carry ``Allow``. Starlette raises it with the header,
    and the error mapping dropped every header of the exception, so a provider's client
    (or a proxy) calling GET /v1/verify learned nothing of which method to use."""
    async with client(StandIn()) as c:
        answers = {
            ("GET", "/verifier/v1/verify"): "POST",
            ("GET", "/verifier/v1/introspect"): "POST",
            ("POST", "/verifier/v1/stats"): "GET",
        }
        for (method, path), allowed in answers.items():
            r = await c.request(method, path, headers=AUTH)
            assert r.status_code == 405, (method, path, r.text)
            assert r.json()["error"] == "method_not_allowed"
            assert allowed in r.headers.get("allow", "").split(", "), (method, path, r.headers)


PREFIX = "/verifier"  # Serve's route prefix, as client() mounts the app


@pytest.mark.asyncio
async def test_head_is_answered_as_get_and_not_by_the_fast_path() -> None:
    """RFC 9110 §9.1 and §9.3.2: every GET route answers HEAD with the GET's status and
    headers (Content-Length, the no-store mark, a 401's challenge) and no content; a 405
    lists HEAD wherever GET is; POST /v1/verify's fast path takes no HEAD."""
    stand_in = Introspecting()
    app = create_app(cast(Verifier, stand_in))
    for path, auth, status in (
        ("/verifier/healthz", {}, 200),
        ("/verifier/v1/stats", AUTH, 200),
        ("/verifier/v1/stats", {}, 401),
    ):
        get = await exchange(app, "GET", path, auth, root_path=PREFIX)
        head = await exchange(app, "HEAD", path, auth, root_path=PREFIX)
        assert get[0] == status and get[2], path
        assert head == (status, get[1], b""), path
    status, headers, content = await exchange(
        app, "HEAD", "/verifier/v1/verify", AUTH, root_path=PREFIX
    )
    assert (status, dict(headers)[b"allow"], content) == (405, b"POST", b"")
    status, headers, _ = await exchange(app, "PUT", "/verifier/v1/stats", AUTH, root_path=PREFIX)
    assert (status, dict(headers)[b"allow"]) == (405, b"GET, HEAD")
    assert stand_in.calls == []
