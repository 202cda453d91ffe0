"""The registry's WebAuthn ceremonies in process, over real PostgreSQL and Redis (no Ray):
what a forged, odd or unusable passkey response does, and that it writes nothing.

The registry is opened on a database of its own and driven through its FastAPI app with
httpx's ASGI transport, by the same ``World`` the Ray tests use.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from registry_inprocess import registry_in_process
from registry_world import Human, World
from softauthn import Passkey, SoftAuthenticator, cbor
from webauthn.helpers import parse_cbor

from agentauth.protocol import PrivateKey, b64url_decode, b64url_encode
from agentauth.registry import Registry

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

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

    async def stored(self, credential_id: bytes) -> dict[str, Any]:
        """What the registry keeps of a passkey that changes with its use."""
        row = await self.registry.pool.fetchrow(
            "SELECT sign_count, backup_eligible, backed_up, last_used_at FROM passkey_credentials"
            " WHERE credential_id = $1",
            b64url_encode(credential_id),
        )
        assert row is not None
        return dict(row)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def service(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[InProcess]:
    data_dir = tmp_path_factory.mktemp("registry")
    async with registry_in_process(database_url, redis_url, data_dir, prefix="webauthn") as opened:
        yield InProcess(opened.registry, opened.world)


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


@pytest.mark.asyncio(loop_scope="session")
async def test_a_passkey_flagged_as_cloned_ends_the_humans_sessions_and_enrollment_codes(
    service: InProcess,
) -> None:
    """Whoever holds the clone may have signed in: a session needs no passkey to mint
    enrollment codes, revoke, deny or read. The flag ends every session of the human and
    the enrollment codes not yet used, as a passkey removal does (until 2026-11-30 they
    all kept working)."""
    world = service.world
    human: Human = await world.human()  # its sign-up's session
    r = await sign_in(world, human.authenticator.get)  # another session; the counter is 1
    assert r.status_code == 200, r.text
    other = {"Authorization": f"Bearer {r.json()['session']}"}
    r = await world.client.post(world.url("/v1/enrollments"), headers=other)
    assert r.status_code == 200, r.text
    code = r.json()["enrollment_code"]
    r = await sign_in(world, lambda o: human.authenticator.get(o, counter=1))
    refused(r, 403, "sign_count_regression")
    for headers in (human.headers, other):
        refused(
            await world.client.get(world.url("/v1/agents"), headers=headers), 401, "bad_session"
        )
    key = PrivateKey.generate("ES256")
    r = await world.client.post(
        world.url("/v1/agents"),
        headers={"DPoP": world.proof(key, "POST", "/v1/agents")},
        json={"name": "bot", "public_jwk": key.public_jwk(), "enrollment_code": code},
    )
    refused(r, 403, "bad_enrollment")
    passkey = next(iter(human.authenticator.passkeys.values()))
    subject = "passkey:" + b64url_encode(passkey.credential_id)
    bodies = [
        json.loads(row["body"])
        for row in await service.registry.pool.fetch(
            "SELECT body FROM audit_events WHERE event = 'passkey.flagged'"
        )
    ]
    assert [b["data"]["sessions_ended"] for b in bodies if b["subject"] == subject] == [2]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_sign_in_and_a_sign_out_are_audited(service: InProcess) -> None:
    """A session is what a stolen or cloned passkey buys: each one opened is recorded with
    the passkey that opened it, and each one ended, once (until 2026-11-30 neither was)."""
    world = service.world
    human: Human = await world.human()
    passkey = next(iter(human.authenticator.passkeys.values()))
    r = await sign_in(world, human.authenticator.get)
    assert r.status_code == 200, r.text
    assert await service.events("session.created", passkey.credential_id) == 1
    session = {"Authorization": f"Bearer {r.json()['session']}"}

    async def ended() -> int:
        rows = await service.registry.pool.fetch(
            "SELECT body FROM audit_events WHERE event = 'session.ended'"
        )
        subject = f"human:{human.principal_id}"
        return sum(json.loads(row["body"])["subject"] == subject for row in rows)

    r = await world.client.delete(world.url("/v1/sessions/current"), headers=session)
    assert r.status_code == 200, r.text
    assert await ended() == 1
    await service.registry.end_session(r.request.headers["Authorization"].split(" ", 1)[1])
    assert await ended() == 1  # ending it again records nothing


@pytest.mark.asyncio(loop_scope="session")
async def test_the_last_passkey_that_is_not_flagged_cannot_be_removed(service: InProcess) -> None:
    """A flagged passkey never signs again, so it leaves nobody able to sign in: removing
    the only other one is refused 409 last_passkey, at the confirmation and at the removal
    (it was allowed: the person locked themselves out and needed the admin's recovery).
    The flagged one itself can be removed."""
    world = service.world
    human = await world.human()
    first = only_passkey(human)
    r = await begin_adding_a_passkey(world, human)
    assert r.status_code == 200, r.text
    credential = human.authenticator.create(r.json())
    r = await world.client.post(
        world.url("/v1/passkeys/finish"), headers=human.headers, json={"credential": credential}
    )
    assert r.status_code == 200, r.text
    second = human.authenticator.passkeys[b64url_decode(r.json()["credential_id"])]
    first_id, second_id = b64url_encode(first.credential_id), b64url_encode(second.credential_id)

    async def confirm(credential_id: str) -> httpx.Response:
        return await world.client.post(
            world.url("/v1/passkeys/confirm"),
            headers=human.headers,
            json={"change": "remove", "credential_id": credential_id},
        )

    # A confirmation asked for before the first passkey was flagged.
    r = await confirm(second_id)
    assert r.status_code == 200, r.text
    signed = human.authenticator.get(r.json(), passkey=second)
    await service.registry.pool.execute(
        "UPDATE passkey_credentials SET flagged_at = now() WHERE credential_id = $1", first_id
    )
    refused(await confirm(second_id), 409, "last_passkey")
    r = await world.client.request(
        "DELETE",
        world.url(f"/v1/passkeys/{second_id}"),
        headers=human.headers,
        json={"credential": signed},
    )
    refused(r, 409, "last_passkey")
    assert await service.flagged(human.principal_id) in ([True, False], [False, True])
    r = await confirm(first_id)
    assert r.status_code == 200, r.text
    r = await world.client.request(
        "DELETE",
        world.url(f"/v1/passkeys/{first_id}"),
        headers=human.headers,
        json={"credential": human.authenticator.get(r.json(), passkey=second)},
    )
    assert r.status_code == 200, r.text


# --- 2. a passkey the protocol cannot use is refused at registration --------------------------


def rs256_cose() -> bytes:
    numbers = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    n, e = numbers.public_numbers().n, numbers.public_numbers().e
    return cbor({1: 3, 3: -257, -1: n.to_bytes(256, "big"), -2: e.to_bytes(3, "big")})


def p384_cose_named_es256() -> bytes:
    point = ec.generate_private_key(ec.SECP384R1()).public_key().public_numbers()
    x, y = point.x.to_bytes(48, "big"), point.y.to_bytes(48, "big")
    return cbor({1: 2, 3: -7, -1: 2, -2: x, -3: y})


def es256_cose_with_private_scalar() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    point = key.public_key().public_numbers()
    d = key.private_numbers().private_value
    return cbor(
        {
            1: 2,
            3: -7,
            -1: 1,
            -2: point.x.to_bytes(32, "big"),
            -3: point.y.to_bytes(32, "big"),
            -4: d.to_bytes(32, "big"),
        }
    )


def ed25519_cose_off_the_curve() -> bytes:
    # y = 2 has no x on edwards25519: OpenSSL loads the key and refuses every signature.
    return cbor({1: 1, 3: -8, -1: 6, -2: (2).to_bytes(32, "little")})


UNUSABLE = [
    pytest.param({"cose": rs256_cose()}, "registration_refused", id="rs256"),
    pytest.param({"cose": p384_cose_named_es256()}, "unsupported_key", id="es256-on-p384"),
    pytest.param({"cose": es256_cose_with_private_scalar()}, "unsupported_key", id="private-d"),
    pytest.param({"cose": ed25519_cose_off_the_curve()}, "unsupported_key", id="ed25519-off-curve"),
    pytest.param({"credential_id": os.urandom(1024)}, "credential_id_too_long", id="id-1024"),
]


async def begin_adding_a_passkey(world: World, human: Human) -> httpx.Response:
    """The registration options for another passkey, confirmed with the human's own."""
    r = await world.client.post(
        world.url("/v1/passkeys/confirm"), headers=human.headers, json={"change": "add"}
    )
    return await world.client.post(
        world.url("/v1/passkeys/begin"),
        headers=human.headers,
        json={"credential": human.authenticator.get(r.json())},
    )


async def signup_options(world: World) -> dict[str, Any]:
    r = await world.client.post(world.url("/v1/signup/begin"), json={"display_name": "Dan"})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


@pytest.mark.asyncio(loop_scope="session")
async def test_registration_offers_only_the_algorithms_receipts_verify(
    service: InProcess,
) -> None:
    world = service.world
    assert [p["alg"] for p in (await signup_options(world))["pubKeyCredParams"]] == [-8, -7]
    human = await world.human()
    r = await begin_adding_a_passkey(world, human)
    assert [p["alg"] for p in r.json()["pubKeyCredParams"]] == [-8, -7]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize(("passkey", "reason"), UNUSABLE)
async def test_a_sign_up_with_a_passkey_receipts_cannot_carry_writes_nothing(
    service: InProcess, passkey: dict[str, Any], reason: str
) -> None:
    world = service.world
    options = await signup_options(world)
    before = await service.counts()
    credential = SoftAuthenticator(origin=world.origin).create(options, **passkey)
    r = await world.client.post(world.url("/v1/signup/finish"), json={"credential": credential})
    refused(r, 400, reason)
    assert await service.counts() == before


def with_attestation(credential: dict[str, Any], fmt: str, statement: Any) -> dict[str, Any]:
    """``credential`` (a "none" registration) re-sent with another attestation statement."""
    attestation = parse_cbor(b64url_decode(credential["response"]["attestationObject"]))
    rewritten = cbor({"fmt": fmt, "attStmt": statement, "authData": attestation["authData"]})
    response = {**credential["response"], "attestationObject": b64url_encode(rewritten)}
    return {**credential, "response": response}


def attestation_certificate() -> bytes:
    """A self-signed DER certificate for an attestation statement's x5c."""
    signer = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attestation")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signer.public_key())
        .serial_number(1)
        .not_valid_before(datetime.datetime(2020, 1, 1))
        .not_valid_after(datetime.datetime(2040, 1, 1))
        .sign(signer, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


def certificate_of_an_unknown_key_type() -> bytes:
    """Its key names an algorithm nobody knows: cryptography raises UnsupportedAlgorithm
    (no ValueError) for its public key."""
    der = attestation_certificate()
    # id-ecPublicKey (1.2.840.10045.2.1) becomes 1.2.840.10045.2.9, an unassigned arc.
    return der.replace(bytes.fromhex("06072a8648ce3d0201"), bytes.fromhex("06072a8648ce3d0209"))


def certificate_of_an_unknown_version() -> bytes:
    """X.509 version 9: cryptography raises InvalidVersion (no ValueError) as it reads it."""
    der = attestation_certificate()
    # The version field, [0] EXPLICIT INTEGER 2 (v3), the first of the certificate's.
    return der.replace(bytes.fromhex("a003020102"), bytes.fromhex("a003020108"), 1)


# Attestation statements py_webauthn's parsers trip over (AttributeError, IndexError; an
# x5c certificate whose key type or version cryptography does not know, UnsupportedAlgorithm
# and InvalidVersion; a SafetyNet JWS nested deeper than json.loads recurses,
# RecursionError): until 2026-12-01 each was a 500 rather than a refusal.
MALFORMED_ATTESTATIONS = [
    pytest.param("android-safetynet", {"ver": "1", "response": "a.b.c"}, id="response-text"),
    pytest.param(
        "android-safetynet",
        {"ver": "1", "response": b64url_encode(b"[1]").encode() + b".e30.c"},
        id="header-not-object",
    ),
    pytest.param(
        "packed",
        {"alg": -7, "sig": b"0", "x5c": [certificate_of_an_unknown_key_type()]},
        id="packed-unknown-key-type",
    ),
    pytest.param(
        "fido-u2f",
        {"sig": b"0", "x5c": [certificate_of_an_unknown_key_type()]},
        id="u2f-unknown-key-type",
    ),
    pytest.param(
        "packed",
        {"alg": -7, "sig": b"0", "x5c": [certificate_of_an_unknown_version()]},
        id="packed-unknown-version",
    ),
    pytest.param(
        "android-safetynet",
        {"ver": "1", "response": b64url_encode(b"[" * 5000).encode() + b".e30.c"},
        id="header-nested-too-deep",
    ),
    pytest.param(
        "android-safetynet",
        {"ver": "1", "response": b"e30." + b64url_encode(b"[" * 5000).encode() + b".c"},
        id="payload-nested-too-deep",
    ),
]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize(("fmt", "statement"), MALFORMED_ATTESTATIONS)
async def test_a_sign_up_with_a_malformed_attestation_is_refused_and_writes_nothing(
    service: InProcess, fmt: str, statement: dict[str, Any]
) -> None:
    world = service.world
    options = await signup_options(world)
    before = await service.counts()
    credential = with_attestation(
        SoftAuthenticator(origin=world.origin).create(options), fmt, statement
    )
    r = await world.client.post(world.url("/v1/signup/finish"), json={"credential": credential})
    refused(r, 400, "registration_refused")
    assert await service.counts() == before


@pytest.mark.asyncio(loop_scope="session")
async def test_a_credential_id_of_1023_bytes_registers_and_approves(service: InProcess) -> None:
    world = service.world
    authenticator = SoftAuthenticator(origin=world.origin)
    credential = authenticator.create(await signup_options(world), credential_id=os.urandom(1023))
    r = await world.client.post(world.url("/v1/signup/finish"), json={"credential": credential})
    assert r.status_code == 200, r.text
    human = Human(r.json()["principal_id"], r.json()["session"], authenticator)
    agent = await world.agent(human)
    grant = await world.approve(human, (await world.request(agent, await world.provider()))["id"])
    assert len(b64url_decode(grant["receipt"]["credential_id"])) == 1023


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize(("passkey", "reason"), UNUSABLE)
async def test_a_recovery_with_a_passkey_receipts_cannot_carry_spends_no_code(
    service: InProcess, passkey: dict[str, Any], reason: str
) -> None:
    """The admin's one-time code stays unspent and the human's sessions stay: the same code
    then recovers the account with a passkey that works."""
    world = service.world
    human = await world.human()
    code, options = await world.recovery_options(human.principal_id)
    before = await service.counts()
    credential = SoftAuthenticator(origin=world.origin).create(options, **passkey)
    r = await world.client.post(
        world.url("/v1/recovery/finish"), json={"code": code, "credential": credential}
    )
    refused(r, 400, reason)
    assert await service.counts() == before
    spent = await service.registry.pool.fetchval(
        "SELECT used_at FROM recoveries WHERE principal_id = $1", human.principal_id
    )
    assert spent is None
    r = await world.client.get(world.url("/v1/passkeys"), headers=human.headers)
    assert r.status_code == 200, r.text  # the session still works
    authenticator = SoftAuthenticator(origin=world.origin)
    r = await world.client.post(
        world.url("/v1/recovery/finish"),
        json={"code": code, "credential": authenticator.create(options)},
    )
    assert r.status_code == 200, r.text
    r = await sign_in(world, authenticator.get)
    assert r.status_code == 200 and r.json()["principal_id"] == human.principal_id, r.text


# --- 3. the userHandle names the passkey's owner ---------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_an_approval_whose_user_handle_names_another_human_writes_nothing(
    service: InProcess,
) -> None:
    world = service.world
    alice, bob = await world.human("Alice"), await world.human("Bob")
    agent = await world.agent(alice)
    request = await world.request(agent, await world.provider())
    path = world.url(f"/v1/grant-requests/{request['id']}/approval/finish")
    for handle, reason in (
        (b64url_encode(bob.principal_id.encode()), "user_handle_mismatch"),
        (b64url_encode(alice.principal_id.encode()) + "=", "malformed"),
    ):
        begun = await world.begin_approval(alice, request["id"])
        credential = alice.authenticator.get(begun["options"])
        credential["response"]["userHandle"] = handle
        before = await service.counts()
        r = await world.client.post(path, headers=alice.headers, json={"credential": credential})
        refused(r, 400, reason)
        assert await service.counts() == before
    # Without a userHandle (the options named Alice's passkeys) the approval stands, and the
    # receipt names no user; with hers, it names her.
    begun = await world.begin_approval(alice, request["id"])
    credential = alice.authenticator.get(begun["options"])
    del credential["response"]["userHandle"]
    r = await world.client.post(path, headers=alice.headers, json={"credential": credential})
    assert r.status_code == 200, r.text
    assert "user_handle" not in r.json()["receipt"]
    grant = await world.approve(alice, (await world.request(agent, await world.provider()))["id"])
    assert b64url_decode(grant["receipt"]["user_handle"]) == alice.principal_id.encode()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_discoverable_sign_in_must_name_the_passkeys_owner(service: InProcess) -> None:
    world = service.world
    alice, bob = await world.human("Alice"), await world.human("Bob")

    def with_handle(handle: str | None) -> Any:
        def answer(options: dict[str, Any]) -> dict[str, Any]:
            credential = alice.authenticator.get(options)
            if handle is None:
                del credential["response"]["userHandle"]
            else:
                credential["response"]["userHandle"] = handle
            return credential

        return answer

    before = await service.counts()
    r = await sign_in(world, with_handle(None))
    refused(r, 400, "user_handle_missing")
    r = await sign_in(world, with_handle(""))
    refused(r, 400, "user_handle_missing")
    r = await sign_in(world, with_handle(b64url_encode(bob.principal_id.encode())))
    refused(r, 400, "user_handle_mismatch")
    challenges = before["webauthn_challenges"] + 3  # the three refused sign-ins' own
    assert await service.counts() == {**before, "webauthn_challenges": challenges}
    r = await sign_in(world, alice.authenticator.get)
    assert r.status_code == 200 and r.json()["principal_id"] == alice.principal_id, r.text


# --- 4. a passkey is registered in a top-level page of an allowed origin only -----------------


class FramedAuthenticator(SoftAuthenticator):
    """Registers with these clientData members in place of ``crossOrigin: false``."""

    def __init__(self, origin: str, frame: dict[str, Any]) -> None:
        super().__init__(origin=origin)
        self.frame = frame

    def _client_data(self, kind: str, challenge: str) -> bytes:
        return json.dumps(
            {"type": kind, "challenge": challenge, "origin": self.origin, **self.frame}
        ).encode()


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize(
    "frame",
    [
        {"crossOrigin": True},
        {"crossOrigin": True, "topOrigin": "https://evil.example"},
        {"crossOrigin": False, "topOrigin": "https://evil.example"},
        {"topOrigin": "http://localhost:8080"},
        {"crossOrigin": None},
        {"crossOrigin": "false"},
    ],
    ids=["cross", "cross-top", "top-only", "top-self", "null", "text"],
)
async def test_a_passkey_registered_in_a_cross_origin_frame_is_refused(
    service: InProcess, frame: dict[str, Any]
) -> None:
    world = service.world
    options = await signup_options(world)
    before = await service.counts()
    credential = FramedAuthenticator(world.origin, frame).create(options)
    r = await world.client.post(world.url("/v1/signup/finish"), json={"credential": credential})
    refused(r, 400, "cross_origin")
    assert await service.counts() == before


@pytest.mark.asyncio(loop_scope="session")
async def test_a_registration_without_cross_origin_is_a_top_level_one(service: InProcess) -> None:
    world = service.world
    authenticator = FramedAuthenticator(world.origin, {})
    credential = authenticator.create(await signup_options(world))
    r = await world.client.post(world.url("/v1/signup/finish"), json={"credential": credential})
    assert r.status_code == 200, r.text


# --- 5. the backup flags: BE never changes, BS is kept current --------------------------------


async def human_with(world: World, *, backup_eligible: bool, backed_up: bool) -> Human:
    """A new human whose one passkey registered with these BE and BS flags."""
    authenticator = SoftAuthenticator(origin=world.origin)
    credential = authenticator.create(
        await signup_options(world), backup_eligible=backup_eligible, backed_up=backed_up
    )
    r = await world.client.post(world.url("/v1/signup/finish"), json={"credential": credential})
    assert r.status_code == 200, r.text
    return Human(r.json()["principal_id"], r.json()["session"], authenticator)


def only_passkey(human: Human) -> Passkey:
    (passkey,) = human.authenticator.passkeys.values()
    return passkey


async def listed(world: World, human: Human) -> list[tuple[bool | None, bool]]:
    """The backup flags GET /v1/passkeys shows for each of the human's passkeys."""
    r = await world.client.get(world.url("/v1/passkeys"), headers=human.headers)
    assert r.status_code == 200, r.text
    return [(p["backup_eligible"], p["backed_up"]) for p in r.json()]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize(
    ("backup_eligible", "backed_up"),
    [(False, False), (True, False), (True, True)],
    ids=["single-device", "eligible", "synced"],
)
async def test_registration_records_both_backup_flags(
    service: InProcess, backup_eligible: bool, backed_up: bool
) -> None:
    world = service.world
    human = await human_with(world, backup_eligible=backup_eligible, backed_up=backed_up)
    assert await listed(world, human) == [(backup_eligible, backed_up)]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_registration_backed_up_but_not_backup_eligible_writes_nothing(
    service: InProcess,
) -> None:
    """BS without BE (WebAuthn L3 §7.1), at sign-up and when adding a passkey: 400 with its
    own reason, not a server error, and nothing written."""
    world = service.world
    options = await signup_options(world)
    before = await service.counts()
    credential = SoftAuthenticator(origin=world.origin).create(options, backed_up=True)
    r = await world.client.post(world.url("/v1/signup/finish"), json={"credential": credential})
    refused(r, 400, "invalid_backup_flags")
    assert await service.counts() == before

    human = await world.human()
    r = await begin_adding_a_passkey(world, human)
    assert r.status_code == 200, r.text
    before = await service.counts()
    credential = SoftAuthenticator(origin=world.origin).create(r.json(), backed_up=True)
    r = await world.client.post(
        world.url("/v1/passkeys/finish"), headers=human.headers, json={"credential": credential}
    )
    refused(r, 400, "invalid_backup_flags")
    assert await service.counts() == before
    assert await listed(world, human) == [(False, False)]


@pytest.mark.asyncio(loop_scope="session")
async def test_each_sign_in_and_approval_records_the_backup_state(service: InProcess) -> None:
    """BS may change (a passkey provider finishes or stops syncing): what the registry shows
    is what the passkey said at its last accepted use."""
    world = service.world
    human = await human_with(world, backup_eligible=True, backed_up=False)
    passkey = only_passkey(human)
    passkey.backed_up = True
    r = await sign_in(world, human.authenticator.get)
    assert r.status_code == 200, r.text
    assert await listed(world, human) == [(True, True)]
    passkey.backed_up = False
    agent = await world.agent(human)
    await world.approve(human, (await world.request(agent, await world.provider()))["id"])
    assert await listed(world, human) == [(True, False)]


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize("registered_eligible", [False, True], ids=["gains-be", "loses-be"])
async def test_an_assertion_whose_backup_eligibility_changed_is_audited_and_writes_nothing_else(
    service: InProcess, registered_eligible: bool
) -> None:
    """BE is fixed for a credential's life (WebAuthn L3 §6.1.3). A signed assertion with the
    other BE is refused, sign-in and approval alike, 403 backup_eligibility_changed: no
    session, no grant, the request still pending, the counter and flags as they were, the
    passkey not flagged. Each refusal leaves one audit event, as a counter going back does
    (it was unaudited: a cloned or tampered authenticator left no trace but a log line).
    The same passkey with its own BE then works."""
    world = service.world
    human = await human_with(world, backup_eligible=registered_eligible, backed_up=False)
    agent = await world.agent(human)
    request = await world.request(agent, await world.provider())
    passkey = only_passkey(human)
    stored = await service.stored(passkey.credential_id)
    passkey.backup_eligible = not registered_eligible
    passkey.backed_up = passkey.backup_eligible  # a BS the new BE allows: only BE is wrong

    begun = await world.begin_approval(human, request["id"])
    before = await service.counts()
    r = await world.client.post(
        world.url(f"/v1/grant-requests/{request['id']}/approval/finish"),
        headers=human.headers,
        json={"credential": human.authenticator.get(begun["options"])},
    )
    refused(r, 403, "backup_eligibility_changed")
    assert await service.counts() == {**before, "audit_events": before["audit_events"] + 1}

    r = await sign_in(world, human.authenticator.get)
    refused(r, 403, "backup_eligibility_changed")
    # The sign-in's own challenge, stored by /begin, and the two refusals' events are all
    # that is new.
    assert await service.counts() == {
        **before,
        "webauthn_challenges": before["webauthn_challenges"] + 1,
        "audit_events": before["audit_events"] + 2,
    }
    assert await service.events("passkey.refused", passkey.credential_id) == 2
    subject = "passkey:" + b64url_encode(passkey.credential_id)
    rows = await service.registry.pool.fetch(
        "SELECT body FROM audit_events WHERE event = 'passkey.refused'"
    )
    events = [e for e in map(json.loads, (r["body"] for r in rows)) if e["subject"] == subject]
    assert [(e["actor"], e["data"]) for e in events] == 2 * [
        (
            "registry",
            {"reason": "backup_eligibility_changed", "backup_eligible": not registered_eligible},
        )
    ]
    assert await service.stored(passkey.credential_id) == stored
    assert await service.flagged(human.principal_id) == [False]
    r = await world.client.get(
        world.url(f"/v1/grant-requests/{request['id']}"), headers=human.headers
    )
    assert r.json()["status"] == "pending", r.text

    passkey.backup_eligible, passkey.backed_up = registered_eligible, False
    r = await sign_in(world, human.authenticator.get)
    assert r.status_code == 200, r.text
    await world.approve(human, request["id"])


@pytest.mark.asyncio(loop_scope="session")
async def test_a_backup_eligible_passkey_that_drops_be_but_keeps_bs_is_audited_as_a_be_change(
    service: InProcess,
) -> None:
    """A passkey registered with BE whose signed assertion clears BE and sets BS: its BE
    changed, refused 403 backup_eligibility_changed with its passkey.refused event, as
    without BS. (It was a 400 invalid_backup_flags with no trace: setting BS as well was
    enough to leave the change unaudited.)"""
    world = service.world
    human = await human_with(world, backup_eligible=True, backed_up=True)
    passkey = only_passkey(human)
    stored = await service.stored(passkey.credential_id)
    passkey.backup_eligible, passkey.backed_up = False, True
    before = await service.counts()
    r = await sign_in(world, human.authenticator.get)
    refused(r, 403, "backup_eligibility_changed")
    assert await service.counts() == {
        **before,
        "webauthn_challenges": before["webauthn_challenges"] + 1,
        "audit_events": before["audit_events"] + 1,
    }
    assert await service.events("passkey.refused", passkey.credential_id) == 1
    assert await service.stored(passkey.credential_id) == stored
    assert await service.flagged(human.principal_id) == [False]


@pytest.mark.parametrize("backed_up", [False, True])
@pytest.mark.asyncio(loop_scope="session")
async def test_a_be_change_whose_counter_goes_back_flags_the_passkey(
    service: InProcess, backed_up: bool
) -> None:
    """The counter is judged before the backup flags (docs/registry.md, "Passkey backup
    flags"), so a signed assertion that changes BE with a counter gone back flags the
    passkey as a clone's, BS set or not. (With BS set it was audited as a BE change only,
    the counter never compared: the passkey stayed usable and the sessions open.)"""
    world = service.world
    human = await human_with(world, backup_eligible=True, backed_up=True)
    passkey = only_passkey(human)
    r = await sign_in(world, human.authenticator.get)  # the stored counter is now 1
    assert r.status_code == 200, r.text
    passkey.backup_eligible, passkey.backed_up = False, backed_up
    r = await sign_in(world, lambda o: human.authenticator.get(o, counter=1))
    refused(r, 403, "sign_count_regression")
    assert await service.flagged(human.principal_id) == [True]
    assert await service.events("passkey.flagged", passkey.credential_id) == 1
    assert await service.events("passkey.refused", passkey.credential_id) == 0


@pytest.mark.asyncio(loop_scope="session")
async def test_an_assertion_backed_up_but_not_backup_eligible_writes_nothing(
    service: InProcess,
) -> None:
    """BS without BE in a signed assertion (WebAuthn L3 §7.2): 400 invalid_backup_flags, not
    a server error; nothing written."""
    world = service.world
    human = await human_with(world, backup_eligible=False, backed_up=False)
    passkey = only_passkey(human)
    stored = await service.stored(passkey.credential_id)
    passkey.backed_up = True
    before = await service.counts()
    r = await sign_in(world, human.authenticator.get)
    refused(r, 400, "invalid_backup_flags")
    assert await service.counts() == {
        **before,
        "webauthn_challenges": before["webauthn_challenges"] + 1,
    }
    assert await service.stored(passkey.credential_id) == stored


@pytest.mark.asyncio(loop_scope="session")
async def test_a_passkey_from_before_be_was_stored_records_it_at_its_next_use(
    service: InProcess,
) -> None:
    """A passkey registered before migration 0010 has BE NULL: its first accepted assertion
    records BE (and BS), and from then on a change of BE is refused."""
    world = service.world
    human = await human_with(world, backup_eligible=True, backed_up=True)
    passkey = only_passkey(human)
    await service.registry.pool.execute(
        "UPDATE passkey_credentials SET backup_eligible = NULL, backed_up = false"
        " WHERE credential_id = $1",
        b64url_encode(passkey.credential_id),
    )
    assert await listed(world, human) == [(None, False)]
    r = await sign_in(world, human.authenticator.get)
    assert r.status_code == 200, r.text
    assert await listed(world, human) == [(True, True)]
    passkey.backup_eligible = passkey.backed_up = False
    r = await sign_in(world, human.authenticator.get)
    refused(r, 403, "backup_eligibility_changed")


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize(
    "frame",
    [{"crossOrigin": False, "topOrigin": "http://localhost:8080"}, {"topOrigin": "https://x.y"}],
    ids=["top-with-cross-false", "top-without-cross"],
)
async def test_an_approval_or_sign_in_with_a_top_origin_is_refused(
    service: InProcess, frame: dict[str, Any]
) -> None:
    """topOrigin comes only with crossOrigin true (WebAuthn L3 §5.8.1). py_webauthn ignores
    it; the receipt verifier refuses it, so the registry neither stores such a receipt
    (it could never verify offline) nor signs anyone in with the assertion."""
    alice, request_id = await _assertions_refused(service, frame, "cross_origin")
    # The same passkey in a top-level page approves.
    await service.world.approve(alice, request_id)


async def _assertions_refused(
    service: InProcess, client_data: dict[str, Any], reason: str
) -> tuple[Human, str]:
    """Alice's passkey, its client data given ``client_data``'s members: an approval with
    it is refused ``reason``, writing nothing, and so is a sign-in. Returns Alice and the
    request she could not approve."""
    world = service.world
    alice = await world.human("Alice")
    changed = FramedAuthenticator(world.origin, client_data)
    changed.passkeys = alice.authenticator.passkeys  # the same passkey
    agent = await world.agent(alice)
    request = await world.request(agent, await world.provider())
    begun = await world.begin_approval(alice, request["id"])
    before = await service.counts()
    r = await world.client.post(
        world.url(f"/v1/grant-requests/{request['id']}/approval/finish"),
        headers=alice.headers,
        json={"credential": changed.get(begun["options"])},
    )
    refused(r, 400, reason)
    assert await service.counts() == before
    refused(await sign_in(world, changed.get), 400, reason)
    return alice, request["id"]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_token_binding_the_registry_cannot_check_is_refused_online_as_offline(
    service: InProcess,
) -> None:
    """WebAuthn L2 §7.1 step 10, §7.2 step 14: tokenBinding "present" must match the TLS
    connection's binding, and the registry's has none. py_webauthn takes it unchecked; the
    registry refuses it for registrations and assertions alike, as receipts are refused
    offline (test_receipts.py). "supported" is a browser that did not bind."""
    world = service.world
    present = {"crossOrigin": False, "tokenBinding": {"status": "present", "id": "AAECAw"}}
    options = await signup_options(world)
    before = await service.counts()
    credential = FramedAuthenticator(world.origin, present).create(options)
    r = await world.client.post(world.url("/v1/signup/finish"), json={"credential": credential})
    refused(r, 400, "token_binding")
    assert await service.counts() == before
    await _assertions_refused(service, present, "token_binding")  # over a bound connection
    supported = {"crossOrigin": False, "tokenBinding": {"status": "supported"}}
    credential = FramedAuthenticator(world.origin, supported).create(await signup_options(world))
    r = await world.client.post(world.url("/v1/signup/finish"), json={"credential": credential})
    assert r.status_code == 200, r.text


# --- 6. a recovery removes the passkeys it replaces --------------------------------------------


async def recover(world: World, human: Human, credential_for: Any) -> httpx.Response:
    """The admin's code for ``human``, spent on the passkey ``credential_for`` makes."""
    code, options = await world.recovery_options(human.principal_id)
    return await world.client.post(
        world.url("/v1/recovery/finish"),
        json={"code": code, "credential": credential_for(options)},
    )


async def removals(service: InProcess, passkey: Passkey) -> list[dict[str, Any]]:
    """The passkey.removed audit events about this passkey, as recorded."""
    subject = "passkey:" + b64url_encode(passkey.credential_id)
    rows = await service.registry.pool.fetch(
        "SELECT body FROM audit_events WHERE event = 'passkey.removed' ORDER BY time_ms, seq"
    )
    return [b for b in (json.loads(r["body"]) for r in rows) if b["subject"] == subject]


async def removed_at(service: InProcess, passkey: Passkey) -> Any:
    return await service.registry.pool.fetchval(
        "SELECT removed_at FROM passkey_credentials WHERE credential_id = $1",
        b64url_encode(passkey.credential_id),
    )


@pytest.mark.asyncio(loop_scope="session")
async def test_a_recovery_removes_the_passkeys_it_replaces(service: InProcess) -> None:
    """Whoever holds a lost (stolen) passkey must not sign in or approve with it once its
    owner has recovered (until 2026-12-01 every lost passkey stayed registered). Each is
    removed as DELETE /v1/passkeys/{id} removes one, and what it approved before stands."""
    world = service.world
    alice = await world.human("Alice")
    agent = await world.agent(alice)
    grant = await world.approve(alice, (await world.request(agent, await world.provider()))["id"])
    r = await begin_adding_a_passkey(world, alice)
    assert r.status_code == 200, r.text
    r = await world.client.post(
        world.url("/v1/passkeys/finish"),
        headers=alice.headers,
        json={"credential": alice.authenticator.create(r.json())},
    )
    assert r.status_code == 200, r.text
    lost = list(alice.authenticator.passkeys.values())
    assert len(lost) == 2

    device = SoftAuthenticator(origin=world.origin)
    r = await recover(world, alice, device.create)
    assert r.status_code == 200, r.text
    recovered = {"Authorization": f"Bearer {r.json()['session']}"}
    r = await world.client.get(world.url("/v1/passkeys"), headers=recovered)
    assert [p["credential_id"] for p in r.json()] == [b64url_encode(k) for k in device.passkeys]
    for passkey in lost:
        # Refused as a passkey removed from the Passkeys page is.
        r = await sign_in(world, lambda o, p=passkey: alice.authenticator.get(o, passkey=p))
        refused(r, 400, "unknown_credential")
        # The row stays, marked removed: receipts name it.
        assert await removed_at(service, passkey) is not None
        (removal,) = await removals(service, passkey)
        assert removal["actor"] == f"human:{alice.principal_id}"
        assert removal["data"] == {"reason": "recovery"}
    r = await sign_in(world, device.get)
    assert r.status_code == 200 and r.json()["principal_id"] == alice.principal_id, r.text
    # The grant one of the lost passkeys approved still gets tokens.
    r = await world.token(agent, grant["id"])
    assert r.status_code == 200, r.text


@pytest.mark.asyncio(loop_scope="session")
async def test_a_refused_recovery_removes_no_passkey(service: InProcess) -> None:
    """A wrong code, a registration from another origin or with an algorithm not offered:
    the human's passkey stays, listed and signing in, and nothing records its removal;
    the same code then recovers and removes it."""
    world = service.world
    alice = await world.human("Alice")
    old = only_passkey(alice)
    code, options = await world.recovery_options(alice.principal_id)
    device = SoftAuthenticator(origin=world.origin)
    for body, status, reason in (
        ({"code": "rec_" + "x" * 32, "credential": device.create(options)}, 403, "bad_recovery"),
        (
            {
                "code": code,
                "credential": SoftAuthenticator(origin="https://evil.example").create(options),
            },
            400,
            "registration_refused",
        ),
        (
            {"code": code, "credential": device.create(options, cose=rs256_cose())},
            400,
            "registration_refused",
        ),
    ):
        r = await world.client.post(world.url("/v1/recovery/finish"), json=body)
        refused(r, status, reason)
        assert await removed_at(service, old) is None
        assert await removals(service, old) == []
        r = await world.client.get(world.url("/v1/passkeys"), headers=alice.headers)
        assert [p["credential_id"] for p in r.json()] == [b64url_encode(old.credential_id)]
        r = await sign_in(world, alice.authenticator.get)
        assert r.status_code == 200, r.text
    r = await world.client.post(
        world.url("/v1/recovery/finish"),
        json={"code": code, "credential": SoftAuthenticator(origin=world.origin).create(options)},
    )
    assert r.status_code == 200, r.text
    assert await removed_at(service, old) is not None
    refused(await sign_in(world, alice.authenticator.get), 400, "unknown_credential")


@pytest.mark.asyncio(loop_scope="session")
async def test_a_recoverys_challenge_adds_no_passkey_outside_the_recovery(
    service: InProcess,
) -> None:
    """A session and a recovery code (no passkey confirming the change) must not add a
    passkey beside the human's own, leaving them, their sessions and the code as they were
    (until 2026-12-01 /v1/passkeys/finish took a recovery's challenge). The challenge stays
    for the recovery itself, which replaces the passkeys."""
    world = service.world
    alice = await world.human("Alice")
    old = only_passkey(alice)
    code, options = await world.recovery_options(alice.principal_id)
    device = SoftAuthenticator(origin=world.origin)
    before = await service.counts()
    r = await world.client.post(
        world.url("/v1/passkeys/finish"),
        headers=alice.headers,
        json={"credential": device.create(options)},
    )
    refused(r, 409, "challenge_used")
    assert await service.counts() == before
    r = await world.client.post(
        world.url("/v1/recovery/finish"),
        json={"code": code, "credential": device.create(options)},
    )
    assert r.status_code == 200, r.text
    assert await removed_at(service, old) is not None


@pytest.mark.asyncio(loop_scope="session")
async def test_ceremonies_begun_before_a_recovery_are_refused_to_the_passkeys_it_removed(
    service: InProcess,
) -> None:
    """An approval and a step-up's approval begun with the lost passkey before the recovery
    (their challenges still live) are refused to it after, writing nothing: a passkey is
    judged when it signs, not when the ceremony began."""
    world = service.world
    alice, agent, _, grant = await world.payments_grant()
    lost = only_passkey(alice)
    request = await world.request(agent, await world.provider())
    approval = await world.begin_approval(alice, request["id"])
    step = await world.step_up(agent, grant["id"], "60")
    r = await world.client.post(
        world.url(f"/v1/step-ups/{step['id']}/approval/begin"), headers=alice.headers
    )
    assert r.status_code == 200, r.text
    step_options = r.json()["options"]
    r = await recover(world, alice, SoftAuthenticator(origin=world.origin).create)
    assert r.status_code == 200, r.text
    recovered = {"Authorization": f"Bearer {r.json()['session']}"}
    before = await service.counts()
    for path, options in (
        (f"/v1/grant-requests/{request['id']}/approval/finish", approval["options"]),
        (f"/v1/step-ups/{step['id']}/approval/finish", step_options),
    ):
        r = await world.client.post(
            world.url(path),
            headers=recovered,
            json={"credential": alice.authenticator.get(options, passkey=lost)},
        )
        refused(r, 400, "unknown_credential")
        assert await service.counts() == before
