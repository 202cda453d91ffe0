"""Approval receipts: offline proof that a passkey approved exactly one grant.

A human approves a grant by making a WebAuthn assertion (``navigator.credentials.get``) whose
challenge is the grant's 32-byte SHA-256 hash. The stored ``ApprovalReceipt`` holds what the
authenticator returned plus the credential's COSE public key from registration, so anyone can
later check, with no server and no clock, that this credential signed this challenge for this
relying party and origin (W3C WebAuthn L3 §7.2, steps that need no stored state).

What ``verify_assertion`` does *not* decide, because it needs state the caller owns:

* that ``credential_id`` is registered to the approving user with this public key (look the key
  up by credential id; never trust the key a receipt carries on its own);
* that ``sign_count`` moved forward (the caller compares and persists it);
* that ``backup_eligible`` (BE) is the value the credential registered with, which never
  changes (the caller compares it, and persists ``backed_up``, BS, which may);
* that ``user_handle`` names the expected user.

The assertion signs authenticatorData and clientDataJSON only. ``credential_id`` and
``user_handle`` are unsigned (``VerifiedReceipt.credential_id`` merely repeats the
receipt's), and anyone can sign a grant's hash with a key of their own and name it
``credential_public_key``: a receipt shows whose approval it is only once its key is found
to be the one registered under its credential id.

Every failure raises ``InvalidReceipt`` with a public ``reason``:

    malformed                 a field, clientDataJSON, authenticatorData or CBOR is ill-formed
    unsupported_key           the COSE key is not ES256/P-256 or EdDSA/Ed25519, or is invalid
    type_mismatch             clientData.type is not "webauthn.get"
    challenge_mismatch        clientData.challenge is not the expected challenge
    origin_mismatch           clientData.origin is not an allowed origin
    cross_origin              clientData.crossOrigin is present and not false, or
                              clientData.topOrigin is present
    token_binding             clientData.tokenBinding.status is "present": the browser used
                              Token Binding, which this relying party does not
    rp_id_mismatch            authenticatorData.rpIdHash is not SHA-256 of the RP ID
    user_not_present          the UP flag is clear
    user_not_verified         the UV flag is clear and verification was required
    attested_data             the AT flag is set, which an assertion never does
    bad_signature             the signature is ill-formed or does not verify
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection
from dataclasses import dataclass
from typing import Annotated, Any, Final, TypeAlias

from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ._encoding import b64url_decode, b64url_encode, canonical_json, strict_json_loads
from ._errors import InvalidReceipt, InvalidRequest
from ._keys import PublicKey, ed25519_on_curve

__all__ = ["ApprovalReceipt", "VerifiedReceipt", "cose_key_to_jwk", "verify_assertion"]


@dataclass(frozen=True, slots=True)
class _Limits:
    """Size limits for receipts; each default carries its reason."""

    # Real fields are far smaller (clientDataJSON ~200-500 bytes, authenticatorData 37 bytes plus
    # rare extensions, DER signatures <= 72 bytes, COSE keys ~80 bytes); 4 KiB of text leaves
    # room for odd origins (android:apk-key-hash:...) and extensions while bounding the work.
    max_field_chars: int = 4096
    # WebAuthn L3 §5.1 caps credential IDs at 1023 bytes: 1364 base64url characters.
    max_credential_id_chars: int = 1364
    # WebAuthn L3 §5.4.3 caps user handles at 64 bytes: 86 base64url characters.
    max_user_handle_chars: int = 86
    # A COSE key is one flat map (depth 2); 4 levels is generous and stops stack games.
    max_cbor_depth: int = 4
    # WebAuthn §13.4.3 asks for at least 16 random bytes; a grant hash has 32.
    min_challenge_bytes: int = 16


_LIMITS: Final = _Limits()

# authenticatorData: rpIdHash (32) || flags (1) || signCount (4) || [attested data] || [exts].
_RP_ID_HASH_END = 32
_FLAGS_AT = 32
_SIGN_COUNT_END = 37
_FLAG_UP = 0x01
_FLAG_UV = 0x04
_FLAG_BE = 0x08
_FLAG_BS = 0x10
_FLAG_AT = 0x40
_FLAG_ED = 0x80

# COSE (RFC 9052/9053) labels and values this module understands.
_COSE_KTY, _COSE_ALG, _COSE_CRV, _COSE_X, _COSE_Y = 1, 3, -1, -2, -3
_KTY_OKP, _KTY_EC2 = 1, 2
_ALG_ES256, _ALG_EDDSA = -7, -8
_CRV_P256, _CRV_ED25519 = 1, 6


def _fail(reason: str, description: str) -> InvalidReceipt:
    return InvalidReceipt(description, reason=reason)


# --- A minimal CBOR decoder (RFC 8949), just enough for COSE keys ---------------------------

_CborKey: TypeAlias = int | str
_CborValue: TypeAlias = (
    int | bytes | str | bool | list["_CborValue"] | dict[_CborKey, "_CborValue"] | None
)


# false, true, null: the only simple values read, and only where asked for.
_CBOR_SIMPLE: Final[dict[int, bool | None]] = {0xF4: False, 0xF5: True, 0xF6: None}


# The smallest argument each longer head form (additional information 24-27) may carry:
# anything smaller fits a shorter form (RFC 8949 §4.2.1, "preferred serialization").
_SHORTEST_FROM: Final = {24: 24, 25: 1 << 8, 26: 1 << 16, 27: 1 << 32}


class _CborReader:
    """Definite-length CBOR: integers, byte and text strings, arrays and maps. Nothing else.

    Tags, floats, simple values and indefinite lengths are refused; so are map keys other
    than integers and text strings, duplicate map keys and nesting beyond the depth limit.
    With ``booleans``, false, true and null are read too (never as map keys): extension
    outputs in authenticatorData use them (CTAP 2.2 thirdPartyPayment is a boolean); a
    COSE key has none. With ``shortest``, every integer, length and count must be written
    in its shortest form (CTAP2 canonical CBOR), so the bytes read have one encoding.
    """

    __slots__ = ("_booleans", "_data", "_pos", "_shortest")

    def __init__(self, data: bytes, *, booleans: bool = False, shortest: bool = False) -> None:
        self._data = data
        self._pos = 0
        self._booleans = booleans
        self._shortest = shortest

    def at_end(self) -> bool:
        return self._pos == len(self._data)

    def _take(self, n: int) -> bytes:
        if n > len(self._data) - self._pos:
            raise _fail("malformed", "truncated CBOR")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def _argument(self, info: int) -> int:
        if info < 24:
            return info
        if 24 <= info <= 27:
            value = int.from_bytes(self._take(1 << (info - 24)), "big")
            if self._shortest and value < _SHORTEST_FROM[info]:
                raise _fail("malformed", "CBOR integer or length not in its shortest form")
            return value
        # 28-30 are reserved; 31 means an indefinite length (or "break").
        raise _fail("malformed", "unsupported CBOR length encoding")

    def item(self, depth: int = 1) -> _CborValue:
        if depth > _LIMITS.max_cbor_depth:
            raise _fail("malformed", "CBOR nested too deeply")
        initial = self._take(1)[0]
        major, info = initial >> 5, initial & 0x1F
        if self._booleans and initial in _CBOR_SIMPLE:
            return _CBOR_SIMPLE[initial]
        if major >= 6:
            raise _fail("malformed", "unsupported CBOR item (tag, float or simple value)")
        arg = self._argument(info)
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major == 2:
            return self._take(arg)
        if major == 3:
            try:
                return self._take(arg).decode("utf-8", "strict")
            except UnicodeDecodeError:
                raise _fail("malformed", "CBOR text is not UTF-8") from None
        # Huge counts cost nothing: every item takes a byte, so the loops stop at the data's end.
        if major == 4:
            return [self.item(depth + 1) for _ in range(arg)]
        result: dict[_CborKey, _CborValue] = {}
        for _ in range(arg):
            key = self.item(depth + 1)
            if isinstance(key, bool) or not isinstance(key, int | str):
                raise _fail("malformed", "CBOR map key is not an integer or text")
            if key in result:
                raise _fail("malformed", "duplicate CBOR map key")
            result[key] = self.item(depth + 1)
        return result


def _decode_cbor(data: bytes) -> _CborValue:
    """Decode exactly one CBOR item, every head in its shortest form; trailing bytes are
    refused.

    Authenticators write COSE keys in CTAP2 canonical CBOR, and the registry stores the key
    as py_webauthn re-encodes it, in the shortest form: a longer one is no key it holds, and
    would let one approval be written as several receipts (several digests).
    """
    reader = _CborReader(data, shortest=True)
    value = reader.item()
    if not reader.at_end():
        raise _fail("malformed", "trailing bytes after CBOR item")
    return value


# --- COSE keys -------------------------------------------------------------------------------


def _coordinate(key: dict[_CborKey, _CborValue], label: int) -> str:
    value = key.get(label)
    if not isinstance(value, bytes) or len(value) != 32:
        raise _fail("unsupported_key", "COSE key coordinate is missing or has the wrong length")
    return b64url_encode(value)


def _cose_public_key(cose: bytes) -> PublicKey:
    key = _decode_cbor(cose)
    if not isinstance(key, dict):
        raise _fail("unsupported_key", "COSE key is not a map")
    kty, alg, crv = key.get(_COSE_KTY), key.get(_COSE_ALG), key.get(_COSE_CRV)
    jwk: dict[str, str]
    if kty == _KTY_EC2 and alg == _ALG_ES256 and crv == _CRV_P256:
        labels = {_COSE_KTY, _COSE_ALG, _COSE_CRV, _COSE_X, _COSE_Y}
        jwk = {
            "kty": "EC",
            "crv": "P-256",
            "x": _coordinate(key, _COSE_X),
            "y": _coordinate(key, _COSE_Y),
        }
    elif kty == _KTY_OKP and alg == _ALG_EDDSA and crv == _CRV_ED25519:
        labels = {_COSE_KTY, _COSE_ALG, _COSE_CRV, _COSE_X}
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": _coordinate(key, _COSE_X)}
    else:
        raise _fail("unsupported_key", "only ES256 (P-256) and EdDSA (Ed25519) keys are supported")
    # Anything else (a private scalar "d", a compressed point, unknown parameters) is refused
    # rather than ignored: a registration key has exactly these members.
    if set(key) != labels:
        raise _fail("unsupported_key", "COSE key has unexpected members")
    try:
        public = PublicKey.from_jwk(jwk)
    except InvalidRequest:
        raise _fail("unsupported_key", "COSE key is not a valid public key") from None
    # from_jwk leaves this to OpenSSL's verify, which refuses every signature: a passkey with
    # such a key would register and then never approve nor sign in.
    if public.alg == "Ed25519" and not ed25519_on_curve(b64url_decode(jwk["x"])):
        raise _fail("unsupported_key", "COSE key is not a point of Ed25519")
    return public


def cose_key_to_jwk(cose: bytes) -> dict[str, str]:
    """The public JWK (with ``alg``) of a WebAuthn COSE_Key; raises ``InvalidReceipt``."""
    key = _cose_public_key(cose)
    return {**key.jwk, "alg": key.alg}


# --- Receipts --------------------------------------------------------------------------------


def _check_base64url(value: str) -> str:
    try:
        b64url_decode(value)
    except (InvalidRequest, UnicodeEncodeError):
        raise ValueError("must be unpadded, canonical base64url") from None
    return value


_Base64Url: TypeAlias = Annotated[str, AfterValidator(_check_base64url)]


class ApprovalReceipt(BaseModel):
    """A WebAuthn assertion over a grant hash, with the credential's public key."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    credential_id: _Base64Url = Field(
        min_length=1,
        max_length=_LIMITS.max_credential_id_chars,
        description="Credential ID (the authenticator's rawId), unpadded base64url.",
    )
    authenticator_data: _Base64Url = Field(
        min_length=1,
        max_length=_LIMITS.max_field_chars,
        description="authenticatorData from the assertion, unpadded base64url.",
    )
    client_data_json: _Base64Url = Field(
        min_length=1,
        max_length=_LIMITS.max_field_chars,
        description="clientDataJSON bytes exactly as the browser produced them, unpadded "
        "base64url.",
    )
    signature: _Base64Url = Field(
        min_length=1,
        max_length=_LIMITS.max_field_chars,
        description="Assertion signature over authenticatorData || SHA-256(clientDataJSON), "
        "unpadded base64url: ASN.1 DER for ES256, raw 64 bytes for EdDSA.",
    )
    credential_public_key: _Base64Url = Field(
        min_length=1,
        max_length=_LIMITS.max_field_chars,
        description="The credential's COSE_Key bytes from registration, unpadded base64url.",
    )
    user_handle: _Base64Url | None = Field(
        default=None,
        max_length=_LIMITS.max_user_handle_chars,
        description="userHandle from the assertion, unpadded base64url, if the authenticator "
        "returned one.",
    )

    def digest(self) -> str:
        """The receipt hash tokens carry: base64url(SHA-256(canonical JSON of the receipt))."""
        document = self.model_dump(exclude_none=True)
        return b64url_encode(hashlib.sha256(canonical_json(document)).digest())


