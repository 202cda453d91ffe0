"""Sessions, cookies and the page's defences against other sites.

The human's registry session token never reaches the browser: this server keeps it in a
``SessionStore`` keyed by a random id that lives in an HttpOnly, SameSite=Strict cookie
(``Secure`` too, and the ``__Host-`` name, when the origin is https; browsers drop
``Secure`` cookies on http://localhost, so development runs without it).

``SecurityMiddleware`` (ASGI, outermost) answers for every response and connection:

- ``X-Frame-Options: DENY`` and CSP ``frame-ancestors 'none'``: the page cannot be framed;
- state-changing HTTP methods and WebSocket handshakes (the page's actions travel over
  NiceGUI's socket) must come from the configured origin: the ``Origin`` header is
  required and must match exactly, so a cross-site form, fetch or socket gets 403; any
  other request naming another origin gets 403 too (a cross-origin read, such as a
  same-site page opening a Socket.IO polling session with the person's cookie);
- the ``Host`` header must be the origin's host, which stops DNS-rebinding pages (a GET
  for another host is redirected to the origin, so typing 127.0.0.1 still works; only the
  ``/healthz`` probe answers on any host);
- a request body is read no further than ``MAX_BODY_BYTES`` (413 past it), before the page
  sees it;
- every browser gets an anonymous cookie id on its first visit; signing in swaps it for a
  fresh one (no session fixation) through a one-time ticket bound to the old id.
"""

from __future__ import annotations

import asyncio
import hmac
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote

from nicegui import Client
from socketio import exceptions as socket_errors
from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._web import BodyTooLarge, read_body, replaying

__all__ = ["LoginTicket", "SecurityMiddleware", "Session", "SessionStore", "cookie_name"]

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_HEADERS = (
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"frame-ancestors 'none'; base-uri 'self'; object-src 'none'; form-action 'self'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"publickey-credentials-get=(self), camera=(), microphone=()"),
)
_HSTS = (b"strict-transport-security", b"max-age=63072000")
# The largest request body the page takes: Engine.IO's own bound on a polling POST (its
# max_http_buffer_size); /auth/session's is about a hundred bytes. Starlette reads a body
# whole, however long, before FastAPI parses it: anyone who can reach the page (the Origin
# check is a browser's, any other client writes the header) could fill the memory every
# signed-in person's page shares.
MAX_BODY_BYTES = 1_000_000
# Cookie ids are 256-bit random; anything else in the cookie is ignored and replaced.
_ID_BYTES = 32
_ID = re.compile(r"[A-Za-z0-9_-]{43}")  # what new_id makes: 32 bytes as base64url


def cookie_name(secure: bool) -> str:
    # The __Host- prefix makes browsers refuse the cookie unless Secure, Path=/ and no
    # Domain: no sibling subdomain can plant or overwrite it. It needs https.
    return "__Host-agentauth" if secure else "agentauth_session"


def new_id() -> str:
    return secrets.token_urlsafe(_ID_BYTES)


@dataclass(slots=True)
class Session:
    """A signed-in human, as this server knows them."""

    principal_id: str
    registry_token: str = field(repr=False)
    expires_at: float
    display_name: str | None = None
    # The person's last use (a page load, an action): idleness counts from here. Later than
    # now while a passkey prompt is up, since the person is busy with it.
    used_at: float = 0.0


@dataclass(frozen=True, slots=True)
class LoginTicket:
    """Bridges a passkey sign-in (over the socket) to the new cookie (over HTTP)."""

    bound_to: str = field(repr=False)  # the anonymous cookie id it was issued to
    session_id: str = field(repr=False)  # the new, signed-in cookie id
    expires_at: float


