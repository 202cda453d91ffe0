"""The provider helpers ask about the request the app will run, and answer its own errors.

AgentAuthMiddleware and require() drive a real Starlette or FastAPI app in process; the
verifier is a stand-in that records what it was asked, or the in-process verifier service
(tests/verifier_inprocess.py). What is under test: the app never runs an action the
verifier was not asked about, and a malformed request is the caller's 400, never a 500 or
a "verifier down" 503.
"""

from __future__ import annotations

import time
from typing import Any, cast

import httpx
import pytest
from conftest import sample_provider
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from agentauth.protocol import Action, create_dpop_proof
from agentauth.sdk import AgentAuthMiddleware, Verification, VerifierClient, require


class Recorder:
    """A verifier that answers ``allowed`` to everything and records what it was asked."""

    def __init__(self, *, allowed: bool = False) -> None:
        self.allowed = allowed
        self.asked: list[tuple[str, str, Action]] = []

    async def verify_request(self, **kw: Any) -> Verification:
        self.asked.append((kw["method"], kw["url"], kw["action"]))
        if self.allowed:
            return Verification(True, "ok", audit_event="verifier-0:1")
        return Verification(False, "insufficient_capability")


def shop(ran: list[str]) -> Starlette:
    """POST /payments/{id} moves money, GET /reports reads: both protected by action_of."""

    async def pay(request: Request) -> PlainTextResponse:
        ran.append(f"{request.method} {request.url.path}")
        return PlainTextResponse("paid")

    async def report(request: Request) -> PlainTextResponse:
        ran.append(f"{request.method} {request.url.path}")
        return PlainTextResponse("the quarterly numbers")

    return Starlette(
        routes=[
            Route("/payments/{id}", pay, methods=["POST"]),
            Route("/reports", report, methods=["GET"]),
        ]
    )


def action_of(method: str, path: str) -> Action | None:
    """What a provider writes for shop(): its own routes, by method."""
    if method == "POST" and path.startswith("/payments/"):
        return Action(kind="write", resource="payments")
    if method == "GET" and path == "/reports":
        return Action(kind="read", resource="reports")
    return None


def protected_shop(ran: list[str], verifier: Recorder) -> AgentAuthMiddleware:
    return AgentAuthMiddleware(
        shop(ran),
        verifier=cast(VerifierClient, verifier),
        action_of=action_of,
        public_url="https://shop.example",
    )


# --- the path action_of is asked about is the one the router matches ----------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("mounted_by", ["starlette_mount", "server_root_path"])
async def test_a_protected_route_below_a_mount_prefix_is_verified(mounted_by: str) -> None:
    """A sub-app mounted under /v1 (Starlette's Mount, uvicorn --root-path, a Serve route
    prefix) sees the prefix in both ``path`` and ``root_path``; its router matches the
    path without it. action_of, written for the app's own routes, was handed the full
    path, named no action, and the payment ran with no token at all."""
    ran: list[str] = []
    verifier = Recorder()
    protected = protected_shop(ran, verifier)
    if mounted_by == "starlette_mount":
        transport = httpx.ASGITransport(app=Starlette(routes=[Mount("/v1", app=protected)]))
    else:
        transport = httpx.ASGITransport(app=protected, root_path="/v1")
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.example") as c:
        response = await c.post("/v1/payments/1")
    assert (response.status_code, ran) == (403, [])
    # The proof's htu still names the URL the agent called, prefix included.
    assert [(m, url) for m, url, _ in verifier.asked] == [
        ("POST", "https://shop.example/v1/payments/1")
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("prefix", "sent"),
    [("/my shop", "/my%20shop"), ("/café", "/caf%C3%A9"), ("/a b/c", "/a%20b/c")],
)
@pytest.mark.parametrize("mounted_by", ["starlette_mount", "server_root_path"])
async def test_a_mount_prefix_sent_encoded_is_named_once_as_sent(
    prefix: str, sent: str, mounted_by: str
) -> None:
    """``root_path`` is decoded and ``raw_path`` is not: a prefix with a space or a letter
    outside ASCII was not found in the raw path, so the decoded prefix was put in front of
    the whole raw path (``/café/caf%C3%A9/payments/1``), and no agent's proof matched."""
    ran: list[str] = []
    verifier = Recorder()
    protected = protected_shop(ran, verifier)
    if mounted_by == "starlette_mount":
        transport = httpx.ASGITransport(app=Starlette(routes=[Mount(prefix, app=protected)]))
    else:
        transport = httpx.ASGITransport(app=protected, root_path=prefix)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.example") as c:
        response = await c.post(f"{sent}/payments/1")
    assert (response.status_code, ran) == (403, [])
    assert [url for _, url, _ in verifier.asked] == [f"https://shop.example{sent}/payments/1"]


