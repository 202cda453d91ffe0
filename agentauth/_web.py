"""HTTP plumbing shared by the registry and the verifier: input limits, error mapping, HEAD.

Every error leaves as ``{"error", "error_description", "reason"?}`` with its status; schema
failures are 400 with the failing fields; anything unexpected is logged here and answers
500 without details. Every 401 carries a ``WWW-Authenticate`` challenge for each scheme the
route accepts (``Authentication``), the error code on the one the caller tried. Every GET
route answers HEAD too (``answer_head``), and every 405 lists each method its path takes.
"""

from __future__ import annotations

import base64
import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._logs import Throttle, raised_at
from .protocol import (
    DPOP_ALGS,
    AgentAuthError,
    DependencyUnavailable,
    InvalidDPoPProof,
    InvalidRequest,
    InvalidToken,
    PayloadTooLarge,
    RateLimited,
    ReplayDetected,
    Unauthenticated,
    UseDPoPNonce,
    strict_json_loads,
)

__all__ = [
    "MAX_BODY_BYTES",
    "Authentication",
    "BodyGuard",
    "BodyTooLarge",
    "NoStore",
    "answer_head",
    "basic_credentials",
    "error_response",
    "expect_authentication",
    "install_error_handlers",
    "parsed_body",
    "read_body",
    "replaying",
]

# Where BodyGuard leaves the document it parsed, so a hot route need not parse it again.
_PARSED = "agentauth.parsed_body"

# The largest legitimate body is a grant request with 64 capabilities or a WebAuthn
# credential; 64 KiB is ample and keeps hostile bodies cheap to refuse.
MAX_BODY_BYTES = 64 * 1024


# Where a route's dependency leaves the Authentication it expects, for its errors' challenges.
_AUTHENTICATION = "agentauth.authentication"


@dataclass(frozen=True, slots=True)
class Authentication:
    """How a route's callers authenticate: what its 401s challenge for (RFC 9110 §11.6.1:
    a 401 carries at least one challenge).

    ``schemes``: ``"DPoP"``, ``"Bearer"``, ``"Basic"``, in the order offered.
    ``token_endpoint``: an authorization server's token endpoint, whose DPoP failures are
    RFC 6749 §5.2 error responses, 400 without a challenge (RFC 9449 §5 and §8), coded
    ``invalid_dpop_proof`` (a replay too, its reason kept) or ``use_dpop_nonce``. A caller
    that did not authenticate is §5.2's ``invalid_client``: 400 for a proof by a key of no
    agent, 401 with the challenge when it sent no proof (saying which scheme to use).
    ``introspection``: an RFC 7662 endpoint, whose caller that did not authenticate gets
    §5.2's ``invalid_client`` too (RFC 7662 §2.3), always 401 with the challenge.
    """

    realm: str
    schemes: tuple[str, ...]
    token_endpoint: bool = False
    introspection: bool = False


def expect_authentication(scope: Scope, authentication: Authentication) -> None:
    """Record, before the caller is authenticated, how this route authenticates: the
    challenges of a 401 it answers follow it instead of the app's."""
    scope[_AUTHENTICATION] = authentication


# Proof failures, whatever their code: a replayed proof is an invalid one (RFC 9449 §11.1).
_PROOF_ERRORS = (InvalidDPoPProof, ReplayDetected)


def _presented(scope: Scope | None) -> str | None:
    """The scheme of the credentials a request carried, as the registry reads them (a DPoP
    proof first, then Authorization), in lower case; None when it carried none."""
    if scope is None:
        return None
    authorization = None
    for name, value in scope.get("headers", ()):
        if name == b"dpop":
            return "dpop"
        if name == b"authorization":
            authorization = value.decode("latin-1").partition(" ")[0].lower()
    return authorization or None


def _error_code(exc: AgentAuthError, scheme: str) -> str | None:
    """The ``error`` parameter for the challenge of the scheme the caller tried."""
    if scheme == "basic":
        return None  # RFC 7617 defines no error parameter
    if isinstance(exc, InvalidDPoPProof):
        return exc.error  # invalid_dpop_proof, use_dpop_nonce (RFC 9449 §7.1, §9)
    if isinstance(exc, InvalidToken):
        return exc.error
    if isinstance(exc, ReplayDetected):
        return "invalid_dpop_proof"
    # The credential of that scheme did not authenticate (an unknown agent key, an ended
    # session, a wrong admin token).
    return {"dpop": "invalid_dpop_proof", "bearer": "invalid_token"}.get(scheme)


