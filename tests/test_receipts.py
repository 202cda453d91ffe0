"""Approval receipts: WebAuthn assertions over grant hashes, verified offline.

``SoftAuthenticator`` below is a software passkey: it holds a P-256 or Ed25519 key, encodes its
COSE_Key by hand and makes assertions the way a browser and authenticator would.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Literal

import pytest
import webauthn
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from webauthn.helpers import parse_authentication_credential_json
from webauthn.helpers.exceptions import InvalidAuthenticationResponse
from webauthn.helpers.structs import CredentialDeviceType

from agentauth.protocol._encoding import b64url_decode, b64url_encode, canonical_json
from agentauth.protocol._errors import InvalidReceipt
from agentauth.protocol._keys import PublicKey
from agentauth.protocol._receipts import (
    ApprovalReceipt,
    VerifiedReceipt,
    _decode_cbor,
    cose_key_to_jwk,
    verify_assertion,
)

RP_ID = "agentauth.example"
ORIGIN = "https://agentauth.example"

UP, UV, BE, BS, AT, ED = 0x01, 0x04, 0x08, 0x10, 0x40, 0x80

GRANT_A = {"agent": "agent-1", "capabilities": [{"action": "pay", "max": "10.00"}]}
GRANT_B = {"agent": "agent-1", "capabilities": [{"action": "pay", "max": "10000.00"}]}
CHALLENGE_A = hashlib.sha256(canonical_json(GRANT_A)).digest()
CHALLENGE_B = hashlib.sha256(canonical_json(GRANT_B)).digest()

RECEIPT_FIELDS = (
    "credential_id",
    "authenticator_data",
    "client_data_json",
    "signature",
    "credential_public_key",
    "user_handle",
)


# --- A software authenticator ------------------------------------------------------------------


def _cbor_bstr32(value: bytes) -> bytes:
    assert len(value) == 32
    return b"\x58\x20" + value  # major 2, one-byte length 32


class SoftAuthenticator:
    """A software passkey making WebAuthn assertions (authenticator and browser halves)."""

    def __init__(self, alg: Literal["ES256", "Ed25519"] = "ES256") -> None:
        self.alg = alg
        self.key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
        if alg == "ES256":
            self.key = ec.generate_private_key(ec.SECP256R1())
        else:
            self.key = ed25519.Ed25519PrivateKey.generate()
        self.credential_id = os.urandom(16)
        self.user_handle = os.urandom(16)
        self.sign_count = 41

    def cose_key(self) -> bytes:
        """The credential's COSE_Key, CTAP2-canonical CBOR encoded by hand."""
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            x = self.key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            # {1: 1 (OKP), 3: -8 (EdDSA), -1: 6 (Ed25519), -2: x}
            return b"\xa4" + b"\x01\x01" + b"\x03\x27" + b"\x20\x06" + b"\x21" + _cbor_bstr32(x)
        numbers = self.key.public_key().public_numbers()
        # {1: 2 (EC2), 3: -7 (ES256), -1: 1 (P-256), -2: x, -3: y}
        return (
            b"\xa5"
            + b"\x01\x02"
            + b"\x03\x26"
            + b"\x20\x01"
            + b"\x21"
            + _cbor_bstr32(numbers.x.to_bytes(32, "big"))
            + b"\x22"
            + _cbor_bstr32(numbers.y.to_bytes(32, "big"))
        )

    def sign(self, data: bytes) -> bytes:
        """WebAuthn form: DER for ES256, raw 64 bytes for EdDSA."""
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            return self.key.sign(data)
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))

    def authenticator_data(
        self, *, rp_id: str = RP_ID, flags: int = UP | UV, extensions: bytes = b""
    ) -> bytes:
        self.sign_count += 1
        return (
            hashlib.sha256(rp_id.encode()).digest()
            + bytes([flags])
            + self.sign_count.to_bytes(4, "big")
            + extensions
        )

    @staticmethod
    def client_data(challenge: bytes, **overrides: Any) -> bytes:
        """clientDataJSON as a browser serializes it; ``None`` overrides drop a member."""
        members: dict[str, Any] = {
            "type": "webauthn.get",
            "challenge": b64url_encode(challenge),
            "origin": ORIGIN,
            "crossOrigin": False,
        }
        members.update(overrides)
        members = {k: v for k, v in members.items() if v is not None}
        return json.dumps(members, separators=(",", ":")).encode()

    def approve(
        self,
        challenge: bytes,
        *,
        authenticator_data: bytes | None = None,
        client_data_json: bytes | None = None,
        **client_data: Any,
    ) -> ApprovalReceipt:
        """Sign an assertion over ``challenge`` and package it as a receipt."""
        auth_data = authenticator_data or self.authenticator_data()
        cdj = client_data_json or self.client_data(challenge, **client_data)
        signature = self.sign(auth_data + hashlib.sha256(cdj).digest())
        return ApprovalReceipt(
            credential_id=b64url_encode(self.credential_id),
            authenticator_data=b64url_encode(auth_data),
            client_data_json=b64url_encode(cdj),
            signature=b64url_encode(signature),
            credential_public_key=b64url_encode(self.cose_key()),
            user_handle=b64url_encode(self.user_handle),
        )


@pytest.fixture(scope="module", params=["ES256", "Ed25519"])
def authenticator(request: pytest.FixtureRequest) -> SoftAuthenticator:
    return SoftAuthenticator(request.param)


@pytest.fixture(scope="module")
def es256() -> SoftAuthenticator:
    return SoftAuthenticator("ES256")


