"""A fake of HashiCorp Vault's Transit secrets engine HTTP API (no Vault server installs here).

A fake of the HTTP API, not Vault: real HTTP on 127.0.0.1, real keys and signatures
(``cryptography``), Vault's JSON shapes. Endpoints covered, all under ``/v1/{mount}`` and all
requiring a valid ``X-Vault-Token`` (403 ``{"errors": ["permission denied"]}`` otherwise, as
Vault answers a missing, unknown, expired or revoked token):

    POST /keys/{name}            create (body: {"type": "ecdsa-p256" | "ed25519" | ...}) -> 204
    GET  /keys/{name}            read: type, latest_version, keys{version: {public_key, ...}}
    POST /keys/{name}/rotate     add a version -> 204
    POST /sign/{name}[/{hash}]   input (standard base64), key_version (0/absent: latest),
                                 hash_algorithm (sha2-224/256/384/512, default sha2-256),
                                 prehashed, marshaling_algorithm (asn1 default, or jws)

Sign semantics follow Vault: ecdsa keys hash the input (unless prehashed) and return
``vault:vN:`` + standard-base64 ASN.1 DER, or base64url (no padding) raw r||s with
``marshaling_algorithm=jws``; ed25519 keys sign the input itself and return standard
base64, ignoring hash_algorithm and marshaling_algorithm. Public keys: PEM
SubjectPublicKeyInfo for ecdsa, standard base64 of the raw 32 bytes for ed25519. Symmetric
key types (aes256-gcm96) can be created, to be refused by signers; they cannot sign.

and, under ``/v1/auth/token``, the token's own endpoints (Vault's token auth method API):

    GET  /lookup-self            data: ttl (whole seconds left), renewable, expire_time
                                 (RFC 3339, null without a TTL), creation_ttl,
                                 explicit_max_ttl, issue_time, id (the token itself), ...
    POST /renew-self             increment (seconds, or "30s"/"5m"/"1h"; absent: the token's
                                 creation_ttl) -> auth.lease_duration: the TTL granted

Tokens: ``token`` is valid from the start, without expiry, and looked up as Vault shows a
root token (ttl 0, not renewable, expire_time null); renewing it is refused (400). Tokens
from ``issue_token(ttl=...)`` (``hvs.`` + random, as Vault's service tokens) are valid until
their TTL runs out, renewable unless ``renewable=False``; ``max_ttl`` is the token's
explicit max TTL, counted from its issue: a renewal past it is granted only the time left
(with Vault's "capped" warning), so the TTL stops growing and the token expires at its max
TTL whatever is renewed. ``revoke_token`` ends one at once (as ``vault token revoke``, or an
expiry). ``advance(seconds)`` moves the fake's clock (every TTL is on it), so a test can
pass a token's expiry without waiting; ``freeze()`` stops it but for ``advance``.
``signatures`` counts the signatures answered, so a test can show that nothing was signed.

Failure knobs: ``delay`` (slow answers), ``stop()`` (refused connections),
``token_self_denied`` (403 on lookup-self and renew-self, as Vault answers a token whose
policies leave out ``default``, which grants them),
``wrong_signatures`` (well-formed signatures over other bytes), ``ignore_key_version``
(sign with the latest version whatever the request pins, as a misbehaving server might).
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ._http import FakeHTTPService, Request

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha2-224": hashes.SHA224,
    "sha2-256": hashes.SHA256,
    "sha2-384": hashes.SHA384,
    "sha2-512": hashes.SHA512,
}
_SIGNING_TYPES = ("ecdsa-p256", "ed25519")
_ALL_TYPES = (*_SIGNING_TYPES, "aes256-gcm96")


@dataclass
class _Token:
    issued: float  # on the fake's clock
    expires: float | None  # None: never (a root token)
    renewable: bool
    creation_ttl: int
    max_expires: float | None  # issued + explicit max TTL; None: no max


_DURATION = re.compile(r"([0-9]+)([smh]?)")


def _seconds(value: Any) -> int | None:
    """An ``increment`` as Vault takes it: whole seconds, or a number with s, m or h."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None
    return int(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


def _rfc3339(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


@dataclass
class _Version:
    private: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | None
    created: str


@dataclass
class _TransitKey:
    type: str
    versions: dict[int, _Version] = field(default_factory=dict)
    min_encryption_version: int = 0

    def add_version(self) -> None:
        private: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | None
        if self.type == "ecdsa-p256":
            private = ec.generate_private_key(ec.SECP256R1())
        elif self.type == "ed25519":
            private = ed25519.Ed25519PrivateKey.generate()
        else:
            private = None
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())
        self.versions[len(self.versions) + 1] = _Version(private, stamp)

    @property
    def latest(self) -> int:
        return len(self.versions)


def _errors(status: int, *messages: str) -> tuple[int, Any]:
    return status, {"errors": list(messages)}


def _ok(
    data: dict[str, Any] | None,
    *,
    auth: dict[str, Any] | None = None,
    warnings: list[str] | None = None,
) -> tuple[int, Any]:
    """Vault's response envelope: ``data`` for a read or a transit call, ``auth`` for a
    token's own calls (renew-self), with any ``warnings``."""
    return 200, {
        "request_id": str(uuid.uuid4()),
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": data,
        "wrap_info": None,
        "warnings": warnings,
        "auth": auth,
    }


class FakeVault(FakeHTTPService):
    def __init__(self, *, token: str = "root-token-for-tests", mount: str = "transit") -> None:
        super().__init__()
        self.token = token
        # The fake's clock, on which TTLs run: time.monotonic(), or the instant freeze()
        # stopped it at, plus what advance() added.
        self._skew = 0.0
        self._frozen: float | None = None
        # Requests are served in threads: the lock keeps issuing, revoking, renewing and
        # checking apart.
        self._tokens: dict[str, _Token] = {token: _Token(self._now(), None, False, 0, None)}
        self._tokens_lock = threading.Lock()
        self.token_self_denied = False
        self.signatures = 0
        self.mount = mount
        self.keys: dict[str, _TransitKey] = {}
        self.wrong_signatures = False
        self.ignore_key_version = False
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., tuple[int, Any]]]] = [
            ("GET", re.compile(r"/v1/auth/token/lookup-self"), self._lookup_self),
            ("POST", re.compile(r"/v1/auth/token/renew-self"), self._renew_self),
            ("POST", re.compile(rf"/v1/{re.escape(mount)}/keys/([\w.-]+)/rotate"), self._rotate),
            ("GET", re.compile(rf"/v1/{re.escape(mount)}/keys/([\w.-]+)"), self._read),
            ("POST", re.compile(rf"/v1/{re.escape(mount)}/keys/([\w.-]+)"), self._create),
            (
                "POST",
                re.compile(rf"/v1/{re.escape(mount)}/sign/([\w.-]+)(?:/([\w-]+))?"),
                self._sign,
            ),
        ]

    # -- test helpers (the same operations are reachable over HTTP) --------------------------

    def create_key(self, name: str, key_type: str = "ecdsa-p256") -> None:
        assert key_type in _ALL_TYPES, key_type
        key = _TransitKey(key_type)
        key.add_version()
        self.keys[name] = key

    def rotate_key(self, name: str) -> int:
        self.keys[name].add_version()
        return self.keys[name].latest

    def issue_token(
        self, *, ttl: float | None = None, renewable: bool = True, max_ttl: float | None = None
    ) -> str:
        """A new valid token; with ``ttl``, it expires that many seconds from now unless
        renewed (``renewable``), and never later than ``max_ttl`` seconds from now."""
        token = "hvs." + secrets.token_urlsafe(24)
        if ttl is not None and max_ttl is not None:
            ttl = min(ttl, max_ttl)  # Vault caps the TTL asked for at the max TTL
        with self._tokens_lock:
            now = self._now()
            self._tokens[token] = _Token(
                issued=now,
                expires=None if ttl is None else now + ttl,
                renewable=ttl is not None and renewable,
                creation_ttl=0 if ttl is None else int(ttl),
                max_expires=None if max_ttl is None else now + max_ttl,
            )
        return token

    def revoke_token(self, token: str) -> None:
        """Vault refuses ``token`` from now on, as once it expired or was revoked."""
        with self._tokens_lock:
            self._tokens.pop(token, None)

    def advance(self, seconds: float) -> None:
        """Move the fake's clock (and so every token's time left) ``seconds`` on."""
        with self._tokens_lock:
            self._skew += seconds

    def freeze(self) -> None:
        """Stop the fake's clock: from now on only ``advance`` moves it, so the TTLs it
        reports are exact however slow the machine is."""
        with self._tokens_lock:
            self._frozen = time.monotonic()

    def _now(self) -> float:
        return (time.monotonic() if self._frozen is None else self._frozen) + self._skew

    def _valid(self, token: str | None) -> bool:
        with self._tokens_lock:
            if token is None or token not in self._tokens:
                return False
            expires = self._tokens[token].expires
            if expires is not None and self._now() >= expires:
                del self._tokens[token]  # expired tokens are gone, as in Vault
                return False
            return True

    # -- HTTP -------------------------------------------------------------------------------

    def handle(self, request: Request) -> tuple[int, Any]:
        if not self._valid(request.headers.get("x-vault-token")):
            return _errors(403, "permission denied")
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(request.path)
            if match and request.method == method:
                return handler(request, *match.groups())
        return _errors(404, f"no handler for route {request.path!r}")

    def _lookup_self(self, request: Request) -> tuple[int, Any]:
        if self.token_self_denied:
            return _errors(403, "permission denied")
        token = request.headers["x-vault-token"]  # valid: handle() checked it
        with self._tokens_lock:
            entry = self._tokens.get(token)
            if entry is None:  # revoked since handle() checked it
                return _errors(403, "permission denied")
            now = self._now()
            left = None if entry.expires is None else entry.expires - now
        wall = time.time()
        return _ok(
            {
                "accessor": "acc." + token[-8:],
                "creation_time": int(wall - (now - entry.issued)),
                "creation_ttl": entry.creation_ttl,
                "display_name": "token",
                "entity_id": "",
                "expire_time": None if left is None else _rfc3339(wall + left),
                "explicit_max_ttl": (
                    0 if entry.max_expires is None else int(entry.max_expires - entry.issued)
                ),
                "id": token,  # Vault's answer carries the token itself
                "issue_time": _rfc3339(wall - (now - entry.issued)),
                "meta": None,
                "num_uses": 0,
                "orphan": False,
                "path": "auth/token/create",
                "policies": ["default"] if entry.expires is not None else ["root"],
                # Whole seconds left, as Vault reports it; 0 for a token without a TTL.
                "ttl": 0 if left is None else max(int(left), 0),
                "renewable": entry.renewable,
                "type": "service",
            }
        )

    def _renew_self(self, request: Request) -> tuple[int, Any]:
        if self.token_self_denied:
            return _errors(403, "permission denied")
        token = request.headers["x-vault-token"]
        asked = request.json().get("increment")
        with self._tokens_lock:
            entry = self._tokens.get(token)
            if entry is None:  # revoked since handle() checked it
                return _errors(403, "permission denied")
            if entry.expires is None:
                return _errors(400, "lease not found or lease is not renewable")
            if not entry.renewable:
                return _errors(400, "lease is not renewable")
            increment = entry.creation_ttl if asked is None else _seconds(asked)
            if increment is None:
                return _errors(400, f"invalid increment {asked!r}")
            now = self._now()
            granted = increment
            warnings = None
            if entry.max_expires is not None and now + increment > entry.max_expires:
                # Vault grants only what is left before the max TTL, and says so.
                granted = max(int(entry.max_expires - now), 0)
                warnings = [
                    f'TTL of "{increment}s" exceeded the effective max_ttl of "{granted}s";'
                    " TTL value is capped accordingly"
                ]
            entry.expires = now + granted
        return _ok(
            None,
            warnings=warnings,
            auth={
                "client_token": token,
                "accessor": "acc." + token[-8:],
                "policies": ["default"],
                "token_policies": ["default"],
                "metadata": None,
                "lease_duration": granted,
                "renewable": True,
                "entity_id": "",
                "token_type": "service",
                "orphan": False,
            },
        )

    def _create(self, request: Request, name: str) -> tuple[int, Any]:
        key_type = request.json().get("type", "aes256-gcm96")
        if key_type not in _ALL_TYPES:
            return _errors(400, f"unknown key type: {key_type}")
        if name not in self.keys:
            self.create_key(name, key_type)
        return 204, None

    def _rotate(self, _request: Request, name: str) -> tuple[int, Any]:
        if name not in self.keys:
            return _errors(400, "key not found")
        self.rotate_key(name)
        return 204, None

    def _read(self, _request: Request, name: str) -> tuple[int, Any]:
        key = self.keys.get(name)
        if key is None:
            return _errors(404)
        versions: dict[str, Any] = {}
        for number, version in key.versions.items():
            if version.private is None:
                # Symmetric keys list each version's creation time, no public key.
                versions[str(number)] = int(time.time())
            elif isinstance(version.private, ed25519.Ed25519PrivateKey):
                raw = version.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
                versions[str(number)] = {
                    "creation_time": version.created,
                    "name": "ed25519",
                    "public_key": base64.b64encode(raw).decode(),
                }
            else:
                pem = version.private.public_key().public_bytes(
                    Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
                )
                versions[str(number)] = {
                    "creation_time": version.created,
                    "name": "P-256",
                    "public_key": pem.decode(),
                }
        signing = key.type in _SIGNING_TYPES
        return _ok(
            {
                "name": name,
                "type": key.type,
                "keys": versions,
                "latest_version": key.latest,
                "min_available_version": 0,
                "min_decryption_version": 1,
                "min_encryption_version": key.min_encryption_version,
                "supports_signing": signing,
                "supports_encryption": not signing,
                "supports_decryption": not signing,
                "supports_derivation": key.type == "ed25519",
                "deletion_allowed": False,
                "derived": False,
                "exportable": False,
                "allow_plaintext_backup": False,
                "auto_rotate_period": 0,
                "imported_key": False,
            }
        )

    def _sign(self, request: Request, name: str, url_hash: str | None) -> tuple[int, Any]:
        body = request.json()
        key = self.keys.get(name)
        if key is None:
            return _errors(400, "signing key not found")
        if key.type not in _SIGNING_TYPES:
            return _errors(400, f"key type {key.type} does not support signing")
        try:
            data = base64.b64decode(body.get("input", ""), validate=True)
        except (binascii.Error, ValueError):
            return _errors(400, "unable to decode input as base64")
        number = int(body.get("key_version") or 0)
        if number == 0 or self.ignore_key_version:
            number = key.latest
        if number > key.latest:
            return _errors(
                400, "requested version for signing is higher than the latest key version"
            )
        if number < max(key.min_encryption_version, 1):
            return _errors(400, "requested version for signing is less than the minimum")
        private = key.versions[number].private
        if self.wrong_signatures:
            data = b"not what was asked: " + data
        if isinstance(private, ed25519.Ed25519PrivateKey):
            encoded = base64.b64encode(private.sign(data)).decode()
        else:
            assert isinstance(private, ec.EllipticCurvePrivateKey)
            hash_name = url_hash or body.get("hash_algorithm") or "sha2-256"
            if hash_name not in _HASHES:
                return _errors(400, f"unsupported hash algorithm {hash_name}")
            algorithm = _HASHES[hash_name]()
            if body.get("prehashed"):
                der = private.sign(data, ec.ECDSA(Prehashed(algorithm)))
            else:
                der = private.sign(data, ec.ECDSA(algorithm))
            marshaling = body.get("marshaling_algorithm") or "asn1"
            if marshaling == "asn1":
                encoded = base64.b64encode(der).decode()
            elif marshaling == "jws":
                r, s = decode_dss_signature(der)
                raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
                encoded = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
            else:
                return _errors(400, f"unsupported marshaling type {marshaling}")
        with self._tokens_lock:  # answered in threads
            self.signatures += 1
        return _ok({"signature": f"vault:v{number}:{encoded}", "key_version": number})