@pytest.mark.asyncio
async def test_a_mount_prefix_a_proxy_removed_is_put_back_encoded() -> None:
    """Behind a proxy that strips the prefix, the server is told it in ``root_path`` and
    the raw path lacks it: the agent sent it, percent-encoded, and signed that."""
    verifier = Recorder()
    protected = protected_shop([], verifier)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "scheme": "https",
        "path": "/café/payments/1",
        "raw_path": b"/payments/1",
        "root_path": "/café",
        "headers": [(b"host", b"shop.example")],
        "query_string": b"",
    }
    await protected(scope, receive, send)
    assert [url for _, url, _ in verifier.asked] == ["https://shop.example/caf%C3%A9/payments/1"]


@pytest.mark.asyncio
async def test_a_mount_prefix_is_removed_only_at_a_segment_boundary() -> None:
    """``/v1`` is the mount of ``/v1/reports``, not of ``/v1reports``: as Starlette routes."""
    paths: list[str] = []

    def of(method: str, path: str) -> Action | None:
        paths.append(path)
        return None

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    protected = AgentAuthMiddleware(app, verifier=cast(VerifierClient, Recorder()), action_of=of)
    transport = httpx.ASGITransport(app=protected, root_path="/v1")
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.example") as c:
        for path in ("/v1/reports", "/v1reports", "/v1", "/other"):
            await c.get(path)
    # Each first as the router matches it; a prefixed one found unprotected is asked about
    # again as the full path (see the next test).
    assert paths == ["/reports", "/v1/reports", "/v1reports", "/", "/v1", "/other"]


@pytest.mark.asyncio
async def test_an_action_of_written_for_full_paths_keeps_its_routes_protected() -> None:
    """Before, action_of was handed the full path, prefix included; a provider who wrote it
    for those paths must not find its routes opened by the change to the router's path."""
    ran: list[str] = []
    verifier = Recorder()

    def of_full_paths(method: str, path: str) -> Action | None:
        if method == "POST" and path.startswith("/v1/payments/"):
            return Action(kind="write", resource="payments")
        return None

    protected = AgentAuthMiddleware(
        shop(ran), verifier=cast(VerifierClient, verifier), action_of=of_full_paths
    )
    transport = httpx.ASGITransport(app=Starlette(routes=[Mount("/v1", app=protected)]))
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.example") as c:
        response = await c.post("/v1/payments/1")
    assert (response.status_code, ran) == (403, [])
    assert [action for _, _, action in verifier.asked] == [
        Action(kind="write", resource="payments")
    ]


@pytest.mark.asyncio
async def test_a_websocket_to_a_protected_route_below_a_mount_prefix_is_refused() -> None:
    """The WebSocket refusal asked action_of about the full path too: a socket the app
    serves at /live, which action_of protects, was handed to the app under Mount("/v1")."""
    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await receive()
        await send({"type": "websocket.accept"})

    def of(method: str, path: str) -> Action | None:
        return Action(kind="read", resource="live") if path == "/live" else None

    protected = AgentAuthMiddleware(app, verifier=cast(VerifierClient, Recorder()), action_of=of)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    # What Starlette's Mount("/v1") hands the sub-app for ws://host/v1/live.
    scope = {
        "type": "websocket",
        "path": "/v1/live",
        "raw_path": b"/v1/live",
        "root_path": "/v1",
        "headers": [],
        "query_string": b"",
    }
    await protected(scope, receive, send)
    assert (reached, sent) == ([], [{"type": "websocket.close", "code": 1008}])


