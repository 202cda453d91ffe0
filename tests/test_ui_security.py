"""The approval page's defences, in memory: cookies, sessions, cross-site refusals, and the
check that a passkey signs only the grant shown on screen."""

from __future__ import annotations

from typing import Any, cast

import httpx
import pytest
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse
from starlette.routing import Route

from agentauth.protocol import Capability, Envelope, Grant, RateLimit, b64url_encode
from agentauth.ui import SecurityMiddleware, SessionStore, UISettings
from agentauth.ui._app import _TicketIn
from agentauth.ui._pages import Ctx, Mismatch, Notice, Pages
from agentauth.ui._security import MAX_BODY_BYTES, read_cookie

ORIGIN = "https://approve.example"


def app(*, secure: bool = True) -> SecurityMiddleware:
    async def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(request.state.agentauth_cookie_id))

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(f"<p>{request.state.agentauth_cookie_id}</p>")

    inner = Starlette(routes=[Route("/x", echo, methods=["GET", "POST"]), Route("/page", page)])
    return SecurityMiddleware(
        inner,
        origin=ORIGIN if secure else "http://localhost:8080",
        host="approve.example" if secure else "localhost:8080",
        secure=secure,
        cookie_max_age=3600,
    )


def client(secure: bool = True) -> httpx.AsyncClient:
    base = ORIGIN if secure else "http://localhost:8080"
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app(secure=secure)), base_url=base)


@pytest.mark.asyncio
async def test_every_response_refuses_framing_and_new_browsers_get_a_strict_cookie() -> None:
    async with client() as c:
        r = await c.get("/x")
        assert r.status_code == 200
        assert r.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["strict-transport-security"] == "max-age=63072000"  # https only
        cookie = r.headers["set-cookie"]
        name, _, rest = cookie.partition("=")
        value = rest.split(";", 1)[0]
        assert name == "__Host-agentauth" and value == r.text and len(value) == 43
        for attribute in ("Path=/", "HttpOnly", "SameSite=Strict", "Secure"):
            assert attribute in cookie
        # A browser that has the cookie keeps it: no new one, the same id in the request.
        again = await c.get("/x", headers={"Cookie": f"__Host-agentauth={value}"})
        assert again.text == value and "set-cookie" not in again.headers
        # Refusals carry the framing headers too.
        refused = await c.post("/x")
        assert refused.status_code == 403 and refused.headers["x-frame-options"] == "DENY"


@pytest.mark.asyncio
async def test_development_cookies_work_on_http_localhost() -> None:
    async with client(secure=False) as c:
        answer = await c.get("/x")
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith("agentauth_session=") and "Secure" not in cookie
        assert "strict-transport-security" not in answer.headers  # no https to insist on


@pytest.mark.asyncio
async def test_state_changes_need_the_page_origin_and_the_page_host() -> None:
    async with client() as c:
        assert (await c.post("/x", headers={"Origin": ORIGIN})).status_code == 200
        assert (await c.post("/x")).status_code == 403
        assert (await c.post("/x", headers={"Origin": "https://evil.example"})).status_code == 403
        assert (await c.post("/x", headers={"Origin": "null"})).status_code == 403
        # A read by another origin's script (browsers send Origin on a GET only then).
        assert (await c.get("/x")).status_code == 200
        assert (await c.get("/x", headers={"Origin": ORIGIN})).status_code == 200
        for other in ("https://sibling.example", "null"):
            assert (await c.get("/x", headers={"Origin": other})).status_code == 403
        r = await c.get("/x?a=1", headers={"Host": "rebound.example"})
        assert r.status_code == 308 and r.headers["location"] == f"{ORIGIN}/x?a=1"
        assert "set-cookie" not in r.headers
        r = await c.post("/x", headers={"Host": "rebound.example", "Origin": ORIGIN})
        assert r.status_code == 400
        # Only the health probe answers on any host (load balancers probe by address).
        r = await c.get("/healthz", headers={"Host": "10.0.0.7:8080"})
        assert r.status_code == 404 and r.headers["x-frame-options"] == "DENY"


async def handshake(origin: str | None) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    reached: list[bool] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        reached.append(True)
        await send({"type": "websocket.accept"})

    middleware = SecurityMiddleware(
        inner, origin=ORIGIN, host="approve.example", secure=True, cookie_max_age=60
    )
    headers = [(b"host", b"approve.example")]
    if origin is not None:
        headers.append((b"origin", origin.encode()))

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await middleware({"type": "websocket", "path": "/ws", "headers": headers}, receive, send)
    return sent if not reached else [{"type": "reached"}, *sent]


