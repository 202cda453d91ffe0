"""A software WebAuthn authenticator for tests: what a browser with a passkey would send.

It answers ``navigator.credentials.create/get`` options (as the JSON the registry returns)
with the JSON serialization browsers produce (base64url fields), using a real P-256 key,
"none" attestation, a signature counter and the backup flags BE and BS, which a test sets
on a passkey (and may change between its assertions). Knobs let tests misbehave on purpose.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agentauth.protocol import b64url_decode, b64url_encode

UP, UV, BE, BS, AT = 0x01, 0x04, 0x08, 0x10, 0x40


def _cbor_head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes([major << 5 | value])
    if value < 0x100:
        return bytes([major << 5 | 24, value])
    if value < 0x10000:
        return bytes([major << 5 | 25]) + struct.pack(">H", value)
    return bytes([major << 5 | 26]) + struct.pack(">I", value)


def cbor(value: Any) -> bytes:
    """Minimal canonical CBOR encoder for ints, bytes, text, arrays and maps (enough for
    WebAuthn)."""
    if isinstance(value, bool):
        raise TypeError("no bools needed")
    if isinstance(value, int):
        return _cbor_head(0, value) if value >= 0 else _cbor_head(1, -1 - value)
    if isinstance(value, bytes):
        return _cbor_head(2, len(value)) + value
    if isinstance(value, str):
        raw = value.encode()
        return _cbor_head(3, len(raw)) + raw
    if isinstance(value, list):
        return _cbor_head(4, len(value)) + b"".join(cbor(v) for v in value)
    if isinstance(value, dict):
        return _cbor_head(5, len(value)) + b"".join(cbor(k) + cbor(v) for k, v in value.items())
    raise TypeError(type(value))


@dataclass
class Passkey:
    credential_id: bytes
    key: ec.EllipticCurvePrivateKey
    user_handle: bytes
    rp_id: str
    sign_count: int = 0
    # BE: the passkey can be backed up (synced); BS: it is backed up now. Both false is a
    # single-device passkey, as a security key makes.
    backup_eligible: bool = False
    backed_up: bool = False

    def backup_flags(self) -> int:
        return (BE if self.backup_eligible else 0) | (BS if self.backed_up else 0)

    def cose(self) -> bytes:
        numbers = self.key.public_key().public_numbers()
        return cbor(
            {
                1: 2,
                3: -7,
                -1: 1,
                -2: numbers.x.to_bytes(32, "big"),
                -3: numbers.y.to_bytes(32, "big"),
            }
        )


@dataclass
class SoftAuthenticator:
    origin: str = "http://localhost:8080"
    user_verification: bool = True
    passkeys: dict[bytes, Passkey] = field(default_factory=dict)

    def create(
        self,
        options: dict[str, Any],
        *,
        credential_id: bytes | None = None,
        cose: bytes | None = None,
        backup_eligible: bool = False,
        backed_up: bool = False,
    ) -> dict[str, Any]:
        """Register a new passkey for ``options`` (PublicKeyCredentialCreationOptions JSON).

        ``credential_id`` and ``cose`` (a COSE_Key to register in place of the passkey's own,
        so its assertions will not verify) are for registrations the registry must refuse.
        ``backup_eligible`` and ``backed_up`` are its BE and BS flags, not checked here: BS
        without BE is a registration the registry must refuse too.
        """
        rp_id = options["rp"]["id"]
        passkey = Passkey(
            credential_id=os.urandom(32) if credential_id is None else credential_id,
            key=ec.generate_private_key(ec.SECP256R1()),
            user_handle=b64url_decode(options["user"]["id"]),
            rp_id=rp_id,
            backup_eligible=backup_eligible,
            backed_up=backed_up,
        )
        self.passkeys[passkey.credential_id] = passkey
        client_data = self._client_data("webauthn.create", options["challenge"])
        attested = (
            bytes(16) + struct.pack(">H", len(passkey.credential_id)) + passkey.credential_id
        ) + (passkey.cose() if cose is None else cose)
        auth_data = self._auth_data(rp_id, AT | passkey.backup_flags(), 0) + attested
        attestation = cbor({"fmt": "none", "attStmt": {}, "authData": auth_data})
        cid = b64url_encode(passkey.credential_id)
        return {
            "id": cid,
            "rawId": cid,
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url_encode(client_data),
                "attestationObject": b64url_encode(attestation),
                "transports": ["internal"],
            },
            "clientExtensionResults": {},
        }

    def get(
        self,
        options: dict[str, Any],
        *,
        passkey: Passkey | None = None,
        challenge: str | None = None,
        counter: int | None = None,
    ) -> dict[str, Any]:
        """Sign an assertion over ``options['challenge']`` (or an override) with a passkey."""
        if passkey is None:
            allowed = [b64url_decode(c["id"]) for c in options.get("allowCredentials", [])]
            candidates = [
                p for p in self.passkeys.values() if not allowed or p.credential_id in allowed
            ]
            passkey = candidates[0]
        passkey.sign_count = counter if counter is not None else passkey.sign_count + 1
        client_data = self._client_data("webauthn.get", challenge or options["challenge"])
        auth_data = self._auth_data(passkey.rp_id, passkey.backup_flags(), passkey.sign_count)
        signature = passkey.key.sign(
            auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256())
        )
        cid = b64url_encode(passkey.credential_id)
        return {
            "id": cid,
            "rawId": cid,
            "type": "public-key",
            "response": {
                "clientDataJSON": b64url_encode(client_data),
                "authenticatorData": b64url_encode(auth_data),
                "signature": b64url_encode(signature),
                "userHandle": b64url_encode(passkey.user_handle),
            },
            "clientExtensionResults": {},
        }

    def _client_data(self, kind: str, challenge: str) -> bytes:
        return json.dumps(
            {"type": kind, "challenge": challenge, "origin": self.origin, "crossOrigin": False}
        ).encode()

    def _auth_data(self, rp_id: str, extra_flags: int, counter: int) -> bytes:
        flags = UP | (UV if self.user_verification else 0) | extra_flags
        return hashlib.sha256(rp_id.encode()).digest() + bytes([flags]) + struct.pack(">I", counter)
