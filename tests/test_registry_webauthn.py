"""The registry's WebAuthn ceremonies in process, over real PostgreSQL and Redis (no Ray):
what a forged, odd or unusable passkey response does, and that it writes nothing.

The registry is opened on a database of its own and driven through its FastAPI app with
httpx's ASGI transport, by the same ``World`` the Ray tests use.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from conftest import _wait_out_replay_epoch, with_database
from registry_world import Human, World

from agentauth.protocol import b64url_encode
from agentauth.registry import Registry, RegistrySettings, create_app

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

ISSUER = "http://r.test"
TABLES = (
    "principals",
    "passkey_credentials",
    "sessions",
    "recoveries",
    "grants",
    "webauthn_challenges",
    "audit_events",
)


@dataclass
class InProcess:
    registry: Registry
    world: World

    async def counts(self) -> dict[str, int]:
        # Table names are the test's own constants.
        pool = self.registry.pool
        return {t: int(await pool.fetchval(f"SELECT count(*) FROM {t}")) for t in TABLES}

    async def events(self, event: str, credential_id: bytes) -> int:
        """How many ``event`` audit events are about this passkey."""
        bodies = await self.registry.pool.fetch(
            "SELECT body FROM audit_events WHERE event = $1", event
        )
        subject = "passkey:" + b64url_encode(credential_id)
        return sum(json.loads(b["body"])["subject"] == subject for b in bodies)

    async def flagged(self, principal_id: str) -> list[bool]:
        rows = await self.registry.pool.fetch(
            "SELECT flagged_at FROM passkey_credentials WHERE principal_id = $1", principal_id
        )
        return [r["flagged_at"] is not None for r in rows]


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def service(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[InProcess]:
    name = f"webauthn_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    settings = RegistrySettings(
        database_url=with_database(database_url, name),
        redis_url=redis_url,
        data_dir=tmp_path_factory.mktemp("registry"),
        issuer=ISSUER,
        admin_token=secrets.token_urlsafe(24),
    )
    registry = await Registry.open(settings)
    try:
        _wait_out_replay_epoch(redis_url)
        transport = httpx.ASGITransport(app=create_app(registry))
        async with httpx.AsyncClient(transport=transport, base_url=ISSUER, timeout=60) as client:
            world = World(client=client, base=ISSUER, admin_token=settings.admin_token)
            yield InProcess(registry, world)
    finally:
        await registry.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def sign_in(world: World, credential_for: Any) -> httpx.Response:
    """A discoverable sign-in: ``credential_for`` answers the options."""
    options = (await world.client.post(world.url("/v1/sessions/begin"))).json()
    return await world.client.post(
        world.url("/v1/sessions/finish"), json={"credential": credential_for(options)}
    )


def refused(response: httpx.Response, status: int, reason: str) -> None:
    assert (response.status_code, response.json().get("reason")) == (status, reason), response.text


# --- 1. the signature counter is judged only on a signed assertion ---------------------------


def unsigned_assertion(world: World, options: dict[str, Any], credential_id: str) -> dict[str, Any]:
    """What anyone who knows a credential id can send: counter 0, a signature by no key."""
    client_data = json.dumps(
        {"type": "webauthn.get", "challenge": options["challenge"], "origin": world.origin}
    ).encode()
    auth_data = hashlib.sha256(b"localhost").digest() + bytes([0x05]) + struct.pack(">I", 0)
    return {
        "id": credential_id,
        "rawId": credential_id,
        "type": "public-key",
        "response": {
            "clientDataJSON": b64url_encode(client_data),
            "authenticatorData": b64url_encode(auth_data),
            "signature": b64url_encode(b"\x30\x06\x02\x01\x01\x02\x01\x01"),
        },
        "clientExtensionResults": {},
    }


@pytest.mark.asyncio(loop_scope="session")
async def test_an_assertion_without_the_passkeys_signature_flags_nothing(
    service: InProcess,
) -> None:
    """The agent reads its human's credential id from its own grant's receipt and sends
    unsigned assertions with a counter of 0. Each is refused as unverified; the passkey is
    not flagged, and the human still signs in and approves."""
    world = service.world
    human, agent, provider, grant = await world.setup_grant()
    r = await world.as_agent(agent, "GET", f"/v1/grants/{grant['id']}")
    credential_id = r.json()["receipt"]["credential_id"]
    before = await service.counts()
    for _ in range(3):
        r = await sign_in(world, lambda o: unsigned_assertion(world, o, credential_id))
        refused(r, 400, "assertion_refused")
    assert await service.counts() == {
        **before,
        "webauthn_challenges": before["webauthn_challenges"] + 3,
    }
    assert await service.flagged(human.principal_id) == [False]
    r = await sign_in(world, human.authenticator.get)
    assert r.status_code == 200, r.text
    await world.approve(human, (await world.request(agent, provider))["id"])


@pytest.mark.asyncio(loop_scope="session")
async def test_a_signed_assertion_whose_counter_goes_back_flags_the_passkey(
    service: InProcess,
) -> None:
    """A genuine signature with a counter not above the stored one: possibly a clone. The
    passkey is flagged (with its audit event) and refused from then on."""
    world = service.world
    human: Human = await world.human()
    passkey = next(iter(human.authenticator.passkeys.values()))
    r = await sign_in(world, human.authenticator.get)  # the stored counter is now 1
    assert r.status_code == 200, r.text
    r = await sign_in(world, lambda o: human.authenticator.get(o, counter=1))
    refused(r, 403, "sign_count_regression")
    assert await service.flagged(human.principal_id) == [True]
    assert await service.events("passkey.flagged", passkey.credential_id) == 1
    r = await sign_in(world, human.authenticator.get)
    refused(r, 403, "credential_flagged")