def _verify(receipt: ApprovalReceipt, **overrides: Any) -> VerifiedReceipt:
    kwargs: dict[str, Any] = {
        "challenge": CHALLENGE_A,
        "rp_id": RP_ID,
        "origin": ORIGIN,
        "require_uv": True,
    }
    kwargs.update(overrides)
    return verify_assertion(receipt, **kwargs)


def _reason(receipt: ApprovalReceipt, **overrides: Any) -> str | None:
    with pytest.raises(InvalidReceipt) as caught:
        _verify(receipt, **overrides)
    assert caught.value.error == "invalid_receipt"
    return caught.value.reason


def _py_webauthn_verify(receipt: ApprovalReceipt, **overrides: Any) -> Any:
    credential = {
        "id": receipt.credential_id,
        "rawId": receipt.credential_id,
        "type": "public-key",
        "response": {
            "authenticatorData": receipt.authenticator_data,
            "clientDataJSON": receipt.client_data_json,
            "signature": receipt.signature,
            "userHandle": receipt.user_handle,
        },
    }
    kwargs: dict[str, Any] = {
        "expected_challenge": CHALLENGE_A,
        "expected_rp_id": RP_ID,
        "expected_origin": ORIGIN,
        "require_user_verification": True,
    }
    kwargs.update(overrides)
    return webauthn.verify_authentication_response(
        credential=parse_authentication_credential_json(credential),
        credential_public_key=b64url_decode(receipt.credential_public_key),
        credential_current_sign_count=0,
        **kwargs,
    )


# --- Positive controls -------------------------------------------------------------------------


def test_assertion_verifies(authenticator: SoftAuthenticator) -> None:
    receipt = authenticator.approve(CHALLENGE_A)
    verified = _verify(receipt)
    assert verified == VerifiedReceipt(
        credential_id=b64url_encode(authenticator.credential_id),
        sign_count=authenticator.sign_count,
        user_verified=True,
        backed_up=False,
        backup_eligible=False,
    )


def test_backup_flags_and_origin_list(authenticator: SoftAuthenticator) -> None:
    receipt = authenticator.approve(
        CHALLENGE_A,
        authenticator_data=authenticator.authenticator_data(flags=UP | UV | BE | BS),
        origin="https://approve.agentauth.example",
    )
    origins = ["https://elsewhere.example", "https://approve.agentauth.example"]
    assert _verify(receipt, origin=origins).backed_up is True
    verified = _verify(receipt, origin=frozenset(origins))
    assert (verified.backed_up, verified.backup_eligible) == (True, True)


def test_backup_eligible_but_not_backed_up(authenticator: SoftAuthenticator) -> None:
    auth_data = authenticator.authenticator_data(flags=UP | UV | BE)
    receipt = authenticator.approve(CHALLENGE_A, authenticator_data=auth_data)
    verified = _verify(receipt)
    assert (verified.backed_up, verified.backup_eligible) == (False, True)


def test_client_data_without_cross_origin_and_with_unknown_members(
    authenticator: SoftAuthenticator,
) -> None:
    # Browsers may omit crossOrigin and add members (Chrome's "other_keys_can_be_added_here").
    receipt = authenticator.approve(
        CHALLENGE_A, crossOrigin=None, other_keys_can_be_added_here="do not compare bytes"
    )
    _verify(receipt)


def test_extensions_are_tolerated(authenticator: SoftAuthenticator) -> None:
    extensions = b"\xa1\x6bcredProtect\x01"  # {"credProtect": 1}
    auth_data = authenticator.authenticator_data(flags=UP | UV | ED, extensions=extensions)
    verified = _verify(authenticator.approve(CHALLENGE_A, authenticator_data=auth_data))
    assert verified.sign_count == authenticator.sign_count


@pytest.mark.parametrize(
    "extensions",
    [
        "a0",  # {}
        # {"thirdPartyPayment": true}: CTAP 2.2's output is a boolean
        "a1" + "71" + b"thirdPartyPayment".hex() + "f5",
        # {"credBlob": h'0102', "x": null}
        "a2" + "68" + b"credBlob".hex() + "420102" + "6178" + "f6",
    ],
    ids=["empty-map", "boolean-output", "bytes-and-null"],
)
def test_an_extensions_map_agrees_with_py_webauthn(
    authenticator: SoftAuthenticator, extensions: str
) -> None:
    auth_data = authenticator.authenticator_data(
        flags=UP | UV | ED, extensions=bytes.fromhex(extensions)
    )
    receipt = authenticator.approve(CHALLENGE_A, authenticator_data=auth_data)
    assert _verify(receipt).sign_count == _py_webauthn_verify(receipt).new_sign_count


@pytest.mark.parametrize(
    "extensions",
    [
        "ffffffffff",  # no CBOR at all
        "a0" + b"junk".hex(),  # one map, then bytes
        "a0a0",  # two maps
        "80",  # an array, not a map
        "6178",  # a text string
        "a1f501",  # {true: 1}: a key that is no integer or text
        "a1",  # a map cut short
    ],
    ids=["junk", "map-then-junk", "two-maps", "array", "text", "boolean-key", "truncated"],
)
def test_extensions_that_are_not_exactly_one_map_are_refused(
    authenticator: SoftAuthenticator, extensions: str
) -> None:
    """WebAuthn §6.1: with ED set, exactly one CBOR map follows the counter. The registry's
    parser (py_webauthn) refuses junk, trailing bytes and truncation, so the offline
    verifier must too: a receipt would otherwise prove something only offline. It is
    stricter on the rest (an array, a text string, a boolean key), which the registry then
    refuses as well, since it stores only receipts this verifier accepts."""
    auth_data = authenticator.authenticator_data(
        flags=UP | UV | ED, extensions=bytes.fromhex(extensions)
    )
    receipt = authenticator.approve(CHALLENGE_A, authenticator_data=auth_data)
    assert _reason(receipt) == "malformed"


