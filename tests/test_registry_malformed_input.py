"""Malformed WebAuthn credentials and DELETE bodies at the registry (in process, real
PostgreSQL and Redis, no Ray), found by fuzzing its HTTP layer.

- A credential py_webauthn cannot read (no ``id``, an unknown ``type``, a non-string
  ``userHandle``, no ``signature`` or ``attestationObject``, a COSE key type it does not
  know) raised one of its exceptions nobody caught: a 500 at every ceremony, anonymous
  sign-up and sign-in included, instead of ``400 invalid_receipt``.
- DELETE bodies skipped the body screen (size cap, duplicate members, U+0000, lone
  surrogates): a passkey removal's assertion holding U+0000 reached PostgreSQL, a 500.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from registry_inprocess import ISSUER, registry_in_process, table_counts
from registry_world import World
from softauthn import SoftAuthenticator

from agentauth.protocol import b64url_encode
from agentauth.registry import Registry, create_app

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


class Opened:
    def __init__(self, registry: Registry, world: World, client: httpx.AsyncClient) -> None:
        self.registry, self.world, self.client = registry, world, client

    async def counts(self) -> dict[str, int]:
        return await table_counts(self.registry.pool)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def service(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Opened]:
    data_dir = tmp_path_factory.mktemp("registry")
    async with registry_in_process(database_url, redis_url, data_dir, prefix="malformed") as opened:
        # What a real server answers: the 500 as a response, not the exception re-raised.
        transport = httpx.ASGITransport(app=create_app(opened.registry), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as client:
            yield Opened(opened.registry, opened.world, client)


def refused_400(r: httpx.Response) -> None:
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.json()["error"] == "invalid_receipt", r.text


# --- credentials py_webauthn cannot read -------------------------------------------------


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: c.pop("id"), id="no-id"),
        pytest.param(lambda c: c.update(type="public-key-x"), id="bad-type"),
        pytest.param(lambda c: c["response"].pop("attestationObject"), id="no-attestation"),
    ],
)
@pytest.mark.asyncio(loop_scope="session")
async def test_anonymous_signup_with_a_malformed_credential_is_refused_not_500(
    service: Opened, mutate: Any
) -> None:
    w, c = service.world, service.client
    options = (await c.post(w.url("/v1/signup/begin"), json={"display_name": "Mallory"})).json()
    credential = SoftAuthenticator(origin=w.origin).create(options)
    mutate(credential)
    before = await service.counts()
    r = await c.post(w.url("/v1/signup/finish"), json={"credential": credential})
    refused_400(r)
    assert await service.counts() == before


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: c.pop("id"), id="no-id"),
        pytest.param(lambda c: c.update(type="x"), id="bad-type"),
        pytest.param(lambda c: c["response"].update(userHandle=5), id="userHandle-int"),
        pytest.param(lambda c: c["response"].pop("signature"), id="no-signature"),
    ],
)
@pytest.mark.asyncio(loop_scope="session")
async def test_anonymous_sign_in_with_a_malformed_credential_is_refused_not_500(
    service: Opened, mutate: Any
) -> None:
    w, c = service.world, service.client
    alice = await w.human("Alice")  # via the world's own client: a passkey to name
    options = (await c.post(w.url("/v1/sessions/begin"))).json()
    credential = alice.authenticator.get(options)
    mutate(credential)
    r = await c.post(w.url("/v1/sessions/finish"), json={"credential": credential})
    refused_400(r)


@pytest.mark.asyncio(loop_scope="session")
async def test_an_approval_with_a_malformed_credential_is_refused_not_500(
    service: Opened,
) -> None:
    w, c = service.world, service.client
    human = await w.human()
    agent = await w.agent(human)
    request = await w.request(agent, await w.provider())
    begun = await w.begin_approval(human, request["id"])
    credential = human.authenticator.get(begun["options"])
    credential["response"]["userHandle"] = ["not", "a", "string"]
    before = await service.counts()
    r = await c.post(
        w.url(f"/v1/grant-requests/{request['id']}/approval/finish"),
        headers=human.headers,
        json={"credential": credential},
    )
    refused_400(r)
    assert await service.counts() == before


# --- DELETE bodies ----------------------------------------------------------------------


@pytest.mark.parametrize("poison", ["\\u0000", "\\ud800"])
@pytest.mark.asyncio(loop_scope="session")
async def test_a_passkey_removal_body_is_screened_like_every_other_body(
    service: Opened, poison: str
) -> None:
    w, c = service.world, service.client
    alice = await w.human("Alice")
    r = await c.post(w.url("/v1/passkeys/confirm"), headers=alice.headers, json={"change": "add"})
    r = await c.post(
        w.url("/v1/passkeys/begin"),
        headers=alice.headers,
        json={"credential": alice.authenticator.get(r.json())},
    )
    r = await c.post(
        w.url("/v1/passkeys/finish"),
        headers=alice.headers,
        json={"credential": SoftAuthenticator(origin=w.origin).create(r.json())},
    )
    second = r.json()["credential_id"]
    r = await c.post(
        w.url("/v1/passkeys/confirm"),
        headers=alice.headers,
        json={"change": "remove", "credential_id": second},
    )
    credential = alice.authenticator.get(r.json())
    raw = json.dumps({"credential": credential}).replace('"rawId": "', f'"rawId": "{poison}', 1)
    r = await c.request(
        "DELETE",
        w.url(f"/v1/passkeys/{second}"),
        headers={**alice.headers, "Content-Type": "application/json"},
        content=raw.encode(),
    )
    assert r.status_code == 400, (r.status_code, r.text)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_delete_body_with_duplicate_members_is_refused(service: Opened) -> None:
    """Every other body with duplicate members is a 400 bad_json (BodyGuard): "a security
    document must mean one thing". The passkey removal's is parsed keeping the last."""
    w, c = service.world, service.client
    alice = await w.human("Alice")
    r = await c.request(
        "DELETE",
        w.url("/v1/passkeys/whatever"),
        headers={**alice.headers, "Content-Type": "application/json"},
        content=b'{"credential": {"a": 1}, "credential": {}}',
    )
    assert (r.status_code, r.json().get("reason")) == (400, "bad_json"), r.text


