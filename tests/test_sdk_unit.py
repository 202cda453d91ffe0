"""The SDK without a server: the DPoP auth flow driven by hand, errors mapped from bodies,
step-up polls against a mock registry, and the provider helpers in process."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import pytest

from agentauth.protocol import (
    Action,
    Capability,
    DependencyUnavailable,
    DPoPVerifier,
    Envelope,
    Forbidden,
    Grant,
    InvalidRequest,
    NotFound,
    PrivateKey,
    RateLimited,
    Unauthenticated,
    b64url_decode,
    create_dpop_proof,
    mint_access_token,
)
from agentauth.sdk import (
    AgentAuthClient,
    AgentAuthClientSync,
    AgentAuthMiddleware,
    DPoPAuth,
    OfflineVerifier,
    ServerError,
    Verification,
    VerifierClient,
    error_from_response,
    is_nonce_challenge,
    require,
)
from agentauth.sdk._client import _load_or_create_key, _Token
from agentauth.sdk._provider import denial


def claims(proof: str) -> dict[str, object]:
    return dict(json.loads(b64url_decode(proof.split(".")[1])))


def test_auth_flow_signs_then_retries_once_with_the_servers_nonce() -> None:
    key = PrivateKey.generate()
    auth = DPoPAuth(key=key, token="tok.en.x")
    request = httpx.Request("GET", "https://api.example/v1/x?q=1")
    flow = auth.auth_flow(request)
    first = next(flow)
    assert first.headers["Authorization"] == "DPoP tok.en.x"
    first_proof = claims(first.headers["DPoP"])  # the request is re-signed in place
    assert "nonce" not in first_proof
    challenge = httpx.Response(
        401,
        headers={"WWW-Authenticate": 'DPoP error="use_dpop_nonce"', "DPoP-Nonce": "n-123"},
        request=request,
    )
    second = flow.send(challenge)
    proof = claims(second.headers["DPoP"])
    assert proof["nonce"] == "n-123" and proof["htu"] == "https://api.example/v1/x"
    assert proof["jti"] != first_proof["jti"]
    with pytest.raises(StopIteration):  # one retry only
        flow.send(httpx.Response(401, request=request))
    # The nonce is remembered for the next request to that server.
    nxt = next(auth.auth_flow(httpx.Request("POST", "https://api.example/v1/y")))
    assert claims(nxt.headers["DPoP"])["nonce"] == "n-123"
    DPoPVerifier().verify(
        nxt.headers["DPoP"],
        htm="POST",
        htu="https://api.example/v1/y",
        now=time.time(),
        access_token="tok.en.x",
        jkt=key.thumbprint,
    )


def test_a_nonce_renewed_with_a_successful_answer_is_used_next() -> None:
    """RFC 9449 §8.2: a server may send a new nonce with any answer, and AgentAuth's
    providers send one with an allow whose nonce is aging. The SDK kept only nonces from
    challenges, so it went on with the old one until a request was refused for it."""
    auth = DPoPAuth(key=PrivateKey.generate(), token="tok.en.x")
    auth.nonces["https://api.example"] = "n-old"
    request = httpx.Request("GET", "https://api.example/v1/x")
    flow = auth.auth_flow(request)
    assert claims(next(flow).headers["DPoP"])["nonce"] == "n-old"
    with pytest.raises(StopIteration):  # an answer, not a challenge: no retry
        flow.send(httpx.Response(200, headers={"DPoP-Nonce": "n-new"}, request=request))
    nxt = next(auth.auth_flow(httpx.Request("GET", "https://api.example/v1/z")))
    assert claims(nxt.headers["DPoP"])["nonce"] == "n-new"
    # Another origin is told nothing of it; an answer without one keeps the nonce held.
    other = next(auth.auth_flow(httpx.Request("GET", "https://other.example/")))
    assert "nonce" not in claims(other.headers["DPoP"])
    flow = auth.auth_flow(request)
    next(flow)
    with pytest.raises(StopIteration):
        flow.send(httpx.Response(200, request=request))
    assert auth.nonces == {"https://api.example": "n-new"}


def test_nonces_are_kept_for_a_bounded_number_of_origins() -> None:
    """DPoPAuth kept a nonce for every origin that ever sent one, without end."""
    from agentauth.sdk._auth import MAX_NONCES

    auth = DPoPAuth(key=PrivateKey.generate(), token="tok.en.x")
    for k in range(MAX_NONCES + 10):
        request = httpx.Request("GET", f"https://api{k}.example/")
        flow = auth.auth_flow(request)
        next(flow)
        with pytest.raises(StopIteration):
            flow.send(httpx.Response(200, headers={"DPoP-Nonce": f"n{k}"}, request=request))
    assert len(auth.nonces) == MAX_NONCES
    assert "https://api0.example" not in auth.nonces  # the oldest went first
    assert auth.nonces[f"https://api{MAX_NONCES + 9}.example"] == f"n{MAX_NONCES + 9}"


def test_a_nonce_from_the_server_a_redirect_led_to_is_not_taken_for_the_first() -> None:
    """With redirects followed, the flow sees the last hop's answer: its nonce challenge
    was stored as the first origin's nonce and the request retried under it."""
    auth = DPoPAuth(key=PrivateKey.generate(), token="tok.en.x")
    request = httpx.Request("GET", "https://api.example/v1/x")
    flow = auth.auth_flow(request)
    next(flow)
    elsewhere = httpx.Request("GET", "https://other.example/landing")
    challenge = httpx.Response(
        401,
        headers={"WWW-Authenticate": 'DPoP error="use_dpop_nonce"', "DPoP-Nonce": "theirs"},
        request=elsewhere,
    )
    with pytest.raises(StopIteration):  # no retry
        flow.send(challenge)
    assert auth.nonces == {}


@pytest.mark.parametrize("refusal", ["invalid_token", "revoked"])
def test_a_refusal_from_the_server_a_redirect_led_to_does_not_let_the_token_go(
    refusal: str,
) -> None:
    """With redirects followed, the last hop's answer is another server's: its 401
    invalid_token (or a body saying revoked) says nothing of the provider's token, which
    was let go all the same, a new token minted for each such redirect."""
    refused: list[str] = []

    def servers(request: httpx.Request) -> httpx.Response:
        if request.url.host == "api.example":
            return httpx.Response(302, headers={"Location": "https://other.example/landing"})
        if refusal == "invalid_token":
            return httpx.Response(401, headers={"WWW-Authenticate": 'DPoP error="invalid_token"'})
        return httpx.Response(403, json={"error": "access_denied", "reason": refusal})

    auth = DPoPAuth(key=PrivateKey.generate(), token="tok.en.x", on_refused=refused.append)
    transport = httpx.MockTransport(servers)
    with httpx.Client(transport=transport, follow_redirects=True, auth=auth) as client:
        assert client.get("https://api.example/v1/x").url.host == "other.example"
    assert refused == []


