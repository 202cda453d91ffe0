"""The verifier's HTTP API: POST /v1/verify and an RFC 7662-style /v1/introspect.

Providers authenticate with ``Authorization: Basic base64(provider_id:secret)`` and can
only verify tokens whose audience is themselves, so nobody can burn an agent's proofs or
budget by verifying them first. A verification answers 200 with ``decision`` allow or
deny and a reason code; errors of the call itself (bad input, unknown caller) are 4xx.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from .._web import (
    Authentication,
    NoStore,
    answer_head,
    basic_credentials,
    error_response,
    expect_authentication,
    install_error_handlers,
    parsed_body,
)
from ..protocol import Unauthenticated
from ._service import Verifier, VerifyIn

__all__ = ["create_app"]

log = logging.getLogger("agentauth.verifier")

# Every route but /healthz is for providers, with their Basic credential: what a 401 asks for.
AUTHENTICATION = Authentication(realm="agentauth-verifier", schemes=("Basic",))
# RFC 7662 §2.3: an introspecting provider is an OAuth client, refused as RFC 6749 §5.2 has
# it (invalid_client). /v1/verify, no RFC 7662 endpoint, keeps unauthenticated.
INTROSPECTION = dataclasses.replace(AUTHENTICATION, introspection=True)


async def provider(request: Request) -> str:
    return await _authenticate(request.app.state.verifier, request.headers.get("authorization", ""))


async def _authenticate(verifier: Verifier, authorization: str) -> str:
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "basic":
        raise Unauthenticated("provider credentials required", reason="missing_credentials")
    return await verifier.authenticate_provider(*basic_credentials(value))


Provider = Annotated[str, Depends(provider)]


def _question(scope: Scope) -> VerifyIn:
    """The body BodyGuard parsed, whatever the Content-Type said: both routes that take
    one read it so, and so take the same bodies."""
    try:
        return VerifyIn.model_validate(parsed_body(scope))
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


async def _verify_answer(verifier: Verifier, authorization: str, scope: Scope) -> bytes:
    """POST /v1/verify from its Authorization header and the body BodyGuard parsed."""
    provider_id = await _authenticate(verifier, authorization)
    answer = await verifier.verify(provider_id, _question(scope))
    return json.dumps(answer, separators=(",", ":")).encode()


_JSON_HEADERS = [(b"content-type", b"application/json")]


class VerifyFastPath:
    """ASGI middleware that answers POST /v1/verify before FastAPI routes the request.

    The hot route's own work is a fraction of what FastAPI spends around it (routing,
    dependency resolution, Request and Response objects); measured on a replica, skipping
    that is about a fifth of its CPU per verification. It sits inside BodyGuard (the body
    is capped and parsed once) and answers errors through the same mapping as the
    handlers, so callers see no difference. Every other path goes to the app.
    """

    def __init__(self, app: ASGIApp, verifier: Verifier) -> None:
        self.app = app
        self.verifier = verifier

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or _route(scope) != "/v1/verify":
            await self.app(scope, receive, send)
            return
        authorization = ""
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        try:
            answer = await _verify_answer(self.verifier, authorization, scope)
        except Exception as exc:  # every failure gets its coded answer, as in the handlers
            refusal = error_response(exc, log, scope=scope, authentication=AUTHENTICATION)
            await refusal(scope, receive, send)
            return
        headers = [*_JSON_HEADERS, (b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer})


def _route(scope: Scope) -> str:
    """The path below the app's mount point (Serve mounts the app under its route prefix)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def create_app(verifier: Verifier) -> FastAPI:
    app = FastAPI(title="AgentAuth verifier", version="1")
    app.state.verifier = verifier

    # Added first, so it runs inside BodyGuard (Starlette wraps later middleware around it).
    app.add_middleware(VerifyFastPath, verifier=verifier)
    install_error_handlers(app, log, authentication=AUTHENTICATION)
    # Outermost of the three: the body guard's refusals are marked too. A decision or an
    # introspection answer tells the token's state now (RFC 7662 §4): a cache that kept an
    # allow would repeat it past a revocation, and the stats are one provider's.
    app.add_middleware(NoStore)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # Both routes read their body as _question does, so the OpenAPI document is told it.
    question = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/VerifyIn"}}},
        }
    }

    # VerifyFastPath answers this route before routing; the route stays for the OpenAPI
    # document (its schema is VerifyIn) and for Serve, which names a request's route for
    # its metrics from the app's routes. It answers the same way if reached.
    @app.post("/v1/verify", openapi_extra=question, response_class=Response)
    async def verify(request: Request) -> Response:
        authorization = request.headers.get("authorization", "")
        answer = await _verify_answer(verifier, authorization, request.scope)
        return Response(answer, media_type="application/json")

    @app.post("/v1/introspect", openapi_extra=question)
    async def introspect(request: Request) -> dict[str, Any]:
        """RFC 7662 shape: ``active`` true only when every check of /v1/verify passed."""
        expect_authentication(request.scope, INTROSPECTION)
        provider_id = await _authenticate(verifier, request.headers.get("authorization", ""))
        return await verifier.introspect(provider_id, _question(request.scope))

    plain_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        # No route takes VerifyIn as a parameter (both read it with _question), so FastAPI
        # would leave out the schema their bodies refer to.
        if app.openapi_schema is None:
            document = plain_openapi()
            schema = VerifyIn.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas = document.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(schema.pop("$defs", {}), VerifyIn=schema)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override

    @app.get("/v1/stats")
    async def stats(provider_id: Provider) -> dict[str, Any]:
        """This replica's counters: the caller's own decisions by reason, and the shard
        link's and revocation watcher's, which are about the replica, not any provider."""
        return {
            "decisions": verifier.decisions.of(provider_id),
            "batches": verifier.shards.batches,
            "checks": verifier.shards.checks,
            "checks_given_up": verifier.shards.given_up,
            "void_checks": verifier.shards.void_checks,
            "shard_overruns": verifier.shards.overruns,
            "shard_overruns_unacknowledged": verifier.shards.unacknowledged,
            "queue_depth": verifier.shards.queue_depth(),
            "revocations_fresh": verifier.revocations.fresh(),
        }

    answer_head(app)  # last: it serves the routes declared above
    return app