@pytest.mark.asyncio
async def test_cross_site_socket_handshakes_are_closed() -> None:
    assert (await handshake(ORIGIN))[0] == {"type": "reached"}
    for origin in ("https://evil.example", None):
        assert await handshake(origin) == [{"type": "websocket.close", "code": 1008}]


@pytest.mark.asyncio
async def test_a_cookie_of_an_ids_length_that_is_no_id_is_replaced() -> None:
    """A cookie id is ``new_id``'s: a value of its length that is not one (another app on
    localhost may set the name) was taken as the browser's id, and the comparisons of ids
    (a sign-in ticket's claim, a page's socket joining it) use hmac.compare_digest, which
    raises TypeError on text that is not ASCII: a 500 for the claim instead of a refusal."""
    odd = "\u00e9" * 43
    assert read_cookie(Headers({"cookie": f"agentauth_session={odd}"}), "agentauth_session") is None
    async with client(secure=False) as c:
        answer = await c.get("/x", headers={"Cookie": f"agentauth_session={odd}".encode("latin-1")})
        assert answer.status_code == 200 and answer.text != odd
        assert answer.headers["set-cookie"].startswith(f"agentauth_session={answer.text};")
    store = SessionStore(ttl=600, ticket_ttl=30)
    ticket = store.sign_in(answer.text, principal_id="hum_1", registry_token="ses_1")
    presented = read_cookie(Headers({"cookie": f"agentauth_session={odd}"}), "agentauth_session")
    assert store.claim(ticket, presented) is None  # refused, not raised


# Cookies other sites under the same parent domain (or other apps on localhost) may set,
# which browsers send along with the page's own and Python's SimpleCookie refuses.
@pytest.mark.asyncio
async def test_a_page_renews_the_cookie_it_was_served_under() -> None:
    """The cookie was set once, at the first visit or a sign-in, for the session's 12 h: a
    sign-in page left open past that (the person signed out, or idle) tied its tickets to
    an id the browser had dropped, and every sign-in there was refused until a reload.
    Each page renews it, with the same id; other answers leave it alone."""
    async with client() as c:
        own = (await c.get("/x")).text
        c.cookies.clear()
        answer = await c.get("/page", headers={"Cookie": f"__Host-agentauth={own}"})
        assert answer.text == f"<p>{own}</p>"
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith(f"__Host-agentauth={own};") and "Max-Age=3600" in cookie
        for attribute in ("Path=/", "HttpOnly", "SameSite=Strict", "Secure"):
            assert attribute in cookie
        plain = await c.get("/x", headers={"Cookie": f"__Host-agentauth={own}"})
        assert "set-cookie" not in plain.headers


async def post_in_chunks(
    chunks: int, size: int, *, declared: int | None = None
) -> tuple[int, int, bytes | None]:
    """POST ``chunks`` bodies of ``size`` bytes through the middleware to a handler that
    reads its body whole, as FastAPI does: (status, chunks the client sent, what the
    handler read)."""
    read: list[bytes] = []
    sent = 0
    status: list[int] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        read.append(await Request(scope, receive).body())
        await PlainTextResponse("ok")(scope, receive, send)

    middleware = SecurityMiddleware(
        inner, origin=ORIGIN, host="approve.example", secure=True, cookie_max_age=60
    )
    headers = [(b"host", b"approve.example"), (b"origin", ORIGIN.encode())]
    if declared is not None:
        headers.append((b"content-length", str(declared).encode()))

    async def receive() -> dict[str, Any]:
        nonlocal sent
        sent += 1
        return {"type": "http.request", "body": b"x" * size, "more_body": sent < chunks}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    scope = {"type": "http", "method": "POST", "path": "/auth/session", "headers": headers}
    await middleware(scope | {"query_string": b"", "root_path": ""}, receive, send)
    return status[0], sent, read[0] if read else None


@pytest.mark.asyncio
async def test_a_request_body_past_the_bound_is_refused_before_it_is_read_whole() -> None:
    """Starlette reads a body whole before FastAPI parses it, and the Origin check stops
    browsers only: anyone who reached the page could stream /auth/session a body without
    end into the memory every signed-in person's page shares (the registry caps its own)."""
    # 64 MiB, sent without a length: read to just past the bound, never handed on.
    status, sent, read = await post_in_chunks(1024, 65536)
    assert status == 413 and read is None
    assert sent * 65536 <= MAX_BODY_BYTES + 65536
    # Declared too long: refused before a byte of it is read.
    status, sent, read = await post_in_chunks(1024, 65536, declared=1024 * 65536)
    assert (status, sent, read) == (413, 0, None)
    # A body within the bound reaches the page whole.
    status, sent, read = await post_in_chunks(4, 1000)
    assert status == 200 and read == b"x" * 4000


