"""The verifier's HTTP API: POST /v1/verify and an RFC 7662-style /v1/introspect.

Providers authenticate with ``Authorization: Basic base64(provider_id:secret)`` and can
only verify tokens whose audience is themselves, so nobody can burn an agent's proofs or
budget by verifying them first. A verification answers 200 with ``decision`` allow or
deny and a reason code; errors of the call itself (bad input, unknown caller) are 4xx.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from .._web import install_error_handlers, parsed_body
from ..protocol import Unauthenticated
from ._service import Verifier, VerifyIn

__all__ = ["create_app"]

log = logging.getLogger("agentauth.verifier")


async def provider(request: Request) -> str:
    verifier: Verifier = request.app.state.verifier
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        raise Unauthenticated("provider credentials required", reason="missing_credentials")
    try:
        provider_id, _, secret = (
            base64.b64decode(value.strip(), validate=True).decode().partition(":")
        )
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthenticated(
            "malformed Basic credentials", reason="bad_provider_credential"
        ) from None
    return await verifier.authenticate_provider(provider_id, secret)


Provider = Annotated[str, Depends(provider)]


def create_app(verifier: Verifier) -> FastAPI:
    app = FastAPI(title="AgentAuth verifier", version="1")
    app.state.verifier = verifier

    install_error_handlers(app, log)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    # The hot route validates and answers by hand: FastAPI's body parsing and response
    # encoding (a second JSON parse, jsonable_encoder) cost more than the rest of the
    # handler's own Python. The documented schema is the same VerifyIn.
    @app.post(
        "/v1/verify",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/VerifyIn"}}
                },
            }
        },
        response_class=Response,
    )
    async def verify(provider_id: Provider, request: Request) -> Response:
        try:
            body = VerifyIn.model_validate(parsed_body(request))
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        answer = await verifier.verify(provider_id, body)
        return Response(json.dumps(answer, separators=(",", ":")), media_type="application/json")

    @app.post("/v1/introspect")
    async def introspect(provider_id: Provider, body: VerifyIn) -> dict[str, Any]:
        """RFC 7662 shape: ``active`` true only when every check of /v1/verify passed."""
        answer = await verifier.verify(provider_id, body)
        active = answer["decision"] == "allow"
        result: dict[str, Any] = {"active": active}
        if active:
            token = verifier.tokens.verify(
                body.token,
                audience=verifier._providers[provider_id].audience,
                now=time.time(),
            )
            claims = token.claims
            result.update(
                sub=claims.sub,
                aud=claims.aud,
                iss=claims.iss,
                exp=claims.exp,
                iat=claims.iat,
                jti=claims.jti,
                cnf={"jkt": claims.cnf.jkt},
                token_type="DPoP",  # noqa: S106 - a token type name, not a secret
                grant_id=claims.grant_id,
                scope=" ".join(f"{c.kind}:{c.resource}" for c in claims.capabilities),
                remaining=answer.get("remaining"),
                audit_event=answer["audit_event"],
            )
        else:
            result["reason"] = answer["reason"]
        return result

    @app.get("/v1/stats")
    async def stats(_: Provider) -> dict[str, Any]:
        return {
            "decisions": dict(verifier.decisions),
            "batches": verifier.shards.batches,
            "checks": verifier.shards.checks,
            "queue_depth": verifier.shards.queue_depth(),
            "revocations_fresh": verifier.revocations.fresh(),
        }

    return app
