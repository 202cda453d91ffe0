"""A slow signer: the registry signs with Vault Transit, and Vault stops answering in time.

No Vault server installs here, so Vault is the tests' fake of its HTTP API
(``tests/fakes/vault.py``: real HTTP on loopback, real keys), whose ``delay`` knob holds every
answer. A second registry application (``/registry-vault``, on the same Serve instance,
with a database of its own in the same PostgreSQL) signs with it. Its signer gives up after
``agentauth.keys.DEFAULT_TIMEOUT`` (2 s, not configurable); Vault is made 3 s slow.

Fail-open here: a token (HTTP 200) for a request made while Vault was slow; a token, at any
time, whose signature does not verify under the Vault key itself (checked with the fake's
own key, not with anything the registry publishes); an ``issued_tokens`` row written during
the fault. Recovery: from Vault being fast again to the first token.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter
from typing import Any

import asyncpg
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from fakes.vault import FakeVault
from ray import serve
from registry_world import World

from agentauth.deployments.registry import build_registry_app
from agentauth.protocol import b64url_decode
from agentauth.registry import RegistrySettings, SignerSettings

from ._context import Context
from ._report import Result
from ._stack import with_database

NAME = "slow_signer"
HYPOTHESIS = (
    "With Vault slower (3 s) than the signer timeout (2 s), every token request fails with "
    "503 signer_unavailable within the timeout (+ slack) and writes nothing; no token is "
    "ever signed by another key; the registry stays responsive for everything else (JWKS); "
    "tokens are issued again, signed by the Vault key, as soon as Vault is fast again."
)
SLOW_S = 3.0
SIGNER_TIMEOUT_S = 2.0
BOUND_S = 15.0
APP = "registry-vault"


def _signed_by(token: str, public: ec.EllipticCurvePublicKey) -> bool:
    """ES256 check of a compact JWS against one public key, with nothing from the registry."""
    head, payload, signature = token.split(".")
    if json.loads(b64url_decode(head)).get("alg") != "ES256":
        return False
    raw = b64url_decode(signature)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    try:
        public.verify(der, f"{head}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


async def run(ctx: Context) -> Result:
    result = Result(NAME, HYPOTHESIS, recovery_bound_s=BOUND_S)
    result.recovery_what = "Vault fast again -> first token"
    stack = ctx.stack
    vault = FakeVault()
    vault.start()
    vault.create_key("registry", "ecdsa-p256")
    private = vault.keys["registry"].versions[1].private
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    vault_key = private.public_key()
    db_name = f"chaos_vault_{secrets.token_hex(3)}"
    admin = await stack.db()
    await admin.execute(f'CREATE DATABASE "{db_name}"')
    url = with_database(stack.database_url, db_name)
    settings = RegistrySettings(
        database_url=url,
        redis_url=stack.redis.url,
        data_dir=stack.workdir / "vault-data",
        issuer=f"{stack.base}/{APP}",
        admin_token=secrets.token_urlsafe(32),
        signer=SignerSettings(
            backend="vault", key_id="registry", endpoint=vault.url, vault_token=vault.token
        ),
    )
    try:
        await asyncio.to_thread(
            serve.run, build_registry_app(settings), name=APP, route_prefix=f"/{APP}"
        )

        # serve.run returns when the replica is up; HAProxy learns the route a moment later.
        async def routed() -> bool:
            r = await ctx.client.get(f"{settings.issuer}/healthz")
            return r.status_code == 200

        await stack.wait_until(routed, timeout=30)
        await _experiment(ctx, result, settings=settings, vault=vault, vault_key=vault_key, url=url)
    finally:
        await asyncio.to_thread(serve.delete, APP)
        vault.stop()
        await admin.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        await admin.close()
    return result


async def _experiment(
    ctx: Context,
    result: Result,
    *,
    settings: RegistrySettings,
    vault: FakeVault,
    vault_key: ec.EllipticCurvePublicKey,
    url: str,
) -> None:
    world = World(client=ctx.client, base=settings.issuer, admin_token=settings.admin_token)
    _, agent, _, grant = await world.setup_grant()
    tokens: list[str] = []
    outcomes: list[tuple[float, float, int, str]] = []  # sent, done, status, error code

    async def ask() -> tuple[float, float, int, str]:
        sent = time.monotonic()
        r = await world.token(agent, grant["id"])
        body: dict[str, Any] = r.json()
        if r.status_code == 200:
            tokens.append(body["access_token"])
        outcome = (sent, time.monotonic(), r.status_code, body.get("error", "token_issued"))
        outcomes.append(outcome)
        return outcome

    for _ in range(3):
        await ask()
    conn = await asyncpg.connect(url)
    try:
        issued_before = await conn.fetchval("SELECT count(*) FROM issued_tokens")
        vault.delay = SLOW_S
        slow_at = time.monotonic()
        jwks_ms: list[float] = []

        async def jwks() -> None:
            for _ in range(5):
                started = time.monotonic()
                r = await ctx.client.get(world.url("/.well-known/jwks.json"))
                if r.status_code == 200:
                    jwks_ms.append((time.monotonic() - started) * 1000)
                await asyncio.sleep(0.3)

        # Two waves of four concurrent requests; JWKS reads alongside the first.
        await asyncio.gather(*(ask() for _ in range(4)), jwks())
        await asyncio.gather(*(ask() for _ in range(4)))
        during = [o for o in outcomes if o[0] >= slow_at]
        issued_during = await conn.fetchval("SELECT count(*) FROM issued_tokens") - issued_before
        vault.delay = 0.0
        fast_at = time.monotonic()
        recovered_at = None
        while time.monotonic() - fast_at < BOUND_S:
            _, done, status, _ = await ask()
            if status == 200:
                recovered_at = done
                break
            await asyncio.sleep(0.2)
        for _ in range(3):
            await ask()
    finally:
        await conn.close()

    counts: dict[str, Counter[str]] = {"allow": Counter(), "deny": Counter(), "error": Counter()}
    for _, _, status, code in outcomes:
        kind = "allow" if status == 200 else "deny" if status == 503 else "error"
        counts[kind][code if status != 200 else "token_issued"] += 1
    result.requests = len(outcomes)
    result.decisions = counts
    result.fail_opens["token issued while Vault was slow"] = sum(o[2] == 200 for o in during)
    result.fail_opens["token not signed by the Vault key"] = sum(
        not _signed_by(t, vault_key) for t in tokens
    )
    result.fail_opens["issued_tokens rows written during the fault"] = int(issued_during)
    result.recovery_s = None if recovered_at is None else recovered_at - fast_at
    slowest = max((o[1] - o[0] for o in during), default=0.0)
    result.checks["every request during the fault got 503 signer_unavailable"] = bool(
        during
    ) and all(o[2] == 503 and o[3] == "signer_unavailable" for o in during)
    result.checks["each failure came within the signer timeout + 1.5 s"] = (
        slowest <= SIGNER_TIMEOUT_S + 1.5
    )
    result.checks["JWKS kept answering during the fault"] = len(jwks_ms) >= 3
    result.notes.append(
        f"{len(during)} token requests while slow, slowest {slowest:.2f} s; JWKS reads"
        f" {', '.join(f'{m:.0f}' for m in jwks_ms)} ms; {len(tokens)} tokens in all, each"
        " checked against the Vault key"
    )