@dataclass(frozen=True, slots=True)
class VerifiedReceipt:
    """What a verified receipt establishes; the caller checks and persists the rest."""

    credential_id: str
    sign_count: int
    user_verified: bool
    backed_up: bool
    #: BE: the credential can be backed up. Fixed for its life (WebAuthn L3 §6.1.3), so a
    #: caller holding the registered value compares it; ``backed_up`` may change any time.
    backup_eligible: bool


def _check_client_data(client_data_json: bytes, challenge: bytes, origins: frozenset[str]) -> None:
    try:
        client_data = strict_json_loads(client_data_json)
    except InvalidRequest:
        raise _fail("malformed", "clientDataJSON is not valid JSON") from None
    if not isinstance(client_data, dict):
        raise _fail("malformed", "clientDataJSON is not a JSON object")
    if client_data.get("type") != "webauthn.get":
        raise _fail("type_mismatch", "clientDataJSON type is not webauthn.get")
    encoded = client_data.get("challenge")
    if not isinstance(encoded, str):
        raise _fail("malformed", "clientDataJSON challenge is missing")
    try:
        presented = b64url_decode(encoded)
    except (InvalidRequest, UnicodeEncodeError):
        raise _fail("malformed", "clientDataJSON challenge is not base64url") from None
    if not hmac.compare_digest(presented, challenge):
        raise _fail("challenge_mismatch", "the assertion approves a different challenge")
    origin = client_data.get("origin")
    if not isinstance(origin, str) or origin not in origins:
        raise _fail("origin_mismatch", "the assertion was made on an unexpected origin")
    check_top_level_frame(client_data, "assertion")
    check_token_binding(client_data, "assertion")