@pytest.mark.asyncio(loop_scope="session")
async def test_an_anonymous_oversized_delete_body_is_refused_413(service: Opened) -> None:
    """MAX_BODY_BYTES (64 KiB) "keeps hostile bodies cheap to refuse": a POST over it is a
    413. A DELETE body of any size is read and parsed, before the caller is authenticated."""
    w, c = service.world, service.client
    big = b'{"credential": {"a": "' + b"x" * (8 * 1024 * 1024) + b'"}}'
    r = await c.post(
        w.url("/v1/passkeys/finish"), content=big, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413, r.text
    r = await c.request(
        "DELETE", w.url("/v1/passkeys/x"), content=big, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413, (r.status_code, r.text)


@pytest.mark.parametrize(
    "cose",
    [
        pytest.param({1: 4, 3: -7}, id="kty-symmetric"),
        pytest.param({1: "x", 3: -7}, id="kty-text"),
    ],
)
@pytest.mark.asyncio(loop_scope="session")
async def test_anonymous_signup_with_an_unknown_cose_key_type_is_refused_not_500(
    service: Opened, cose: dict[int, Any]
) -> None:
    """py_webauthn raises UnsupportedPublicKeyType for a COSE key of a type it does not
    know. Anyone can send one: the "none" attestation format signs nothing."""
    from softauthn import cbor

    w, c = service.world, service.client
    options = (await c.post(w.url("/v1/signup/begin"), json={"display_name": "Mallory"})).json()
    credential = SoftAuthenticator(origin=w.origin).create(options, cose=cbor(cose))
    r = await c.post(w.url("/v1/signup/finish"), json={"credential": credential})
    refused_400(r)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_provider_id_with_a_colon_is_refused_at_registration(service: Opened) -> None:
    """The id is the user-id of the provider's Basic credentials, which ends at the first
    colon (RFC 7617 §2): registered, ``acme:eu`` could never authenticate, every call read
    as provider ``acme`` with a secret starting ``eu:``."""
    w, c = service.world, service.client
    before = await service.counts()
    r = await c.post(
        w.url("/v1/providers"),
        headers=w.admin,
        json={
            "id": "acme:eu",
            "audience": "https://eu.acme.example",
            "display_name": "Acme EU",
            "allowed_kinds": ["read"],
        },
    )
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), r.text
    assert await service.counts() == before


@pytest.mark.parametrize("name", ["Ali\u202ecod.exe", "Alice\nAdmin", "Al\u200bice"])
@pytest.mark.asyncio(loop_scope="session")
async def test_a_sign_up_name_with_invisible_characters_is_refused(
    service: Opened, name: str
) -> None:
    """Agent and provider names refuse controls and format characters (a bidi override
    reverses what follows, a zero-width space makes two names look alike); a person's own
    name, which becomes the passkey's display name in the platform's picker, did not."""
    w, c = service.world, service.client
    before = await service.counts()
    r = await c.post(w.url("/v1/signup/begin"), json={"display_name": name})
    assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), r.text
    assert await service.counts() == before


