"""Issuance with a remote signer: an unreachable or lying backend means no token at all.

Runs the registry in-process (no Serve needed for this) against the fake Vault Transit
server in tests/fakes (no Vault server installs here), with real PostgreSQL and Redis.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import pytest_asyncio
from conftest import new_database
from fakes.vault import FakeVault
from registry_world import World

from agentauth.protocol import b64url_decode
from agentauth.registry import Registry, RegistrySettings, SignerSettings, create_app

pytestmark = [pytest.mark.postgres, pytest.mark.redis]
BASE = "http://registry.test"


@pytest_asyncio.fixture(loop_scope="session")
async def vault_world(
    database_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[tuple[World, FakeVault, str]]:
    vault = FakeVault()
    vault.start()
    try:
        vault.create_key("registry", "ecdsa-p256")
        async with new_database(database_url, "signer") as url:
            settings = RegistrySettings(
                database_url=url,
                redis_url=redis_url,
                data_dir=tmp_path,
                issuer=BASE,
                admin_token=secrets.token_urlsafe(24),
                signer=SignerSettings(
                    backend="vault", key_id="registry", endpoint=vault.url, vault_token=vault.token
                ),
            )
            registry = await Registry.open(settings)
            try:
                transport = httpx.ASGITransport(app=create_app(registry))
                async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
                    world = World(client=client, base=BASE, admin_token=settings.admin_token)
                    yield world, vault, url
            finally:
                await registry.close()
    finally:
        vault.stop()


@pytest.mark.asyncio
async def test_a_dead_or_lying_signer_gives_no_token(
    vault_world: tuple[World, FakeVault, str],
) -> None:
    world, vault, url = vault_world
    _, agent, _, grant = await world.setup_grant()
    r = await world.token(agent, grant["id"])
    assert r.status_code == 200, r.text
    kid = json.loads(b64url_decode(r.json()["access_token"].split(".")[0]))["kid"]
    jwks = (await world.client.get(world.url("/.well-known/jwks.json"))).json()
    assert [k["kid"] for k in jwks["keys"]] == [kid]  # the Vault key is the only key

    db = await asyncpg.connect(url)
    try:
        issued = await db.fetchval("SELECT count(*) FROM issued_tokens")
        events = await db.fetchval("SELECT count(*) FROM audit_events")

        vault.wrong_signatures = True  # answers, but with signatures that do not verify
        r = await world.token(agent, grant["id"])
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "signer_unavailable"
        vault.wrong_signatures = False

        vault.stop()  # unreachable
        r = await world.token(agent, grant["id"])
        assert r.status_code == 503 and r.json()["error"] == "signer_unavailable", r.text
        assert "access_token" not in r.json()
        assert await db.fetchval("SELECT count(*) FROM issued_tokens") == issued
        assert await db.fetchval("SELECT count(*) FROM audit_events") == events
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_openapi_document_lists_the_api(vault_world: tuple[World, FakeVault, str]) -> None:
    world, _, _ = vault_world
    r = await world.client.get(world.url("/openapi.json"))
    assert r.status_code == 200
    paths = r.json()["paths"]
    for path in (
        "/v1/agents",
        "/v1/grant-requests",
        "/v1/token",
        "/v1/revocations",
        "/v1/step-ups",
        "/.well-known/jwks.json",
        "/v1/audit/consistency",
    ):
        assert path in paths, path


@pytest.mark.asyncio
async def test_a_restarted_replay_cache_refuses_proofs_it_may_have_forgotten(
    vault_world: tuple[World, FakeVault, str], redis_url: str
) -> None:
    import asyncio
    import time

    import redis.asyncio as aioredis

    world, _, _ = vault_world
    _, agent, _, grant = await world.setup_grant()
    proof = world.proof(agent.key, "POST", "/v1/token")
    body = {"grant_id": grant["id"]}
    first = await world.client.post(world.url("/v1/token"), headers={"DPoP": proof}, json=body)
    assert first.status_code == 200
    # Redis restarted empty: its reservations (and the epoch key) are gone.
    client = aioredis.Redis.from_url(redis_url)
    original_epoch = await client.get("agentauth:jti-epoch")
    try:
        jti_keys = [k async for k in client.scan_iter("agentauth:jti:*")]
        await client.delete("agentauth:jti-epoch", *jti_keys)
        again = await world.client.post(world.url("/v1/token"), headers={"DPoP": proof}, json=body)
        assert again.status_code == 400, again.text  # a token endpoint's proof error
        assert again.json()["reason"] == "replay_cache_reset"
        # A proof issued after the reset (and the allowed skew) works again.
        epoch = int(await client.get("agentauth:jti-epoch"))
        from agentauth.protocol import create_dpop_proof

        # Dated just past the epoch plus the allowed skew and the clock difference tolerated
        # between replicas and Redis (5 s), sent once the registry's clock makes that date
        # acceptable (at most 10 s ahead of it).
        await asyncio.sleep(max(0.0, epoch + 6.5 - time.time()))
        later = create_dpop_proof(
            agent.key, htm="POST", htu=world.url("/v1/token"), now=epoch + 16, access_token=None
        )
        r = await world.client.post(world.url("/v1/token"), headers={"DPoP": later}, json=body)
    finally:
        # Put back the long-running Redis's epoch so later tests are not refused for 15 s.
        if original_epoch is not None:
            await client.set("agentauth:jti-epoch", original_epoch)
        await client.aclose()
    assert r.status_code == 200, r.text


@pytest.mark.asyncio
async def test_a_backend_holding_another_key_is_refused_and_closed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """After a rotation inside the backend (a new key version), the key it holds is not the
    published one: no signature, a 503, and the client opened for it closed every time."""
    from agentauth.keys import KeyRecord, KeyRing, SignerUnavailable
    from agentauth.protocol import PrivateKey
    from agentauth.registry import RegistrySettings
    from agentauth.registry._keys import KeyManager

    settings = RegistrySettings(
        database_url="postgresql://x/y",
        redis_url="redis://x",
        data_dir=tmp_path,
        issuer="http://r",
        admin_token="a" * 20,
    )
    manager = KeyManager(settings, pool=None)  # type: ignore[arg-type]
    published = PrivateKey.generate(kid="published")
    manager._ring = KeyRing(
        [KeyRecord("published", dict(published.public_jwk()), "ES256", 0, activates_at=0)]
    )
    manager._backends = {"published": "vault:registry"}
    manager._loaded_at = float("inf")  # no refresh from the (absent) database
    closed: list[str] = []

    class Other:
        kid = "another"

        async def aclose(self) -> None:
            closed.append(self.kid)

    async def open_backend(ref: str) -> Other:
        return Other()

    monkeypatch.setattr(manager, "_open_backend", open_backend)
    for _ in range(3):
        with pytest.raises(SignerUnavailable):
            await manager.signer(1_000)
    assert closed == ["another"] * 3