# --- HEAD runs the GET handler, so it is asked about as GET ---------------------------------


@pytest.mark.asyncio
async def test_head_is_verified_as_the_get_it_runs() -> None:
    """Starlette answers HEAD with the GET route's endpoint (RFC 9110 §9.3.2). action_of
    was asked about "HEAD", which a mapping by method does not name: the GET handler ran
    for anyone, its side effects and its headers (Content-Length, ETag) with it. The
    verifier is still asked about HEAD: the proof's htm is the request's method."""
    ran: list[str] = []
    verifier = Recorder()
    protected = protected_shop(ran, verifier)
    transport = httpx.ASGITransport(app=protected)
    async with httpx.AsyncClient(transport=transport, base_url="http://shop.example") as c:
        response = await c.head("/reports")
    assert (response.status_code, ran) == (403, [])
    assert verifier.asked == [
        ("HEAD", "https://shop.example/reports", Action(kind="read", resource="reports"))
    ]


# --- require(callable): an action the request cannot name is the caller's 400 -------------


@pytest.mark.asyncio
async def test_require_answers_an_action_the_request_cannot_name_with_a_400() -> None:
    """The callable builds the Action from the query; a bad amount or currency raises the
    model's ValidationError (a ValueError) out of the dependency: a 500 with a traceback
    in the provider's log. The middleware answers action_of's ValueError with a 400; so
    does require() now, without asking the verifier."""
    from fastapi import Depends, FastAPI

    def payment(request: Any) -> Action:
        return Action(
            kind="transact",
            resource="payments",
            amount=request.query_params.get("amount", ""),
            currency=request.query_params.get("currency", "USD"),
        )

    verifier = Recorder()
    api = FastAPI()
    # require() takes a factory too; a stand-in is not a VerifierClient, so it is handed one.
    pay = require(
        payment, verifier=lambda: cast(VerifierClient, verifier), public_url="https://x.example"
    )

    @api.post("/api/payments", dependencies=[Depends(pay)])
    async def make_payment() -> str:  # pragma: no cover - never reached
        return "paid"

    transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://x.example") as c:
        for query in ("?amount=abc", "", "?amount=1&currency=usd"):
            response = await c.post(f"/api/payments{query}")
            assert response.status_code == 400, (query, response.text)
            assert response.json()["detail"] == {"error": "invalid_request", "reason": "bad_action"}
    assert verifier.asked == []


# --- the verifier refusing the call's own input is not an outage ---------------------------


def inprocess_verifier_client() -> VerifierClient:
    from verifier_inprocess import verifier

    from agentauth.verifier import create_app

    service, _ = verifier()
    http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(service)), base_url="http://verifier"
    )
    return VerifierClient("http://verifier", provider_id="prov_a", secret="secret-a", http=http)