_CRED_PROTECT = "6b" + b"credProtect".hex()  # the text key "credProtect", shortest form


@pytest.mark.parametrize(
    "extensions",
    [
        "b801" + _CRED_PROTECT + "01",  # map count 1 in one extra byte
        "b90001" + _CRED_PROTECT + "01",  # ...in two
        "ba00000001" + _CRED_PROTECT + "01",  # ...in four
        "bb0000000000000001" + _CRED_PROTECT + "01",  # ...in eight
        "a1780b" + b"credProtect".hex() + "01",  # text length 11 in one extra byte
        "a1" + _CRED_PROTECT + "1801",  # unsigned 1 as 0x18 0x01
        "a1" + _CRED_PROTECT + "190017",  # unsigned 23 in two bytes
        "a1" + _CRED_PROTECT + "1900ff",  # unsigned 255 in two bytes, not one
        "a1" + _CRED_PROTECT + "1a0000ffff",  # 65535 in four bytes, not two
        "a1" + _CRED_PROTECT + "1b00000000ffffffff",  # 2**32 - 1 in eight bytes, not four
        "a1" + _CRED_PROTECT + "3800",  # -1 as 0x38 0x00
        "a1" + "68" + b"credBlob".hex() + "580102",  # byte string length 1 in one extra byte
        "a1" + "61" + b"x".hex() + "980101",  # array count 1 in one extra byte
        "bf" + _CRED_PROTECT + "01" + "ff",  # indefinite-length map
        "a1" + "7f" + "6b" + b"credProtect".hex() + "ff" + "01",  # indefinite-length text key
    ],
    ids=[
        "count-1",
        "count-2",
        "count-4",
        "count-8",
        "text-length",
        "uint-1",
        "uint-23",
        "uint-255",
        "uint-65535",
        "uint-2^32-1",
        "nint",
        "bytes-length",
        "array-count",
        "indefinite-map",
        "indefinite-text",
    ],
)
def test_extensions_not_in_shortest_form_are_refused(
    authenticator: SoftAuthenticator, extensions: str
) -> None:
    """CTAP2 canonical CBOR writes every integer, length and count in its shortest form.
    A longer one would let one approval be written as several receipts with different
    digests; py_webauthn (the registry's parser) refuses them too, so the two agree."""
    auth_data = authenticator.authenticator_data(
        flags=UP | UV | ED, extensions=bytes.fromhex(extensions)
    )
    receipt = authenticator.approve(CHALLENGE_A, authenticator_data=auth_data)
    assert _reason(receipt) == "malformed"
    with pytest.raises(InvalidAuthenticationResponse):
        _py_webauthn_verify(receipt)


@pytest.mark.parametrize(
    "value",
    ["17", "1818", "18ff", "190100", "19ffff", "1a00010000", "1affffffff", "1b0000000100000000"],
    ids=["23", "24", "255", "256", "65535", "65536", "2^32-1", "2^32"],
)
def test_extensions_at_each_shortest_form_boundary_verify(
    authenticator: SoftAuthenticator, value: str
) -> None:
    auth_data = authenticator.authenticator_data(
        flags=UP | UV | ED, extensions=bytes.fromhex("a1" + _CRED_PROTECT + value)
    )
    receipt = authenticator.approve(CHALLENGE_A, authenticator_data=auth_data)
    assert _verify(receipt).sign_count == _py_webauthn_verify(receipt).new_sign_count


def test_sign_count_is_big_endian_counter(es256: SoftAuthenticator) -> None:
    es256.sign_count = 0x01020303
    assert _verify(es256.approve(CHALLENGE_A)).sign_count == 0x01020304


@pytest.mark.parametrize("alg", ["ES256", "Ed25519"])
def test_agrees_with_py_webauthn(alg: Literal["ES256", "Ed25519"]) -> None:
    authenticator = SoftAuthenticator(alg)
    receipt = authenticator.approve(CHALLENGE_A)
    ours = _verify(receipt)
    theirs = _py_webauthn_verify(receipt)
    assert theirs.new_sign_count == ours.sign_count == authenticator.sign_count
    assert theirs.user_verified == ours.user_verified
    assert theirs.credential_backed_up == ours.backed_up
    assert (theirs.credential_device_type == CredentialDeviceType.MULTI_DEVICE) == (
        ours.backup_eligible
    )
    assert b64url_encode(theirs.credential_id) == ours.credential_id


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda a: a.approve(CHALLENGE_B), "challenge_mismatch"),
        (lambda a: a.approve(CHALLENGE_A, origin="https://evil.example"), "origin_mismatch"),
        (lambda a: a.approve(CHALLENGE_A, type="webauthn.create"), "type_mismatch"),
        (
            lambda a: a.approve(CHALLENGE_A, authenticator_data=a.authenticator_data(rp_id="x.y")),
            "rp_id_mismatch",
        ),
        (
            lambda a: a.approve(CHALLENGE_A, authenticator_data=a.authenticator_data(flags=UV)),
            "user_not_present",
        ),
        (
            lambda a: a.approve(CHALLENGE_A, authenticator_data=a.authenticator_data(flags=UP)),
            "user_not_verified",
        ),
    ],
)
def test_py_webauthn_rejects_what_we_reject(make: Any, reason: str) -> None:
    receipt = make(SoftAuthenticator("ES256"))
    assert _reason(receipt) == reason
    with pytest.raises(InvalidAuthenticationResponse):
        _py_webauthn_verify(receipt)