@pytest.mark.asyncio
async def test_a_streamed_upload_is_sent_again_after_a_nonce_challenge() -> None:
    """The nonce retry re-sent a streamed body the first attempt had consumed: a transport
    that streams the body (as a real one does) raised StreamConsumed."""
    sent: list[tuple[bytes, object]] = []

    class Streaming(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            body = b"".join([chunk async for chunk in request.stream])  # type: ignore[union-attr]
            sent.append((body, claims(request.headers["DPoP"]).get("nonce")))
            if len(sent) == 1:
                headers = {"WWW-Authenticate": 'DPoP error="use_dpop_nonce"', "DPoP-Nonce": "n1"}
                return httpx.Response(401, headers=headers, request=request)
            return httpx.Response(200, request=request)

    async def upload() -> AsyncIterator[bytes]:
        yield b"part one, "
        yield b"part two"

    auth = DPoPAuth(key=PrivateKey.generate(), token="tok.en.x")
    async with httpx.AsyncClient(transport=Streaming(), auth=auth) as client:
        response = await client.post("https://api.example/v1/upload", content=upload())
    assert response.status_code == 200
    assert sent == [(b"part one, part two", None), (b"part one, part two", "n1")]


def test_only_a_real_nonce_challenge_triggers_a_retry() -> None:
    request = httpx.Request("GET", "https://a.example/")
    assert not is_nonce_challenge(httpx.Response(401, request=request))
    assert not is_nonce_challenge(httpx.Response(403, headers={"DPoP-Nonce": "n"}, request=request))
    plain = httpx.Response(
        401, headers={"DPoP-Nonce": "n"}, json={"error": "invalid_token"}, request=request
    )
    assert not is_nonce_challenge(plain)
    # A JSON body that is not an object is no challenge either (it raised AttributeError).
    for body in ([], "use_dpop_nonce", 1):
        listed = httpx.Response(401, headers={"DPoP-Nonce": "n"}, json=body, request=request)
        assert not is_nonce_challenge(listed)


class _UnreadBody(httpx.AsyncByteStream, httpx.SyncByteStream):
    """A body that arrives as a stream, as one from the network does: unread when the
    auth flow is handed the response."""

    def __init__(self, body: bytes) -> None:
        self.body = body

    def __iter__(self) -> Iterator[bytes]:
        yield self.body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.body


def body_only_nonce_server(sent: list[httpx.Request]) -> Callable[[httpx.Request], httpx.Response]:
    def server(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if len(sent) == 1:
            return httpx.Response(
                400,
                headers={"DPoP-Nonce": "n-1", "Content-Type": "application/json"},
                stream=_UnreadBody(b'{"error": "use_dpop_nonce"}'),
            )
        return httpx.Response(200, json={"ok": True})

    return server


@pytest.mark.asyncio
async def test_a_nonce_challenge_named_only_in_the_body_is_answered_over_the_network() -> None:
    """RFC 9449 §8: an authorization server's nonce challenge is a 400 with the error in
    the JSON body and no WWW-Authenticate. Reading that body from a response httpx had
    not read yet raised ResponseNotRead, with both the async and the sync client."""
    sent: list[httpx.Request] = []
    auth = DPoPAuth(key=PrivateKey.generate(), token="tok")
    transport = httpx.MockTransport(body_only_nonce_server(sent))
    async with httpx.AsyncClient(transport=transport) as http:
        response = await http.post("https://as.example/token", auth=auth, json={})
    assert response.status_code == 200 and len(sent) == 2
    assert claims(sent[1].headers["DPoP"])["nonce"] == "n-1"
    sent.clear()
    auth = DPoPAuth(key=PrivateKey.generate(), token="tok")
    with httpx.Client(transport=httpx.MockTransport(body_only_nonce_server(sent))) as http:
        response = http.post("https://as.example/token", auth=auth, json={})
    assert response.status_code == 200 and len(sent) == 2
    assert claims(sent[1].headers["DPoP"])["nonce"] == "n-1"


def start_together(path: Path, agents: int) -> tuple[list[str], list[BaseException]]:
    """``agents`` threads loading or creating the key at ``path`` at the same moment: the
    key thumbprints they got, and what they raised."""
    barrier = threading.Barrier(agents)
    thumbprints: list[str] = []
    failures: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            thumbprints.append(_load_or_create_key(path, "ES256").thumbprint)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=start) for _ in range(agents)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return thumbprints, failures


def test_agents_started_together_on_one_home_share_one_whole_key(tmp_path: Path) -> None:
    """Agent processes started at once (a supervisor starting workers): the key file was
    created, then written, so another start found it there and read it empty, or failed
    to create it (FileExistsError). It is linked into place whole now."""
    for attempt in range(10):
        path = tmp_path / f"home{attempt}" / "agent-key.pem"
        thumbprints, failures = start_together(path, 4)
        assert failures == []
        assert len(set(thumbprints)) == 1
        assert [p.name for p in path.parent.iterdir()] == ["agent-key.pem"]  # no temp left
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_an_agent_key_reached_through_a_symlink_is_refused(tmp_path: Path) -> None:
    """An existing key was read following symlinks (only a newly raced one was read as the
    registry reads its own key, O_NOFOLLOW): a link planted at the key path chose the key."""
    elsewhere = tmp_path / "elsewhere.pem"
    _load_or_create_key(elsewhere, "ES256")
    path = tmp_path / "home" / "agent-key.pem"
    path.parent.mkdir(mode=0o700)
    path.symlink_to(elsewhere)
    with pytest.raises(OSError, match="symbolic links"):
        _load_or_create_key(path, "ES256")


@pytest.mark.asyncio
async def test_registering_never_writes_through_a_link_planted_in_the_home(
    tmp_path: Path,
) -> None:
    """``register`` wrote agent.json with ``write_text``, which follows a symlink: a link
    planted in the home (where the key itself is read without following one) had the
    agent truncate and overwrite whatever file it named, and a reader could find the file
    empty, half written. It is written beside it and renamed into place now."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (home / "agent.json").symlink_to(victim)

    def registry(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201, json={"id": "agt_9"})

    key = PrivateKey.generate()
    http = httpx.AsyncClient(transport=httpx.MockTransport(registry))
    client = AgentAuthClient("https://registry.example", key=key, http=http, home=home)
    assert await client.register(enrollment_code="enr_1") == "agt_9"
    assert victim.read_text() == "keep me"
    assert not (home / "agent.json").is_symlink()
    assert sorted(p.name for p in home.iterdir()) == ["agent.json"]  # no temporary left
    assert AgentAuthClient("https://registry.example", key=key, home=home).agent_id == "agt_9"
    await http.aclose()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_an_agent_key_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    """An existing key owned by another user (mode 0600, so root reads it) was used: that
    user knows the key, or can replace it, and so signs as the agent."""
    path = tmp_path / "agent-key.pem"
    _load_or_create_key(path, "ES256")
    os.chown(path, 4242, 4242)
    with pytest.raises(PermissionError, match="owned by uid 4242"):
        _load_or_create_key(path, "ES256")


def test_an_agent_key_that_is_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO at the key path (mode 0600) passed the mode check, and reading it waited for
    a writer: the agent hung for ever as it started."""
    path = tmp_path / "agent-key.pem"
    os.mkfifo(path, 0o600)
    failures: list[BaseException] = []

    def load() -> None:
        try:
            _load_or_create_key(path, "ES256")
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(5.0)
    if thread.is_alive():  # unblock the read, so the thread ends with the test
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    assert not thread.is_alive() and len(failures) == 1
    assert isinstance(failures[0], PermissionError)


def test_server_errors_map_onto_the_error_tree() -> None:
    request = httpx.Request("GET", "https://r.example/")
    error = error_from_response(
        httpx.Response(
            403,
            json={"error": "forbidden", "error_description": "no", "reason": "widening"},
            request=request,
        )
    )
    assert isinstance(error, Forbidden) and error.reason == "widening"
    unknown = error_from_response(httpx.Response(418, json={"error": "teapot"}, request=request))
    assert unknown.code == "teapot"  # type: ignore[attr-defined]
    # A 429 keeps the registry's Retry-After.
    refused = error_from_response(
        httpx.Response(
            429,
            json={"error": "rate_limited", "reason": "too_many_waits"},
            headers={"Retry-After": "5"},
            request=request,
        )
    )
    assert isinstance(refused, RateLimited) and refused.retry_after == 5


@pytest.mark.parametrize(
    "body",
    [
        {"error": {"code": 502, "message": "upstream unavailable"}},  # a gateway's own form
        {"error": ["forbidden"]},
        {"error": "forbidden", "error_description": {"text": "no"}, "reason": ["widening"]},
    ],
)
def test_an_error_body_not_in_the_registrys_form_is_still_an_agentauth_error(
    body: dict[str, Any],
) -> None:
    """An ``error`` that is no string (as API gateways answer: ``{"error": {"code": ...}}``)
    raised TypeError from the lookup of its class, not the error tree's; a description or
    reason that is no string went into the exception as it was."""
    error = error_from_response(
        httpx.Response(502, json=body, request=httpx.Request("GET", "https://r.example/"))
    )
    assert isinstance(error, Forbidden if body["error"] == "forbidden" else ServerError)
    assert error.reason is None and str(error) == "HTTP 502"


@pytest.mark.asyncio
async def test_verifier_client_fails_closed() -> None:
    action = Action(kind="read", resource="x")
    headers = {"authorization": "DPoP a.b.c", "dpop": "d.e.f"}

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    for transport in (
        httpx.MockTransport(down),
        httpx.MockTransport(lambda r: httpx.Response(500, json={"error": "server_error"})),
        httpx.MockTransport(lambda r: httpx.Response(200, json={"decision": "maybe"})),
        httpx.MockTransport(lambda r: httpx.Response(200, content=b"not json")),
    ):
        client = VerifierClient(
            "http://v", provider_id="p", secret="s", http=httpx.AsyncClient(transport=transport)
        )
        result = await client.verify_request(
            method="GET", url="https://a/x", headers=headers, action=action
        )
        assert (result.allowed, result.reason) == (False, "verifier_unavailable")
    # The verifier refusing the provider itself (a suspension, a wrong secret) decides
    # nothing about the request: denied as unavailable, the verifier's reason kept.
    for status, reason in ((403, "provider_suspended"), (401, "bad_provider_credential")):
        refusing = httpx.MockTransport(
            lambda r, s=status, why=reason: httpx.Response(
                s, json={"error": "forbidden", "reason": why}
            )
        )
        client = VerifierClient(
            "http://v", provider_id="p", secret="s", http=httpx.AsyncClient(transport=refusing)
        )
        result = await client.verify_request(
            method="GET", url="https://a/x", headers=headers, action=action
        )
        assert (result.allowed, result.reason) == (False, "verifier_unavailable")
        assert result.raw == {"status": status, "reason": reason}
    allowing = httpx.MockTransport(
        lambda r: httpx.Response(200, json={"decision": "allow", "reason": "ok"})
    )
    client = VerifierClient(
        "http://v", provider_id="p", secret="s", http=httpx.AsyncClient(transport=allowing)
    )
    missing = await client.verify_request(
        method="GET", url="https://a/x", headers={}, action=action
    )
    assert not missing.allowed and missing.reason == "missing_dpop_credentials"
    assert (
        await client.verify_request(method="GET", url="https://a/x", headers=headers, action=action)
    ).allowed


@pytest.mark.asyncio
async def test_a_provider_refused_by_the_verifier_logs_it_once_not_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong or ended provider secret refuses every request the provider serves: its log
    says so once (it is the provider operator's to fix), not once per request."""
    refusing = httpx.MockTransport(
        lambda r: httpx.Response(
            401, json={"error": "unauthenticated", "reason": "bad_provider_credential"}
        )
    )
    client = VerifierClient(
        "http://v", provider_id="p", secret="s", http=httpx.AsyncClient(transport=refusing)
    )
    headers = {"authorization": "DPoP a.b.c", "dpop": "d.e.f"}
    action = Action(kind="read", resource="x")
    with caplog.at_level(logging.WARNING, logger="agentauth.provider"):
        for _ in range(20):
            result = await client.verify_request(
                method="GET", url="https://a/x", headers=headers, action=action
            )
            assert (result.allowed, result.reason) == (False, "verifier_unavailable")
    assert [r.getMessage() for r in caplog.records] == [
        "the verifier refused this provider: 401 bad_provider_credential"
    ]
    await client.aclose()


@pytest.mark.asyncio
async def test_a_timeout_given_with_a_client_of_ones_own_bounds_each_verifier_call() -> None:
    """With http= given, timeout= was dropped: a provider's client made without timeouts
    waited on a verifier that accepted and never answered for as long as it stayed so,
    every request held, instead of a deny within the timeout asked for."""
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # reads nothing, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    http = httpx.AsyncClient(timeout=None)
    client = VerifierClient(
        f"http://127.0.0.1:{port}", provider_id="p", secret="s", timeout=0.2, http=http
    )
    headers = {"authorization": "DPoP a.b.c", "dpop": "d.e.f"}
    try:
        started = time.monotonic()
        result = await asyncio.wait_for(
            client.verify_request(
                method="GET",
                url="https://a/x",
                headers=headers,
                action=Action(kind="read", resource="x"),
            ),
            5.0,
        )
        assert (result.allowed, result.reason) == (False, "verifier_unavailable")
        assert time.monotonic() - started < 2.0
    finally:
        await http.aclose()
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


# --- step-ups: long polls outlast the registry's hold; a retry never asks twice ------------


class StepUpRegistry:
    """The registry's step-up calls, holding each poll open as the real one does: a poll
    whose read timeout is shorter than its ``wait`` ends in a ReadTimeout, like a socket."""

    def __init__(self, *, pending_polls: int) -> None:
        self.pending_polls = pending_polls
        self.created: list[str] = []
        self.polled: list[str] = []
        self.drop_next_poll = False
        self.refuse_next_poll = False

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/grants":
            grant = {"id": "grt_1", "provider_id": "shop", "revoked_at": None}
            return httpx.Response(200, json=[{**grant, "document": {"audience": "a"}}])
        if request.method == "POST" and path == "/v1/step-ups":
            self.created.append(f"stp_{len(self.created) + 1}")
            return httpx.Response(200, json={"id": self.created[-1], "status": "pending"})
        step_id = path.rsplit("/", 1)[-1]
        self.polled.append(step_id)
        if self.drop_next_poll:
            self.drop_next_poll = False
            raise httpx.RemoteProtocolError("connection dropped", request=request)
        if self.refuse_next_poll:
            self.refuse_next_poll = False
            body = {"error": "rate_limited", "reason": "too_many_waits"}
            return httpx.Response(429, json=body, headers={"Retry-After": "1"})
        if float(request.url.params["wait"]) >= request.extensions["timeout"]["read"]:
            raise httpx.ReadTimeout("held longer than the read timeout", request=request)
        await asyncio.sleep(0.01)  # the hold, shortened
        if self.pending_polls > 0:
            self.pending_polls -= 1
            return httpx.Response(200, json={"status": "pending"})
        return httpx.Response(200, json={"status": "approved", "approval_ref": f"ref-{step_id}"})


def mocked(
    registry: Any,
    home: Path,
    *,
    timeout: float = 5.0,
    client: Any = AgentAuthClient,
    **options: Any,
) -> Any:
    """An agent's ``client`` (``AgentAuthClient`` or the sync one) whose registry is the
    handler ``registry``, through httpx's MockTransport."""
    http = httpx.AsyncClient(transport=httpx.MockTransport(registry), timeout=timeout)
    return client(
        "https://registry.example",
        key=PrivateKey.generate(),
        agent_id="agt_1",
        http=http,
        home=home,
        **options,
    )


def agent_client(registry: StepUpRegistry, home: Path) -> AgentAuthClient:
    # The SDK's own default read timeout (10 s), shorter than the 25 s the poll asks for.
    return mocked(registry, home, timeout=10.0)  # type: ignore[no-any-return]


PAYMENT: dict[str, Any] = {
    "resource": "payments/inv/7",
    "amount": "120",
    "currency": "USD",
    "payee": "acme",
}


@pytest.mark.asyncio
async def test_a_step_up_poll_outlasts_the_registrys_hold(tmp_path: Path) -> None:
    registry = StepUpRegistry(pending_polls=2)
    registry.drop_next_poll = True  # and a poll lost on the way is asked again
    client = agent_client(registry, tmp_path)
    assert await client.request_step_up("shop", **PAYMENT) == "ref-stp_1"
    assert registry.created == ["stp_1"]
    assert registry.polled == ["stp_1"] * 4


@pytest.mark.asyncio
async def test_a_step_up_poll_refused_as_one_too_many_is_asked_again(tmp_path: Path) -> None:
    """The registry holds only so many polls of one agent at once: a 429 is no answer
    about the step-up, so the client waits its Retry-After and polls the same one again."""
    registry = StepUpRegistry(pending_polls=0)
    registry.refuse_next_poll = True
    client = agent_client(registry, tmp_path)
    started = time.monotonic()
    assert await client.request_step_up("shop", **PAYMENT) == "ref-stp_1"
    assert registry.created == ["stp_1"]
    assert registry.polled == ["stp_1"] * 2
    assert time.monotonic() - started >= 1  # its Retry-After


@pytest.mark.asyncio
async def test_a_step_up_wait_polls_on_through_a_registry_outage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll answered 503 (a dependency of the registry down) or another 5xx ended the
    wait with that error while the step-up was still pending, though a dropped connection
    or a 429 was polled again. Every answer wait_for_approval takes for "no answer yet" is
    now polled through; a refusal still ends the wait at once."""
    monkeypatch.setattr("agentauth.sdk._client._STEP_UP_RETRY_PAUSE", 0.01)
    registry = StepUpRegistry(pending_polls=0)
    outages = [
        (503, {"error": "temporarily_unavailable"}),
        (502, {"error": {"code": 502, "message": "bad gateway"}}),  # a gateway's own form
        (500, {"error": "server_error"}),
    ]

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/v1/step-ups/") and outages:
            registry.polled.append("outage")
            status, body = outages.pop(0)
            return httpx.Response(status, json=body)
        return await registry(request)

    client = mocked(handler, tmp_path, timeout=10.0)
    assert await client.request_step_up("shop", **PAYMENT) == "ref-stp_1"
    assert registry.created == ["stp_1"]
    assert registry.polled == ["outage"] * 3 + ["stp_1"]
    outages.append((404, {"error": "not_found"}))
    with pytest.raises(NotFound):
        await client.request_step_up("shop", **PAYMENT)
    assert registry.created == ["stp_1", "stp_2"] and registry.polled[-1] == "outage"


@pytest.mark.asyncio
async def test_asking_again_after_a_timeout_waits_on_the_same_step_up(tmp_path: Path) -> None:
    registry = StepUpRegistry(pending_polls=10**6)  # the human is away
    client = agent_client(registry, tmp_path)
    for _ in range(2):
        with pytest.raises(TimeoutError, match="stp_1"):
            await client.request_step_up("shop", **PAYMENT, timeout=0.05)
    registry.pending_polls = 0  # the human approves the one card they were shown
    assert await client.request_step_up("shop", **PAYMENT) == "ref-stp_1"
    assert registry.created == ["stp_1"]
    # Decided, it is forgotten: the next payment of the same kind is a new step-up.
    assert await client.request_step_up("shop", **PAYMENT) == "ref-stp_2"
    assert registry.created == ["stp_1", "stp_2"]


@pytest.mark.asyncio
async def test_amounts_finer_than_the_currency_are_refused_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    registry = StepUpRegistry(pending_polls=0)
    sent: list[httpx.Request] = []

    async def transport(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return await registry(request)

    client = mocked(transport, tmp_path, timeout=10.0)
    for amount, currency in (("120.005", "USD"), ("1.5", "JPY"), ("0.0005", "BHD")):
        with pytest.raises(InvalidRequest, match=f"{currency} amounts have") as caught:
            await client.request_step_up(
                "shop", resource="payments", amount=amount, currency=currency
            )
        assert caught.value.reason == "amount_precision"
    sub_cent = Capability.transact("payments", max_amount="0.001", currency="USD")
    with pytest.raises(InvalidRequest, match=r"capabilities\[0\].max_amount: USD"):
        await client.request_grant("shop", [sub_cent])
    limits: list[tuple[Envelope | dict[str, Any], str]] = [
        (
            Envelope.model_validate({"step_up_threshold": {"amount": "9.999", "currency": "USD"}}),
            "envelope.step_up_threshold.amount: USD amounts have at most 2 decimal places",
        ),
        (
            {"spend_limits": [{"amount": "10.5", "currency": "JPY", "period": "day"}]},
            "envelope.spend_limits[0].amount: JPY amounts have no decimal places",
        ),
    ]
    for envelope, says in limits:
        with pytest.raises(InvalidRequest) as caught:
            await client.request_grant("shop", [Capability.read("calendar")], envelope=envelope)
        assert caught.value.description.startswith(says)
    assert sent == []
    # Whole minor units (trailing zeros too) and units outside ISO 4217 go out as before.
    assert await client.request_step_up("shop", **{**PAYMENT, "amount": "120.50"}) == "ref-stp_1"
    assert await client.request_step_up(
        "shop", resource="payments", amount="0.000001", currency="TOK"
    ) == ("ref-stp_2")


@pytest.mark.asyncio
async def test_the_last_half_second_of_a_step_up_wait_is_one_poll_not_a_burst(
    tmp_path: Path,
) -> None:
    """The registry holds a poll for ``wait`` seconds, a float. Rounded to whole seconds,
    a wait under half a second was wait=0, answered at once: the SDK polled again and
    again, a signed proof each, until its deadline."""
    polls: list[float] = []

    async def registry(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/grants":
            grant = {"id": "grt_1", "provider_id": "shop", "revoked_at": None}
            return httpx.Response(200, json=[{**grant, "document": {"audience": "a"}}])
        if request.method == "POST":
            return httpx.Response(200, json={"id": "stp_1", "status": "pending"})
        wait = float(request.url.params["wait"])
        polls.append(wait)
        await asyncio.sleep(wait + 0.002)  # the hold, and a fast network's round trip
        return httpx.Response(200, json={"status": "pending"})

    client = mocked(registry, tmp_path)
    with pytest.raises(TimeoutError, match="stp_1"):
        await client.request_step_up("shop", **PAYMENT, timeout=0.3)
    assert len(polls) == 1 and 0.2 < polls[0] <= 0.3, polls


# --- tokens: which grant to use, and when to ask for another ---------------------------------


class TokenRegistry:
    """The registry's grant list and token endpoint, on the test's clock: it refuses an
    expired grant (grant_expired) and caps a token's life at its grant's end, as the real
    one does."""

    def __init__(
        self, grants: list[dict[str, Any]], *, now: list[float], lifetime: int = 300
    ) -> None:
        self.grants = grants
        self.now = now
        self.lifetime = lifetime
        self.issued: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/grants":
            return httpx.Response(200, json=self.grants)
        grant_id = json.loads(request.content)["grant_id"]
        grant = next(g for g in self.grants if g["id"] == grant_id)
        now = int(self.now[0])
        expires_at = grant["document"]["envelope"].get("expires_at")
        if grant["provider_suspended"]:
            body = {"error": "forbidden", "reason": "provider_suspended"}
            return httpx.Response(403, json=body)
        if expires_at is not None and now >= expires_at:
            return httpx.Response(403, json={"error": "forbidden", "reason": "grant_expired"})
        lifetime = self.lifetime if expires_at is None else min(self.lifetime, expires_at - now)
        self.issued.append(grant_id)
        token = f"tok-{len(self.issued)}-{grant_id}"
        return httpx.Response(200, json={"access_token": token, "expires_in": lifetime})


def listed_grant(
    grant_id: str, *, expires_at: int | None = None, suspended: bool = False
) -> dict[str, Any]:
    envelope = {} if expires_at is None else {"expires_at": expires_at}
    return {
        "id": grant_id,
        "provider_id": "shop",
        "revoked_at": None,
        "provider_suspended": suspended,
        "document": {"audience": "https://shop.example", "envelope": envelope},
    }


def token_client(registry: TokenRegistry, home: Path) -> AgentAuthClient:
    return mocked(registry, home, clock=lambda: registry.now[0])  # type: ignore[no-any-return]


@pytest.mark.asyncio
async def test_a_newer_grant_the_registry_would_refuse_does_not_hide_an_older_good_one(
    tmp_path: Path,
) -> None:
    """The grant list keeps expired grants and those of a suspended provider; the SDK took
    the newest all the same, and the registry refused it: the agent was locked out while
    an older grant for the provider still stood."""
    now = [1_000_000.0]
    registry = TokenRegistry(
        [
            listed_grant("grt_month", expires_at=1_000_000 + 30 * 86400),
            listed_grant("grt_hour", expires_at=1_000_000 - 10),  # approved later, now over
            listed_grant("grt_suspended", suspended=True),
        ],
        now=now,
    )
    client = token_client(registry, tmp_path)
    assert await client.get_token("shop") == "tok-1-grt_month"
    # With no grant left that the registry would honour, its own refusal says why.
    registry.grants = registry.grants[1:]
    client._tokens.clear()
    with pytest.raises(Forbidden) as refused:
        await client.get_token("shop")
    assert refused.value.reason == "provider_suspended"


@pytest.mark.asyncio
async def test_a_token_that_ends_with_its_grant_serves_until_it_expires(tmp_path: Path) -> None:
    """The registry ends a token at its grant's expires_at. Within the refresh margin of
    the grant's end the cached token never counted as fresh, so every request asked for
    another (a token row and an audit event each), though none could outlive it."""
    now = [1_000_000.0]
    registry = TokenRegistry([listed_grant("grt_1", expires_at=1_000_020)], now=now)
    client = token_client(registry, tmp_path)
    for later in (0.0, 5.0, 19.5):
        now[0] = 1_000_000 + later
        assert await client.get_token("shop") == "tok-1-grt_1"
    assert registry.issued == ["grt_1"]
    now[0] = 1_000_020  # the grant is over: no token, and the registry says why
    with pytest.raises(Forbidden) as refused:
        await client.get_token("shop")
    assert refused.value.reason == "grant_expired"
    # A grant that outlives its tokens still has them refreshed within the margin.
    registry.grants = [listed_grant("grt_2", expires_at=1_000_020 + 3600)]
    first = await client.get_token("shop")
    now[0] += 300 - 29
    assert await client.get_token("shop") != first
    assert registry.issued == ["grt_1", "grt_2", "grt_2"]


@pytest.mark.asyncio
async def test_a_token_the_provider_refuses_as_revoked_is_let_go(tmp_path: Path) -> None:
    """The SDK kept presenting a token its provider refused as revoked (the grant revoked,
    a new one approved) until the token expired, minutes of refusals. It now takes a new
    token on the next request; a refusal a new token does not cure (a misconfigured
    provider) lets one go at most once every 30 s, not at every request."""
    now = [1_000_000.0]
    registry = TokenRegistry([listed_grant("grt_1")], now=now)
    client = token_client(registry, tmp_path)
    assert await client.get_token("shop") == "tok-1-grt_1"
    registry.grants = [{**listed_grant("grt_1"), "revoked_at": "2026-01-01"}, listed_grant("grt_2")]
    dead = {"tok-1-grt_1"}
    presented: list[str] = []

    def provider(request: httpx.Request) -> httpx.Response:
        token = request.headers["authorization"].removeprefix("DPoP ")
        presented.append(token)
        if token in dead:  # the provider helpers' refusal: 403, the reason in the body only
            body = b'{"error": "access_denied", "reason": "revoked"}'
            return httpx.Response(
                403, headers={"Content-Type": "application/json"}, stream=_UnreadBody(body)
            )
        return httpx.Response(200, json={"ok": True})

    async with httpx.AsyncClient(
        transport=httpx.MockTransport(provider), auth=client.auth("shop")
    ) as http:
        assert (await http.get("https://shop.example/orders")).status_code == 403
        assert (await http.get("https://shop.example/orders")).status_code == 200
        assert presented == ["tok-1-grt_1", "tok-2-grt_2"]

        dead.add("tok-2-grt_2")  # from now on every token is refused
        for _ in range(5):  # within 30 s of letting the last one go: kept
            await http.get("https://shop.example/orders")
        assert registry.issued == ["grt_1", "grt_2"]
        now[0] += 30
        for _ in range(5):
            await http.get("https://shop.example/orders")
        assert registry.issued == ["grt_1", "grt_2", "grt_2"]  # one more, not five


@pytest.mark.asyncio
@pytest.mark.parametrize("reason", ["revoked", "insufficient_capability"])
async def test_a_token_refused_through_require_is_let_go_too(tmp_path: Path, reason: str) -> None:
    """``require`` refuses through FastAPI's HTTPException, whose answer nests the body in
    ``detail``: the SDK read the reason at the top level only, so an agent of a FastAPI
    provider kept presenting a revoked (or too narrow) token until it expired."""
    from fastapi import Depends, FastAPI

    now = [1_000_000.0]
    registry = TokenRegistry([listed_grant("grt_1")], now=now)
    client = token_client(registry, tmp_path)
    presented: list[str] = []

    class ByToken:
        async def verify_request(self, **kw: Any) -> Verification:
            token = kw["headers"]["authorization"].removeprefix("DPoP ")
            presented.append(token)
            return Verification(token == "tok-2-grt_2", "ok" if token == "tok-2-grt_2" else reason)

    app = FastAPI()
    read = Action(kind="read", resource="orders")

    by_token = ByToken()  # not a VerifierClient: require asks its callable for it

    @app.get("/orders", dependencies=[Depends(require(read, verifier=lambda: by_token))])
    async def orders() -> str:
        return "orders"

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), auth=client.auth("shop")
    ) as http:
        refused = await http.get("https://shop.example/orders")
        assert refused.status_code == 403
        assert refused.json()["detail"]["reason"] == reason  # FastAPI's form
        registry.grants = [{**listed_grant("grt_1"), "revoked_at": "2026-01-01"}]
        registry.grants.append(listed_grant("grt_2"))
        assert (await http.get("https://shop.example/orders")).status_code == 200
    assert presented == ["tok-1-grt_1", "tok-2-grt_2"]
    await client.aclose()


# Every reason a verifier (or the offline check) denies with, as the provider helpers
# answer it, by whether a new token could pass where this one was refused.
CURED_BY_A_NEW_TOKEN = [
    "invalid_token:expired",  # the token's own lifetime
    "invalid_token:unknown_kid",  # signed by a key the registry retired
    "invalid_token:bad_signature",
    "invalid_token:malformed_claims",  # its grant names what parses no more
    "revoked",  # the grant, the agent or the token revoked: a new grant may stand
    "grant_inactive",
    "expired",  # the grant's envelope ran out: a newer grant may not have
    "insufficient_capability",  # the newest grant may cover more (insufficient_scope)
    "invalid_dpop_proof:jkt_mismatch",  # the agent's key replaced: bound to the old one
    "invalid_dpop_proof:ath_mismatch",
]
STANDING_WITH_ANY_TOKEN = [
    "rate_limited",
    "cumulative_limit_exceeded",
    "transaction_limit_exceeded",
    "outside_time_window",
    "step_up_required",
    "step_up_invalid",
    "amount_precision",
    "currency_mismatch",
    "replay_detected",  # a new proof is the cure, not a new token
    "shard_restarted",
    "invalid_dpop_proof:iat_too_old",
    "invalid_dpop_proof:htu_mismatch",
    "invalid_dpop_proof:bad_signature",
    "invalid_dpop_proof:multiple_proofs",
    "invalid_request:missing_token",
    "invalid_request:rejected_by_verifier",
    "missing_dpop_credentials",
    "malformed_check",
    "verifier_unavailable",  # a dependency down: 503, whatever the token
    "revocation_state_stale",
    "dependency_unavailable",
    "state_unavailable",
    "state_timeout",
    "audit_unavailable",
]


@pytest.mark.parametrize(
    ("reason", "let_go"),
    [(r, True) for r in CURED_BY_A_NEW_TOKEN] + [(r, False) for r in STANDING_WITH_ANY_TOKEN],
)
def test_a_token_is_let_go_for_exactly_the_refusals_a_new_token_may_cure(
    reason: str, let_go: bool
) -> None:
    """Only a 401 invalid_token, revoked and grant_inactive let a token go: a token whose
    grant's envelope had expired, one bound to a replaced key, and one covering less than
    the human has granted since were presented again until they expired."""
    status, headers, body = denial(Verification(False, reason))
    refused: list[str] = []
    auth = DPoPAuth(key=PrivateKey.generate(), token="tok.en.x", on_refused=refused.append)
    request = httpx.Request("GET", "https://shop.example/orders")
    flow = auth.sync_auth_flow(request)
    next(flow)
    answer = httpx.Response(
        status, headers=headers, stream=_UnreadBody(json.dumps(body).encode()), request=request
    )
    with pytest.raises(StopIteration):
        flow.send(answer)
    assert refused == (["tok.en.x"] if let_go else [])


@pytest.mark.asyncio
async def test_a_grant_approved_for_more_is_used_at_the_next_request(tmp_path: Path) -> None:
    """An agent refused insufficient_capability asks for more and the human approves a
    second grant: the token of the first, still valid, is not presented again."""
    now = [1_000_000.0]
    registry = TokenRegistry([listed_grant("grt_1")], now=now)
    client = token_client(registry, tmp_path)
    presented: list[str] = []

    async def provider(request: httpx.Request) -> httpx.Response:
        token = request.headers["authorization"].removeprefix("DPoP ")
        presented.append(token)
        if token == "tok-1-grt_1":
            status, headers, body = denial(Verification(False, "insufficient_capability"))
            return httpx.Response(status, headers=headers, json=body)
        return httpx.Response(200, json={"ok": True})

    async with httpx.AsyncClient(
        transport=httpx.MockTransport(provider), auth=client.auth("shop")
    ) as http:
        assert (await http.post("https://shop.example/refunds")).status_code == 403
        registry.grants = [listed_grant("grt_1"), listed_grant("grt_2")]  # approved meanwhile
        assert (await http.post("https://shop.example/refunds")).status_code == 200
    assert presented == ["tok-1-grt_1", "tok-2-grt_2"]


@pytest.mark.asyncio
async def test_a_step_up_is_presented_with_a_token_of_the_grant_it_approves(
    tmp_path: Path,
) -> None:
    """A step-up approves one payment under one grant, and the verifier takes its reference
    only with a token of that grant. It was asked under the newest grant for the provider,
    while the payment went with the token cached from an older one: refused
    step_up_invalid, the human's approval unusable until that token expired."""
    now = [1_000_000.0]
    registry = TokenRegistry([listed_grant("grt_1")], now=now)
    asked: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/v1/step-ups":
            asked.append(json.loads(request.content)["grant_id"])
            return httpx.Response(200, json={"id": "stp_1", "status": "pending"})
        if request.url.path == "/v1/step-ups/stp_1":
            return httpx.Response(200, json={"status": "approved", "approval_ref": "ref-1"})
        return await registry(request)

    client = mocked(handler, tmp_path, clock=lambda: now[0])
    assert await client.get_token("shop") == "tok-1-grt_1"
    registry.grants = [listed_grant("grt_1"), listed_grant("grt_2")]  # approved meanwhile
    ref = await client.request_step_up("shop", **PAYMENT)
    headers = await client.authenticate_headers("shop", "POST", "/payments", step_up_ref=ref)
    assert asked == ["grt_2"]
    assert headers["Authorization"] == "DPoP tok-2-grt_2"
    # A step-up under the grant of the token held leaves that token in use.
    again = await client.request_step_up("shop", **{**PAYMENT, "amount": "130"})
    headers = await client.authenticate_headers("shop", "POST", "/payments", step_up_ref=again)
    assert headers["Authorization"] == "DPoP tok-2-grt_2"
    await client.aclose()


def test_the_sync_client_lets_a_refused_token_go_too(tmp_path: Path) -> None:
    now = [1_000_000.0]
    registry = TokenRegistry([listed_grant("grt_1")], now=now)
    sync = mocked(registry, tmp_path, client=AgentAuthClientSync, clock=lambda: now[0])
    presented: list[str] = []

    def provider(request: httpx.Request) -> httpx.Response:
        token = request.headers["authorization"].removeprefix("DPoP ")
        presented.append(token)
        if token == "tok-1-grt_1":
            body = b'{"error": "access_denied", "reason": "grant_inactive"}'
            return httpx.Response(
                403, headers={"Content-Type": "application/json"}, stream=_UnreadBody(body)
            )
        return httpx.Response(200, json={"ok": True})

    try:
        with httpx.Client(transport=httpx.MockTransport(provider), auth=sync.auth("shop")) as http:
            assert http.get("https://shop.example/orders").status_code == 403
            registry.grants = [listed_grant("grt_2")]  # the grant approved again
            assert http.get("https://shop.example/orders").status_code == 200
    finally:
        sync.close()
    assert presented == ["tok-1-grt_1", "tok-2-grt_2"]


def test_a_sync_client_without_its_client_says_so_instead_of_recursing(tmp_path: Path) -> None:
    """Every attribute the sync client lacks is looked up on its ``_client``: with none
    (an ``__init__`` that raised, ``copy.copy`` probing ``__setstate__`` on the blank
    copy), looking that up came back to ``__getattr__``, a RecursionError."""
    bare = AgentAuthClientSync.__new__(AgentAuthClientSync)
    with pytest.raises(AttributeError, match="has no client"):
        bare.get_token  # noqa: B018 (the lookup is the test)
    sync = mocked(lambda r: httpx.Response(404), tmp_path, client=AgentAuthClientSync)
    try:
        twin = copy.copy(sync)
        assert twin.agent_id == "agt_1"
    finally:
        sync.close()


def test_a_sync_client_closes_once_and_then_does_nothing(tmp_path: Path) -> None:
    """close() a second time (a ``with`` block around a client closed inside it) ran the
    client's aclose on the closed loop: RuntimeError('Event loop is closed')."""
    sync = mocked(lambda r: httpx.Response(404), tmp_path, client=AgentAuthClientSync)
    with sync:
        sync.close()
    assert sync._loop.is_closed()
    sync.close()


def test_a_sync_client_that_fails_to_start_closes_its_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop made for the client was left open when making the client raised: nobody
    holds the half-made object to close() it."""
    loops: list[asyncio.AbstractEventLoop] = []

    def new_event_loop() -> asyncio.AbstractEventLoop:
        loops.append(asyncio.SelectorEventLoop())
        return loops[-1]

    monkeypatch.setattr(asyncio, "new_event_loop", new_event_loop)
    with pytest.raises(TypeError, match="no_such_option"):
        AgentAuthClientSync("https://registry.example", no_such_option=1)
    assert len(loops) == 1 and loops[0].is_closed()


def test_a_cached_tokens_repr_hides_the_token() -> None:
    token = _Token("eyJhbGciOiJFUzI1NiJ9.SECRET.sig", 1e10, "grt_1")
    assert "SECRET" not in repr(token) and "grt_1" in repr(token)


# --- the provider side -----------------------------------------------------------------------


class Refusing:
    """A verifier that refuses everything and counts what it was asked."""

    def __init__(self) -> None:
        self.asked = 0

    async def verify_request(self, **_: Any) -> Verification:
        self.asked += 1
        return Verification(False, "insufficient_capability")


@pytest.mark.asyncio
async def test_middleware_refuses_websockets_on_protected_paths() -> None:
    reached: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await receive()
        await send({"type": "websocket.accept"})

    def action_of(method: str, path: str) -> Action | None:
        return Action(kind="write", resource="orders/1") if path.startswith("/orders") else None

    verifier = Refusing()
    middleware = AgentAuthMiddleware(
        app, verifier=cast(VerifierClient, verifier), action_of=action_of
    )

    async def handshake(path: str) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "websocket.connect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "websocket", "path": path, "headers": [], "query_string": b""}
        await middleware(scope, receive, send)
        return sent

    # Closed before it is accepted: the server answers the handshake with 403.
    assert await handshake("/orders/1") == [{"type": "websocket.close", "code": 1008}]
    assert reached == [] and verifier.asked == 0
    # A path the provider left public is the app's to handle.
    assert await handshake("/live") == [{"type": "websocket.accept"}]
    assert reached == ["/live"]
    with pytest.raises(RuntimeError, match="cannot protect"):
        await middleware({"type": "webtransport", "path": "/orders/1"}, None, None)


ISSUER = "https://registry.example"
SHOP_URL = "https://shop.example/payments/1"


def offline_request(
    envelope: Envelope, now: int | None = None
) -> tuple[OfflineVerifier, dict[str, str]]:
    """An offline verifier, and the headers of an agent's request under a grant with
    ``envelope`` (a transact capability on payments/*, no amount cap of its own), signed
    at ``now`` (by default the present)."""
    registry_key, agent_key = PrivateKey.generate(), PrivateKey.generate()
    now = int(time.time()) if now is None else now
    grant = Grant(
        grant_id="grt_1",
        agent_id="agt_1",
        principal_id="hum_1",
        provider_id="shop",
        audience="https://shop.example",
        capabilities=(Capability.transact("payments/*"),),
        envelope=envelope,
        created_at=now,
    )
    token = mint_access_token(
        signer=registry_key,
        issuer=ISSUER,
        grant=grant,
        jkt=agent_key.thumbprint,
        receipt_hash="A" * 43,
        now=now,
        lifetime=300,
    )
    proof = create_dpop_proof(agent_key, htm="POST", htu=SHOP_URL, now=now, access_token=token)
    verifier = OfflineVerifier(
        jwks={"keys": [registry_key.public_jwk()]}, issuer=ISSUER, audience="https://shop.example"
    )
    return verifier, {"authorization": f"DPoP {token}", "dpop": proof}


def pay_usd(amount: str) -> Action:
    return Action(kind="transact", resource="payments/1", amount=amount, currency="USD")


@pytest.mark.asyncio
async def test_offline_mode_applies_the_envelopes_stateless_rules() -> None:
    usd = {"currency": "USD"}
    limits = {
        "max_per_transaction": {"amount": "100", **usd},
        "step_up_threshold": {"amount": "30", **usd},
        "spend_limits": [{"amount": "50", "period": "day", **usd}],
    }
    verifier, headers = offline_request(Envelope.model_validate(limits))

    async def reason(action: Action, step_up_ref: str | None = None) -> str:
        verification = await verifier.verify_request(
            method="POST", url=SHOP_URL, headers=headers, action=action, step_up_ref=step_up_ref
        )
        assert verification.allowed == (verification.reason == "ok_offline")
        return verification.reason

    assert await reason(pay_usd("20")) == "ok_offline"
    assert await reason(pay_usd("5000")) == "transaction_limit_exceeded"
    assert await reason(pay_usd("40")) == "step_up_required"
    # A one-time approval cannot be checked (or used up) offline: above the threshold is no.
    assert await reason(pay_usd("40"), step_up_ref="stp-ref") == "step_up_required"
    assert await reason(pay_usd("20").model_copy(update={"currency": "EUR"})) == (
        "currency_mismatch"
    )
    # Half a cent can be neither paid nor counted: refused before anything else.
    assert await reason(pay_usd("0.005")) == "amount_precision"
    assert await reason(pay_usd("5000.005")) == "amount_precision"

    expired, headers_expired = offline_request(
        Envelope.model_validate({**limits, "expires_at": int(time.time()) - 10})
    )
    refused = await expired.verify_request(
        method="POST", url=SHOP_URL, headers=headers_expired, action=pay_usd("20")
    )
    assert (refused.allowed, refused.reason) == (False, "expired")

    # A window on a day that is not today (in UTC), so never now.
    not_today = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")[
        (datetime.now(UTC).weekday() + 3) % 7
    ]
    window = [{"days": [not_today], "start": "00:00", "end": "24:00"}]
    closed, headers_closed = offline_request(Envelope.model_validate({"time_windows": window}))
    refused = await closed.verify_request(
        method="POST", url=SHOP_URL, headers=headers_closed, action=pay_usd("20")
    )
    assert (refused.allowed, refused.reason) == (False, "outside_time_window")


@pytest.mark.asyncio
async def test_offline_mode_draws_a_time_windows_edges_as_the_verifier_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The instant just before a window opens is outside it, offline as online (the float
    below 09:00 used to be rounded up to 09:00), and the instant just before it closes is
    inside."""
    from agentauth.sdk import _provider

    opens = int(datetime(2024, 6, 3, 9, 0, tzinfo=UTC).timestamp())  # a Monday
    closes = opens + 8 * 3600
    window = [{"days": ["mon"], "start": "09:00", "end": "17:00"}]
    envelope = Envelope.model_validate({"time_windows": window})
    for now, reason in [
        (math.nextafter(opens, 0), "outside_time_window"),
        (opens, "ok_offline"),
        (math.nextafter(closes, 0), "ok_offline"),
        (closes, "outside_time_window"),
    ]:
        verifier, headers = offline_request(envelope, now=math.floor(now) - 5)
        monkeypatch.setattr(_provider, "time", SimpleNamespace(time=lambda now=now: now))
        verification = await verifier.verify_request(
            method="POST", url=SHOP_URL, headers=headers, action=pay_usd("20")
        )
        assert verification.reason == reason, now


@pytest.mark.asyncio
async def test_the_middleware_asks_about_the_url_as_the_agent_sent_it() -> None:
    """The agent's proof names the percent-encoded path; ASGI's ``path`` is decoded. The
    verifier must be asked about the encoded one, or a file called "my notes" is refused
    and ``a%2Fb`` passes for ``a/b``."""
    asked: list[str] = []

    class Recorder:
        async def verify_request(self, *, url: str, **_: Any) -> Verification:
            asked.append(url)
            return Verification(True, "ok")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = AgentAuthMiddleware(
        app,
        verifier=cast(Any, Recorder()),
        action_of=lambda method, path: Action(kind="read", resource="files"),
        public_url="https://api.example",
    )
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for path in ("/files/my%20notes.txt", "/files/a%2Fb", "/files/plain"):
            assert (await client.get(path)).status_code == 204
    assert asked == [
        "https://api.example/files/my%20notes.txt",
        "https://api.example/files/a%2Fb",
        "https://api.example/files/plain",
    ]


@pytest.mark.asyncio
async def test_a_path_no_action_can_name_is_a_400_not_a_provider_error() -> None:
    """``action_of`` building ``Action(resource=path)`` from ``/calendar/../payroll`` raises
    (the model refuses dot segments): the middleware answers 400, the app never runs."""
    ran: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        ran.append(scope["path"])

    def action_of(method: str, path: str) -> Action:
        return Action(kind="read", resource=path.strip("/"))

    verifier = OfflineVerifier(jwks={"keys": []}, issuer="https://registry.example", audience="x")
    middleware = AgentAuthMiddleware(app, verifier=verifier, action_of=action_of)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "GET", "path": "/calendar/../payroll", "headers": []}
    await middleware(scope, receive, send)
    assert sent[0]["status"] == 400 and ran == []
    assert json.loads(sent[1]["body"]) == {"error": "invalid_request", "reason": "bad_resource"}


# --- one DPoP and one Authorization line, or no decision (RFC 9449 §4.3, check 1) ---------


def protected_apps(verifier: Any) -> dict[str, Any]:
    """The same GET /payments/1 behind the middleware and behind require()."""
    from fastapi import Depends, FastAPI

    from agentauth.sdk import require

    action = Action(kind="transact", resource="payments/1", amount="20", currency="USD")

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"paid"})

    middleware = AgentAuthMiddleware(
        inner,
        verifier=verifier,
        action_of=lambda method, path: action,
        public_url="https://shop.example",
    )
    api = FastAPI()
    allowed = require(action, verifier=verifier, public_url="https://shop.example")

    @api.post("/payments/1", dependencies=[Depends(allowed)])
    async def pay() -> str:
        return "paid"

    return {"middleware": middleware, "require": api}


def duplicate_cases(token: str, proof: str) -> list[tuple[list[tuple[str, str]], int, str]]:
    """Header lines, and the status and reason each must get."""
    other = proof[:-8] + "AAAAAAAA"
    auth = ("Authorization", f"DPoP {token}")
    return [
        ([auth, ("DPoP", proof)], 200, "ok"),
        ([auth, ("DPoP", "junk.proof.value"), ("DPoP", proof)], 401, "multiple_proofs"),
        ([auth, ("DPoP", proof), ("DPoP", other)], 401, "multiple_proofs"),
        ([auth, ("DPoP", f"{other}, {proof}")], 401, "multiple_proofs"),
        ([("Authorization", "DPoP a.b.c"), auth, ("DPoP", proof)], 400, "multiple_authorizations"),
        ([auth], 401, "missing_proof"),
        ([("DPoP", proof)], 400, "missing_token"),
        ([("Authorization", f"Bearer {token}"), ("DPoP", proof)], 400, "missing_token"),
        (
            [auth, ("DPoP", proof), ("AgentAuth-Step-Up", "stp_a"), ("AgentAuth-Step-Up", "stp_b")],
            400,
            "multiple_step_up_refs",
        ),
    ]


@pytest.mark.asyncio
async def test_two_dpop_or_authorization_lines_are_refused_by_every_provider_helper() -> None:
    """A framework's dict of headers keeps one line a name, so the helpers used whichever
    line it kept: a second DPoP header was not refused (RFC 9449 §4.3), nor a second
    Authorization. The header lines are read as sent now."""
    verifier, headers = offline_request(Envelope())
    for label, app in protected_apps(verifier).items():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="https://shop.example") as c:
            token = headers["authorization"].removeprefix("DPoP ")
            for lines, status, reason in duplicate_cases(token, headers["dpop"]):
                r = await c.post("/payments/1", headers=httpx.Headers(lines))
                assert r.status_code == status, (label, lines, r.text)
                assert status == 200 or reason in r.text, (label, r.text)


@pytest.mark.asyncio
async def test_header_lines_given_as_a_one_pass_iterable_are_read_whole() -> None:
    """``verify_request`` takes the header lines as any iterable of pairs (a generator over
    a WSGI environ, say). The DPoP lines were looked for first, using the iterable up, so
    the Authorization line was never seen and every such request was refused 400
    ``missing_token``."""
    verifier, headers = offline_request(Envelope())
    result = await verifier.verify_request(
        method="POST",
        url=SHOP_URL,
        headers=((name, value) for name, value in headers.items()),
        action=pay_usd("5"),
    )
    assert (result.allowed, result.reason) == (True, "ok_offline")
    allowing = httpx.MockTransport(
        lambda r: httpx.Response(200, json={"decision": "allow", "reason": "ok"})
    )
    client = VerifierClient(
        "http://v", provider_id="p", secret="s", http=httpx.AsyncClient(transport=allowing)
    )
    online = await client.verify_request(
        method="POST",
        url=SHOP_URL,
        headers=iter([(b"authorization", headers["authorization"].encode()), (b"dpop", b"p")]),
        action=pay_usd("5"),
    )
    assert online.allowed
    await client.aclose()


@pytest.mark.asyncio
async def test_the_verifier_is_not_asked_about_a_request_with_two_proofs() -> None:
    asked: list[str] = []

    def verifier(request: httpx.Request) -> httpx.Response:
        asked.append(json.loads(request.content)["proof"])
        return httpx.Response(200, json={"decision": "allow", "reason": "ok"})

    client = VerifierClient(
        "https://verifier.example",
        provider_id="p",
        secret="s",
        http=httpx.AsyncClient(transport=httpx.MockTransport(verifier)),
    )
    action = Action(kind="read", resource="x")
    two = [("Authorization", "DPoP t.o.k"), ("DPoP", "first.proof.A"), ("DPoP", "second.proof.B")]
    # However the lines come: ASGI's bytes pairs, str pairs, httpx's or Starlette's Headers.
    from starlette.datastructures import Headers

    raw = [(k.lower().encode(), v.encode()) for k, v in two]
    for headers in (raw, two, httpx.Headers(two), Headers(raw=raw)):
        result = await client.verify_request(
            method="GET", url="https://a/x", headers=cast(Any, headers), action=action
        )
        assert (result.allowed, result.reason) == (False, "invalid_dpop_proof:multiple_proofs")
    assert asked == []
    one = {"authorization": "DPoP t.o.k", "dpop": "first.proof.A"}
    result = await client.verify_request(
        method="GET", url="https://a/x", headers=one, action=action
    )
    assert result.allowed and asked == ["first.proof.A"]


@pytest.mark.asyncio
async def test_the_agent_client_surfaces_the_token_endpoints_400_proof_errors(
    tmp_path: Path,
) -> None:
    """The token endpoint answers a bad proof 400 (RFC 9449 §5), no longer 401: the client
    reads the error code, not the status, and raises the same error as before. A replay
    comes as invalid_dpop_proof there now (RFC 6749 §5.2 has no replay_detected): its
    reason tells it apart, and it is still raised as ReplayDetected, as from a registry
    that sends replay_detected. A key of no agent is RFC 6749 §5.2's invalid_client there,
    raised as Unauthenticated, as the registry's other routes send it."""
    from agentauth.protocol import InvalidDPoPProof, ReplayDetected

    answers = [
        ("invalid_dpop_proof", "htu_mismatch", InvalidDPoPProof),
        ("invalid_dpop_proof", "iat_too_old", InvalidDPoPProof),
        ("invalid_dpop_proof", "jti_reused", ReplayDetected),
        ("invalid_dpop_proof", "too_old", ReplayDetected),
        ("invalid_dpop_proof", "replay_cache_reset", ReplayDetected),
        ("replay_detected", "jti_reused", ReplayDetected),
        ("invalid_client", "unknown_agent", Unauthenticated),
    ]
    for code, reason, raised in answers:

        def registry(request: httpx.Request, code: str = code, reason: str = reason) -> Any:
            if request.url.path == "/v1/grants":
                grant = {"id": "grt_1", "provider_id": "shop", "revoked_at": None}
                return httpx.Response(200, json=[{**grant, "document": {"audience": "a"}}])
            body = {"error": code, "error_description": "no", "reason": reason}
            return httpx.Response(400, json=body)

        client = mocked(registry, tmp_path)
        with pytest.raises(raised) as refused:
            await client.get_token("shop")
        assert type(refused.value) is raised and refused.value.reason == reason


# --- the provider's challenges (RFC 9449 §7.1) --------------------------------------------

ALGS = 'algs="ES256 Ed25519 EdDSA"'


@pytest.mark.parametrize(
    ("verification", "status", "challenge"),
    [
        # No credentials presented: a challenge without an error code (RFC 6750 §3.1).
        (Verification(False, "missing_dpop_credentials"), 401, f"DPoP {ALGS}"),
        # Proof failures are invalid_dpop_proof (RFC 9449 §12.2), a replay included.
        (
            Verification(False, "invalid_dpop_proof:htu_mismatch"),
            401,
            f'DPoP error="invalid_dpop_proof", {ALGS}',
        ),
        (Verification(False, "replay_detected"), 401, f'DPoP error="invalid_dpop_proof", {ALGS}'),
        (Verification(False, "invalid_token:expired"), 401, f'DPoP error="invalid_token", {ALGS}'),
        (
            Verification(False, "use_dpop_nonce:nonce_required", dpop_nonce="n-1"),
            401,
            f'DPoP error="use_dpop_nonce", {ALGS}',
        ),
        (
            Verification(False, "invalid_request:multiple_authorizations"),
            400,
            f'DPoP error="invalid_request", {ALGS}',
        ),
        # The token covers no such action: insufficient_scope (RFC 6750 §3.1, RFC 9449 §7.1).
        (
            Verification(False, "insufficient_capability"),
            403,
            f'DPoP error="insufficient_scope", {ALGS}',
        ),
        # Refusals of an action the token covers: another token would fare no better.
        # Allowed, not this often: 429 with the verifier's wait (RFC 6585 §4); below too.
        (Verification(False, "rate_limited"), 429, None),
        (Verification(False, "step_up_required"), 403, None),
        (Verification(False, "grant_inactive"), 403, None),
        # Nothing decided: the verifier or one of its dependencies failed (a deny, fail
        # closed), so the agent may try again rather than give up on a grant that allows it.
        (Verification(False, "verifier_unavailable"), 503, None),
        (Verification(False, "state_unavailable"), 503, None),
        (Verification(False, "state_timeout"), 503, None),
        (Verification(False, "audit_unavailable"), 503, None),
        (Verification(False, "dependency_unavailable"), 503, None),
        (Verification(False, "revocation_state_stale"), 503, None),
        # The shard could not take the replica's check (versions apart, or a bug): the
        # verifier's failure, not the grant's refusal it was answered as (a 403) until
        # 2026-12-01.
        (Verification(False, "malformed_check"), 503, None),
    ],
)
def test_each_refusal_gets_its_status_and_dpop_challenge(
    verification: Verification, status: int, challenge: str | None
) -> None:
    got_status, headers, body = denial(verification)
    assert (got_status, headers.get("WWW-Authenticate")) == (status, challenge)
    assert headers.get("Retry-After") == ("1" if status in (429, 503) else None)
    assert body["reason"] == verification.reason
    assert headers.get("DPoP-Nonce") == verification.dpop_nonce


def test_a_proof_refused_after_a_shard_restart_asks_for_a_new_proof() -> None:
    """A restarted shard refuses the proofs its predecessor may have accepted
    (``shard_restarted``): the proof failed, as a replay does, and a fresh one is the cure.
    It was answered 403 without a challenge, what a grant that refuses the action gets."""
    status, headers, body = denial(Verification(False, "shard_restarted"))
    assert (status, headers) == (
        401,
        {"WWW-Authenticate": f'DPoP error="invalid_dpop_proof", {ALGS}'},
    )
    assert body == {"error": "access_denied", "reason": "shard_restarted"}


@pytest.mark.asyncio
async def test_the_middlewares_challenges_name_the_failure_and_the_algorithms() -> None:
    verifier, headers = offline_request(Envelope())
    token = headers["authorization"].removeprefix("DPoP ")
    bad_signature = headers["dpop"][:-8] + (
        "AAAAAAAA" if headers["dpop"][-1] != "A" else "BBBBBBBB"
    )
    app = protected_apps(verifier)["middleware"]
    cases = [
        ({}, f"DPoP {ALGS}"),
        (
            {"Authorization": f"DPoP {token}", "DPoP": bad_signature},
            f'DPoP error="invalid_dpop_proof", {ALGS}',
        ),
        (
            {"Authorization": f"DPoP {token[:-8]}AAAAAAAA", "DPoP": headers["dpop"]},
            f'DPoP error="invalid_token", {ALGS}',
        ),
    ]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="https://shop.example") as c:
        for sent, challenge in cases:
            r = await c.post("/payments/1", headers=sent)
            assert r.status_code == 401, r.text
            assert r.headers["www-authenticate"] == challenge, r.text


@pytest.mark.asyncio
async def test_a_request_the_token_does_not_cover_is_refused_insufficient_scope() -> None:
    """RFC 6750 §3.1 (for DPoP, RFC 9449 §7.1): a token without the privilege a request
    needs is refused 403 with ``error="insufficient_scope"`` in the challenge, which tells
    the agent that a token with more capabilities, not a new proof, is what it lacks. Other
    403s (a limit reached, a step-up needed, a revoked grant) carry no challenge: the same
    token may do the action later. By the middleware and by require() alike."""
    for reason, challenge in (
        ("insufficient_capability", f'DPoP error="insufficient_scope", {ALGS}'),
        ("cumulative_limit_exceeded", None),
        ("revoked", None),
    ):
        answer = {"decision": "deny", "reason": reason, "audit_event": "verifier-0:1"}
        verifier = VerifierClient(
            "http://verifier",
            provider_id="shop",
            secret="s",
            http=httpx.AsyncClient(
                transport=httpx.MockTransport(lambda r, a=answer: httpx.Response(200, json=a))
            ),
        )
        for label, app in protected_apps(verifier).items():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="https://shop.example") as c:
                r = await c.post(
                    "/payments/1", headers={"Authorization": "DPoP t.o.k", "DPoP": "p.r.f"}
                )
            assert r.status_code == 403, (label, r.text)
            assert reason in r.text, (label, r.text)
            assert r.headers.get("www-authenticate") == challenge, (label, reason)


@pytest.mark.asyncio
async def test_middleware_without_public_url_survives_a_non_utf8_header() -> None:
    """Headers are bytes, latin-1 to ASGI: a request with a byte that is not UTF-8 in some
    header is refused like any other, not a 500 (the origin rebuilt from the request
    decoded every header as UTF-8, and raised out of the middleware)."""

    class Refusing:
        async def verify_request(self, **_: Any) -> Verification:
            return Verification(False, "insufficient_capability")

    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
        raise AssertionError("must not run")

    middleware = AgentAuthMiddleware(
        app,
        verifier=cast(VerifierClient, Refusing()),
        action_of=lambda method, path: Action(kind="read", resource="files"),
    )
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/files",
        "raw_path": b"/files",
        "root_path": "",
        "scheme": "https",
        "query_string": b"",
        "headers": [(b"host", b"api.example"), (b"x-note", b"caf\xe9")],
    }
    await middleware(scope, receive, send)
    assert sent[0]["status"] in (400, 401, 403)


@pytest.mark.asyncio
async def test_waiting_for_a_request_answered_cancelled_ends_at_once(tmp_path: Path) -> None:
    """A request answered ``cancelled`` ends the wait (it once ended only at its timeout,
    polling a request nobody could approve any more). The registry cancels a request only
    for an agent it disabled, whose poll it refuses ``agent_disabled`` first
    (tests/test_registry_dpop.py); this is the SDK's side should it ever answer so."""

    def registry(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"id": "grq_1", "status": "cancelled"})

    client = mocked(registry, tmp_path)
    with pytest.raises(Forbidden) as refused:
        await client.wait_for_approval("grq_1", timeout=0.5, interval=0.01)
    assert refused.value.reason == "cancelled"


@pytest.mark.asyncio
async def test_waiting_for_approval_polls_on_through_a_registry_outage(tmp_path: Path) -> None:
    """One poll the registry could not answer (a restart, a dropped connection, a 503)
    ended the wait with that error while the human might still be deciding, and the
    step-up wait already polled on. The wait goes on to its deadline now, and raises the
    failure only if the registry never answered; a refusal still ends it at once."""
    answers: list[str] = ["unreachable", "unavailable", "rate_limited", "pending", "approved"]
    polls: list[str] = []

    def registry(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/grants/grt_1":
            grant = {"id": "grt_1", "provider_id": "shop", "document": {"audience": "x"}}
            return httpx.Response(200, json=grant)
        answer = answers.pop(0) if answers else "unreachable"
        polls.append(answer)
        if answer == "disabled":
            return httpx.Response(403, json={"error": "forbidden", "reason": "agent_disabled"})
        if answer in ("pending", "approved"):
            return httpx.Response(200, json={"status": answer, "grant_id": "grt_1"})
        return _outage(answer, request)

    client = mocked(registry, tmp_path)
    approval = await client.wait_for_approval("grq_1", timeout=5.0, interval=0.01)
    assert approval.grant_id == "grt_1" and len(polls) == 5
    with pytest.raises(httpx.ConnectError):  # never answered: the failure, not a timeout
        await client.wait_for_approval("grq_1", timeout=0.2, interval=0.01)
    polls.clear()
    answers.append("disabled")
    with pytest.raises(Forbidden) as refused:
        await client.wait_for_approval("grq_1", timeout=5.0, interval=0.01)
    assert refused.value.reason == "agent_disabled" and polls == ["disabled"]
    await client.aclose()


# --- what a proof names, and where credentials go ---------------------------------------------


@pytest.mark.asyncio
async def test_a_proofs_htu_names_the_url_as_it_goes_on_the_wire(tmp_path: Path) -> None:
    """The htu was the URL's text as typed: a host outside ASCII, a space or an accented
    letter in the path went into the proof as such, while httpx sends the IDNA host and the
    percent-encoded path that the provider then compares the proof with (RFC 9449 §4.3), so
    such a request was always refused. Userinfo went into the proof too (a password, in a
    token-bound header), where the verifier refuses it."""
    registry = TokenRegistry([listed_grant("grt_1")], now=[1_000_000.0])
    client = token_client(registry, tmp_path)
    typed = "https://bücher.example/my notes/café?q=a b#top"
    headers = await client.authenticate_headers("shop", "GET", typed)
    on_the_wire = httpx.Request("GET", typed)
    assert on_the_wire.headers["host"] == "xn--bcher-kva.example"
    assert on_the_wire.url.raw_path.startswith(b"/my%20notes/caf%C3%A9?")
    assert claims(headers["DPoP"])["htu"] == "https://xn--bcher-kva.example/my%20notes/caf%C3%A9"
    relative = await client.authenticate_headers("shop", "POST", "/my notes")
    assert claims(relative["DPoP"])["htu"] == "https://shop.example/my%20notes"
    auth = DPoPAuth(key=PrivateKey.generate(), token="tok")
    signed = next(auth.auth_flow(httpx.Request("GET", "https://user:pw@api.example:443/x")))
    assert claims(signed.headers["DPoP"])["htu"] == "https://api.example/x"
    await client.aclose()


@pytest.mark.asyncio
async def test_a_relative_url_with_a_url_in_its_query_is_signed_for_the_provider(
    tmp_path: Path,
) -> None:
    """A URL was taken as absolute if "://" appeared anywhere in it: a relative one carrying
    a URL in its query (``/links?next=https://…``) was signed with htu ``:///links``, which
    names no request, so the provider refused every such call."""
    registry = TokenRegistry([listed_grant("grt_1")], now=[1_000_000.0])
    client = token_client(registry, tmp_path)
    headers = await client.authenticate_headers(
        "shop", "GET", "/links?next=https://other.example/a"
    )
    assert claims(headers["DPoP"])["htu"] == "https://shop.example/links"
    absolute = await client.authenticate_headers("shop", "GET", "https://shop.example/x?y=1")
    assert claims(absolute["DPoP"])["htu"] == "https://shop.example/x"
    await client.aclose()


@pytest.mark.asyncio
async def test_a_registry_call_never_follows_a_redirect_with_its_proof(tmp_path: Path) -> None:
    """With an ``http`` client that follows redirects, a registry call's DPoP proof went on
    to wherever a 307 pointed, another origin included; that proof authenticates the agent
    at the registry on its own (no token), for a body of the holder's choosing."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "registry.example":
            location = "https://elsewhere.example/v1/grant-requests"
            return httpx.Response(307, headers={"Location": location})
        return httpx.Response(200, json={"id": "gr_1", "provider_id": "shop", "status": "p"})

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler), follow_redirects=True)
    client = AgentAuthClient(
        "https://registry.example", key=PrivateKey.generate(), http=http, home=tmp_path
    )
    with pytest.raises(ServerError) as refused:
        await client.request_grant("shop", [Capability.read("calendar")])
    assert refused.value.status == 307
    assert [r.url.host for r in seen] == ["registry.example"]
    await http.aclose()


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [(12.2, "13"), (0.004, "1"), (30, "30"), (None, "1"), ("soon", "1"), (math.inf, "1")],
)
def test_a_rate_limited_request_is_told_when_to_come_back(retry_after: object, header: str) -> None:
    """A rate limit reached was a 403 without Retry-After: the agent read "not allowed"
    (which the grant does allow) and never learnt the wait the verifier had computed."""
    raw: dict[str, Any] = {"decision": "deny", "reason": "rate_limited"}
    if retry_after is not None:
        raw["retry_after"] = retry_after
    status, headers, body = denial(Verification(False, "rate_limited", raw=raw))
    assert (status, headers, body["reason"]) == (429, {"Retry-After": header}, "rate_limited")


@pytest.mark.asyncio
async def test_a_token_issued_for_no_longer_than_the_margin_is_still_reused(
    tmp_path: Path,
) -> None:
    """With tokens issued for 30 s (the registry's shortest token_lifetime) and the default
    30 s refresh margin, no cached token ever counted as fresh: every request took a new
    token, a token row and an audit event each. It now serves half its life."""
    now = [1_000_000.0]
    registry = TokenRegistry([listed_grant("grt_1")], now=now, lifetime=30)
    client = token_client(registry, tmp_path)
    for later in (0.0, 1.0, 14.0):
        now[0] = 1_000_000 + later
        assert await client.get_token("shop") == "tok-1-grt_1"
    now[0] = 1_000_015.5
    assert await client.get_token("shop") == "tok-2-grt_1"
    assert registry.issued == ["grt_1", "grt_1"]
    await client.aclose()


def _outage(kind: str, request: httpx.Request) -> httpx.Response:
    """The registry's answer when it cannot issue just now: unreachable, a dependency
    down, or too many tokens asked for."""
    if kind == "unreachable":
        raise httpx.ConnectError("connection refused", request=request)
    if kind == "unavailable":
        return httpx.Response(503, json={"error": "temporarily_unavailable"})
    return httpx.Response(429, headers={"Retry-After": "5"}, json={"error": "rate_limited"})


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["unreachable", "unavailable", "rate_limited"])
async def test_a_token_not_yet_expired_serves_while_the_registry_cannot_renew_it(
    tmp_path: Path, kind: str
) -> None:
    """A token is renewed within the refresh margin of its expiry, early so that a
    registry blip costs nothing; but a renewal the registry could not answer failed the
    request, though the token had up to 30 s left. It serves now until it expires, and
    each request asks for its renewal again."""
    now = [1_000_000.0]
    registry = TokenRegistry([listed_grant("grt_1")], now=now)
    down = [False]

    async def handler(request: httpx.Request) -> httpx.Response:
        return _outage(kind, request) if down[0] else await registry(request)

    client = mocked(handler, tmp_path, clock=lambda: now[0])
    assert await client.get_token("shop") == "tok-1-grt_1"
    down[0] = True
    now[0] += 300 - 10  # due for renewal, 10 s left
    assert await client.get_token("shop") == "tok-1-grt_1"
    now[0] += 10  # expired: nothing left to serve, so the registry's failure is raised
    with pytest.raises((httpx.ConnectError, DependencyUnavailable, RateLimited)):
        await client.get_token("shop")
    down[0] = False
    assert await client.get_token("shop") == "tok-2-grt_1"
    await client.aclose()


@pytest.mark.asyncio
async def test_a_token_due_for_renewal_is_not_used_once_its_grant_is_refused(
    tmp_path: Path,
) -> None:
    """Only a registry that cannot answer leaves the old token in use: one that answers
    the grant is revoked is believed, and its refusal raised."""
    now = [1_000_000.0]
    registry = TokenRegistry([listed_grant("grt_1")], now=now)
    client = token_client(registry, tmp_path)
    assert await client.get_token("shop") == "tok-1-grt_1"
    registry.grants = [{**listed_grant("grt_1"), "revoked_at": "2026-01-01"}]
    now[0] += 300 - 10
    with pytest.raises(Forbidden) as refused:
        await client.get_token("shop")
    assert refused.value.reason == "no_grant"
    await client.aclose()


@pytest.mark.asyncio
async def test_callers_that_find_the_token_due_together_share_one_renewal(
    tmp_path: Path,
) -> None:
    """Callers finding the token due queued on a lock, and when the renewal failed each
    asked the registry again in turn: with the registry down, the tenth caller waited ten
    timeouts. They share one renewal and its outcome now, a failure as well as a token; a
    caller that gives up does not cancel it for the others."""
    now = [1_000_000.0]
    registry = TokenRegistry([listed_grant("grt_1")], now=now)
    asked: list[str] = []
    down = [True]

    async def handler(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        await asyncio.sleep(0.05)
        return _outage("unavailable", request) if down[0] else await registry(request)

    client = mocked(handler, tmp_path, clock=lambda: now[0])
    callers = [client.get_token("shop") for _ in range(5)]
    outcomes = await asyncio.gather(*callers, return_exceptions=True)
    assert all(isinstance(o, DependencyUnavailable) for o in outcomes), outcomes
    assert asked == ["/v1/grants"]
    down[0] = False
    asked.clear()
    given_up = asyncio.ensure_future(client.get_token("shop"))
    tokens = asyncio.gather(*(client.get_token("shop") for _ in range(4)))
    await asyncio.sleep(0.01)
    given_up.cancel()
    assert await tokens == ["tok-1-grt_1"] * 4
    assert asked == ["/v1/grants", "/v1/token"]
    await client.aclose()


@pytest.mark.asyncio
async def test_a_renewal_its_callers_gave_up_on_ends_with_the_client(tmp_path: Path) -> None:
    """A renewal runs on when its callers give up (others may share it), but it outlived
    aclose(): still waiting on the registry, it went on to ask it through a client closed
    under it, and a loop closed then (the sync client's) dropped it pending."""
    now = [1_000_000.0]
    registry = TokenRegistry([listed_grant("grt_1")], now=now)
    asked: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.2)
        asked.append(request.url.path)
        return await registry(request)

    client = mocked(handler, tmp_path, clock=lambda: now[0])
    before = asyncio.all_tasks()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.get_token("shop"), 0.02)
    await client.aclose()
    assert asyncio.all_tasks() - before == set()
    await asyncio.sleep(0.3)
    assert asked == []


def test_the_async_clients_auth_refuses_a_sync_httpx_client(tmp_path: Path) -> None:
    """``AgentAuthClient.auth()`` on a sync ``httpx.Client`` signed with no token at all
    ("Authorization: DPoP ", a proof bound to the empty string) and sent it; after async
    use, with whatever token the last async request had left behind."""
    sent: list[httpx.Request] = []

    def provider(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    client = token_client(TokenRegistry([listed_grant("grt_1")], now=[1_000_000.0]), tmp_path)
    with (
        httpx.Client(transport=httpx.MockTransport(provider)) as http,
        pytest.raises(TypeError, match="AgentAuthClientSync"),
    ):
        http.get("https://shop.example/api/events", auth=client.auth("shop"))
    assert sent == []


@pytest.mark.asyncio
async def test_a_verifier_call_that_raises_is_a_503_deny_not_a_500() -> None:
    """The verifier client caught httpx's errors and bad JSON only: a call on a client
    closed under a request in flight (a provider shutting down) raised RuntimeError, and
    the middleware let it out as a 500 instead of the 503 a failed dependency gets."""
    allowing = httpx.MockTransport(
        lambda r: httpx.Response(200, json={"decision": "allow", "reason": "ok"})
    )
    verifier = VerifierClient(
        "http://v", provider_id="p", secret="s", http=httpx.AsyncClient(transport=allowing)
    )
    await verifier.aclose()
    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    middleware = AgentAuthMiddleware(
        app, verifier=verifier, action_of=lambda m, p: Action(kind="read", resource="x")
    )
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/x",
        "raw_path": b"/x",
        "headers": [(b"host", b"a"), (b"authorization", b"DPoP a.b.c"), (b"dpop", b"d.e.f")],
    }
    await middleware(scope, None, send)
    assert reached == []
    assert sent[0]["status"] == 503
    assert json.loads(sent[1]["body"])["reason"] == "verifier_unavailable"


@pytest.mark.asyncio
async def test_a_public_url_written_in_unicode_matches_the_proofs_the_agents_send() -> None:
    """``public_url="https://bücher.example"`` was used as typed, while every agent's
    request (httpx) and so its proof's htu name the host in IDNA: every proof was refused
    as htu_mismatch. It is now taken in the form the requests carry."""
    asked: list[str] = []

    class Recording:
        async def verify_request(self, **request: Any) -> Verification:
            asked.append(request["url"])
            return Verification(True, "ok")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    middleware = AgentAuthMiddleware(
        app,
        verifier=cast(VerifierClient, Recording()),
        action_of=lambda m, p: Action(kind="read", resource="notes"),
        public_url="https://bücher.example/",
    )
    auth = DPoPAuth(key=PrivateKey.generate(), token="tok")
    signed = next(auth.auth_flow(httpx.Request("GET", "https://bücher.example/büro/my notes")))
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/büro/my notes",
        "raw_path": signed.url.raw_path,
        "root_path": "",
        "headers": [(b"host", signed.headers["host"].encode())],
    }
    await middleware(scope, None, None)
    assert asked == [claims(signed.headers["DPoP"])["htu"]]
    assert asked == ["https://xn--bcher-kva.example/b%C3%BCro/my%20notes"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "answer",
    [
        {"decision": "deny", "reason": "rate_limited", "dpop_nonce": 5},
        {"decision": "deny", "reason": "rate_limited", "dpop_nonce": "a\r\nSet-Cookie: x=1"},
        {"decision": "allow", "reason": "ok", "dpop_nonce": {"n": 1}},
        {"decision": "allow", "reason": "ok", "dpop_nonce": "n\u00f6nce\u2603"},
        {"decision": "allow", "reason": "ok", "dpop_nonce": ""},
    ],
)
async def test_a_verifier_answer_with_a_malformed_nonce_is_a_503_deny_not_a_500(
    answer: dict[str, Any],
) -> None:
    """The verifier's dpop_nonce went unchecked into the DPoP-Nonce header: a number or a
    dict made every answer a 500 (after an allow, once the app had been let in to run), and
    a line break or a character outside latin-1 broke the response. An answer that is not
    the verifier's form decides nothing: denied as a verifier that is down."""
    verifier = VerifierClient(
        "http://v",
        provider_id="p",
        secret="s",
        http=httpx.AsyncClient(
            transport=httpx.MockTransport(lambda r: httpx.Response(200, json=answer))
        ),
    )
    result = await verifier.verify_request(
        method="GET",
        url="https://a/x",
        headers={"authorization": "DPoP a.b.c", "dpop": "d.e.f"},
        action=Action(kind="read", resource="x"),
    )
    assert (result.allowed, result.reason, result.dpop_nonce) == (
        False,
        "verifier_unavailable",
        None,
    )
    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = AgentAuthMiddleware(
        app,
        verifier=verifier,
        action_of=lambda m, p: Action(kind="read", resource="x"),
        public_url="https://a",
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=middleware), base_url="https://a"
    ) as http:
        response = await http.get("/x", headers={"Authorization": "DPoP a.b.c", "DPoP": "d.e.f"})
    assert response.status_code == 503 and reached == []
    await verifier.aclose()


@pytest.mark.asyncio
async def test_the_verifier_call_never_follows_a_redirect_with_the_agents_credentials() -> None:
    """A provider's own httpx client set to follow redirects sent a verifier's 307 on, the
    body with it: the agent's token and its unspent proof went to whatever origin the
    Location named, which could present them to the provider before the proof grew old, and
    that origin's allow was taken for the verifier's. Never followed, as the registry calls
    are not: a redirect decides nothing."""
    reached: list[str] = []

    def server(request: httpx.Request) -> httpx.Response:
        reached.append(str(request.url))
        if request.url.host == "v":
            return httpx.Response(307, headers={"Location": "https://elsewhere.example/steal"})
        return httpx.Response(200, json={"decision": "allow", "reason": "ok"})

    verifier = VerifierClient(
        "http://v",
        provider_id="p",
        secret="s",
        http=httpx.AsyncClient(transport=httpx.MockTransport(server), follow_redirects=True),
    )
    result = await verifier.verify_request(
        method="GET",
        url="https://a/x",
        headers={"authorization": "DPoP a.b.c", "dpop": "d.e.f"},
        action=Action(kind="read", resource="x"),
    )
    assert (result.allowed, result.reason) == (False, "verifier_unavailable")
    assert reached == ["http://v/v1/verify"]
    await verifier.aclose()
