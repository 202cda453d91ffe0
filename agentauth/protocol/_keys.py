"""Public keys as JWKs, RFC 7638 thumbprints, signature checks, and the signer interface.

Two algorithms exist here: ES256 (P-256, raw r||s signatures as JWS uses) and Ed25519
(RFC 9864's name; the legacy JOSE name "EdDSA" is accepted on input with an Ed25519 key).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ._encoding import b64url_decode, b64url_encode, canonical_json
from ._errors import InvalidRequest

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "KeySet",
    "PrivateKey",
    "PublicKey",
    "Signer",
    "jwk_thumbprint",
]

Algorithm = Literal["ES256", "Ed25519"]
#: Every algorithm AgentAuth signs or verifies with. No "none", no HMAC, no RSA.
ALGORITHMS: frozenset[str] = frozenset({"ES256", "Ed25519"})
# "EdDSA" is the pre-RFC 9864 name; it is only ever accepted with an Ed25519 key.
_ALG_ALIASES = {"ES256": "ES256", "Ed25519": "Ed25519", "EdDSA": "Ed25519"}
#: Every ``alg`` value accepted on input (``normalize_alg``), "EdDSA" included.
ALG_NAMES: tuple[str, ...] = tuple(_ALG_ALIASES)
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
# P-256's field prime: JWK coordinates are field elements (RFC 7518 §6.2.1.2).
_P256_P = 2**256 - 2**224 + 2**192 + 2**96 - 1
# edwards25519 (RFC 8032 §5.1): -x² + y² = 1 + d·x²·y² over the integers mod p.
_ED_P = 2**255 - 19
_ED_D = -121665 * pow(121666, -1, _ED_P) % _ED_P
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def normalize_alg(alg: object) -> Algorithm:
    """Map a JOSE ``alg`` value to the algorithm it names, or raise for anything else."""
    if not isinstance(alg, str) or alg not in _ALG_ALIASES:
        raise InvalidRequest("unsupported algorithm")
    return _ALG_ALIASES[alg]  # type: ignore[return-value]


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint (base64url) over the key's required members only."""
    kty = jwk.get("kty")
    if kty == "EC":
        members = {k: jwk[k] for k in ("crv", "kty", "x", "y")}
    elif kty == "OKP":
        members = {k: jwk[k] for k in ("crv", "kty", "x")}
    else:
        raise InvalidRequest("unsupported key type")
    return b64url_encode(hashlib.sha256(canonical_json(members)).digest())


def _coordinate(jwk: dict[str, Any], name: str, size: int) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f"JWK member {name} is missing")
    raw = b64url_decode(value)
    if len(raw) != size:
        raise InvalidRequest(f"JWK member {name} has the wrong length")
    return raw


def _p256_coordinate(jwk: dict[str, Any], name: str) -> int:
    value = int.from_bytes(_coordinate(jwk, name, 32), "big")
    # OpenSSL reduces a coordinate mod p, so x and x + p would name one key with two
    # RFC 7638 thumbprints (two agents, two replay namespaces for one key).
    if value >= _P256_P:
        raise InvalidRequest(f"JWK member {name} is not a P-256 field element")
    return value


def _ed25519_public_bytes(raw: bytes) -> bytes:
    """Return ``raw`` unless it encodes y non-canonically or names a point of small order.

    A small-order key (order dividing the cofactor 8) has no secret behind it: for the
    identity, R = identity and S = 0 verify for every message, so anyone could make its
    DPoP proofs. OpenSSL loads such keys without complaint.
    """
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)  # the top bit is x's sign
    # y and y + p would otherwise be one key with two thumbprints.
    if y >= _ED_P:
        raise InvalidRequest("JWK member x is not a canonical Ed25519 point")
    # Multiply by the cofactor and see whether the identity, the only point with y = 1,
    # comes out. Doubling gives y' = (x² + y²) / (2 + x² - y²), and the curve fixes
    # x² = (y² - 1) / (d·y² + 1), so y alone suffices: no square root (a 255-bit
    # exponentiation, 50-90 µs), no inversion, and x's sign cannot change the order.
    # Projectively, y = Y / Z. Off-curve y (no x in the field) are not screened: OpenSSL
    # refuses them at every verify, so they can sign nothing.
    big_y, big_z = y, 1
    for _ in range(3):
        s, t = big_y * big_y % _ED_P, big_z * big_z % _ED_P
        x2_num, x2_den = s - t, _ED_D * s + t
        big_y, big_z = (
            (x2_num * t + s * x2_den) % _ED_P,
            (t * (2 * x2_den + x2_num) - s * x2_den) % _ED_P,
        )
    if big_y == big_z:
        raise InvalidRequest("JWK is a small-order Ed25519 key")
    return raw