# --- Client data -------------------------------------------------------------------------------


def test_approval_of_one_grant_is_not_approval_of_another(
    authenticator: SoftAuthenticator,
) -> None:
    receipt = authenticator.approve(CHALLENGE_A)
    _verify(receipt, challenge=CHALLENGE_A)
    assert _reason(receipt, challenge=CHALLENGE_B) == "challenge_mismatch"


def test_wrong_origin(authenticator: SoftAuthenticator) -> None:
    receipt = authenticator.approve(CHALLENGE_A, origin="https://agentauth.example.evil")
    assert _reason(receipt) == "origin_mismatch"
    # Origins match exactly: no prefix, case or trailing-slash games.
    for origin in ("https://agentauth.example/", "HTTPS://AGENTAUTH.EXAMPLE"):
        receipt = authenticator.approve(CHALLENGE_A, origin=origin)
        assert _reason(receipt) == "origin_mismatch"


def test_empty_origin_list_allows_nothing(authenticator: SoftAuthenticator) -> None:
    assert _reason(authenticator.approve(CHALLENGE_A), origin=[]) == "origin_mismatch"


@pytest.mark.parametrize("value", [True, "false", 0, None])
def test_cross_origin(authenticator: SoftAuthenticator, value: object) -> None:
    if value is None:  # a JSON null, not an absent member
        cdj = b'{"type":"webauthn.get","challenge":"%s","origin":"%s","crossOrigin":null}' % (
            b64url_encode(CHALLENGE_A).encode(),
            ORIGIN.encode(),
        )
        receipt = authenticator.approve(CHALLENGE_A, client_data_json=cdj)
    else:
        receipt = authenticator.approve(CHALLENGE_A, crossOrigin=value)
    assert _reason(receipt) == "cross_origin"


@pytest.mark.parametrize(
    "frame",
    [
        {"crossOrigin": False, "topOrigin": ORIGIN},
        {"crossOrigin": None, "topOrigin": ORIGIN},
        {"crossOrigin": False, "topOrigin": "https://evil.example"},
        {"crossOrigin": True, "topOrigin": "https://evil.example"},
        {"crossOrigin": False, "topOrigin": None},  # a JSON null is still the member
    ],
    ids=["top-self", "top-without-cross", "top-other", "cross-and-top", "top-null"],
)
def test_top_origin_is_refused_whatever_cross_origin_says(
    authenticator: SoftAuthenticator, frame: dict[str, Any]
) -> None:
    """WebAuthn L3 §5.8.1: topOrigin is only set for a cross-origin frame, with crossOrigin
    true. Beside false or nothing it contradicts the client data's own claim; the registry
    refuses any topOrigin at registration, and assertions now agree with it."""
    members = {
        "type": "webauthn.get",
        "challenge": b64url_encode(CHALLENGE_A),
        "origin": ORIGIN,
        **{k: v for k, v in frame.items() if v is not None or k == "topOrigin"},
    }
    cdj = json.dumps(members, separators=(",", ":")).encode()
    receipt = authenticator.approve(CHALLENGE_A, client_data_json=cdj)
    assert _reason(receipt) == "cross_origin"


@pytest.mark.parametrize(
    "binding",
    [{"status": "present", "id": "AAECAw"}, {"status": "present"}],
    ids=["with-id", "without-id"],
)
def test_token_binding_present_is_refused_as_the_registry_refuses_it(
    authenticator: SoftAuthenticator, binding: dict[str, str]
) -> None:
    """WebAuthn L2 §7.2 step 14: "present" must match the TLS connection's Token Binding,
    and AgentAuth's connections have none. py_webauthn takes it unchecked, so the
    registry's refusal (test_registry_webauthn.py) is this verifier's: online and offline
    agree."""
    receipt = authenticator.approve(CHALLENGE_A, tokenBinding=binding)
    assert _reason(receipt) == "token_binding"
    _py_webauthn_verify(receipt)  # accepted there: the rule is ours


def test_token_binding_supported_is_no_binding(authenticator: SoftAuthenticator) -> None:
    # "supported": the browser could bind, but this connection was not bound.
    _verify(authenticator.approve(CHALLENGE_A, tokenBinding={"status": "supported"}))


@pytest.mark.parametrize(
    "binding",
    [{}, {"status": "not-supported"}, {"status": None}, {"status": ["present"]}, "present", None],
    ids=["no-status", "unknown", "null-status", "list", "text", "null"],
)
def test_token_binding_no_browser_writes_is_malformed(
    authenticator: SoftAuthenticator, binding: object
) -> None:
    members = {
        "type": "webauthn.get",
        "challenge": b64url_encode(CHALLENGE_A),
        "origin": ORIGIN,
        "tokenBinding": binding,
    }
    cdj = json.dumps(members, separators=(",", ":")).encode()
    receipt = authenticator.approve(CHALLENGE_A, client_data_json=cdj)
    assert _reason(receipt) == "malformed"


def test_registration_client_data_is_refused(authenticator: SoftAuthenticator) -> None:
    receipt = authenticator.approve(CHALLENGE_A, type="webauthn.create")
    assert _reason(receipt) == "type_mismatch"