class SessionStore:
    """Sessions and login tickets in this process's memory (one UI process per origin), and
    per human the audit checkpoints their visits to the audit page verified."""

    def __init__(
        self,
        *,
        ttl: int,
        ticket_ttl: int,
        idle_ttl: int = 1800,
        clock: Callable[[], float] = time.time,
        max_people_remembered: int = 100_000,
    ):
        self._sessions: dict[str, Session] = {}
        # Registry tokens of sessions ended for idleness, for the caller to end at the
        # registry too (this store does no I/O): that session would otherwise live on
        # there until its expiry, hours later.
        self._idle_ended: list[str] = []
        self._tickets: dict[str, LoginTicket] = {}
        # principal id -> chain -> (size, root). Kept by principal, not by session: the
        # registry can end a session (and so would wipe what the next visit is held to).
        # In the order people last verified a trail: past max_people_remembered the one
        # who verified longest ago is forgotten (their next visit trusts the latest
        # checkpoint, as after a restart), so accounts signed up without end cannot grow
        # this process's memory without end.
        self._checkpoints_seen: dict[str, dict[str, tuple[int, str]]] = {}
        self._max_people = max_people_remembered
        self._ttl = ttl
        # OWASP ASVS 4.0 V3.3.2: a page left open on a shared or stolen computer must not
        # act for the person, without their passkey, for the rest of the session's life.
        self._idle_ttl = idle_ttl
        self._ticket_ttl = ticket_ttl
        self._clock = clock

    def get(self, session_id: str | None) -> Session | None:
        """The live session, without counting this as the person's use (a page's polls)."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        if session.expires_at <= now:
            self._sessions.pop(session_id, None)
            return None
        if session.used_at + self._idle_ttl <= now:
            self._sessions.pop(session_id, None)
            self._idle_ended.append(session.registry_token)
            return None
        return session

    def use(self, session_id: str | None, *, busy_for: float = 0.0) -> Session | None:
        """Like ``get``, counting it as the person's use: idleness starts again now, or
        ``busy_for`` seconds from now (a passkey prompt that may stay up that long). A
        session already idle too long stays ended."""
        session = self.get(session_id)
        if session is not None:
            session.used_at = self._clock() + busy_for
        return session

    def idle_ended(self) -> list[str]:
        """The registry tokens of sessions ended for idleness since the last call."""
        ended, self._idle_ended = self._idle_ended, []
        return ended

    def sign_in(
        self,
        anonymous_id: str,
        *,
        principal_id: str,
        registry_token: str,
        display_name: str | None = None,
    ) -> str:
        """Create the signed-in session under a fresh id; return the ticket to claim it."""
        self.sweep()
        now = self._clock()
        session_id = new_id()
        self._sessions[session_id] = Session(
            principal_id=principal_id,
            registry_token=registry_token,
            expires_at=now + self._ttl,
            display_name=display_name,
            used_at=now,
        )
        ticket = new_id()
        self._tickets[ticket] = LoginTicket(
            bound_to=anonymous_id, session_id=session_id, expires_at=now + self._ticket_ttl
        )
        return ticket

    def claim(self, ticket: str, cookie_id: str | None) -> str | None:
        """The new session id for a ticket, once, and only to the browser it was made for."""
        found = self._tickets.pop(ticket, None)
        if found is None or found.expires_at <= self._clock():
            return None
        if cookie_id is None or not secrets.compare_digest(found.bound_to, cookie_id):
            self._sessions.pop(found.session_id, None)  # a stolen ticket burns the session
            return None
        return found.session_id

    def checkpoints_seen(self, principal_id: str) -> dict[str, tuple[int, str]]:
        """Per chain, the latest checkpoint (size, root) this human's visits verified."""
        return dict(self._checkpoints_seen.get(principal_id, {}))

    def remember_checkpoints(
        self,
        principal_id: str,
        checked_against: Mapping[str, tuple[int, str]],
        verified: Mapping[str, tuple[int, str]],
    ) -> None:
        """Remember ``verified``, each checked against ``checked_against`` (what
        ``checkpoints_seen`` gave that visit). A chain another visit moved on meanwhile keeps
        that visit's: each one stored was checked against the one it replaces."""
        mine = self._checkpoints_seen.pop(principal_id, {})
        self._checkpoints_seen[principal_id] = mine  # now the most recent
        for chain, checkpoint in verified.items():
            if mine.get(chain) == checked_against.get(chain):
                mine[chain] = checkpoint
        while len(self._checkpoints_seen) > self._max_people:
            del self._checkpoints_seen[next(iter(self._checkpoints_seen))]

    def sign_out(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

    def sweep(self) -> None:
        """Drop expired sessions and tickets; end idle sessions (``idle_ended`` gives their
        registry tokens)."""
        now = self._clock()
        for key in [k for k, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[key]
        for key in [k for k, s in self._sessions.items() if s.used_at + self._idle_ttl <= now]:
            self._idle_ended.append(self._sessions.pop(key).registry_token)
        for key in [k for k, t in self._tickets.items() if t.expires_at <= now]:
            del self._tickets[key]


def read_cookie(headers: Headers, name: str) -> str | None:
    raw = headers.get("cookie")
    if not raw:
        return None
    # Parsed as browsers write it, cookie by cookie: the standard library's parser gives
    # up on the whole header at one cookie it dislikes (a space or a quote in a value,
    # brackets in a name), and any site under the same parent domain, or any app on
    # localhost, can set such a cookie: ours would be unreadable, the person signed out.
    value = cookie_parser(raw).get(name)
    # Not its length alone: ids are compared with hmac.compare_digest (a ticket's claim, a
    # socket joining its page), which raises TypeError on text that is not ASCII.
    return value if value and _ID.fullmatch(value) else None


def set_cookie_header(name: str, value: str, *, secure: bool, max_age: int) -> bytes:
    parts = [f"{name}={value}", "Path=/", "HttpOnly", "SameSite=Strict", f"Max-Age={max_age}"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts).encode("latin-1")


class SecurityMiddleware:
    """See the module docstring. Wraps the whole app (NiceGUI's mount included)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        origin: str,
        host: str,
        secure: bool,
        cookie_max_age: int,
    ) -> None:
        self.app = app
        self.origin = origin
        self.host = host.lower()
        self.secure = secure
        self.cookie = cookie_name(secure)
        self.cookie_max_age = cookie_max_age
        # On https, browsers are told to come back over https only (no downgrade by
        # someone on the network before the first redirect); this host only, since the
        # parent domain's other sites are not this page's to decide for.
        self.headers = _HEADERS + ((_HSTS,) if secure else ())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        probe = scope["type"] == "http" and scope["path"] == "/healthz"
        if (headers.get("host") or "").lower() != self.host and not probe:
            if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
                # Someone typed 127.0.0.1 (or a rebinding page asked): send them to the
                # origin the passkeys are bound to; nothing of this server is served here.
                await self._redirect(scope, send)
            else:
                await self._refuse(scope, receive, send, 400, b"unknown host")
            return
        unsafe = scope["type"] == "websocket" or scope["method"] not in _SAFE_METHODS
        origin = headers.get("origin")
        # A GET naming another origin is another site's script reading this one (browsers
        # send Origin on a GET only in CORS mode). None is served: Engine.IO would answer
        # it with the person's cookie and hand out a polling session id, which a server
        # then drives with a forged Origin (cookie-less, its requests pass), as the person.
        if origin != self.origin and (unsafe or origin is not None):
            await self._refuse(scope, receive, send, 403, b"cross-origin request refused")
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        if unsafe:
            bounded = await self._bounded_body(scope, receive, send, headers)
            if bounded is None:
                return
            receive = bounded

        cookie_id = read_cookie(headers, self.cookie)
        issued = None
        if cookie_id is None:
            cookie_id = issued = new_id()
        scope.setdefault("state", {})["agentauth_cookie_id"] = cookie_id

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                raw = list(message.get("headers", []))
                names = {k.lower() for k, _ in raw}
                raw += [(k, v) for k, v in self.headers if k not in names]
                content_type = dict(raw).get(b"content-type", b"")
                if content_type.startswith(b"text/html") or b"cache-control" not in names:
                    raw = [(k, v) for k, v in raw if k.lower() != b"cache-control"]
                    raw.append((b"cache-control", b"no-store"))
                # A page renews the cookie it was served under (the same id, Max-Age from
                # now): the sign-in page ties its tickets to that id, and a cookie set at an
                # earlier sign-in expired under a page left open (signed out, or idle) past
                # it, so every sign-in there was refused until a reload. The session's own
                # lifetime and idleness are the server's, whatever the cookie's.
                renew = issued or (cookie_id if content_type.startswith(b"text/html") else None)
                if renew is not None and not any(
                    k.lower() == b"set-cookie" and v.startswith(self.cookie.encode() + b"=")
                    for k, v in raw
                ):
                    raw.append(
                        (
                            b"set-cookie",
                            set_cookie_header(
                                self.cookie,
                                renew,
                                secure=self.secure,
                                max_age=self.cookie_max_age,
                            ),
                        )
                    )
                message = {**message, "headers": raw}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _bounded_body(
        self, scope: Scope, receive: Receive, send: Send, headers: Headers
    ) -> Receive | None:
        """The request's body read here, up to MAX_BODY_BYTES, and a ``receive`` that hands
        it on; None when the request was answered (413) or the client went away."""
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            await self._refuse(scope, receive, send, 413, b"request body too large")
            return None
        try:
            body = await read_body(receive, MAX_BODY_BYTES)
        except BodyTooLarge:
            await self._refuse(scope, receive, send, 413, b"request body too large")
            return None
        return None if body is None else replaying(body, receive)

    async def _redirect(self, scope: Scope, send: Send) -> None:
        target = self.origin + quote(scope.get("path", "/"), safe="/%:@!$&'()*+,;=-._~")
        query = scope.get("query_string", b"")
        if query:
            target += "?" + quote(query.decode("latin-1"), safe="=&%+-._~")
        await send(
            {
                "type": "http.response.start",
                "status": 308,
                "headers": [(b"location", target.encode("latin-1")), *self.headers],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, status: int, body: bytes
    ) -> None:
        if scope["type"] == "websocket":
            # Closing before accepting makes the server answer the handshake with 403.
            await receive()
            await send({"type": "websocket.close", "code": 1008})
            return
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"text/plain"), *self.headers],
            }
        )
        await send({"type": "http.response.body", "body": body})


def bind_sockets_to_pages(sio: Any, cookie: str) -> None:
    """Let a page's socket act for that page's browser only.

    NiceGUI runs a message on whichever page (client id) the message names, whatever
    socket carried it, and lets any socket join a page whose ids it gives. Those ids are
    no secret: they are in the page and in the socket's URL, so in proxies' logs. Here a
    socket joins a page only when it presents the cookie the page was built for, and its
    messages reach only the page it joined (NiceGUI matches a JavaScript answer to its
    request by the request's id, a random one sent to that page alone). ``sio`` is
    NiceGUI's Socket.IO server, its handlers registered already (call after
    ``ui.run_with``).
    """
    handlers = sio.handlers.get("/", {})
    names = ("connect", "handshake", "event", "javascript_response", "ack", "log")
    if any(name not in handlers for name in names):  # another NiceGUI: refuse to run unbound
        raise RuntimeError("NiceGUI's socket handlers are not where this version expects")
    connect, handshake = handlers["connect"], handlers["handshake"]

    def built_for(environ: Any, client_id: Any) -> bool:
        client = Client.instances.get(client_id) if isinstance(client_id, str) else None
        request = client.request if client is not None else None
        page = getattr(request.state, "agentauth_cookie_id", None) if request else None
        scope = environ.get("asgi.scope") if isinstance(environ, dict) else None
        given = read_cookie(Headers(scope=scope), cookie) if isinstance(scope, dict) else None
        return isinstance(page, str) and given is not None and hmac.compare_digest(page, given)

    async def on_connect(sid: str, environ: dict[str, Any], *rest: Any) -> Any:
        # Read as NiceGUI reads it (the first of repeated names), or a second
        # ``implicit_handshake`` would pass here and join there.
        query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        joining = query.get("implicit_handshake") == "true"
        if joining and not built_for(environ, query.get("client_id")):
            raise socket_errors.ConnectionRefusedError("not this browser's page")
        return await connect(sid, environ, *rest)

    async def on_handshake(sid: str, data: Any) -> Any:
        if not isinstance(data, dict) or not built_for(sio.get_environ(sid), data.get("client_id")):
            return False
        return await handshake(sid, data)

    def joined_only(handler: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
        # After a handshake the socket is in a room named after the page's client id.
        def on_message(sid: str, message: Any) -> Any:
            if isinstance(message, dict) and message.get("client_id") in sio.rooms(sid):
                return handler(sid, message)
            return None

        return on_message

    sio.on("connect", handler=on_connect)
    sio.on("handshake", handler=on_handshake)
    for name in names[2:]:
        if asyncio.iscoroutinefunction(handlers[name]):
            raise RuntimeError(f"NiceGUI's {name} handler is not the plain function expected")
        sio.on(name, handler=joined_only(handlers[name]))