def ed25519_on_curve(raw: bytes) -> bool:
    """Whether ``raw``, whose y ``_ed25519_public_bytes`` has checked, names a curve point.

    About half of all y have no x on edwards25519. OpenSSL loads such a key and refuses every
    signature under it, so it costs a DPoP proof nothing; a passkey, though, must not be
    registered if it can never verify (one exponentiation, 50-90 µs, spent on each passkey).
    x² = (y² - 1) / (d·y² + 1) needs a square root, and it has one exactly when the product
    of the two sides does (Euler's criterion; d·y² + 1 is never 0, as -1/d is no square).
    """
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    u, v = (y * y - 1) % _ED_P, (_ED_D * y * y + 1) % _ED_P
    return pow(u * v, (_ED_P - 1) // 2, _ED_P) in (0, 1)


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A verified public key with its algorithm pinned; build it with ``from_jwk``."""

    alg: Algorithm
    jwk: dict[str, Any] = field(repr=False, hash=False, compare=False)
    thumbprint: str
    _key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey = field(
        repr=False, hash=False, compare=False
    )

    @classmethod
    def from_jwk(cls, jwk: object, *, alg: str | None = None) -> PublicKey:
        """Parse a public JWK, refusing private members, unknown curves, off-curve P-256
        points, coordinates outside the field and small-order Ed25519 keys.

        ``alg``, when given, must agree with the key type (an ES256 header cannot name an
        Ed25519 key); it is otherwise derived from the key.
        """
        if not isinstance(jwk, dict):
            raise InvalidRequest("JWK must be an object")
        if "d" in jwk or "p" in jwk or "k" in jwk:
            raise InvalidRequest("JWK contains private key material")
        kty, crv = jwk.get("kty"), jwk.get("crv")
        key: ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
        if kty == "EC" and crv == "P-256":
            x, y = _p256_coordinate(jwk, "x"), _p256_coordinate(jwk, "y")
            try:
                key = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
            except ValueError:
                raise InvalidRequest("JWK point is not on P-256") from None
            key_alg: Algorithm = "ES256"
            clean = {"kty": "EC", "crv": "P-256", "x": jwk["x"], "y": jwk["y"]}
        elif kty == "OKP" and crv == "Ed25519":
            raw = _ed25519_public_bytes(_coordinate(jwk, "x", 32))
            key = ed25519.Ed25519PublicKey.from_public_bytes(raw)
            key_alg = "Ed25519"
            clean = {"kty": "OKP", "crv": "Ed25519", "x": jwk["x"]}
        else:
            raise InvalidRequest("unsupported key type or curve")
        if alg is not None and normalize_alg(alg) != key_alg:
            raise InvalidRequest("algorithm does not match the key type")
        if "kid" in jwk and isinstance(jwk["kid"], str):
            clean["kid"] = jwk["kid"]
        return cls(alg=key_alg, jwk=clean, thumbprint=jwk_thumbprint(clean), _key=key)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True if ``signature`` (JWS form: raw r||s for ES256) signs ``data``."""
        if isinstance(self._key, ed25519.Ed25519PublicKey):
            if len(signature) != 64:
                return False
            try:
                self._key.verify(signature, data)
            except InvalidSignature:
                return False
            return True
        if len(signature) != 64:
            return False
        r = int.from_bytes(signature[:32], "big")
        s = int.from_bytes(signature[32:], "big")
        # Out-of-range scalars are invalid by definition (SEC 1 §4.1.4); refusing them here
        # also keeps DER re-encoding unambiguous.
        if not (0 < r < _P256_ORDER and 0 < s < _P256_ORDER):
            return False
        try:
            self._key.verify(encode_dss_signature(r, s), data, _ECDSA_SHA256)
        except InvalidSignature:
            return False
        return True


@runtime_checkable
class Signer(Protocol):
    """Anything that signs with a key named ``kid``: a local key, a KMS, an HSM.

    ``sign`` returns the signature in JWS form (raw r||s for ES256). Backends that do I/O
    may instead use the two-step helpers (build the signing input, attach the signature).
    """

    @property
    def kid(self) -> str: ...

    @property
    def alg(self) -> Algorithm: ...

    def sign(self, data: bytes) -> bytes: ...

    def public_jwk(self) -> dict[str, Any]: ...


class PrivateKey:
    """An in-memory private key (agents, tests, the development signer). It is a ``Signer``."""

    __slots__ = ("_key", "_kid", "_public")

    def __init__(
        self, key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, *, kid: str | None = None
    ) -> None:
        if isinstance(key, ec.EllipticCurvePrivateKey) and not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("only P-256 EC keys are supported")
        self._key = key
        self._public = PublicKey.from_jwk(self._public_jwk_members())
        self._kid = kid or self._public.thumbprint

    @classmethod
    def generate(cls, alg: Algorithm = "ES256", *, kid: str | None = None) -> PrivateKey:
        if alg == "ES256":
            return cls(ec.generate_private_key(ec.SECP256R1()), kid=kid)
        if alg == "Ed25519":
            return cls(ed25519.Ed25519PrivateKey.generate(), kid=kid)
        raise ValueError(f"unsupported algorithm {alg!r}")

    def _public_jwk_members(self) -> dict[str, Any]:
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            raw = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)}
        numbers = self._key.public_key().public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url_encode(numbers.x.to_bytes(32, "big")),
            "y": b64url_encode(numbers.y.to_bytes(32, "big")),
        }

    @property
    def kid(self) -> str:
        return self._kid

    @property
    def alg(self) -> Algorithm:
        return self._public.alg

    @property
    def public_key(self) -> PublicKey:
        return self._public

    @property
    def thumbprint(self) -> str:
        return self._public.thumbprint

    @property
    def crypto_key(self) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
        """The underlying ``cryptography`` key, for serialization by key stores."""
        return self._key

    def public_jwk(self) -> dict[str, Any]:
        jwk = dict(self._public.jwk)
        jwk.update(kid=self._kid, alg=self.alg, use="sig")
        return jwk

    def sign(self, data: bytes) -> bytes:
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(data)
        r, s = decode_dss_signature(self._key.sign(data, _ECDSA_SHA256))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def __repr__(self) -> str:  # never print key material
        return f"PrivateKey(alg={self.alg!r}, kid={self._kid!r})"