def check_top_level_frame(client_data: dict[str, Any], ceremony: str) -> None:
    """Refuse client data from a cross-origin frame: ``crossOrigin`` absent or false, and
    no ``topOrigin``. The registry applies the same rule to registrations (``ceremony``
    names which it was, for the message)."""
    if "crossOrigin" in client_data and client_data["crossOrigin"] is not False:
        raise _fail("cross_origin", f"the {ceremony} was made in a cross-origin frame")
    # A browser adds topOrigin only to client data from a cross-origin frame, together with
    # crossOrigin true (WebAuthn L3 §5.8.1), which is refused above. Beside crossOrigin false
    # or absent it contradicts the claim of a top-level page, so it is refused as well: no
    # browser wrote such client data.
    if "topOrigin" in client_data:
        raise _fail("cross_origin", "the client data names a top-level origin of a frame")


def check_token_binding(client_data: dict[str, Any], ceremony: str) -> None:
    """Refuse client data whose browser used Token Binding (RFC 8471) on its connection.
    WebAuthn L2 (§7.1 step 10, §7.2 step 14) has the relying party compare
    ``tokenBinding.status`` with its TLS connection's: AgentAuth's never has one (TLS ends
    at a proxy, and no current browser sends it), so "present" names a binding nobody
    checked, and only "supported" or no member at all matches. Anything else is no client
    data a browser wrote. The registry applies the same rule to registrations."""
    if "tokenBinding" not in client_data:
        return
    binding = client_data["tokenBinding"]
    status = binding.get("status") if isinstance(binding, dict) else None
    if status == "present":
        raise _fail(
            "token_binding",
            f"the {ceremony} is bound to a TLS Token Binding, which this relying party does"
            " not support",
        )
    if status != "supported":
        raise _fail("malformed", "clientDataJSON tokenBinding has no known status")