@pytest.mark.parametrize(
    "cdj",
    [
        b'{"type":"webauthn.get","type":"webauthn.get","challenge":"CHALLENGE",'
        b'"origin":"https://agentauth.example"}',
        b'["webauthn.get"]',
        b"not json",
        b'{"type":"webauthn.get","challenge":"CHALLENGE","origin":"https://agentauth.example"} x',
        b'{"type":"webauthn.get","challenge":"CHALLENGE","origin":"https://agentauth.example",'
        b'"n":NaN}',
        b'{"type":"webauthn.get","origin":"https://agentauth.example"}',
        b'{"type":"webauthn.get","challenge":"not base64url!","origin":"https://agentauth.example"}',
        b'{"type":"webauthn.get","challenge":7,"origin":"https://agentauth.example"}',
        b"\xff\xfe",
    ],
    ids=[
        "duplicate-member",
        "array",
        "not-json",
        "trailing",
        "nan",
        "no-challenge",
        "challenge-not-b64",
        "challenge-not-string",
        "not-utf8",
    ],
)
def test_malformed_client_data(authenticator: SoftAuthenticator, cdj: bytes) -> None:
    cdj = cdj.replace(b"CHALLENGE", b64url_encode(CHALLENGE_A).encode())
    receipt = authenticator.approve(CHALLENGE_A, client_data_json=cdj)
    assert _reason(receipt) == "malformed"


def test_duplicate_challenge_member_cannot_smuggle_a_second_grant(
    authenticator: SoftAuthenticator,
) -> None:
    # A lenient parser keeps the last "challenge"; a display might show the first.
    cdj = b'{"type":"webauthn.get","challenge":"%s","origin":"%s","challenge":"%s"}' % (
        b64url_encode(CHALLENGE_B).encode(),
        ORIGIN.encode(),
        b64url_encode(CHALLENGE_A).encode(),
    )
    receipt = authenticator.approve(CHALLENGE_A, client_data_json=cdj)
    assert _reason(receipt) == "malformed"


# --- Authenticator data ------------------------------------------------------------------------


def test_wrong_rp_id(authenticator: SoftAuthenticator) -> None:
    receipt = authenticator.approve(CHALLENGE_A)
    assert _reason(receipt, rp_id="evil.example") == "rp_id_mismatch"
    auth_data = authenticator.authenticator_data(rp_id="example")  # a parent domain
    receipt = authenticator.approve(CHALLENGE_A, authenticator_data=auth_data)
    assert _reason(receipt) == "rp_id_mismatch"


def test_user_presence_is_always_required(authenticator: SoftAuthenticator) -> None:
    auth_data = authenticator.authenticator_data(flags=UV)
    receipt = authenticator.approve(CHALLENGE_A, authenticator_data=auth_data)
    assert _reason(receipt, require_uv=False) == "user_not_present"


def test_user_verification_when_required(authenticator: SoftAuthenticator) -> None:
    auth_data = authenticator.authenticator_data(flags=UP)
    receipt = authenticator.approve(CHALLENGE_A, authenticator_data=auth_data)
    assert _reason(receipt, require_uv=True) == "user_not_verified"
    verified = _verify(receipt, require_uv=False)
    assert verified.user_verified is False


def test_attested_data_in_assertion_is_refused(authenticator: SoftAuthenticator) -> None:
    auth_data = authenticator.authenticator_data(flags=UP | UV | AT, extensions=os.urandom(40))
    receipt = authenticator.approve(CHALLENGE_A, authenticator_data=auth_data)
    assert _reason(receipt) == "attested_data"


@pytest.mark.parametrize(
    ("flags", "extensions"),
    [
        (UP | UV, b"\xa0"),  # bytes after the counter without ED
        (UP | UV | ED, b""),  # ED without extensions
        (UP | UV | BS, b""),  # backed up, yet not backup-eligible
    ],
    ids=["trailing-bytes", "ed-without-extensions", "bs-without-be"],
)
def test_inconsistent_authenticator_data(
    authenticator: SoftAuthenticator, flags: int, extensions: bytes
) -> None:
    auth_data = authenticator.authenticator_data(flags=flags, extensions=extensions)
    receipt = authenticator.approve(CHALLENGE_A, authenticator_data=auth_data)
    assert _reason(receipt) == "malformed"


@pytest.mark.parametrize("length", [1, 32, 33, 36])
def test_truncated_authenticator_data(authenticator: SoftAuthenticator, length: int) -> None:
    auth_data = authenticator.authenticator_data()[:length]
    receipt = authenticator.approve(CHALLENGE_A, authenticator_data=auth_data)
    assert _reason(receipt) == "malformed"


# --- Signatures --------------------------------------------------------------------------------


def test_tampered_authenticator_data(authenticator: SoftAuthenticator) -> None:
    receipt = authenticator.approve(CHALLENGE_A)
    auth_data = bytearray(b64url_decode(receipt.authenticator_data))
    auth_data[36] ^= 0x01  # the counter: no other check notices
    tampered = receipt.model_copy(update={"authenticator_data": b64url_encode(bytes(auth_data))})
    assert _reason(tampered) == "bad_signature"


def test_tampered_client_data(authenticator: SoftAuthenticator) -> None:
    receipt = authenticator.approve(CHALLENGE_A)
    cdj = b64url_decode(receipt.client_data_json)
    tampered_cdj = cdj[:-1] + b',"note":"added later"}'
    tampered = receipt.model_copy(update={"client_data_json": b64url_encode(tampered_cdj)})
    assert _reason(tampered) == "bad_signature"