@pytest.mark.asyncio
@pytest.mark.parametrize("case", ["well_formed", "long_step_up_ref", "long_token", "long_method"])
async def test_input_over_the_verifiers_limits_is_a_400_not_a_verifier_outage(case: str) -> None:
    """The verifier refuses input over its limits (a step-up reference over 128
    characters, a token over 8 KiB, a method over 16) as the call's own error. The client
    took any such answer for an outage: anyone, with no token, could make the provider
    answer 503 Retry-After ("try again in a moment"). It is the caller's 400 now."""
    from verifier_inprocess import AGENT, AUDIENCE, mint

    client = inprocess_verifier_client()
    ran: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ran.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    protected = AgentAuthMiddleware(
        app,
        verifier=client,
        action_of=lambda method, path: Action(kind="read", resource="calendar/events"),
        public_url=AUDIENCE,
    )
    method = "GET"
    token = mint(now=time.time())
    headers: dict[str, str] = {}
    if case == "long_step_up_ref":
        headers["AgentAuth-Step-Up"] = "s" * 200
    elif case == "long_token":
        token += "A" * 9000
    elif case == "long_method":
        method = "M" * 20
    proof = create_dpop_proof(
        AGENT,
        htm=method,
        htu=f"{AUDIENCE}/v1/calendar/events",
        now=time.time(),
        access_token=token,
    )
    headers |= {"Authorization": f"DPoP {token}", "DPoP": proof}
    transport = httpx.ASGITransport(app=protected)
    async with httpx.AsyncClient(transport=transport, base_url=AUDIENCE) as c:
        response = await c.request(method, "/v1/calendar/events", headers=headers)
    await client.aclose()
    if case == "well_formed":  # the harness allows it: the app runs
        assert (response.status_code, ran) == (204, ["/v1/calendar/events"])
        return
    assert (response.status_code, ran) == (400, [])
    assert response.json()["reason"] == f"invalid_request:{case.removeprefix('long_')}_too_long"