def _check_authenticator_data(auth_data: bytes, rp_id: str, *, require_uv: bool) -> int:
    if len(auth_data) < _SIGN_COUNT_END:
        raise _fail("malformed", "authenticatorData is too short")
    rp_id_hash = hashlib.sha256(rp_id.encode("utf-8")).digest()
    if not hmac.compare_digest(auth_data[:_RP_ID_HASH_END], rp_id_hash):
        raise _fail("rp_id_mismatch", "the assertion is for a different relying party")
    flags = auth_data[_FLAGS_AT]
    if not flags & _FLAG_UP:
        raise _fail("user_not_present", "the user was not present")
    if require_uv and not flags & _FLAG_UV:
        raise _fail("user_not_verified", "the user was not verified")
    if flags & _FLAG_AT:
        raise _fail("attested_data", "an assertion must not carry attested credential data")
    if flags & _FLAG_BS and not flags & _FLAG_BE:
        raise _fail("malformed", "backup state set on a credential that cannot be backed up")
    # Extensions (ED) follow the counter: exactly one CBOR map up to the end (WebAuthn §6.1),
    # as the registry's parser requires, so a receipt it would refuse does not verify here.
    # They are covered by the signature and not interpreted. Authenticators write them in
    # CTAP2 canonical CBOR; a head in a longer form than needed would let one approval be
    # written as several receipts (several digests), and the registry's parser refuses it
    # too (py_webauthn measures the map by its shortest re-encoding, so the longer form
    # leaves bytes over). Map key order is not checked.
    if flags & _FLAG_ED:
        if len(auth_data) == _SIGN_COUNT_END:
            raise _fail("malformed", "authenticatorData announces extensions it lacks")
        reader = _CborReader(auth_data[_SIGN_COUNT_END:], booleans=True, shortest=True)
        if not isinstance(reader.item(), dict) or not reader.at_end():
            raise _fail("malformed", "authenticatorData extensions are not one CBOR map")
    elif len(auth_data) != _SIGN_COUNT_END:
        raise _fail("malformed", "trailing bytes in authenticatorData")
    return flags