FOREIGN_COOKIES = ['prefs={"theme":"dark"}', "cart[id]=1", "note=hello world"]


@pytest.mark.asyncio
@pytest.mark.parametrize("foreign", FOREIGN_COOKIES)
async def test_another_sites_cookie_does_not_sign_the_person_out(foreign: str) -> None:
    """Read with a parser that gives up on the whole header at one cookie it dislikes,
    the page's own cookie went unseen: every request was a new browser, given a new
    anonymous cookie over the person's session, and a sign-in ticket never matched."""
    async with client() as c:
        own = (await c.get("/x")).text
        c.cookies.clear()
        answer = await c.get("/x", headers={"Cookie": f"{foreign}; __Host-agentauth={own}"})
        assert answer.text == own
        assert "set-cookie" not in answer.headers
    store = SessionStore(ttl=600, ticket_ttl=30)
    anonymous = "a" * 43
    ticket = store.sign_in(anonymous, principal_id="hum_1", registry_token="ses_1")
    presented = read_cookie(
        Headers({"cookie": f"{foreign}; __Host-agentauth={anonymous}"}), "__Host-agentauth"
    )
    assert store.claim(ticket, presented) is not None


def test_a_login_ticket_stays_out_of_the_request_bodys_repr() -> None:
    """The ticket ``/auth/session`` takes is a bearer of the new session until claimed:
    what prints the parsed body (a log line, an error report that records a frame's
    values) must not print it."""
    body = _TicketIn(ticket="tkt-secret-0123456789")
    assert "tkt-secret-0123456789" not in repr(body) + str(body)


def test_an_actions_context_keeps_the_session_cookie_out_of_its_repr() -> None:
    """The cookie id an action's context carries is the person's session on this page (who
    presents it acts as them): what prints the context (a log line, an error report that
    records a frame's values) must not print it, as a session's token and a ticket's ids
    are kept out of theirs."""

    async def redraw() -> None:
        return None

    context = Ctx("cookie-secret-0123456789", cast(Notice, None), redraw)
    assert "cookie-secret" not in repr(context)
    assert context.cookie_id == "cookie-secret-0123456789"


def test_a_login_ticket_works_once_and_only_for_its_browser() -> None:
    now = [1000.0]
    store = SessionStore(ttl=600, ticket_ttl=30, clock=lambda: now[0])
    ticket = store.sign_in("anon-1", principal_id="hum_1", registry_token="ses_secret")
    session_id = store.claim(ticket, "anon-1")
    assert session_id is not None and session_id != "anon-1"
    session = store.get(session_id)
    assert session is not None and session.principal_id == "hum_1"
    assert "ses_secret" not in repr(session)  # never in logs
    assert store.claim(ticket, "anon-1") is None  # once

    stolen = store.sign_in("anon-2", principal_id="hum_2", registry_token="ses_2")
    assert store.claim(stolen, "anon-3") is None  # another browser: refused...
    assert store.claim(stolen, "anon-2") is None  # ...and the ticket is burnt

    late = store.sign_in("anon-4", principal_id="hum_4", registry_token="ses_4")
    now[0] += 31
    assert store.claim(late, "anon-4") is None

    now[0] += 600
    assert store.get(session_id) is None  # sessions expire
    kept = store.claim(store.sign_in("a", principal_id="h", registry_token="t"), "a")
    store.sign_out(kept)
    assert store.get(kept) is None


def offered(request: dict[str, Any], principal: str, **changes: Any) -> dict[str, Any]:
    grant = Grant(
        grant_id="grt_1",
        agent_id=request["agent_id"],
        principal_id=principal,
        provider_id=request["provider_id"],
        audience=request["audience"],
        capabilities=tuple(Capability.read(c["resource"]) for c in request["capabilities"]),
        envelope=Envelope.model_validate(request["envelope"]),
        created_at=1_800_000_000,
    ).model_copy(update=changes)
    return {
        "grant": grant.document(),
        "grant_hash": grant.digest_b64(),
        "options": {"challenge": grant.digest_b64(), "rpId": "localhost"},
    }