def test_the_clients_limits_are_the_verifiers() -> None:
    """The client refuses over-long input without a call; a limit looser than the
    verifier's would only cost a round trip, a tighter one would refuse good requests."""
    from agentauth.sdk._provider import _LIMITS
    from agentauth.verifier import VerifyIn

    for name, most in _LIMITS.items():
        metadata = VerifyIn.model_fields[name].metadata
        assert [m.max_length for m in metadata if hasattr(m, "max_length")] == [most], name


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [400, 422])
async def test_a_verifier_refusing_the_calls_input_is_a_deny_invalid_request(
    status: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Input the client cannot check ahead (an action the verifier's own model refuses,
    say): the verifier's 400 or 422 is a deny the provider answers 400, logged as a
    warning. A 5xx or no answer stays verifier_unavailable (test_sdk_unit.py)."""
    refusing = httpx.MockTransport(
        lambda r: httpx.Response(
            status, json={"error": "invalid_request", "reason": "request_validation"}
        )
    )
    client = VerifierClient(
        "http://v", provider_id="p", secret="s", http=httpx.AsyncClient(transport=refusing)
    )
    headers = {"authorization": "DPoP a.b.c", "dpop": "d.e.f"}
    action = Action(kind="read", resource="x")
    with caplog.at_level("WARNING", logger="agentauth.provider"):
        result = await client.verify_request(
            method="GET", url="https://a/x", headers=headers, action=action
        )
    assert (result.allowed, result.reason) == (False, "invalid_request:rejected_by_verifier")
    assert any(str(status) in record.getMessage() for record in caplog.records)
    await client.aclose()


@pytest.mark.asyncio
async def test_a_check_the_shard_found_malformed_is_answered_as_a_verifier_failure() -> None:
    """``malformed_check`` says the shard could not take the replica's check (the two of
    different versions, or a bug): nothing about the grant was decided, so the agent gets
    the 503 the other server-side failures get, not the 403 of a grant that refuses it."""
    denying = httpx.MockTransport(
        lambda r: httpx.Response(
            200, json={"decision": "deny", "reason": "malformed_check", "audit_event": None}
        )
    )
    client = VerifierClient(
        "http://v", provider_id="p", secret="s", http=httpx.AsyncClient(transport=denying)
    )
    ran: list[str] = []
    app = AgentAuthMiddleware(
        shop(ran), verifier=client, action_of=action_of, public_url="https://shop.example"
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="https://shop.example"
    ) as http:
        answer = await http.get(
            "/reports", headers={"authorization": "DPoP a.b.c", "dpop": "d.e.f"}
        )
    assert (answer.status_code, answer.headers.get("retry-after")) == (503, "1")
    assert answer.json() == {"error": "access_denied", "reason": "malformed_check"}
    assert ran == []
    await client.aclose()


# --- the sample provider verifies only what it will do --------------------------------------


@pytest.mark.asyncio
async def test_the_sample_provider_asks_the_verifier_only_about_a_payment_it_will_make() -> None:
    """An allow is a commit: the verifier counts the amount against the grant's spend
    limits and writes an allow to the audit chain. The sample's require() ran before
    FastAPI validated the route's own query parameters, so a payment with no payee was
    allowed, charged, then refused 422. The action is validated before the verifier is
    asked now, and the payment made is the one allowed, currency included."""
    verifier = Recorder(allowed=True)
    # require() takes a factory too; a stand-in is not a VerifierClient, so it is handed one.
    app = sample_provider().build_app(cast(Any, lambda: verifier), public_url="https://cal.example")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://cal.example") as c:
        for query in ("?amount=20", "?payee=acme", "?amount=abc&payee=acme", "?amount=1&payee="):
            response = await c.post(f"/api/payments{query}")
            assert response.status_code == 400, (query, response.text)
        assert verifier.asked == []
        response = await c.post("/api/payments?amount=20&payee=acme&currency=EUR")
    assert response.status_code == 200, response.text
    [(_, _, allowed)] = verifier.asked
    assert allowed == Action(
        kind="transact", resource="payments", amount="20", currency="EUR", payee="acme"
    )
    paid = response.json()
    assert (paid["paid"], paid["currency"], paid["payee"]) == ("20", "EUR", "acme")


# --- a nonce renewed with an allow reaches the agent --------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("helper", ["middleware", "require"])
async def test_a_renewed_nonce_reaches_the_agent_with_the_allowed_answer(helper: str) -> None:
    """The verifier hands out a nonce's successor with an allow once it is past half its
    lifetime (RFC 9449 §8.2); the provider helpers must pass it on in DPoP-Nonce, and the
    agent's DPoPAuth must sign its next request with it. End to end: the in-process
    verifier service, the helper in a real Starlette/FastAPI app, the SDK's auth."""
    from fastapi import Depends, FastAPI
    from verifier_inprocess import AGENT, mint, verifier

    from agentauth.sdk import DPoPAuth
    from agentauth.verifier import create_app

    service, _ = verifier(dpop_nonces=True, nonce_secret="n" * 32)
    nonces = service.proofs.nonces
    assert nonces is not None
    client = VerifierClient(
        "http://verifier",
        provider_id="prov_a",
        secret="secret-a",
        http=httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(service)), base_url="http://verifier"
        ),
    )
    read = Action(kind="read", resource="calendar/events")
    if helper == "middleware":

        async def events(request: Request) -> PlainTextResponse:
            return PlainTextResponse("events")

        app: Any = AgentAuthMiddleware(
            Starlette(routes=[Route("/v1/calendar/events", events)]),
            verifier=client,
            action_of=lambda method, path: read,
            public_url="https://api.example",
        )
    else:
        app = FastAPI()

        @app.get(
            "/v1/calendar/events",
            dependencies=[
                Depends(require(read, verifier=client, public_url="https://api.example"))
            ],
        )
        async def fastapi_events() -> str:
            return "events"

    auth = DPoPAuth(key=AGENT, token=mint(now=time.time()))
    aging = nonces.issue(time.time() - 200)
    auth.nonces["https://api.example"] = aging
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="https://api.example", auth=auth
    ) as agent:
        first = await agent.get("/v1/calendar/events")
        assert first.status_code == 200
        successor = first.headers["DPoP-Nonce"]
        assert successor != aging and nonces.valid(successor, time.time())
        assert auth.nonces["https://api.example"] == successor
        second = await agent.get("/v1/calendar/events")
        assert second.status_code == 200 and "DPoP-Nonce" not in second.headers
    await client.aclose()


# --- without public_url, the Host header names the origin and nothing more -----------------


