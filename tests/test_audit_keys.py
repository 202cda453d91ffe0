"""The audit key list: every key the registry signed checkpoints with, and its signing window.

In memory first (the document, the windows, how a list may grow), then the registry's route
through its FastAPI app in process (no Ray), after a key rotation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from audit_rotation import AUDIT_KEYS_PATH, published, rotated_registry

from agentauth.protocol import (
    AUDIT_KEYS_FORMAT,
    AuditKey,
    AuditKeys,
    Checkpoint,
    IntegrityError,
    InvalidRequest,
    KeySet,
    PrivateKey,
    PublicKey,
    sign_checkpoint,
)

ROOT = Path(__file__).resolve().parent.parent
OLD, NEW = PrivateKey.generate(kid="old"), PrivateKey.generate("Ed25519", kid="new")


def public(key: PrivateKey) -> PublicKey:
    return PublicKey.from_jwk(key.public_jwk())


def rotated() -> AuditKeys:
    """``old`` signed from 100 until 500, ``new`` from 400 on (they overlap, as after a
    rotation: the old key stays valid until its last token has expired)."""
    return AuditKeys([AuditKey(public(OLD), 100, 500), AuditKey(public(NEW), 400)])


def checkpoint(key: PrivateKey, at: int) -> str:
    return sign_checkpoint(Checkpoint(chain="registry-0", size=1, root="A" * 43, time=at), key)


def test_a_checkpoint_verifies_only_inside_its_keys_window() -> None:
    keys = rotated()
    for key, at in ((OLD, 100), (OLD, 499), (NEW, 400), (NEW, 10**10)):
        assert keys.verify(checkpoint(key, at)).time == at
    for key, at in ((OLD, 99), (OLD, 500), (NEW, 399)):
        with pytest.raises(IntegrityError) as caught:
            keys.verify(checkpoint(key, at))
        assert caught.value.reason == "key_window"
        assert f"outside the signing window of key {key.kid}" in caught.value.description
    # The signature is checked first: a stranger's key is unknown, whatever its time.
    with pytest.raises(IntegrityError) as unknown:
        keys.verify(checkpoint(PrivateKey.generate(kid="stranger"), 450))
    assert unknown.value.reason == "unknown_kid"


def test_the_document_round_trips_and_matches_its_schema() -> None:
    document = rotated().to_document()
    assert document["format"] == AUDIT_KEYS_FORMAT
    assert [(k["kid"], k["activates_at"], k["retires_at"]) for k in document["keys"]] == [
        ("old", 100, 500),
        ("new", 400, None),
    ]
    assert "kid" not in document["keys"][0]["jwk"]  # the kid is the entry's, said once
    again = AuditKeys.from_document(json.loads(json.dumps(document)))
    assert again.to_document() == document and again.windowed
    schema = json.loads((ROOT / "schemas" / "audit-keys.schema.json").read_text())
    jsonschema.validate(document, schema)


def test_a_plain_jwks_is_accepted_without_windows() -> None:
    jwks = KeySet([public(OLD)]).to_jwks()
    keys = AuditKeys.from_document(jwks)
    assert not keys.windowed and set(keys) == {"old"}
    assert keys.verify(checkpoint(OLD, 10**10)).time == 10**10  # nothing to bound it by
    assert AuditKeys.from_key_set(KeySet([public(OLD)])).windowed is False
    windowed = rotated()
    assert AuditKeys.from_key_set(windowed) is windowed


def test_a_pinned_jwks_with_an_encryption_key_keeps_only_its_signing_keys() -> None:
    """``--audit-keys FILE`` with a JWKS that also publishes an encryption key (until
    2026-11-30 the whole file was refused): that key verifies no checkpoint."""
    jwks = {"keys": [OLD.public_jwk(), dict(NEW.public_jwk(), use="enc")]}
    keys = AuditKeys.from_document(jwks)
    assert set(keys) == {"old"}
    assert keys.verify(checkpoint(OLD, 450)).time == 450
    with pytest.raises(IntegrityError) as unknown:
        keys.verify(checkpoint(NEW, 450))
    assert unknown.value.reason == "unknown_kid"


def test_a_plain_jwks_can_be_refused() -> None:
    """Where the document comes from the registry being checked (the approval page), a JWKS
    in place of the audit key list would turn every window check off."""
    with pytest.raises(InvalidRequest, match="plain JWKS"):
        AuditKeys.from_document(KeySet([public(OLD)]).to_jwks(), allow_jwks=False)
    document = rotated().to_document()
    assert AuditKeys.from_document(document, allow_jwks=False).to_document() == document


@pytest.mark.parametrize(
    "change",
    [
        lambda d: {**d, "format": "agentauth.audit-keys.v0"},
        lambda d: {**d, "extra": 1},
        lambda d: {**d, "keys": [{**d["keys"][0], "activates_at": "100"}]},
        lambda d: {**d, "keys": [{**d["keys"][0], "retires_at": -1}]},
        lambda d: {**d, "keys": [{**d["keys"][0], "alg": "HS256"}]},
        lambda d: {**d, "keys": [{**d["keys"][0], "jwk": {**d["keys"][0]["jwk"], "d": "AA"}}]},
        lambda d: {**d, "keys": [d["keys"][0], d["keys"][0]]},
        lambda d: {**d, "keys": [{k: v for k, v in d["keys"][0].items() if k != "retires_at"}]},
        lambda d: [d],
    ],
    ids=[
        "format",
        "extra-member",
        "time-as-text",
        "negative-time",
        "hmac",
        "private-key",
        "kid-twice",
        "missing-window-end",
        "not-an-object",
    ],
)
def test_a_malformed_list_is_refused(change: Any) -> None:
    with pytest.raises(InvalidRequest):
        AuditKeys.from_document(change(rotated().to_document()))


def test_a_list_extends_another_only_the_ways_the_registry_grows_it() -> None:
    before = AuditKeys([AuditKey(public(OLD), 100)])  # before the rotation
    after = rotated()
    assert after.extends(before) and after.extends(after) and not before.extends(after)
    assert AuditKeys([]).extends(AuditKeys([])) and after.extends(AuditKeys([]))
    for changed in (
        AuditKeys([AuditKey(public(OLD), 99, 500), AuditKey(public(NEW), 400)]),  # start moved
        AuditKeys([AuditKey(public(OLD), 100, 600), AuditKey(public(NEW), 400)]),  # end moved
        AuditKeys([AuditKey(public(OLD), 100), AuditKey(public(NEW), 400)]),  # end removed
        AuditKeys([AuditKey(public(NEW), 400)]),  # a key dropped
    ):
        assert not changed.extends(after), changed.to_document()
    other = PublicKey.from_jwk({**PrivateKey.generate().public_jwk(), "kid": "old"})
    assert not AuditKeys([AuditKey(other, 100, 500), AuditKey(public(NEW), 400)]).extends(after)


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio
async def test_the_registry_publishes_every_key_it_ever_signed_with(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with rotated_registry(database_url, redis_url, tmp_path) as registry:
        document = await published(registry.registry, AUDIT_KEYS_PATH)
        jwks = await published(registry.registry, "/.well-known/jwks.json")
        discovery = await published(registry.registry, "/.well-known/agentauth-configuration")
        rows = await registry.execute(
            "SELECT kid, activates_at, retires_at FROM signing_keys ORDER BY activates_at"
        )
    # The JWKS has dropped the retired key; the audit key list keeps it, with its window.
    assert [k["kid"] for k in jwks["keys"]] == [registry.new_kid]
    assert [(k["kid"], k["activates_at"], k["retires_at"]) for k in document["keys"]] == [
        (r["kid"], r["activates_at"], r["retires_at"]) for r in rows
    ]
    old, new = document["keys"]
    assert (old["kid"], new["kid"]) == (registry.old_kid, registry.new_kid)
    assert old["retires_at"] < time.time() and new["retires_at"] is None
    assert old["activates_at"] <= registry.signed_by_old_at < old["retires_at"]
    assert new["activates_at"] > registry.rotated_at  # published before it signed
    assert discovery["audit_keys_uri"] == "http://r.test/.well-known/agentauth-audit-keys.json"
    keys = AuditKeys.from_document(document)
    (current,) = jwks["keys"]
    assert keys[registry.new_kid].thumbprint == PublicKey.from_jwk(current).thumbprint