def _verify_signature(key: PublicKey, signature: bytes, signed: bytes) -> None:
    if key.alg == "ES256":
        # WebAuthn ES256 signatures are DER; PublicKey takes JWS-style r||s. Only the canonical
        # DER encoding is accepted so a signature has one byte form (decode_dss_signature is
        # already strict; the re-encoding check keeps that true whatever its future leniency).
        try:
            r, s = decode_dss_signature(signature)
        except ValueError:
            raise _fail("bad_signature", "the signature is not valid DER") from None
        if not (0 < r < 1 << 256 and 0 < s < 1 << 256):
            raise _fail("bad_signature", "the signature does not verify")
        if encode_dss_signature(r, s) != signature:
            raise _fail("bad_signature", "the signature is not canonical DER")
        # Both s and n - s verify, and both are accepted: authenticators are not asked for
        # low-S signatures and real ones produce either. So anyone holding a receipt can
        # write a second one with the other s and another digest. That proves no more than
        # the first (same approval, same grant), and tokens pin the digest they were issued
        # with, so the second one carries no authority.
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    if not key.verify(signature, signed):
        raise _fail("bad_signature", "the signature does not verify")


def verify_assertion(
    receipt: ApprovalReceipt,
    *,
    challenge: bytes,
    rp_id: str,
    origin: str | Collection[str],
    require_uv: bool,
) -> VerifiedReceipt:
    """Check that ``receipt`` is a valid assertion over ``challenge``, or raise ``InvalidReceipt``.

    ``origin`` is the allowed origin or origins (exact match; an empty collection allows
    none). The caller must still bind ``credential_id`` to the key it registered and
    enforce the sign counter; see the module docstring.
    """
    if len(challenge) < _LIMITS.min_challenge_bytes:
        raise ValueError("the expected challenge is too short")
    if not rp_id:
        raise ValueError("rp_id is required")
    origins = frozenset([origin]) if isinstance(origin, str) else frozenset(origin)

    try:
        auth_data = b64url_decode(receipt.authenticator_data)
        client_data_json = b64url_decode(receipt.client_data_json)
        signature = b64url_decode(receipt.signature)
        cose = b64url_decode(receipt.credential_public_key)
    except (InvalidRequest, UnicodeEncodeError):  # only for receipts built without validation
        raise _fail("malformed", "a receipt field is not base64url") from None

    key = _cose_public_key(cose)
    _check_client_data(client_data_json, challenge, origins)
    flags = _check_authenticator_data(auth_data, rp_id, require_uv=require_uv)
    signed = auth_data + hashlib.sha256(client_data_json).digest()
    _verify_signature(key, signature, signed)

    return VerifiedReceipt(
        credential_id=receipt.credential_id,
        sign_count=int.from_bytes(auth_data[_FLAGS_AT + 1 : _SIGN_COUNT_END], "big"),
        user_verified=bool(flags & _FLAG_UV),
        backed_up=bool(flags & _FLAG_BS),
        backup_eligible=bool(flags & _FLAG_BE),
    )