@pytest.mark.asyncio
@pytest.mark.parametrize("helper", ["middleware", "require"])
@pytest.mark.parametrize(
    "host", ["elsewhere.example#", "elsewhere.example/?", "elsewhere.example/"]
)
async def test_a_host_header_cannot_choose_the_path_a_proof_is_checked_against(
    helper: str, host: str
) -> None:
    """Without public_url the origin is rebuilt from the Host header, a caller's choice; but
    a Host holding "#", "?" or "/" rewrote the path too: the URL asked about was
    ``https://elsewhere.example#/v1/calendar/events``, which is ``https://elsewhere.example/``
    to any URL parser. A token and a proof the agent sent to another origin (a link it was
    led to) then passed for any route of this provider. Such a Host is no RFC 9110 §7.2
    host[:port]: 400 (RFC 9112 §3.2), the verifier not asked, the app not run."""
    from fastapi import Depends, FastAPI
    from verifier_inprocess import AGENT, mint, verifier

    from agentauth.verifier import create_app

    service, shards = verifier()
    client = VerifierClient(
        "http://verifier",
        provider_id="prov_a",
        secret="secret-a",
        http=httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(service)), base_url="http://verifier"
        ),
    )
    ran: list[str] = []
    read = Action(kind="read", resource="calendar/events")
    if helper == "middleware":

        async def events(request: Request) -> PlainTextResponse:
            ran.append(request.url.path)
            return PlainTextResponse("events")

        app: Any = AgentAuthMiddleware(
            Starlette(routes=[Route("/v1/calendar/events", events)]),
            verifier=client,
            action_of=lambda method, path: read,
        )
    else:
        app = FastAPI()

        @app.get("/v1/calendar/events", dependencies=[Depends(require(read, verifier=client))])
        async def fastapi_events() -> str:
            ran.append("/v1/calendar/events")
            return "events"

    now = time.time()
    token = mint(now=now)
    # What the agent sent to the other origin, for its root ("/" is also what "/?" names).
    taken = create_dpop_proof(
        AGENT, htm="GET", htu="https://elsewhere.example/", now=now, access_token=token
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://api.example") as c:
        response = await c.get(
            "/v1/calendar/events",
            headers={"Host": host, "Authorization": f"DPoP {token}", "DPoP": taken},
        )
        assert response.status_code == 400, response.text
        body = response.json()
        assert body.get("detail", body) == {"error": "invalid_request", "reason": "bad_host"}
        # Two Host lines are refused alike: which one names the origin is anyone's guess.
        two = await c.get(
            "/v1/calendar/events",
            headers=[("Host", "api.example"), ("Host", "elsewhere.example")],
        )
        assert two.status_code == 400
        # A host with a port, an IP literal, and no Host at all (HTTP/1.0) still reach the
        # verifier, which refuses this proof for their URLs.
        for good in ("elsewhere.example:8443", "[::1]:8080", "127.0.0.1"):
            answer = await c.get(
                "/v1/calendar/events",
                headers={"Host": good, "Authorization": f"DPoP {token}", "DPoP": taken},
            )
            assert answer.status_code == 401, (good, answer.text)
    assert ran == []
    assert all(check.deny for check in shards.recorded)
    await client.aclose()


@pytest.mark.parametrize("given", ["api.example.com", "//api.example.com", "ftp://api.example"])
def test_a_public_url_that_is_no_http_origin_is_refused_when_the_middleware_is_made(
    given: str,
) -> None:
    """Without a scheme it became "://api.example.com", and every proof was refused 400 as
    if each agent had named the wrong URL: the mistake is the provider's, said at once."""
    with pytest.raises(ValueError, match="public_url"):
        AgentAuthMiddleware(
            object(),
            verifier=cast(VerifierClient, Recorder()),
            action_of=lambda _: None,
            public_url=given,
        )
    with pytest.raises(ValueError, match="public_url"):
        require(
            Action(kind="read", resource="x"),
            verifier=cast(VerifierClient, Recorder()),
            public_url=given,
        )