REQUEST = {
    "id": "grq_1",
    "agent_id": "agt_1",
    "provider_id": "cal",
    "audience": "https://cal.example",
    "capabilities": [{"kind": "read", "resource": "calendar/*"}],
    "envelope": {"rate_limits": [{"max_count": 5, "window_seconds": 3600}]},
}


def test_a_session_left_idle_ends_before_its_lifetime() -> None:
    """ASVS V3.3.2: a page left open on a shared computer acted for the person, without
    their passkey, for all of ``session_ttl`` (12 h)."""
    now = [0.0]
    store = SessionStore(ttl=3600, idle_ttl=600, ticket_ttl=30, clock=lambda: now[0])
    session_id = store.claim(
        store.sign_in("anon", principal_id="hum_1", registry_token="t"), "anon"
    )
    now[0] = 500.0
    assert store.use(session_id) is not None  # the person's use: idleness counts from here
    now[0] = 1099.0
    assert store.get(session_id) is not None  # a look that is no use (a poll) ...
    now[0] = 1100.0
    assert store.get(session_id) is None  # ... does not keep it alive: ended, 600 s idle
    assert store.idle_ended() == ["t"]  # for the page to end at the registry, once
    assert store.idle_ended() == []
    assert store.use(session_id) is None  # use does not bring an ended session back


def test_a_session_is_not_idle_while_a_passkey_prompt_is_up() -> None:
    now = [0.0]
    store = SessionStore(ttl=3600, idle_ttl=60, ticket_ttl=30, clock=lambda: now[0])
    session_id = store.claim(
        store.sign_in("anon", principal_id="hum_1", registry_token="t"), "anon"
    )
    store.use(session_id, busy_for=180)
    now[0] = 200.0
    assert store.use(session_id) is not None
    now[0] = 260.0
    assert store.get(session_id) is None


def test_idle_sessions_swept_at_a_sign_in_are_ended_at_the_registry_too() -> None:
    now = [0.0]
    store = SessionStore(ttl=3600, idle_ttl=60, ticket_ttl=30, clock=lambda: now[0])
    store.claim(store.sign_in("anon", principal_id="hum_1", registry_token="t1"), "anon")
    now[0] = 60.0
    store.sign_in("anon-2", principal_id="hum_2", registry_token="t2")
    assert store.idle_ended() == ["t1"]


@pytest.mark.parametrize(
    "values", [{"session_idle_ttl": 59}, {"session_ttl": 600, "session_idle_ttl": 601}]
)
def test_an_idle_period_outside_its_bounds_is_refused_at_start(values: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="session_idle_ttl"):
        UISettings(registry_url="http://registry.invalid", **values)  # type: ignore[arg-type]
    assert UISettings(registry_url="http://registry.invalid").session_idle_ttl == 1800


def test_the_passkey_signs_only_the_grant_on_screen() -> None:
    good = offered(REQUEST, "hum_1")
    assert Pages._check_offered(good, REQUEST, "hum_1", None).digest_b64() == good["grant_hash"]
    tightened = {"envelope": {"rate_limits": [{"max_count": 2, "window_seconds": 3600}]}}
    narrowed = offered(
        REQUEST,
        "hum_1",
        envelope=Envelope(rate_limits=(RateLimit(max_count=2, window_seconds=3600),)),
    )
    assert Pages._check_offered(narrowed, REQUEST, "hum_1", tightened)

    wider = offered(
        REQUEST,
        "hum_1",
        envelope=Envelope(rate_limits=(RateLimit(max_count=50, window_seconds=3600),)),
    )
    other_agent = offered(REQUEST, "hum_1", agent_id="agt_2")
    other_human = offered(REQUEST, "hum_2")
    more = offered(REQUEST, "hum_1", capabilities=(Capability.read("*"),))
    swapped = {**good, "options": {"challenge": b64url_encode(b"\x00" * 32)}}
    for lie in (wider, other_agent, other_human, more, swapped, {"grant": {}, "options": {}}):
        with pytest.raises(Mismatch):
            Pages._check_offered(lie, REQUEST, "hum_1", None)


def test_the_public_surface_is_exactly_all() -> None:
    import agentauth.ui as ui_package

    public = {n for n, v in vars(ui_package).items() if not n.startswith("_")}
    modules = {n for n in public if type(vars(ui_package)[n]).__name__ == "module"}
    assert set(ui_package.__all__) == public - modules