# Members that only a private or symmetric key has (RFC 7518 §6.2.2, §6.3.2, §6.4.1).
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_KEY_TYPES = {("EC", "P-256"), ("OKP", "Ed25519")}


def _verifies_signatures(jwk: object) -> bool:
    """Whether a JWKS entry is one of AgentAuth's signature keys (False: leave it out), or
    raise ``InvalidRequest`` for an entry that makes the whole set untrustworthy."""
    if not isinstance(jwk, dict):
        raise InvalidRequest("JWK must be an object")
    # A set that publishes a private or secret key, for whatever use, comes from a publisher
    # that cannot be trusted with the others either.
    if _PRIVATE_MEMBERS & jwk.keys():
        raise InvalidRequest("JWK contains private key material")
    kty, crv, use, ops, alg, kid = (
        jwk.get(m) for m in ("kty", "crv", "use", "key_ops", "alg", "kid")
    )
    if not isinstance(kty, str):
        raise InvalidRequest("JWK member kty is missing")
    # RFC 7518 §6.2.1.1 and RFC 8037 §2: a string. Another type would otherwise reach the
    # key type lookup below, where a list or object is unhashable: a TypeError, not a refusal.
    if crv is not None and not isinstance(crv, str):
        raise InvalidRequest("JWK member crv is not a string")
    if use is not None and not isinstance(use, str):
        raise InvalidRequest("JWK member use is not a string")
    if ops is not None and (
        not isinstance(ops, list)
        or not all(isinstance(op, str) for op in ops)
        or len(set(ops)) != len(ops)  # RFC 7517 §4.3: no duplicate values
    ):
        raise InvalidRequest("JWK member key_ops is not an array of distinct strings")
    if alg is not None and not isinstance(alg, str):
        raise InvalidRequest("JWK member alg is not a string")
    if kid is not None and (not isinstance(kid, str) or not kid):
        raise InvalidRequest("JWK member kid is not a non-empty string")
    if use not in (None, "sig") or (ops is not None and "verify" not in ops):
        return False
    if alg is not None:
        # Named for one of AgentAuth's algorithms, it must be that algorithm's key
        # (PublicKey.from_jwk refuses a mismatch); named for another, it is not ours.
        return alg in ALG_NAMES and kid is not None
    return (kty, crv) in _KEY_TYPES and kid is not None


class KeySet(Mapping[str, PublicKey]):
    """Verification keys by ``kid``, each with its algorithm pinned (from a JWKS)."""

    def __init__(self, keys: Iterable[PublicKey]) -> None:
        self._keys: dict[str, PublicKey] = {}
        for key in keys:
            kid = key.jwk.get("kid")
            if not isinstance(kid, str) or not kid:
                raise InvalidRequest("every key in a key set needs a kid")
            if kid in self._keys:
                raise InvalidRequest("duplicate kid in key set")
            self._keys[kid] = key

    @classmethod
    def from_jwks(cls, jwks: object) -> KeySet:
        """The signature verification keys of a JWKS (RFC 7517 §5); raises ``InvalidRequest``.

        A well-formed key that is not for verifying AgentAuth's signatures is left out, and
        the rest of the set kept: one whose ``use`` is not "sig" or whose ``key_ops`` lacks
        "verify" (RFC 7517 §4.2-4.3: an encryption key published beside the signing keys),
        one whose ``alg`` names an algorithm AgentAuth does not sign with, one of a key type
        or curve it does not use (when no ``alg`` claims it for one it does), and one with no
        ``kid``, which no token can name. The whole set is refused when it is malformed: an
        entry that is no object, private key material anywhere, a member of the wrong type,
        a key that names one of AgentAuth's algorithms or key types and does not parse as
        it, or two kept keys with one kid (a token's kid must name one key). An ``alg``
        left out is the key type's own: ES256 for P-256, Ed25519 for Ed25519.
        """
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
            raise InvalidRequest("a JWKS is an object with a keys array")
        keys = []
        for jwk in jwks["keys"]:
            if _verifies_signatures(jwk):
                keys.append(PublicKey.from_jwk(jwk, alg=jwk.get("alg")))
        return cls(keys)

    def to_jwks(self) -> dict[str, Any]:
        return {"keys": [dict(k.jwk, alg=k.alg, use="sig") for k in self._keys.values()]}

    def __getitem__(self, kid: str) -> PublicKey:
        return self._keys[kid]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