def test_signature_from_another_key(authenticator: SoftAuthenticator) -> None:
    receipt = authenticator.approve(CHALLENGE_A)
    impostor = SoftAuthenticator(authenticator.alg)
    forged = impostor.approve(
        CHALLENGE_A, authenticator_data=b64url_decode(receipt.authenticator_data)
    )
    assert _verify(forged).credential_id  # valid under its own key...
    mixed = receipt.model_copy(update={"signature": forged.signature})
    assert _reason(mixed) == "bad_signature"  # ...but not under the approver's


def test_es256_signature_must_be_canonical_der(es256: SoftAuthenticator) -> None:
    receipt = es256.approve(CHALLENGE_A)
    der = b64url_decode(receipt.signature)
    variants = [
        der + b"\x00",  # trailing byte
        b"\x30\x81" + bytes([der[1]]) + der[2:],  # non-minimal length
        der[:-1],  # truncated
        bytes(64),  # raw r||s form, as JWS would have it
    ]
    for variant in variants:
        mangled = receipt.model_copy(update={"signature": b64url_encode(variant)})
        assert _reason(mangled) == "bad_signature"


def test_ed25519_signature_must_be_64_bytes() -> None:
    authenticator = SoftAuthenticator("Ed25519")
    receipt = authenticator.approve(CHALLENGE_A)
    for variant in (b64url_decode(receipt.signature) + b"\x00", b"\x00" * 63):
        mangled = receipt.model_copy(update={"signature": b64url_encode(variant)})
        assert _reason(mangled) == "bad_signature"


_FIXED_RECEIPTS = {
    "ES256": SoftAuthenticator("ES256").approve(CHALLENGE_A),
    "Ed25519": SoftAuthenticator("Ed25519").approve(CHALLENGE_A),
}


@settings(max_examples=300, deadline=None)
@given(
    alg=st.sampled_from(["ES256", "Ed25519"]),
    field=st.sampled_from(["authenticator_data", "client_data_json", "signature"]),
    position=st.integers(min_value=0),
    mask=st.integers(min_value=1, max_value=255),
)
def test_any_flipped_byte_breaks_the_receipt(
    alg: str, field: str, position: int, mask: int
) -> None:
    receipt = _FIXED_RECEIPTS[alg]
    raw = bytearray(b64url_decode(getattr(receipt, field)))
    raw[position % len(raw)] ^= mask
    flipped = receipt.model_copy(update={field: b64url_encode(bytes(raw))})
    with pytest.raises(InvalidReceipt):
        _verify(flipped)


# --- COSE keys and CBOR ------------------------------------------------------------------------


def _with_key(receipt: ApprovalReceipt, cose: bytes) -> ApprovalReceipt:
    return receipt.model_copy(update={"credential_public_key": b64url_encode(cose)})


def test_cose_key_to_jwk(authenticator: SoftAuthenticator) -> None:
    jwk = cose_key_to_jwk(authenticator.cose_key())
    public = authenticator.key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        x = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
        assert jwk == {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(x), "alg": "Ed25519"}
    else:
        numbers = public.public_numbers()
        assert jwk == {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url_encode(numbers.x.to_bytes(32, "big")),
            "y": b64url_encode(numbers.y.to_bytes(32, "big")),
            "alg": "ES256",
        }
    assert PublicKey.from_jwk(jwk, alg=jwk["alg"]).alg == jwk["alg"]


def test_rsa_key_is_unsupported(es256: SoftAuthenticator) -> None:
    # {1: 3 (RSA), 3: -257 (RS256), -1: n (256 bytes), -2: e (65537)}
    rsa = (
        b"\xa4\x01\x03\x03\x39\x01\x00"
        + b"\x20\x59\x01\x00"
        + b"\xc1" * 256
        + b"\x21\x43\x01\x00\x01"
    )
    assert _reason(_with_key(es256.approve(CHALLENGE_A), rsa)) == "unsupported_key"
    with pytest.raises(InvalidReceipt) as caught:
        cose_key_to_jwk(rsa)
    assert caught.value.reason == "unsupported_key"


def _ec2(*, kty: bytes = b"\x02", alg: bytes = b"\x26", crv: bytes = b"\x01") -> bytes:
    x = y = b"\x58\x20" + bytes(32)
    return b"\xa5\x01" + kty + b"\x03" + alg + b"\x20" + crv + b"\x21" + x + b"\x22" + y


