"""Wycheproof signature vectors against ``PublicKey.from_jwk`` and ``PublicKey.verify``.

Every vector is one test case, named by its file and ``tcId``. Keys are turned into JWKs from
the raw coordinates (``wx``/``wy`` or ``pk``), the form our callers send, and checked against
the file's own ``publicKeyJwk`` where it gives one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agentauth.protocol._encoding import b64url_encode
from agentauth.protocol._errors import InvalidRequest
from agentauth.protocol._keys import PublicKey

VECTORS = Path(__file__).parent / "vectors" / "wycheproof"
ES256_FILE = "ecdsa_secp256r1_sha256_p1363_test.json"
ED25519_FILE = "ed25519_test.json"


@dataclass(frozen=True)
class Vector:
    file: str
    alg: str
    jwk: dict[str, Any]
    tc_id: int
    comment: str
    msg: bytes
    sig: bytes
    result: str


def _coordinate(hex_value: str) -> str:
    # Wycheproof writes coordinates as signed big-endian integers (a leading 00 when the top
    # bit is set); a JWK member is the unsigned value in exactly 32 bytes (RFC 7518 §6.2.1.2).
    return b64url_encode(int(hex_value, 16).to_bytes(32, "big"))


def _jwk(group: dict[str, Any]) -> dict[str, Any]:
    key = group["publicKey"]
    jwk: dict[str, Any]
    if key["type"] == "EcPublicKey":
        assert key["curve"] == "secp256r1"
        jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": _coordinate(key["wx"]),
            "y": _coordinate(key["wy"]),
        }
    else:
        assert key["type"] == "EDDSAPublicKey"
        assert key["curve"] == "edwards25519"
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(bytes.fromhex(key["pk"]))}
    given = group.get("publicKeyJwk")
    if given is not None:  # our reading of the raw key agrees with the file's own JWK
        assert {k: given[k] for k in jwk} == jwk
    return jwk


def _load(file: str, alg: str) -> tuple[dict[str, Any], list[Vector]]:
    data: dict[str, Any] = json.loads((VECTORS / file).read_text())
    vectors = [
        Vector(
            file=file,
            alg=alg,
            jwk=_jwk(group),
            tc_id=test["tcId"],
            comment=test["comment"],
            msg=bytes.fromhex(test["msg"]),
            sig=bytes.fromhex(test["sig"]),
            result=test["result"],
        )
        for group in data["testGroups"]
        for test in group["tests"]
    ]
    return data, vectors


ES256_DATA, ES256_VECTORS = _load(ES256_FILE, "ES256")
ED25519_DATA, ED25519_VECTORS = _load(ED25519_FILE, "Ed25519")
ALL_VECTORS = ES256_VECTORS + ED25519_VECTORS


def _id(vector: Vector) -> str:
    return f"{vector.alg}-tc{vector.tc_id}"


def test_every_vector_is_collected() -> None:
    assert ES256_DATA["schema"] == "ecdsa_p1363_verify_schema_v1.json"
    assert ED25519_DATA["schema"] == "eddsa_verify_schema_v1.json"
    assert len(ES256_VECTORS) == ES256_DATA["numberOfTests"] == 262
    assert len(ED25519_VECTORS) == ED25519_DATA["numberOfTests"] == 151
    for vectors in (ES256_VECTORS, ED25519_VECTORS):
        assert len({v.tc_id for v in vectors}) == len(vectors)


def test_no_acceptable_vectors() -> None:
    # "acceptable" marks behaviour Wycheproof leaves to the implementation. These files have
    # none today; if a refresh adds some, decide what verify should do, write it down here,
    # and assert it rather than letting the vectors pass whatever the result.
    assert {v.result for v in ALL_VECTORS} == {"valid", "invalid"}


@pytest.mark.parametrize("vector", ALL_VECTORS, ids=_id)
def test_vector(vector: Vector) -> None:
    try:
        key = PublicKey.from_jwk(vector.jwk)
    except InvalidRequest:
        # Refusing a key is only right when nothing could ever verify under it.
        assert vector.result == "invalid", f"key refused for a {vector.result} vector"
        return
    assert key.alg == vector.alg
    verified = key.verify(vector.sig, vector.msg)
    if vector.result == "valid":
        assert verified is True, vector.comment
    else:
        assert verified is False, vector.comment


@pytest.mark.parametrize("vector", [v for v in ALL_VECTORS if v.result == "valid"], ids=_id)
def test_valid_signature_is_bound_to_message_and_key(vector: Vector) -> None:
    # A valid vector also guards the negative path: one flipped bit anywhere must fail.
    key = PublicKey.from_jwk(vector.jwk)
    flipped_sig = bytes([vector.sig[0] ^ 0x01]) + vector.sig[1:]
    assert key.verify(flipped_sig, vector.msg) is False
    assert key.verify(vector.sig, vector.msg + b"\x00") is False
    assert key.verify(vector.sig[:-1], vector.msg) is False