# WebAuthn's longest credential id (L3 §5.1) is 1023 bytes, 1364 base64url characters, and
# registration accepts it: too long for a "passkey:<id>" audit subject (256 characters).
LONGEST_ID_BYTES = 1023


async def human_with_passkey(service: Opened, credential_id: bytes) -> tuple[str, str, Any]:
    """A new human signed up with a passkey of this id: (principal id, session, its
    authenticator)."""
    w, c = service.world, service.client
    authenticator = SoftAuthenticator(origin=w.origin)
    r = await c.post(w.url("/v1/signup/begin"), json={"display_name": "Dana"})
    credential = authenticator.create(r.json(), credential_id=credential_id)
    r = await c.post(w.url("/v1/signup/finish"), json={"credential": credential})
    assert r.status_code == 200, r.text
    return r.json()["principal_id"], r.json()["session"], authenticator


async def passkey_subjects(service: Opened, principal_id: str) -> list[str]:
    rows = await service.registry.pool.fetch(
        "SELECT body FROM audit_events WHERE body::jsonb ->> 'subject' LIKE 'passkey%'"
        " AND body::jsonb ->> 'actor' IN ($1, 'registry')",
        f"human:{principal_id}",
    )
    return [json.loads(r["body"])["subject"] for r in rows]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_passkey_with_the_longest_credential_id_signs_in_and_is_added_and_removed(
    service: Opened,
) -> None:
    """Sign-up took it, and then each event naming the passkey ("passkey:<id>", over the
    256 characters of every audit subject) failed its request, 400 "invalid document":
    its human could never sign in again, nor add or remove such a passkey (whose removal
    was also refused by a 1024-character cap on the id it names)."""
    w, c = service.world, service.client
    first_id = os.urandom(LONGEST_ID_BYTES)
    principal_id, _, authenticator = await human_with_passkey(service, first_id)
    r = await c.post(w.url("/v1/sessions/begin"))
    r = await c.post(w.url("/v1/sessions/finish"), json={"credential": authenticator.get(r.json())})
    assert r.status_code == 200, r.text
    headers = {"Authorization": f"Bearer {r.json()['session']}"}
    r = await c.post(w.url("/v1/passkeys/confirm"), headers=headers, json={"change": "add"})
    r = await c.post(
        w.url("/v1/passkeys/begin"),
        headers=headers,
        json={"credential": authenticator.get(r.json())},
    )
    second_id = os.urandom(LONGEST_ID_BYTES)
    created = authenticator.create(r.json(), credential_id=second_id)
    r = await c.post(w.url("/v1/passkeys/finish"), headers=headers, json={"credential": created})
    assert r.status_code == 200, r.text
    second = r.json()["credential_id"]
    assert len(second) == 1364
    r = await c.post(
        w.url("/v1/passkeys/confirm"),
        headers=headers,
        json={"change": "remove", "credential_id": second},
    )
    assert r.status_code == 200, r.text
    confirmation = authenticator.get(r.json(), passkey=authenticator.passkeys[first_id])
    r = await c.request(
        "DELETE",
        w.url(f"/v1/passkeys/{second}"),
        headers=headers,
        json={"credential": confirmation},
    )
    assert (r.status_code, r.json()) == (200, {"removed": True}), r.text
    listed = (await c.get(w.url("/v1/passkeys"), headers=headers)).json()
    assert [p["credential_id"] for p in listed] == [b64url_encode(first_id)]
    subjects = await passkey_subjects(service, principal_id)
    assert len(subjects) == 3  # session.created, passkey.added, passkey.removed
    assert all(len(s) <= 256 for s in subjects)
    assert len(set(subjects)) == 2  # one name for each passkey


@pytest.mark.asyncio(loop_scope="session")
async def test_a_recovery_removes_a_passkey_with_the_longest_credential_id(
    service: Opened,
) -> None:
    """The recovery's passkey.removed event for the lost passkey failed it (as above): a
    human whose lost passkey had such an id could not be recovered at all."""
    w, c = service.world, service.client
    principal_id, _, _ = await human_with_passkey(service, os.urandom(LONGEST_ID_BYTES))
    code, options = await w.recovery_options(principal_id)
    new_id = os.urandom(LONGEST_ID_BYTES)
    credential = SoftAuthenticator(origin=w.origin).create(options, credential_id=new_id)
    r = await c.post(w.url("/v1/recovery/finish"), json={"code": code, "credential": credential})
    assert r.status_code == 200, r.text
    headers = {"Authorization": f"Bearer {r.json()['session']}"}
    listed = (await c.get(w.url("/v1/passkeys"), headers=headers)).json()
    assert [p["credential_id"] for p in listed] == [b64url_encode(new_id)]
    assert all(len(s) <= 256 for s in await passkey_subjects(service, principal_id))