@pytest.mark.parametrize(
    ("make_cose", "reason"),
    [
        pytest.param(lambda a: _ec2(alg=b"\x27"), "unsupported_key", id="ec2-with-eddsa"),
        pytest.param(lambda a: _ec2(kty=b"\x01"), "unsupported_key", id="okp-with-es256"),
        pytest.param(lambda a: _ec2(crv=b"\x02"), "unsupported_key", id="p384-crv"),
        pytest.param(lambda a: _ec2(alg=b"\x38\x22"), "unsupported_key", id="es384"),
        pytest.param(lambda a: _ec2(), "unsupported_key", id="off-curve"),
        pytest.param(lambda a: b"\xa4" + a.cose_key()[1:-35], "unsupported_key", id="missing-y"),
        pytest.param(
            lambda a: b"\xa6" + a.cose_key()[1:] + b"\x23\x58\x20" + bytes(32),
            "unsupported_key",
            id="private-d",
        ),
        pytest.param(
            lambda a: b"\xa6" + a.cose_key()[1:] + b"\x02\x41\x00", "unsupported_key", id="kid"
        ),
        pytest.param(lambda a: b"\xa3\x01\x01\x03\x27\x20\x07", "unsupported_key", id="ed448-no-x"),
        pytest.param(lambda a: b"\x83\x01\x02\x03", "unsupported_key", id="array"),
        pytest.param(lambda a: b"\x58\x20" + bytes(32), "unsupported_key", id="bstr"),
        # y = true (a compressed point) is valid COSE, but not CBOR this decoder accepts.
        pytest.param(
            lambda a: b"\xa5" + a.cose_key()[1:-35] + b"\x22\xf5", "malformed", id="compressed"
        ),
        pytest.param(lambda a: a.cose_key() + b"\x00", "malformed", id="trailing-bytes"),
        # The registry's key (CTAP2 canonical) with a longer head: the same key, other bytes.
        pytest.param(
            lambda a: a.cose_key()[:2] + b"\x18\x02" + a.cose_key()[3:], "malformed", id="long-kty"
        ),
        pytest.param(
            lambda a: a.cose_key()[:8] + b"\x59\x00\x20" + a.cose_key()[10:],
            "malformed",
            id="long-x-length",
        ),
        pytest.param(lambda a: b"\xb8\x05" + a.cose_key()[1:], "malformed", id="long-map-count"),
        pytest.param(lambda a: b"\xbf" + a.cose_key()[1:] + b"\xff", "malformed", id="indefinite"),
        pytest.param(lambda a: a.cose_key()[:-1], "malformed", id="truncated"),
    ],
)
def test_unsupported_keys(es256: SoftAuthenticator, make_cose: Any, reason: str) -> None:
    cose = make_cose(es256)
    assert _reason(_with_key(es256.approve(CHALLENGE_A), cose)) == reason
    with pytest.raises(InvalidReceipt) as caught:
        cose_key_to_jwk(cose)
    assert caught.value.reason == reason


def _okp(y: int, *, x_odd: bool = False) -> bytes:
    """An EdDSA/Ed25519 COSE_Key for the point with this y (RFC 8032 §5.1.2 encoding)."""
    encoded = (y | (x_odd << 255)).to_bytes(32, "little")
    return b"\xa4\x01\x01\x03\x27\x20\x06\x21" + _cbor_bstr32(encoded)


