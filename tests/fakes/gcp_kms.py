"""A fake of Google Cloud KMS's REST API (v1) for asymmetric signing (no emulator exists).

Real HTTP on 127.0.0.1, real keys and signatures (``cryptography``), the JSON the
google-cloud-kms REST transport sends and parses: camelCase members, bytes as standard
base64, int64 (the CRC32C fields) as decimal strings, enums as numbers when the request
asks ``$alt=json;enum-encoding=int`` (the client always does) and as names otherwise.
Endpoints covered (``{name}`` is a full CryptoKeyVersion resource name):

    GET  /v1/{name}/publicKey       pem, pemCrc32c, algorithm, name, protectionLevel
    POST /v1/{name}:asymmetricSign  digest{sha256|sha384|sha512} (+ digestCrc32c) ->
                                    signature (ASN.1 DER), signatureCrc32c,
                                    verifiedDigestCrc32c, name, protectionLevel

An unknown key version is 404 NOT_FOUND; a digestCrc32c that does not match the digest, or
a digest of the wrong size, is 400 INVALID_ARGUMENT, in Google's error JSON. No
authentication is checked (the client sends anonymous credentials here). Only EC keys and
digest input are covered, which is all an ES256 signer uses.

Failure knobs: ``delay``, ``stop()``, ``wrong_signatures`` (valid DER over another
digest), ``corrupt_signature_crc32c``, ``skip_digest_crc32c_check`` (answers as if the
checksum never arrived: verifiedDigestCrc32c false), ``omit_pem_crc32c`` (a public key
answer without its pemCrc32c).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ._http import FakeHTTPService, Request

# CryptoKeyVersionAlgorithm numbers from google/cloud/kms/v1/resources.proto.
_ALGORITHMS: dict[str, tuple[int, ec.EllipticCurve, str, type[hashes.HashAlgorithm]]] = {
    "EC_SIGN_P256_SHA256": (12, ec.SECP256R1(), "sha256", hashes.SHA256),
    "EC_SIGN_P384_SHA384": (13, ec.SECP384R1(), "sha384", hashes.SHA384),
}
_PROTECTION_LEVEL = ("SOFTWARE", 1)
_NAME = re.compile(
    r"projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+/cryptoKeyVersions/[^/:]+"
)


def crc32c(data: bytes) -> int:
    """CRC-32C, bit by bit: deliberately not the implementation under test."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


@dataclass
class _KeyVersion:
    algorithm: str
    private: ec.EllipticCurvePrivateKey


def _error(code: int, status: str, message: str) -> tuple[int, Any]:
    return code, {"error": {"code": code, "message": message, "status": status}}


class FakeGcpKms(FakeHTTPService):
    def __init__(self) -> None:
        super().__init__()
        self.versions: dict[str, _KeyVersion] = {}
        self.wrong_signatures = False
        self.corrupt_signature_crc32c = False
        self.skip_digest_crc32c_check = False
        self.omit_pem_crc32c = False

    def create_key_version(
        self,
        key: str = "signing",
        *,
        version: int = 1,
        algorithm: str = "EC_SIGN_P256_SHA256",
        project: str = "test-project",
        location: str = "global",
        key_ring: str = "agentauth",
    ) -> str:
        """Add a key version; returns its resource name."""
        name = (
            f"projects/{project}/locations/{location}/keyRings/{key_ring}"
            f"/cryptoKeys/{key}/cryptoKeyVersions/{version}"
        )
        curve = _ALGORITHMS[algorithm][1]
        self.versions[name] = _KeyVersion(algorithm, ec.generate_private_key(curve))
        return name

    def handle(self, request: Request) -> tuple[int, Any]:
        numeric_enums = "json;enum-encoding=int" in request.query.get("$alt", [])
        path = request.path.removeprefix("/v1/")
        if request.method == "GET" and path.endswith("/publicKey"):
            return self._public_key(path.removesuffix("/publicKey"), numeric_enums)
        if request.method == "POST" and path.endswith(":asymmetricSign"):
            return self._sign(path.removesuffix(":asymmetricSign"), request, numeric_enums)
        return _error(404, "NOT_FOUND", f"no such method: {request.method} {request.path}")

    def _lookup(self, name: str) -> _KeyVersion | tuple[int, Any]:
        if not _NAME.fullmatch(name):
            return _error(400, "INVALID_ARGUMENT", f"invalid resource name {name!r}")
        version = self.versions.get(name)
        if version is None:
            return _error(404, "NOT_FOUND", f"CryptoKeyVersion {name} not found.")
        return version

    def _public_key(self, name: str, numeric_enums: bool) -> tuple[int, Any]:
        version = self._lookup(name)
        if not isinstance(version, _KeyVersion):
            return version
        pem = version.private.public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
        )
        number = _ALGORITHMS[version.algorithm][0]
        answer = {
            "pem": pem.decode(),
            "algorithm": number if numeric_enums else version.algorithm,
            "pemCrc32c": str(crc32c(pem)),
            "name": name,
            "protectionLevel": _PROTECTION_LEVEL[numeric_enums],
        }
        if self.omit_pem_crc32c:
            del answer["pemCrc32c"]
        return 200, answer

    def _sign(self, name: str, request: Request, numeric_enums: bool) -> tuple[int, Any]:
        version = self._lookup(name)
        if not isinstance(version, _KeyVersion):
            return version
        body = request.json()
        _, _, digest_field, hash_type = _ALGORITHMS[version.algorithm]
        digests = body.get("digest") or {}
        if "data" in body or set(digests) != {digest_field}:
            return _error(
                400,
                "INVALID_ARGUMENT",
                f"{version.algorithm} requires digest.{digest_field} (and no data)",
            )
        try:
            digest = base64.b64decode(digests[digest_field], validate=True)
        except (binascii.Error, ValueError):
            return _error(400, "INVALID_ARGUMENT", "digest is not valid base64")
        if len(digest) != hash_type().digest_size:
            return _error(400, "INVALID_ARGUMENT", "digest has the wrong length")
        verified = False
        if "digestCrc32c" in body and not self.skip_digest_crc32c_check:
            if int(body["digestCrc32c"]) != crc32c(digest):
                return _error(
                    400,
                    "INVALID_ARGUMENT",
                    "The checksum in field digest_crc32c did not match the data in field digest.",
                )
            verified = True
        if self.wrong_signatures:
            digest = hashlib.new(digest_field, b"something else").digest()
        signature = version.private.sign(digest, ec.ECDSA(Prehashed(hash_type())))
        checksum = crc32c(signature) ^ (1 if self.corrupt_signature_crc32c else 0)
        return 200, {
            "signature": base64.b64encode(signature).decode(),
            "signatureCrc32c": str(checksum),
            "verifiedDigestCrc32c": verified,
            "verifiedDataCrc32c": False,
            "name": name,
            "protectionLevel": _PROTECTION_LEVEL[numeric_enums],
        }
