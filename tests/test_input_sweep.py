"""Every registry endpoint, sent bad input by every kind of caller, answers a 4xx with an
error code and writes nothing: never a 500, never a stack trace. The operations come from
the live registry's own OpenAPI document, so an endpoint added later is swept too."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import pytest
from registry_world import World

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.redis]

# Path segments that are not ids: unknown, huge, control and bidi characters, bytes that are
# not UTF-8, traversal, SQL, numbers out of range.
SEGMENTS = (
    "nope",
    "x" * 3000,
    "%00",
    "%FF%FE",
    "%E2%80%AE",
    "..%2F..%2Fetc",
    "'%20OR%201=1--",
    "-1",
    "99999999999999999999999",
)
# Bodies no endpoint accepts: not JSON, not an object, bytes that are not UTF-8, nesting
# deeper than any parser's recursion, a number out of float range, a lone surrogate, and
# an object with every member missing.
BODIES = (
    b"{not json",
    b"[]",
    b"null",
    b'"text"',
    b"\xff\xfe{}",
    b"[" * 30_000 + b"]" * 30_000,  # under the 64 KiB cap: the parser sees it
    b'{"a": ' * 9_000 + b"1" + b"}" * 9_000,
    b'{"a": 1e999}',
    b'{"a": "\\ud800"}',
    b"{}",
)
QUERY_VALUES = ("", "%00", "x" * 3000, "-1", "abc", "1e999", "nan", "99999999999999999999999")
# Endpoints that anyone may call with no input (public documents, starting a sign-in):
# they answer 200 by design, so only their bad input is swept.
PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/.well-known/jwks.json"),
    ("GET", "/.well-known/agentauth-audit-keys.json"),
    ("GET", "/.well-known/agentauth-configuration"),
    ("POST", "/v1/sessions/begin"),
}
# Tables a background task of the registry writes on its own schedule (audit_nodes with each
# checkpoint, and as a cache that proofs fill in for chains checkpointed before it existed).
BACKGROUND = {"audit_checkpoints", "audit_nodes", "schema_migrations"}

Send = Callable[[str, str, dict[str, Any]], Awaitable[httpx.Response]]


async def table_counts(db: asyncpg.Connection) -> dict[str, int]:
    tables = await db.fetch(
        "SELECT table_name FROM information_schema.tables"
        " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
    )
    names = sorted(t["table_name"] for t in tables if t["table_name"] not in BACKGROUND)
    assert "audit_events" in names and "grants" in names
    return {n: await db.fetchval(f'SELECT count(*) FROM "{n}"') for n in names}


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    found = []
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            found.append((method.upper(), path, operation))
    return found


def with_segment(path: str, segment: str) -> str:
    return re.sub(r"\{[^}]+\}", segment, path)


def unstorable(document: dict[str, Any], operation: dict[str, Any]) -> list[bytes]:
    """Bodies of the operation's own shape whose every required member is a string
    PostgreSQL cannot store (U+0000) or UTF-8 cannot carry (a lone surrogate)."""
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    ref = schema.get("$ref") or next(
        (s["$ref"] for s in schema.get("anyOf", []) if "$ref" in s), None
    )
    if ref is None:
        return []
    model = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    names = model.get("required") or list(model.get("properties", {}))[:1]
    return [
        b"{" + b", ".join(b'"%s": "%s"' % (n.encode(), text) for n in names) + b"}"
        for text in (b"a\\u0000b", b"a\\ud800b")
    ]


def bad_requests(
    method: str, path: str, operation: dict[str, Any], document: dict[str, Any]
) -> list[tuple[str, bytes]]:
    """(path with query, body) pairs, each bad in at least one place a request can be."""
    in_path = [p for p in operation.get("parameters", []) if p["in"] == "path"]
    in_query = [p["name"] for p in operation.get("parameters", []) if p["in"] == "query"]
    has_body = "requestBody" in operation
    cases: list[tuple[str, bytes]] = []
    if in_path:
        cases += [(with_segment(path, s), b"{}" if has_body else b"") for s in SEGMENTS]
    if has_body:
        target = with_segment(path, "nope") if in_path else path
        cases += [(target, body) for body in (*BODIES, *unstorable(document, operation))]
    for name in in_query:
        target = with_segment(path, "nope")
        others = "".join(f"&{o}=1" for o in in_query if o != name)
        cases += [(f"{target}?{name}={value}{others}", b"") for value in QUERY_VALUES]
    if method == "GET" and in_query:
        # Every query parameter at once, and one given twice.
        target = with_segment(path, "nope")
        both = "&".join(f"{n}=a&{n}=b" for n in in_query)
        cases.append((f"{target}?{both}", b""))
    return cases


def refused_cleanly(r: httpx.Response, method: str) -> str | None:
    """Why this answer is not a clean 4xx with an error code, or None if it is. A read that
    finds nothing (a filter matching no row: the admin's audit query for an id that is
    well formed but unknown) may also answer an empty list."""
    if method == "GET" and r.status_code == 200 and r.content.strip() == b"[]":
        return None
    if not 400 <= r.status_code < 500:
        return f"status {r.status_code}"
    try:
        payload = r.json()
    except ValueError:
        return f"status {r.status_code} without a JSON body: {r.text[:120]!r}"
    if not isinstance(payload, dict) or not isinstance(payload.get("error"), str):
        return f"status {r.status_code} without an error code: {r.text[:120]!r}"
    if payload["error"] == "server_error" or "Traceback" in r.text:
        return f"status {r.status_code} server error: {r.text[:120]!r}"
    return None


@pytest.mark.asyncio
async def test_every_endpoint_refuses_bad_input_from_every_caller_and_writes_nothing(
    world: World, db: asyncpg.Connection
) -> None:
    r = await world.client.get(world.url("/openapi.json"))
    assert r.status_code == 200, r.text
    document = r.json()
    swept = operations(document)
    assert len(swept) >= 40  # the document lists the whole API, not a part

    human = await world.human("Sweeper")
    agent = await world.agent(human)
    provider = await world.provider()

    def plain(headers: dict[str, str]) -> Send:
        async def send(method: str, path: str, kwargs: dict[str, Any]) -> httpx.Response:
            return await world.client.request(
                method, world.url(path), headers={**headers, **kwargs.pop("headers", {})}, **kwargs
            )

        return send

    async def as_agent(method: str, path: str, kwargs: dict[str, Any]) -> httpx.Response:
        return await world.as_agent(agent, method, path, **kwargs)

    callers: dict[str, Send] = {
        "anonymous": plain({}),
        "admin": plain(world.admin),
        "human": plain(human.headers),
        "provider": plain(provider.headers),
        "agent": as_agent,
    }
    before = await table_counts(db)
    failures: list[str] = []
    sent = 0
    for method, path, operation in swept:
        requests = bad_requests(method, path, operation, document)
        for caller, send in callers.items():
            # With no input to get wrong, a caller allowed to act would act (rotate a key,
            # sign out): only a caller with no credentials is sent those, and must be refused.
            todo = requests or (
                [] if caller != "anonymous" or (method, path) in PUBLIC else [(path, b"")]
            )
            for target, body in todo:
                kwargs: dict[str, Any] = {}
                if body:
                    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}}
                answer = await send(method, target, kwargs)
                sent += 1
                why = refused_cleanly(answer, method)
                if why:
                    failures.append(f"{caller} {method} {target[:80]} {body[:24]!r}: {why}")
    assert not failures, "\n".join(failures[:40])
    assert sent > 1000
    assert await table_counts(db) == before


def basic(user: bytes, secret: bytes = b"s") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(user + b":" + secret).decode()}


# Credentials no caller has: a provider id with a NUL byte, bytes that are not UTF-8, a
# huge one, a Basic value that is not ASCII, a scheme without credentials, a DPoP header
# that is not a JWT, two of them.
BAD_CREDENTIALS: tuple[dict[str, str] | dict[str, bytes] | list[tuple[str, str]], ...] = (
    basic(b"\x00prov"),
    basic(b"\xff\xfe"),
    basic(b"p" * 5000),
    basic(b"", b""),
    {"Authorization": "Basic !!!"},
    {"Authorization": "Basic été".encode()},  # not ASCII: base64 cannot even read it
    {"Authorization": "Bearer"},
    {"Authorization": "Bearer " + "t" * 5000},
    {"Authorization": "Negotiate abc"},
    {"DPoP": "not.a.jwt"},
    {"DPoP": "e30." * 3000},
    [("DPoP", "a.b.c"), ("DPoP", "a.b.c")],
)


@pytest.mark.asyncio
async def test_every_endpoint_refuses_bad_credentials_cleanly(
    world: World, db: asyncpg.Connection
) -> None:
    r = await world.client.get(world.url("/openapi.json"))
    swept = [op for op in operations(r.json()) if (op[0], op[1]) not in PUBLIC]
    before = await table_counts(db)
    failures = []
    for method, path, _ in swept:
        for headers in BAD_CREDENTIALS:
            answer = await world.client.request(
                method, world.url(with_segment(path, "nope")), headers=headers
            )
            if answer.status_code not in (400, 401, 403) or refused_cleanly(answer, method):
                failures.append(f"{method} {path} {str(headers)[:60]}: {answer.status_code}")
    assert not failures, "\n".join(failures[:40])
    assert await table_counts(db) == before


# Values no field of a verification accepts as meaning anything: each goes into one field
# of an otherwise good request, whose token and proof are live.
ODD_TEXT = ("", " ", "x" * 5000, "\x00", "\ud800", "\u202e", "😀", "a\nb", "../../", "*", "null")
ODD_ACTIONS: tuple[Any, ...] = (
    {},
    [],
    "read",
    {"kind": "read"},
    {"kind": "teleport", "resource": "things/1"},
    {"kind": "read", "resource": "things/1", "amount": "1"},
    {"kind": "custom", "resource": "things/1"},
    {"kind": "transact", "resource": "things/1", "amount": "1e999", "currency": "USD"},
    {"kind": "transact", "resource": "things/1", "amount": "-1", "currency": "USD"},
    {"kind": "transact", "resource": "things/1", "amount": "NaN", "currency": "USD"},
    {"kind": "transact", "resource": "things/1", "amount": "1e-999999", "currency": "USD"},
    {"kind": "transact", "resource": "things/1", "amount": 5, "currency": "USD"},
    {"kind": "transact", "resource": "things/1", "amount": "5", "currency": "usd"},
    {"kind": "transact", "resource": "things/1", "amount": "5", "currency": "X" * 500},
    # Finer than the currency's minor unit: parses, and is denied (amount_precision).
    {"kind": "transact", "resource": "things/1", "amount": "0.005", "currency": "USD"},
    {"kind": "transact", "resource": "things/1", "amount": "1.5", "currency": "JPY"},
    *({"kind": "read", "resource": text} for text in ODD_TEXT),
)


@pytest.mark.asyncio
async def test_the_verifier_refuses_bad_input_cleanly_and_never_allows_it(
    world: World, verifier_base: str
) -> None:
    from agentauth.protocol import Capability, create_dpop_proof

    api = "https://api.example/v1/things"
    _, agent, provider, grant = await world.setup_grant(
        capabilities=[Capability.read("things/*").to_document()]
    )
    r = await world.token(agent, grant["id"])
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]

    def good() -> dict[str, Any]:
        proof = create_dpop_proof(
            agent.key, htm="GET", htu=api, now=time.time(), access_token=token
        )
        action = {"kind": "read", "resource": "things/1"}
        return {"token": token, "proof": proof, "method": "GET", "url": api, "action": action}

    bodies: list[Any] = []
    for field in ("token", "proof", "method", "url", "step_up_ref"):
        odd = (*ODD_TEXT, 1, [], {}) if field == "step_up_ref" else (*ODD_TEXT, 1, None, [], {})
        bodies += [{**good(), field: value} for value in odd]
    bodies += [{**good(), "action": action} for action in ODD_ACTIONS]
    bodies += [{**good(), "extra": 1}, {k: v for k, v in good().items() if k != "action"}]
    failures = []
    for route in ("/v1/verify", "/v1/introspect"):
        for body in bodies:
            # json.dumps escapes what UTF-8 cannot carry (a lone surrogate), as a client may.
            r = await world.client.post(
                verifier_base + route,
                headers={**provider.headers, "Content-Type": "application/json"},
                content=json.dumps(body).encode(),
            )
            if r.status_code == 200:
                answer = r.json()
                if answer.get("decision") == "allow" or answer.get("active") is True:
                    failures.append(f"{route} allowed {str(body)[-90:]}")
            elif refused_cleanly(r, "POST"):
                failures.append(f"{route} {str(body)[-90:]}: {refused_cleanly(r, 'POST')}")
        for raw in BODIES:
            r = await world.client.post(
                verifier_base + route,
                headers={**provider.headers, "Content-Type": "application/json"},
                content=raw,
            )
            if refused_cleanly(r, "POST"):
                failures.append(f"{route} {raw[:24]!r}: {r.status_code} {r.text[:80]}")
        for headers in BAD_CREDENTIALS:
            r = await world.client.post(verifier_base + route, headers=headers, json=good())
            if r.status_code not in (400, 401, 403) or refused_cleanly(r, "POST"):
                failures.append(f"{route} {str(headers)[:60]}: {r.status_code} {r.text[:80]}")
    assert not failures, "\n".join(failures[:40])
    # The good request itself is allowed: the bad ones were refused for what was bad in them.
    r = await world.client.post(verifier_base + "/v1/verify", headers=provider.headers, json=good())
    assert r.json()["decision"] == "allow", r.text


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"a": "plain"}', 200),
        (b'{"a": "x\x00y"}', 400),  # raw: strict JSON refuses control characters
        (b'{"a": "x\\u0000y"}', 400),
        (b'{"a": ["ok", {"b": "\\ud800"}]}', 400),  # nested, a lone surrogate
        (b'{"\\u0000": 1}', 400),  # in a member name
        (b'{"a": "\\ud83d\\ude00"}', 200),  # a pair is a character
        (b'{"a": "\\\\u0000"}', 200),  # an escaped backslash, then the text u0000
    ],
)
@pytest.mark.asyncio
async def test_body_guard_refuses_what_postgresql_cannot_store(body: bytes, status: int) -> None:
    from starlette.responses import JSONResponse

    from agentauth._web import BodyGuard, parsed_body

    async def echo(scope: Any, receive: Any, send: Any) -> None:
        await JSONResponse({"parsed": parsed_body(scope)})(scope, receive, send)

    transport = httpx.ASGITransport(app=BodyGuard(echo))
    async with httpx.AsyncClient(transport=transport, base_url="http://guard") as client:
        r = await client.post("/", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    if status == 200:
        assert r.json()["parsed"] == json.loads(body)
    else:
        assert r.json()["reason"] == "bad_json"


def test_the_registry_checks_a_proof_against_the_path_as_the_agent_sent_it() -> None:
    """RFC 9449 compares the URL the client used; ASGI's ``path`` is percent-decoded, so an
    encoded slash or space must come from ``raw_path`` (a proof for ``/a/b`` is not one for
    ``/a%2Fb``). The mount prefix (``root_path``) is not part of the issuer's URLs."""
    from types import SimpleNamespace

    from starlette.requests import Request

    from agentauth.registry._http import htu_of

    registry = SimpleNamespace(settings=SimpleNamespace(issuer="https://registry.example/"))
    app = SimpleNamespace(state=SimpleNamespace(registry=registry))

    def htu(path: str, raw: bytes | None, root: str = "") -> str:
        scope: dict[str, Any] = {"type": "http", "path": path, "root_path": root, "app": app}
        if raw is not None:
            scope["raw_path"] = raw
        return htu_of(Request(scope))

    assert htu("/v1/a/b", b"/v1/a%2Fb") == "https://registry.example/v1/a%2Fb"
    assert htu("/v1/my notes", b"/v1/my%20notes") == "https://registry.example/v1/my%20notes"
    assert htu("/registry/v1/x", b"/registry/v1/x", "/registry") == "https://registry.example/v1/x"
    assert htu("/v1/x", None) == "https://registry.example/v1/x"  # a server without raw_path