def _challenges(exc: AgentAuthError, auth: Authentication, presented: str | None) -> str:
    """One challenge per scheme the route accepts (a DPoP one too for a proof failure). The
    scheme the caller tried carries the error code; with no credentials at all none does
    (RFC 6750 §3.1, applied to DPoP by RFC 9449 §7.1)."""
    schemes = list(auth.schemes)
    if isinstance(exc, _PROOF_ERRORS) and "DPoP" not in schemes:
        schemes.insert(0, "DPoP")
    challenges = []
    for scheme in schemes:
        params = [f'realm="{auth.realm}"']
        if scheme == "Basic":
            params.append('charset="UTF-8"')  # RFC 7617 §2.1: credentials are UTF-8
        code = _error_code(exc, scheme.lower()) if scheme.lower() == presented else None
        if code is not None:
            params.append(f'error="{code}"')
        if scheme == "DPoP":
            params.append(f'algs="{" ".join(DPOP_ALGS)}"')  # RFC 9449 §7.1
        challenges.append(f"{scheme} {', '.join(params)}")
    return ", ".join(challenges)


def _error_response(
    exc: AgentAuthError, scope: Scope | None = None, auth: Authentication | None = None
) -> JSONResponse:
    headers = {}
    if isinstance(exc, UseDPoPNonce):
        headers["DPoP-Nonce"] = exc.nonce
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(exc.retry_after)
    if scope is not None:
        auth = scope.get(_AUTHENTICATION, auth)
    status = exc.status_hint
    body = exc.to_dict()
    if status >= 500:
        # A failure of this server or of what it depends on: its own words can name files,
        # users, hosts or a token file's path (a key backend's), which are the server log's
        # (error_response says them there), not a client's. The code and reason stay.
        body["error_description"] = type(exc).default_description
    presented = _presented(scope)
    if auth is not None and auth.token_endpoint and isinstance(exc, _PROOF_ERRORS):
        status = 400  # RFC 9449 §5: an RFC 6749 §5.2 error response
        if isinstance(exc, ReplayDetected):
            # §5.2 allows only registered codes there, and RFC 9449 §12.2 registers
            # invalid_dpop_proof for any proof refused; the reason still says replay.
            body["error"] = "invalid_dpop_proof"
    elif (
        auth is not None
        and (auth.token_endpoint or auth.introspection)
        and isinstance(exc, Unauthenticated)
    ):
        # §5.2's code for a client that did not authenticate; the reason says why. A token
        # endpoint's 401 is for clients that tried no scheme of its own (none, or
        # Authorization); introspection takes no proof, and its 401 is for every caller.
        body["error"] = "invalid_client"
        if auth.token_endpoint and presented == "dpop":
            status = 400
        else:
            headers["WWW-Authenticate"] = _challenges(exc, auth, presented)
    elif status == 401:
        auth = auth or Authentication(realm="agentauth", schemes=("DPoP",))
        headers["WWW-Authenticate"] = _challenges(exc, auth, presented)
    return JSONResponse(body, status_code=status, headers=headers)


class BodyGuard:
    """ASGI middleware: caps request bodies and refuses JSON with duplicate members, and
    sends the answer to a HEAD without its body.

    FastAPI's parser keeps the last of duplicate members; a security document must mean
    one thing, so such bodies never reach it. Bodies are buffered (they are small).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # DELETE is screened too: a passkey removal carries its assertion in the body.
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            if scope.get("method") == "HEAD":
                # On this branch, not in a middleware of its own, so that POST /v1/verify
                # pays nothing for it.
                send = _without_body(send)
            await self.app(scope, receive, send)
            return
        try:
            body = await read_body(receive, MAX_BODY_BYTES)
        except BodyTooLarge:
            await _send_json(send, PayloadTooLarge("the request body is too large"))
            return
        if body is None:
            return
        if body:
            try:
                # strict_json_loads refuses unpaired surrogates itself. U+0000 can only be
                # spelled as a \u escape (strict JSON refuses it raw), so a body without a
                # backslash needs no walk, and most have none (tokens and proofs are
                # base64url). A one-byte search is a memchr: 0.2 µs on a verify body,
                # against 1.4 for b"\\u" and 1.8 to walk.
                document = strict_json_loads(body)
                if b"\\" in body:
                    _storable(document)
                scope[_PARSED] = document
            except InvalidRequest as exc:
                await _send_json(
                    send, InvalidRequest(f"body: {exc.description}", reason="bad_json")
                )
                return
        await self.app(scope, replaying(body, receive), send)


class BodyTooLarge(Exception):
    """A request body past the reader's limit (``read_body``)."""


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """A request's whole body, read no further than ``limit`` bytes (``BodyTooLarge``
    past it); None when the client went away first."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _without_body(send: Send) -> Send:
    """A ``send`` that drops the content of the answer and keeps its headers, Content-Length
    included: a HEAD's answer is its GET's without the content (RFC 9110 §9.3.2). Servers
    drop it too; done here, it does not depend on which one runs the app."""

    async def bodiless(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            message = {**message, "body": b""}
        await send(message)

    return bodiless


def replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app ``body``, read already, then what follows it."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# What NoStore adds to every answer (one request's data, never for a cache to keep).
_NO_STORE = {"cache-control": "no-store", "pragma": "no-cache"}
_NO_STORE_LINES = [(name.encode(), value.encode()) for name, value in _NO_STORE.items()]


class NoStore:
    """ASGI middleware: every answer carries ``Cache-Control: no-store`` (and HTTP/1.0's
    ``Pragma: no-cache``).

    RFC 6749 §5.1 requires it of a token response, and the registry hands out other
    secrets too: session tokens, enrollment and recovery codes, provider secrets, step-up
    approval references. The verifier's decisions and introspection answers tell what a
    token may do now (RFC 7662 §4): a kept allow would outlive a revocation. Marking every
    answer, instead of a list of routes, cannot miss a route added later; the rest are one
    caller's data or, for the public documents (JWKS, audit keys), must show a key rotation
    at once. (Starlette sends a 500 from outside every middleware: ``error_response`` marks
    that one itself.)
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (name, value)
                    for name, value in message.get("headers", [])
                    if name.lower() not in (b"cache-control", b"pragma")
                ]
                headers += _NO_STORE_LINES
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, marked)


