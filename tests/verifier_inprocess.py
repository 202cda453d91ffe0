"""A verifier replica's service layer in process, without Ray, PostgreSQL or Redis.

The token and proof checks, the capability, the revocation and grant prechecks (fed a
fresh revocation state and a grant known active) and the hand-over to the agent's shard,
here a stand-in that records each check and decides as the shard would on a fresh grant:
deny what the replica denied, allow the rest.
"""

from __future__ import annotations

import base64
import hashlib
import time
from typing import Any, cast

from agentauth.actors import Check, Result, ShardClient
from agentauth.protocol import (
    AccessToken,
    Capability,
    Grant,
    KeySet,
    PrivateKey,
    PublicKey,
    b64url_encode,
    create_dpop_proof,
    mint_access_token,
)
from agentauth.verifier import Verifier, VerifierSettings, VerifyIn
from agentauth.verifier._service import _Provider

ISSUER = "https://registry.example"
AUDIENCE = "https://api.example"
HTU = "https://api.example/v1/calendar/events"
REGISTRY = PrivateKey.generate("ES256", kid="registry-es256")
AGENT = PrivateKey.generate("ES256")


class Shards:
    """Stands in for ShardClient: every check is recorded, as the shard's audit chain would."""

    shards = 4
    # The link's counters, which /v1/stats reports.
    batches = checks = given_up = void_checks = overruns = unacknowledged = 0

    def __init__(self) -> None:
        self.recorded: list[Check] = []

    def queue_depth(self) -> int:
        return 0

    async def check(self, shard: int, check: Check) -> Result:
        self.recorded.append(check)
        if check.deny is not None:
            return Result(False, check.deny, audit_event=f"verifier-{shard}:1")
        return Result(True, "ok", audit_event=f"verifier-{shard}:1")


class FreshRevocations:
    def fresh(self) -> bool:
        return True

    def revoked(self, token: AccessToken) -> bool:
        return False


def verifier(*, pool: Any = None, **settings: Any) -> tuple[Verifier, Shards]:
    """A replica's service layer with prov_a (audience AUDIENCE) and prov_b (another), the
    registry's key loaded, revocations fresh and grant-1 known active; ``pool`` stands in
    for PostgreSQL (none by default: nothing on the path reads it then)."""
    config = VerifierSettings(
        database_url="postgresql://unused", redis_url="redis://unused", issuer=ISSUER, **settings
    )
    shards = Shards()
    v = Verifier(
        settings=config,
        pool=pool,
        redis=cast(Any, None),
        shards=cast(ShardClient, shards),
    )
    v.tokens.set_keys(KeySet([PublicKey.from_jwk(REGISTRY.public_jwk())]))
    v.revocations = cast(Any, FreshRevocations())
    v._known_grants.add("grant-1", time.monotonic())  # known active: no lookup
    v._providers = {
        "prov_a": _Provider(AUDIENCE, secret_hash("a"), secret_hash("no"), 0.0, False),
        "prov_b": _Provider(
            "https://other.example", secret_hash("b"), secret_hash("no"), 0.0, False
        ),
    }
    return v, shards


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(f"secret-{secret}".encode()).digest()


def basic(provider_id: str) -> dict[str, str]:
    """prov_a's and prov_b's Basic credentials (their secrets: secret-a, secret-b)."""
    credential = f"{provider_id}:secret-{provider_id.removeprefix('prov_')}"
    return {"Authorization": "Basic " + base64.b64encode(credential.encode()).decode()}


def mint(*, now: float, lifetime: int = 600, signer: PrivateKey = REGISTRY) -> str:
    grant = Grant(
        grant_id="grant-1",
        agent_id="agent-1",
        principal_id="human-1",
        provider_id="prov_a",
        audience=AUDIENCE,
        capabilities=(Capability.read("calendar/*"),),
        created_at=int(now) - 100,
    )
    return mint_access_token(
        signer=signer,
        issuer=ISSUER,
        grant=grant,
        jkt=AGENT.thumbprint,
        receipt_hash=b64url_encode(hashlib.sha256(b"receipt").digest()),
        now=int(now),
        lifetime=lifetime,
    )


def ask(token: str, *, key: PrivateKey = AGENT, nonce: str | None = None) -> VerifyIn:
    proof = create_dpop_proof(
        key, htm="GET", htu=HTU, now=time.time(), access_token=token, nonce=nonce
    )
    return VerifyIn.model_validate(
        {
            "token": token,
            "proof": proof,
            "method": "GET",
            "url": HTU,
            "action": {"kind": "read", "resource": "calendar/events"},
        }
    )