def test_ed25519_key_off_the_curve_is_unsupported() -> None:
    """Half of all y have no x on edwards25519. OpenSSL loads such a key and then refuses
    every signature under it: a passkey the registry must not register."""
    p = 2**255 - 19
    d = -121665 * pow(121666, -1, p) % p

    def has_x(y: int) -> bool:  # RFC 8032 §5.1.3 step 3: recover x, or find there is none
        u, v = (y * y - 1) % p, (d * y * y + 1) % p
        x = u * pow(v, 3, p) * pow(u * pow(v, 7, p), (p - 5) // 8, p) % p
        return v * x * x % p in (u, -u % p)

    off = [2, 7, 8]
    assert [y for y in range(2, 9) if not has_x(y)] == off
    for y in off:
        for x_odd in (False, True):
            with pytest.raises(InvalidReceipt) as caught:
                cose_key_to_jwk(_okp(y, x_odd=x_odd))
            assert caught.value.reason == "unsupported_key"
    ed = SoftAuthenticator("Ed25519")
    assert _reason(_with_key(ed.approve(CHALLENGE_A), _okp(off[0]))) == "unsupported_key"
    # Real keys, whichever sign x has, are points of the curve.
    for _ in range(64):
        cose_key_to_jwk(SoftAuthenticator("Ed25519").cose_key())


def test_cose_key_with_trailing_bytes(authenticator: SoftAuthenticator) -> None:
    receipt = authenticator.approve(CHALLENGE_A)
    assert _reason(_with_key(receipt, authenticator.cose_key() + b"\x00")) == "malformed"


# RFC 8949 Appendix A vectors within the supported subset.
@pytest.mark.parametrize(
    ("encoded", "value"),
    [
        ("00", 0),
        ("17", 23),
        ("1818", 24),
        ("1903e8", 1000),
        ("1a000f4240", 1000000),
        ("1bffffffffffffffff", 2**64 - 1),
        ("20", -1),
        ("3863", -100),
        ("3bffffffffffffffff", -(2**64)),
        ("40", b""),
        ("4401020304", b"\x01\x02\x03\x04"),
        ("60", ""),
        ("6449455446", "IETF"),
        ("62c3bc", "\u00fc"),
        ("80", []),
        ("8301820203820405", [1, [2, 3], [4, 5]]),
        ("a0", {}),
        ("a201020304", {1: 2, 3: 4}),
        ("a26161016162820203", {"a": 1, "b": [2, 3]}),
    ],
)
def test_cbor_decodes(encoded: str, value: object) -> None:
    assert _decode_cbor(bytes.fromhex(encoded)) == value


@pytest.mark.parametrize(
    "encoded",
    [
        "",  # empty
        "5f42010243030405ff",  # indefinite byte string
        "9fff",  # indefinite array
        "bf6161f5ff",  # indefinite map
        "c11a514b67b0",  # tag
        "f4",  # false
        "e0",  # simple value 0
        "f6",  # null
        "f93c00",  # half float
        "fb3ff199999999999a",  # double
        "1c",  # reserved additional info
        "1901",  # truncated argument
        "62c3",  # truncated text
        "62c328",  # invalid UTF-8
        "9bffffffffffffffff",  # absurd array count
        "bbffffffffffffffff",  # absurd map count
        "a201020103",  # duplicate key 1
        "a2616101616102",  # duplicate key "a"
        "a1410001",  # byte-string key
        "a18000",  # array key
        "0000",  # trailing bytes
        "8181818181",  # depth 5
        "818181818100",  # deeper still
        # Well-formed, but not in the shortest form (CTAP2 canonical CBOR): one value, two
        # encodings.
        "1800",
        "1817",
        "190017",
        "1a0000ffff",
        "1b00000000ffffffff",
        "3800",
        "5800",
        "7800",
        "9800",
        "b800",
    ],
)
def test_cbor_refuses(encoded: str) -> None:
    with pytest.raises(InvalidReceipt) as caught:
        _decode_cbor(bytes.fromhex(encoded))
    assert caught.value.reason == "malformed"


def test_cbor_depth_limit_is_four() -> None:
    assert _decode_cbor(bytes.fromhex("81818100")) == [[[0]]]  # depth 4


# --- The receipt model -------------------------------------------------------------------------


def _fields(receipt: ApprovalReceipt) -> dict[str, Any]:
    return receipt.model_dump()


@pytest.mark.parametrize("field", RECEIPT_FIELDS)
@pytest.mark.parametrize(
    "value",
    ["AAA=", "A+/A", "AB", "A", "Ÿ", "AA AA", b"AAAA", 7],
    ids=[
        "padded",
        "std-alphabet",
        "non-canonical",
        "bad-length",
        "non-ascii",
        "space",
        "bytes",
        "int",
    ],
)
def test_fields_must_be_base64url(es256: SoftAuthenticator, field: str, value: object) -> None:
    document = _fields(es256.approve(CHALLENGE_A)) | {field: value}
    with pytest.raises(ValidationError):
        ApprovalReceipt(**document)


def test_field_size_limits(es256: SoftAuthenticator) -> None:
    document = _fields(es256.approve(CHALLENGE_A))
    with pytest.raises(ValidationError):
        ApprovalReceipt(**document | {"client_data_json": "A" * 4100})
    with pytest.raises(ValidationError):
        ApprovalReceipt(**document | {"user_handle": b64url_encode(bytes(65))})
    with pytest.raises(ValidationError):
        ApprovalReceipt(**document | {"credential_id": ""})
    ApprovalReceipt(**document | {"credential_id": b64url_encode(bytes(1023))})


def test_receipt_is_frozen_and_closed(es256: SoftAuthenticator) -> None:
    receipt = es256.approve(CHALLENGE_A)
    with pytest.raises(ValidationError):
        receipt.signature = receipt.signature  # type: ignore[misc]
    with pytest.raises(ValidationError):
        ApprovalReceipt(**_fields(receipt) | {"extra": "x"})


def test_unvalidated_receipt_fields_fail_closed(es256: SoftAuthenticator) -> None:
    document = _fields(es256.approve(CHALLENGE_A)) | {"signature": "not base64url!"}
    assert _reason(ApprovalReceipt.model_construct(**document)) == "malformed"


def test_json_schema_has_descriptions() -> None:
    properties = ApprovalReceipt.model_json_schema()["properties"]
    assert set(properties) == set(RECEIPT_FIELDS)
    assert all(prop.get("description") for prop in properties.values())


def test_digest_is_stable(es256: SoftAuthenticator) -> None:
    receipt = es256.approve(CHALLENGE_A)
    expected = b64url_encode(hashlib.sha256(canonical_json(_fields(receipt))).digest())
    assert receipt.digest() == expected
    assert ApprovalReceipt.model_validate_json(receipt.model_dump_json()).digest() == expected


def test_digest_golden_value() -> None:
    receipt = ApprovalReceipt(
        credential_id="AQID",
        authenticator_data="BAUG",
        client_data_json="BwgJ",
        signature="CgsM",
        credential_public_key="DQ4P",
    )
    document = (
        b'{"authenticator_data":"BAUG","client_data_json":"BwgJ","credential_id":"AQID",'
        b'"credential_public_key":"DQ4P","signature":"CgsM"}'
    )
    assert receipt.digest() == b64url_encode(hashlib.sha256(document).digest())


@pytest.mark.parametrize("field", RECEIPT_FIELDS)
def test_digest_changes_with_every_field(es256: SoftAuthenticator, field: str) -> None:
    receipt = es256.approve(CHALLENGE_A)
    changed = ApprovalReceipt(**_fields(receipt) | {field: b64url_encode(b"something else")})
    assert changed.digest() != receipt.digest()


def test_digest_distinguishes_absent_user_handle(es256: SoftAuthenticator) -> None:
    receipt = es256.approve(CHALLENGE_A)
    without = ApprovalReceipt(**_fields(receipt) | {"user_handle": None})
    assert without.digest() != receipt.digest()
    assert "user_handle" not in without.model_dump(exclude_none=True)


# --- Caller errors -----------------------------------------------------------------------------


def test_expected_values_must_be_real(es256: SoftAuthenticator) -> None:
    receipt = es256.approve(CHALLENGE_A)
    with pytest.raises(ValueError, match="challenge"):
        _verify(receipt, challenge=b"")
    with pytest.raises(ValueError, match="rp_id"):
        _verify(receipt, rp_id="")


def test_error_body(es256: SoftAuthenticator) -> None:
    with pytest.raises(InvalidReceipt) as caught:
        _verify(es256.approve(CHALLENGE_B))
    assert caught.value.to_dict() == {
        "error": "invalid_receipt",
        "error_description": "the assertion approves a different challenge",
        "reason": "challenge_mismatch",
    }