def _storable(document: Any) -> Any:
    """Refuse strings PostgreSQL cannot store (U+0000, which JSON's \\u escapes can spell):
    no field needs it, and refused here it cannot reach a query as a 500. (Unpaired
    surrogates, which UTF-8 cannot encode, never get this far: the parser refuses them.)"""
    stack = [document]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                raise InvalidRequest("strings may not hold U+0000")
        elif isinstance(value, dict):
            stack.extend(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return document


def basic_credentials(value: str) -> tuple[str, str]:
    """A provider's ``Authorization: Basic`` value as (id, secret); anything that is not
    base64 of UTF-8 (not base64, not even ASCII, bytes that do not decode: all ValueError)
    is refused as a bad credential, never a 500.

    The id and the secret are taken as they are (RFC 7617) or form-encoded, as RFC 6749
    §2.3.1 has an OAuth client send them (RFC 7662 §2.1's protected resource is one):
    such a client sends ``billing%40acme`` for the id ``billing@acme``. Neither an id nor a
    secret the registry issues can hold ``%`` or ``+``, so decoding changes none of them
    as sent raw."""
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
        provider_id, _, secret = decoded.partition(":")
        return _form_decoded(provider_id), _form_decoded(secret)
    except ValueError:
        raise Unauthenticated(
            "malformed Basic credentials", reason="bad_provider_credential"
        ) from None


def _form_decoded(text: str) -> str:
    """application/x-www-form-urlencoded's decoding of one value, strict UTF-8 (the
    decoding of bytes that are not UTF-8 raises ValueError, not a replacement character)."""
    if "%" not in text and "+" not in text:
        return text
    return unquote_to_bytes(text.replace("+", " ")).decode()


def parsed_body(scope: Scope) -> object:
    """The JSON document of a request that passed BodyGuard (duplicates refused already).

    Raises InvalidRequest for an empty body.
    """
    if _PARSED not in scope:
        raise InvalidRequest("a JSON body is required", reason="bad_json")
    return scope[_PARSED]


async def _send_json(send: Send, exc: AgentAuthError) -> None:
    response = _error_response(exc)
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        }
    )
    await send({"type": "http.response.body", "body": response.body})


def _schema_error(errors: Sequence[Any]) -> JSONResponse:
    """400 ``schema`` with the first failing fields (pydantic's ``errors()`` entries)."""
    details = [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))}
        for e in errors[:20]
    ]
    body = InvalidRequest("the request does not match its schema", reason="schema").to_dict()
    return JSONResponse({**body, "details": details}, status_code=400)


# A dependency down fails every request alike: one line per kind of failure per period.
_SAID = Throttle(30.0)


