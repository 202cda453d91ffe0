"""A reference verifier written the way a provider would without AgentAuth.

    AGENTAUTH_REF_JWKS_URL=http://.../registry/.well-known/jwks.json \\
    AGENTAUTH_REF_ISSUER=http://.../registry AGENTAUTH_REF_AUDIENCE=https://prov.example \\
    AGENTAUTH_REF_REDIS_URL=redis://127.0.0.1:6379/0 \\
    python -m uvicorn --app-dir bench --factory reference_verifier:create_app --port 8124

FastAPI + PyJWT + Redis, one uvicorn worker. Per request: the access token's ES256
signature against the registry's JWKS (fetched once at start), its issuer, audience and
times; the DPoP proof's signature with the JWK embedded in its header, its htm, htu, iat,
ath and the token's cnf.jkt; a capability covering the action; then ``SET NX`` on the
proof's jti in Redis. Nothing is cached between requests and nothing is audited: this is the
baseline the issue measured (about 680 req/s at 16 connections), not a secure design.
It takes the same JSON body as the AgentAuth verifier so the same load files drive both.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import os
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import redis.asyncio as aioredis
from fastapi import FastAPI
from pydantic import BaseModel

ACCESS_TOKEN_TYP = "aat+jwt"
DPOP_TYP = "dpop+jwt"
PROOF_MAX_AGE = 60
PROOF_FUTURE_SKEW = 10


class ActionIn(BaseModel):
    kind: str
    resource: str


class VerifyIn(BaseModel):
    token: str
    proof: str
    method: str
    url: str
    action: ActionIn


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638: SHA-256 over the required members, sorted, no whitespace."""
    required = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return _b64url(hashlib.sha256(canonical.encode()).digest())


def _htu(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path or '/'}"


def create_app() -> FastAPI:
    env = os.environ
    issuer = env["AGENTAUTH_REF_ISSUER"]
    audience = env["AGENTAUTH_REF_AUDIENCE"]
    jwks = jwt.PyJWKSet.from_dict(httpx.get(env["AGENTAUTH_REF_JWKS_URL"], timeout=10).json())
    keys = {key.key_id: key for key in jwks.keys}
    # redis-py's async pool fails a command outright ("Too many connections", a 500 here)
    # once 100 are in use, which open-loop load past 100 requests in flight reaches; a user
    # would make requests wait for a connection instead, as this pool of the same size does.
    redis = aioredis.Redis(
        connection_pool=aioredis.BlockingConnectionPool.from_url(
            env["AGENTAUTH_REF_REDIS_URL"], max_connections=100, timeout=5
        )
    )
    app = FastAPI(title="reference verifier")

    def deny(reason: str) -> dict[str, str]:
        return {"decision": "deny", "reason": reason}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/verify")
    async def verify(body: VerifyIn) -> dict[str, str]:
        now = time.time()
        try:
            header = jwt.get_unverified_header(body.token)
            key = keys.get(header.get("kid", ""))
            if key is None or header.get("typ") != ACCESS_TOKEN_TYP:
                return deny("bad_token")
            claims = jwt.decode(
                body.token,
                key.key,
                algorithms=["ES256"],
                audience=audience,
                issuer=issuer,
                options={"require": ["exp", "iat", "nbf", "jti", "cnf"]},
            )
            proof_header = jwt.get_unverified_header(body.proof)
            if proof_header.get("typ") != DPOP_TYP or "jwk" not in proof_header:
                return deny("bad_proof")
            proof_key = jwt.PyJWK(proof_header["jwk"])
            if proof_key.algorithm_name != proof_header.get("alg"):
                return deny("bad_proof")
            proof = jwt.decode(
                body.proof,
                proof_key.key,
                algorithms=[proof_key.algorithm_name],
                options={"require": ["iat", "jti", "htm", "htu"], "verify_iat": False},
            )
        except (jwt.PyJWTError, ValueError, KeyError):
            return deny("invalid")
        if proof["htm"] != body.method or _htu(proof["htu"]) != _htu(body.url):
            return deny("proof_mismatch")
        if not now - PROOF_MAX_AGE <= proof["iat"] <= now + PROOF_FUTURE_SKEW:
            return deny("proof_stale")
        ath = _b64url(hashlib.sha256(body.token.encode()).digest())
        if proof.get("ath") != ath:
            return deny("ath_mismatch")
        jkt = _thumbprint(proof_header["jwk"])
        if claims["cnf"].get("jkt") != jkt:
            return deny("jkt_mismatch")
        if not any(
            c.get("kind") == body.action.kind
            and fnmatch.fnmatchcase(body.action.resource, c["resource"])
            for c in claims.get("capabilities", [])
        ):
            return deny("insufficient_capability")
        fresh = await redis.set(
            f"agentauth-ref:jti:{jkt}:{proof['jti']}",
            b"1",
            nx=True,
            ex=PROOF_MAX_AGE + PROOF_FUTURE_SKEW,
        )
        if not fresh:
            return deny("replay")
        return {"decision": "allow"}

    return app