def error_response(
    exc: Exception,
    log: logging.Logger,
    *,
    scope: Scope | None = None,
    authentication: Authentication | None = None,
) -> JSONResponse:
    """The one answer for any exception a request raised: its code, status and headers,
    never details of an unexpected failure (those go to the server log). ``scope`` is the
    request's (the credentials it carried, the route's Authentication if it set one);
    ``authentication`` the app's, for routes that set none."""
    if isinstance(exc, AgentAuthError):
        if exc.status_hint >= 500:
            key = (log.name, exc.error, exc.reason)
            _SAID.log(log, key, "request failed: %s (%s)", exc.error, exc.description)
        return _error_response(exc, scope, authentication)
    if isinstance(exc, RequestValidationError):
        return _schema_error(exc.errors())
    if isinstance(exc, ValidationError):
        return _error_response(InvalidRequest("invalid document", reason="schema"))
    if isinstance(exc, StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        # Its headers are part of the answer: a 405's Allow, which RFC 9110 §15.5.6 requires.
        headers = exc.headers
        allowed = _allowed(scope) if exc.status_code == 405 and scope is not None else None
        if allowed:
            headers = {**(headers or {}), "Allow": allowed}
        return JSONResponse(
            {"error": code, "error_description": str(exc.detail)}, exc.status_code, headers
        )
    if isinstance(exc, _DEPENDENCY_ERRORS):
        # A database or network failure outside a guarded path is still a dependency
        # failure: 503, never a 500 with details.
        _SAID.log(log, (log.name, type(exc)), "dependency failure: %s", type(exc).__name__)
        return _error_response(DependencyUnavailable())
    # Details stay in the server log, once per period for each place a bug is raised: a
    # request that reaches one can be sent again and again, and each traceback is
    # kilobytes (the 500s are answered all the same).
    _SAID.log(
        log,
        (log.name, type(exc), raised_at(exc)),
        "unexpected error",
        level=logging.ERROR,
        exc_info=exc,
    )
    # Starlette answers this one from its outermost layer, outside any middleware, NoStore
    # included: the mark is set here for it.
    return JSONResponse(
        {"error": "server_error", "error_description": "internal error"}, 500, _NO_STORE
    )


_DEPENDENCY_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # What a server refusing or ending connections sends: starting up, shutting down
    # (SQLSTATE class 57), too many clients, out of memory or disk (class 53).
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)


class _AnswerUnexpected:
    """ASGI middleware: answers an exception no handler took (a bug) with
    ``error_response``'s 500, and raises it no further.

    Left to Starlette, its outermost layer answers the same 500 and then raises the
    exception again for the server to log (uvicorn's "Exception in ASGI application",
    Serve's failed request): a traceback per request, written around ``error_response``'s
    throttle, for anyone who finds such a request to repeat at will.
    """

    def __init__(self, app: ASGIApp, log: logging.Logger, authentication: Authentication) -> None:
        self.app = app
        self.log = log
        self.authentication = authentication

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if started:
                raise  # an answer half sent cannot be replaced: the server ends it
            answer = error_response(exc, self.log, scope=scope, authentication=self.authentication)
            await answer(scope, receive, send)


def _allowed(scope: Scope) -> str | None:
    """Every method the request's path takes, for a 405's ``Allow`` (RFC 9110 §10.2.1).
    Starlette names the methods of the first route of the path only, which leaves out the
    others': the HEAD twins ``answer_head`` adds, a POST route beside a GET one. None
    outside an app's routing."""
    app: Any = scope.get("app")
    if app is None:
        return None
    methods: set[str] = set()
    for route in app.routes:
        if route.matches(scope)[0] is not Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


def answer_head(app: FastAPI) -> None:
    """Make every GET route of ``app`` answer HEAD as it answers GET: RFC 9110 §9.1 requires
    HEAD of a general-purpose server, and FastAPI's routes, unlike Starlette's, do not take
    it. Call it once the routes are declared.

    Each GET route gets a twin for HEAD: the same handler, dependencies included, so the
    same authentication, status, headers and errors (BodyGuard drops the content). A twin,
    not HEAD added to the route's methods, keeps HEAD out of the OpenAPI document, where
    it would repeat every GET operation under its operationId. The twins come last, so a
    route declared for HEAD itself would still be the one to answer it.
    """
    routes = app.router.routes
    for route in list(routes):
        if isinstance(route, APIRoute) and "GET" in (route.methods or ()):
            twin = copy.copy(route)
            twin.methods = {"HEAD"}
            twin.include_in_schema = False
            routes.append(twin)


def install_error_handlers(
    app: FastAPI, log: logging.Logger, *, authentication: Authentication
) -> None:
    """Map every exception to the one error body, and refuse bodies we will not parse.
    ``authentication``: how the app's callers authenticate, unless a route says otherwise
    (``expect_authentication``)."""
    # Added first, so it runs inside BodyGuard (Starlette wraps later middleware around it).
    app.add_middleware(_AnswerUnexpected, log=log, authentication=authentication)
    app.add_middleware(BodyGuard)

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return error_response(exc, log, scope=request.scope, authentication=authentication)

    for kind in (
        AgentAuthError,
        RequestValidationError,
        ValidationError,
        StarletteHTTPException,
        *_DEPENDENCY_ERRORS,
        Exception,
    ):
        app.add_exception_handler(kind, handle)
