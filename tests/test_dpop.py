"""DPoP proofs (RFC 9449 §4.3): header, key, signature, claims, htu normalization, nonces.

Malformed proofs are built by hand with ``build_jws``; the same helper, fed the unchanged
header and claims, makes the positive control, so each negative case differs from an
accepted proof in exactly one respect. Each negative asserts the exception type and its
``reason`` code.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentauth.protocol import (
    ACCESS_TOKEN_TYP,
    CHECKPOINT_TYP,
    DPOP_TYP,
    Capability,
    DPoPNonces,
    DPoPPolicy,
    DPoPVerifier,
    Grant,
    InvalidDPoPProof,
    InvalidRequest,
    PrivateKey,
    UseDPoPNonce,
    VerifiedProof,
    access_token_hash,
    b64url_decode,
    b64url_encode,
    create_dpop_proof,
    mint_access_token,
    normalize_htu,
)

NOW = 1_760_000_000
MAX_AGE = DPoPPolicy().max_age
FUTURE_SKEW = DPoPPolicy().future_skew
MAX_PROOF_BYTES = DPoPPolicy().max_proof_bytes
HTM = "POST"
HTU = "https://api.example/payments/send"
JTI = "proof-jti-0123456789"
ISSUER = "https://registry.example"

AGENT_ES = PrivateKey.generate("ES256")
AGENT_ED = PrivateKey.generate("Ed25519")
OTHER_ES = PrivateKey.generate("ES256")
OTHER_ED = PrivateKey.generate("Ed25519")
REGISTRY = PrivateKey.generate("ES256", kid="registry-es256")
GRANT = Grant(
    grant_id="grant-1",
    agent_id="agent-1",
    principal_id="human-1",
    provider_id="provider-1",
    audience="https://api.example",
    capabilities=(Capability.write("payments"),),
    created_at=NOW - 100,
)
ACCESS_TOKEN = mint_access_token(
    signer=REGISTRY,
    issuer=ISSUER,
    grant=GRANT,
    jkt=AGENT_ES.thumbprint,
    receipt_hash=b64url_encode(hashlib.sha256(b"receipt").digest()),
    now=NOW,
    lifetime=600,
)
OTHER_TOKEN = mint_access_token(
    signer=REGISTRY,
    issuer=ISSUER,
    grant=GRANT,
    jkt=AGENT_ES.thumbprint,
    receipt_hash=b64url_encode(hashlib.sha256(b"receipt").digest()),
    now=NOW,
    lifetime=600,
)
SECRET_A = hashlib.sha256(b"nonce secret A").digest()
SECRET_B = hashlib.sha256(b"nonce secret B").digest()
B64URL_ALPHABET = string.ascii_letters + string.digits + "-_"
P256_P = 2**256 - 2**224 + 2**192 + 2**96 - 1

Doc = dict[str, Any]
Edit = Callable[[Doc], None]


# --- Building proofs by hand -------------------------------------------------------------------


def json_bytes(document: Doc) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def _same(value: Any) -> Any:
    return value


def build_jws(
    header: Doc | bytes,
    claims: Doc | bytes,
    signer: PrivateKey,
    *,
    signature: Callable[[bytes], bytes] = _same,
) -> str:
    """A compact JWS over exactly the bytes given."""
    header_bytes = header if isinstance(header, bytes) else json_bytes(header)
    claims_bytes = claims if isinstance(claims, bytes) else json_bytes(claims)
    data = b64url_encode(header_bytes) + "." + b64url_encode(claims_bytes)
    return data + "." + b64url_encode(signature(signer.sign(data.encode("ascii"))))


def public_members(key: PrivateKey) -> Doc:
    return {k: v for k, v in key.public_jwk().items() if k in ("kty", "crv", "x", "y")}


def proof_parts(key: PrivateKey = AGENT_ES) -> tuple[Doc, Doc]:
    header = {"typ": DPOP_TYP, "alg": key.alg, "jwk": public_members(key)}
    claims = {
        "jti": JTI,
        "htm": HTM,
        "htu": HTU,
        "iat": NOW,
        "ath": access_token_hash(ACCESS_TOKEN),
    }
    return header, claims


def make_proof(
    header_edit: Edit | None = None,
    claims_edit: Edit | None = None,
    *,
    key: PrivateKey = AGENT_ES,
    signer: PrivateKey | None = None,
    signature: Callable[[bytes], bytes] = _same,
) -> str:
    """A valid proof by ``key``, or one differing from it by the given edits."""
    header, claims = proof_parts(key)
    if header_edit is not None:
        header_edit(header)
    if claims_edit is not None:
        claims_edit(claims)
    return build_jws(header, claims, signer or key, signature=signature)


def put(key: str, value: Any) -> Edit:
    def edit(document: Doc) -> None:
        document[key] = value

    return edit


def drop(key: str) -> Edit:
    def edit(document: Doc) -> None:
        del document[key]

    return edit


def put_jwk(**members: Any) -> Edit:
    """Change (or, with None, remove) members of the header's jwk."""

    def edit(header: Doc) -> None:
        jwk = dict(header["jwk"])
        for name, value in members.items():
            if value is None:
                jwk.pop(name, None)
            else:
                jwk[name] = value
        header["jwk"] = jwk

    return edit


def verify(
    proof: object,
    *,
    verifier: DPoPVerifier | None = None,
    htm: str = HTM,
    htu: str = HTU,
    now: float = NOW,
    access_token: str | None = ACCESS_TOKEN,
    jkt: str | None = AGENT_ES.thumbprint,
) -> VerifiedProof:
    return (verifier or DPoPVerifier()).verify(
        proof, htm=htm, htu=htu, now=now, access_token=access_token, jkt=jkt
    )


def assert_refused(proof: object, reason: str, **kwargs: Any) -> None:
    with pytest.raises(InvalidDPoPProof) as excinfo:
        verify(proof, **kwargs)
    assert excinfo.value.reason == reason, repr(excinfo.value)
    assert type(excinfo.value) is InvalidDPoPProof
    assert excinfo.value.error == "invalid_dpop_proof"


# --- Positive controls -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "alg"),
    [
        pytest.param(AGENT_ES, "ES256", id="ES256"),
        pytest.param(AGENT_ED, "Ed25519", id="Ed25519"),
        pytest.param(AGENT_ED, "EdDSA", id="legacy-EdDSA"),
    ],
)
def test_hand_built_control_is_accepted(key: PrivateKey, alg: str) -> None:
    result = verify(make_proof(put("alg", alg), key=key), jkt=key.thumbprint)
    assert result == VerifiedProof(jti=JTI, iat=float(NOW), jkt=key.thumbprint, htm=HTM, htu=HTU)


@pytest.mark.parametrize("key", [AGENT_ES, AGENT_ED], ids=["ES256", "Ed25519"])
def test_created_proof_is_accepted(key: PrivateKey) -> None:
    proof = create_dpop_proof(key, htm=HTM, htu=HTU, now=NOW, access_token=ACCESS_TOKEN)
    result = verify(proof, jkt=key.thumbprint)
    assert result.jkt == key.thumbprint
    assert result.htm == HTM


def test_created_proof_drops_query_and_fragment() -> None:
    proof = create_dpop_proof(AGENT_ES, htm="GET", htu=HTU + "?a=1#frag", now=NOW)
    claims = json.loads(b64url_decode(proof.split(".")[1]))
    assert claims["htu"] == HTU
    assert "ath" not in claims
    assert verify(proof, htm="GET", htu=HTU + "?a=1", access_token=None).htu == HTU


def test_proof_without_ath_is_accepted_when_no_token_is_bound() -> None:
    proof = make_proof(claims_edit=drop("ath"))
    assert verify(proof, access_token=None, jkt=None).jti == JTI


def test_precomputed_ath_is_accepted() -> None:
    result = DPoPVerifier().verify(
        make_proof(), htm=HTM, htu=HTU, now=NOW, ath=access_token_hash(ACCESS_TOKEN)
    )
    assert result.jti == JTI


@pytest.mark.parametrize(
    "jti",
    [
        pytest.param("j", id="one-char"),
        pytest.param("j" * 128, id="128-chars"),
        pytest.param("!~" * 8, id="printable-ascii-edges"),
    ],
)
def test_jti_within_limits_is_accepted(jti: str) -> None:
    assert verify(make_proof(claims_edit=put("jti", jti))).jti == jti


def test_fractional_iat_is_accepted() -> None:
    assert verify(make_proof(claims_edit=put("iat", NOW + 0.5))).iat == NOW + 0.5


def test_extra_claims_such_as_nonce_are_ignored_without_nonces() -> None:
    assert verify(make_proof(claims_edit=put("nonce", "anything"))).jti == JTI


def test_key_cache_serves_repeated_proofs() -> None:
    verifier = DPoPVerifier(cache_size=1)
    for key in (AGENT_ES, AGENT_ED, AGENT_ES):
        for jti in ("first-jti", "second-jti"):
            proof = make_proof(claims_edit=put("jti", jti), key=key)
            assert verify(proof, verifier=verifier, jkt=key.thumbprint).jti == jti


# --- Negative cases: header --------------------------------------------------------------------

HEADER_CASES = [
    pytest.param(drop("typ"), "wrong_typ", id="typ-missing"),
    pytest.param(put("typ", "JWT"), "wrong_typ", id="typ-JWT"),
    pytest.param(put("typ", "DPOP+JWT"), "wrong_typ", id="typ-uppercase"),
    pytest.param(put("typ", ACCESS_TOKEN_TYP), "wrong_typ", id="typ-access-token"),
    pytest.param(put("typ", CHECKPOINT_TYP), "wrong_typ", id="typ-checkpoint"),
    pytest.param(put("typ", None), "wrong_typ", id="typ-null"),
    pytest.param(put("kid", "agent-key"), "unexpected_header", id="header-kid"),
    pytest.param(put("x5c", ["MIIB"]), "unexpected_header", id="header-x5c"),
    pytest.param(put("jku", "https://evil.example/jwks"), "unexpected_header", id="header-jku"),
    pytest.param(put("x5u", "https://evil.example/c"), "unexpected_header", id="header-x5u"),
    pytest.param(put("crit", ["htm"]), "unexpected_header", id="header-crit"),
    pytest.param(put("nonce", "x"), "unexpected_header", id="header-nonce"),
    pytest.param(put("alg", "none"), "alg_not_allowed", id="alg-none"),
    pytest.param(put("alg", "HS256"), "alg_not_allowed", id="alg-HS256"),
    pytest.param(put("alg", "RS256"), "alg_not_allowed", id="alg-RS256"),
    pytest.param(put("alg", "ES384"), "alg_not_allowed", id="alg-ES384"),
    pytest.param(put("alg", "es256"), "alg_not_allowed", id="alg-lowercase"),
    pytest.param(drop("alg"), "alg_not_allowed", id="alg-missing"),
    pytest.param(put("alg", "Ed25519"), "bad_jwk", id="alg-Ed25519-with-EC-jwk"),
    pytest.param(put("alg", "EdDSA"), "bad_jwk", id="alg-EdDSA-with-EC-jwk"),
    pytest.param(drop("jwk"), "bad_jwk", id="jwk-missing"),
    pytest.param(put("jwk", None), "bad_jwk", id="jwk-null"),
    pytest.param(put("jwk", "not a key"), "bad_jwk", id="jwk-string"),
    pytest.param(put("jwk", []), "bad_jwk", id="jwk-array"),
    pytest.param(put_jwk(kty="RSA"), "bad_jwk", id="jwk-kty-RSA"),
    pytest.param(put_jwk(crv="P-384"), "bad_jwk", id="jwk-crv-P-384"),
    pytest.param(put_jwk(crv="secp256k1"), "bad_jwk", id="jwk-crv-secp256k1"),
    pytest.param(put_jwk(y=None), "bad_jwk", id="jwk-y-missing"),
    pytest.param(put_jwk(x=None), "bad_jwk", id="jwk-x-missing"),
    pytest.param(put_jwk(x=b64url_encode(b"\x01" * 31)), "bad_jwk", id="jwk-x-31-bytes"),
    pytest.param(put_jwk(x=b64url_encode(b"\x01" * 33)), "bad_jwk", id="jwk-x-33-bytes"),
    pytest.param(put_jwk(x="!!!not-base64url!!!"), "bad_jwk", id="jwk-x-garbage"),
    pytest.param(put_jwk(x="\u00e9" * 43), "bad_jwk", id="jwk-x-non-ascii"),
    pytest.param(put_jwk(x=12), "bad_jwk", id="jwk-x-number"),
    pytest.param(put_jwk(kty="oct", k=b64url_encode(b"secret" * 6)), "bad_jwk", id="jwk-symmetric"),
]


def _off_curve(header: Doc) -> None:
    y = int.from_bytes(b64url_decode(header["jwk"]["y"]), "big")
    header["jwk"] = dict(header["jwk"], y=b64url_encode(((y + 1) % P256_P).to_bytes(32, "big")))


def _coordinate_beyond_field(header: Doc) -> None:
    header["jwk"] = dict(header["jwk"], x=b64url_encode(b"\xff" * 32))


def _noncanonical_x(header: Doc) -> None:
    x = header["jwk"]["x"]  # 32 bytes: 43 characters, the last with 2 spare bits
    header["jwk"] = dict(
        header["jwk"], x=x[:-1] + B64URL_ALPHABET[B64URL_ALPHABET.index(x[-1]) ^ 1]
    )


def _private_d(header: Doc) -> None:
    scalar = AGENT_ES.crypto_key.private_numbers().private_value  # type: ignore[union-attr]
    header["jwk"] = dict(header["jwk"], d=b64url_encode(scalar.to_bytes(32, "big")))


def _other_key(header: Doc) -> None:
    header["jwk"] = public_members(OTHER_ES)


HEADER_CASES += [
    pytest.param(_off_curve, "bad_jwk", id="jwk-point-off-curve"),
    pytest.param(_coordinate_beyond_field, "bad_jwk", id="jwk-x-beyond-field"),
    pytest.param(_noncanonical_x, "bad_jwk", id="jwk-x-noncanonical-base64"),
    pytest.param(_private_d, "bad_jwk", id="jwk-with-private-d"),
    # Bound to the agent's key (jkt), a proof naming another is refused before its
    # signature is checked (test_signed_by_another_key_than_the_jwk_is_refused: unbound).
    pytest.param(_other_key, "jkt_mismatch", id="jwk-of-another-key"),
]


@pytest.mark.parametrize(("header_edit", "reason"), HEADER_CASES)
def test_header_negative(header_edit: Edit, reason: str) -> None:
    assert_refused(make_proof(header_edit), reason)


@pytest.mark.parametrize(
    ("header_edit", "reason"),
    [
        pytest.param(put("alg", "ES256"), "bad_jwk", id="alg-ES256-with-Ed25519-jwk"),
        pytest.param(put_jwk(crv="X25519"), "bad_jwk", id="jwk-crv-X25519"),
        pytest.param(put_jwk(kty="EC"), "bad_jwk", id="jwk-kty-EC-with-Ed25519-crv"),
        pytest.param(put_jwk(d=b64url_encode(b"\x01" * 32)), "bad_jwk", id="jwk-with-d"),
        pytest.param(put("jwk", public_members(OTHER_ED)), "jkt_mismatch", id="jwk-of-another"),
    ],
)
def test_ed25519_header_negative(header_edit: Edit, reason: str) -> None:
    assert_refused(make_proof(header_edit, key=AGENT_ED), reason, jkt=AGENT_ED.thumbprint)


def test_proof_forged_for_a_small_order_key_is_refused() -> None:
    # The identity point as a key: R = identity, S = 0 "signs" every message, so this proof
    # needs no private key. It must fail at the key, before any signature check.
    identity = b"\x01" + bytes(31)
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(identity)}
    header, claims = proof_parts()
    header = dict(header, alg="Ed25519", jwk=jwk)
    data = b64url_encode(json_bytes(header)) + "." + b64url_encode(json_bytes(claims))
    forged = data + "." + b64url_encode(identity + bytes(32))
    thumbprint = b64url_encode(
        hashlib.sha256(json_bytes({"crv": "Ed25519", "kty": "OKP", "x": jwk["x"]})).digest()
    )
    assert_refused(forged, "bad_jwk", jkt=thumbprint)
    assert_refused(forged, "bad_jwk", jkt=None, access_token=None)


def with_duplicate(document: Doc, key: str) -> bytes:
    """The JSON of ``document`` with member ``key`` appearing twice (same value)."""
    return json_bytes(document)[:-1] + b"," + json_bytes({key: document[key]})[1:]


@pytest.mark.parametrize("member", ["typ", "alg", "jwk"])
def test_duplicate_header_member_is_refused(member: str) -> None:
    header, claims = proof_parts()
    assert_refused(build_jws(with_duplicate(header, member), claims, AGENT_ES), "malformed")


@pytest.mark.parametrize("member", ["jti", "htm", "htu", "iat", "ath"])
def test_duplicate_claim_is_refused(member: str) -> None:
    header, claims = proof_parts()
    assert_refused(build_jws(header, with_duplicate(claims, member), AGENT_ES), "malformed")


def test_duplicate_jwk_member_is_refused() -> None:
    header, claims = proof_parts()
    raw = json_bytes(header).replace(b'"jwk":{', b'"jwk":{"kty":"EC",', 1)
    assert_refused(build_jws(raw, claims, AGENT_ES), "malformed")


def test_access_token_never_passes_as_a_proof() -> None:
    assert len(ACCESS_TOKEN) <= MAX_PROOF_BYTES  # so the type check, not the size, refuses it
    assert_refused(ACCESS_TOKEN, "wrong_typ")


def test_proof_typed_as_access_token_is_refused() -> None:
    assert_refused(make_proof(put("typ", ACCESS_TOKEN_TYP)), "wrong_typ")


# --- Negative cases: signature -----------------------------------------------------------------


def _flip_bit(sig: bytes) -> bytes:
    return sig[:5] + bytes([sig[5] ^ 0x80]) + sig[6:]


@pytest.mark.parametrize(
    ("key", "mangle"),
    [
        pytest.param(AGENT_ES, _flip_bit, id="es256-bit-flipped"),
        pytest.param(AGENT_ED, _flip_bit, id="ed25519-bit-flipped"),
        pytest.param(AGENT_ES, lambda s: s[:-1], id="es256-63-bytes"),
        pytest.param(AGENT_ED, lambda s: s + b"\x00", id="ed25519-65-bytes"),
        pytest.param(AGENT_ES, lambda s: b"", id="empty"),
        pytest.param(AGENT_ES, lambda s: b"\x00" * 64, id="es256-zero"),
        pytest.param(AGENT_ED, lambda s: b"\x00" * 64, id="ed25519-zero"),
    ],
)
def test_signature_negative(key: PrivateKey, mangle: Callable[[bytes], bytes]) -> None:
    assert_refused(make_proof(key=key, signature=mangle), "bad_signature", jkt=key.thumbprint)


def test_signed_by_another_key_than_the_jwk_is_refused() -> None:
    assert_refused(make_proof(signer=OTHER_ES), "bad_signature")


def test_signature_over_other_claims_is_refused() -> None:
    good = make_proof()
    other = make_proof(claims_edit=put("jti", "another-jti"))
    header, _, signature = good.split(".")
    assert_refused(f"{header}.{other.split('.')[1]}.{signature}", "bad_signature")


@pytest.mark.parametrize(
    ("claims_edit", "reason"),
    [
        pytest.param(put("iat", NOW - MAX_AGE - 1), "iat_too_old", id="stale"),
        pytest.param(put("iat", NOW + FUTURE_SKEW + 1), "iat_in_future", id="future"),
        pytest.param(put("htu", "https://api.example/other"), "htu_mismatch", id="other-url"),
        pytest.param(put("htm", "GET"), "htm_mismatch", id="other-method"),
        pytest.param(put("ath", "A" * 43), "ath_mismatch", id="other-token"),
    ],
)
def test_a_proof_failing_a_cheap_check_is_refused_before_its_signature_is(
    claims_edit: Edit, reason: str
) -> None:
    # A forged signature, so only a check made before the signature's can name the claim:
    # nobody makes the verifier pay for a signature check with a proof it refuses anyway.
    assert_refused(make_proof(claims_edit=claims_edit, signature=_flip_bit), reason)


def test_a_proof_of_another_key_than_the_bound_one_is_refused_before_its_signature_is() -> None:
    assert_refused(make_proof(key=OTHER_ES, signature=_flip_bit), "jkt_mismatch")


# --- Negative cases: encoding and framing ------------------------------------------------------


def _noncanonical_signature(proof: str) -> str:
    last = B64URL_ALPHABET.index(proof[-1])
    return proof[:-1] + B64URL_ALPHABET[last ^ 1]


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda p: "", id="empty-string"),
        pytest.param(lambda p: p.rsplit(".", 1)[0], id="two-segments"),
        pytest.param(lambda p: p + "." + p.split(".")[2], id="four-segments"),
        pytest.param(lambda p: p + "," + p, id="two-proofs-comma"),
        pytest.param(lambda p: p + " " + p, id="two-proofs-space"),
        pytest.param(lambda p: " " + p, id="leading-space"),
        pytest.param(lambda p: p + "\r\n", id="trailing-crlf"),
        pytest.param(lambda p: p + "=", id="padding"),
        pytest.param(lambda p: "+" + p[1:], id="std-base64-plus"),
        pytest.param(lambda p: p[:-1] + "\u00e9", id="non-ascii"),
        pytest.param(_noncanonical_signature, id="noncanonical-signature"),
        pytest.param(lambda p: p + "A" * (MAX_PROOF_BYTES + 1 - len(p)), id="over-size-cap"),
    ],
)
def test_framing_negative(mangle: Callable[[str], str]) -> None:
    assert_refused(mangle(make_proof()), "malformed")


@pytest.mark.parametrize(
    "proof",
    [
        pytest.param(None, id="None"),
        pytest.param(7, id="int"),
        pytest.param(b"a.b.c", id="bytes"),
        pytest.param(["a.b.c"], id="list"),
    ],
)
def test_non_string_proof_is_refused(proof: object) -> None:
    assert_refused(proof, "malformed")


def _proof_of_length(length: int) -> str:
    header, claims = proof_parts()
    for header_pad in range(3):
        for claims_pad in range(length):
            proof = build_jws(
                json_bytes(header)[:-1] + b" " * header_pad + b"}",
                json_bytes(claims)[:-1] + b" " * claims_pad + b"}",
                AGENT_ES,
            )
            if len(proof) == length:
                return proof
            if len(proof) > length:
                break
    raise AssertionError("no padding reaches that length")


def test_size_cap_boundary() -> None:
    assert verify(_proof_of_length(MAX_PROOF_BYTES)).jti == JTI
    assert_refused(_proof_of_length(MAX_PROOF_BYTES + 1), "malformed")


# --- Negative cases: claims --------------------------------------------------------------------

CLAIM_CASES = [
    pytest.param(drop("jti"), "bad_jti", id="jti-missing"),
    pytest.param(put("jti", ""), "bad_jti", id="jti-empty"),
    pytest.param(put("jti", "j" * 129), "bad_jti", id="jti-129-chars"),
    pytest.param(put("jti", 1234567890), "bad_jti", id="jti-number"),
    pytest.param(put("jti", None), "bad_jti", id="jti-null"),
    pytest.param(put("jti", ["a"]), "bad_jti", id="jti-array"),
    pytest.param(put("jti", "has space"), "bad_jti", id="jti-with-space"),
    pytest.param(put("jti", "caf\u00e9"), "bad_jti", id="jti-non-ascii"),
    pytest.param(put("jti", JTI + "\n"), "bad_jti", id="jti-trailing-newline"),
    pytest.param(drop("htm"), "htm_mismatch", id="htm-missing"),
    pytest.param(put("htm", "post"), "htm_mismatch", id="htm-lowercase"),
    pytest.param(put("htm", "GET"), "htm_mismatch", id="htm-other-method"),
    pytest.param(put("htm", "POST "), "htm_mismatch", id="htm-trailing-space"),
    pytest.param(put("htm", ["POST"]), "htm_mismatch", id="htm-array"),
    pytest.param(drop("htu"), "htu_mismatch", id="htu-missing"),
    pytest.param(put("htu", 443), "htu_mismatch", id="htu-number"),
    pytest.param(put("htu", None), "htu_mismatch", id="htu-null"),
    pytest.param(drop("iat"), "bad_iat", id="iat-missing"),
    pytest.param(put("iat", str(NOW)), "bad_iat", id="iat-string"),
    pytest.param(put("iat", True), "bad_iat", id="iat-true"),
    pytest.param(put("iat", None), "bad_iat", id="iat-null"),
    pytest.param(put("iat", NOW - MAX_AGE - 1), "iat_too_old", id="iat-too-old"),
    pytest.param(put("iat", NOW + FUTURE_SKEW + 1), "iat_in_future", id="iat-in-future"),
    pytest.param(drop("ath"), "ath_mismatch", id="ath-missing"),
    pytest.param(put("ath", access_token_hash(OTHER_TOKEN)), "ath_mismatch", id="ath-other"),
    pytest.param(
        put("ath", access_token_hash(ACCESS_TOKEN) + "="), "ath_mismatch", id="ath-padded"
    ),
    pytest.param(
        put("ath", b64url_encode(hashlib.sha256(ACCESS_TOKEN.encode()).digest()[:31])),
        "ath_mismatch",
        id="ath-truncated",
    ),
    pytest.param(put("ath", 0), "ath_mismatch", id="ath-number"),
    pytest.param(put("ath", "\u00e9" * 43), "ath_mismatch", id="ath-non-ascii"),
    pytest.param(put("ath", access_token_hash(ACCESS_TOKEN) + "A"), "ath_mismatch", id="ath-44"),
]


@pytest.mark.parametrize(("claims_edit", "reason"), CLAIM_CASES)
def test_claims_negative(claims_edit: Edit, reason: str) -> None:
    assert_refused(make_proof(claims_edit=claims_edit), reason)


@pytest.mark.parametrize(
    "claims",
    [
        pytest.param(b"[]", id="array"),
        pytest.param(b"", id="empty"),
        pytest.param(b'{"iat":Infinity}', id="Infinity"),
        pytest.param(b"{}x", id="trailing-data"),
    ],
)
def test_undecodable_claims_are_refused(claims: bytes) -> None:
    header, _ = proof_parts()
    assert_refused(build_jws(header, claims, AGENT_ES), "malformed")


@pytest.mark.parametrize(
    "member",
    [
        pytest.param('"ath":"\\ud800"', id="ath"),
        pytest.param('"htu":"https://api.example/\\udfff"', id="htu"),
        pytest.param('"nonce":"\\ud83d"', id="unread-claim"),
        pytest.param('"\\ud800":1', id="member-name"),
    ],
)
def test_signed_claims_with_a_lone_surrogate_are_refused(member: str) -> None:
    # Validly signed by the token's key: such a string once reached .encode() in the ath
    # check and raised UnicodeEncodeError, a 500 instead of a recorded deny.
    header, claims = proof_parts()
    if member.startswith('"ath"'):
        del claims["ath"]
    if member.startswith('"htu"'):
        del claims["htu"]
    raw = json_bytes(claims)[:-1] + b"," + member.encode("ascii") + b"}"
    assert_refused(build_jws(header, raw, AGENT_ES), "malformed")


def test_stolen_token_with_another_key_is_refused() -> None:
    # The thief has the token (bound to AGENT_ES) and makes a perfect proof with their key.
    proof = create_dpop_proof(OTHER_ES, htm=HTM, htu=HTU, now=NOW, access_token=ACCESS_TOKEN)
    assert_refused(proof, "jkt_mismatch", jkt=AGENT_ES.thumbprint)


def test_ed25519_proof_for_an_es256_bound_token_is_refused() -> None:
    assert_refused(make_proof(key=AGENT_ED), "jkt_mismatch", jkt=AGENT_ES.thumbprint)


# --- Time: iat at and just beyond each boundary ------------------------------------------------


@pytest.mark.parametrize(
    "now",
    [
        pytest.param(NOW, id="now"),
        pytest.param(NOW + MAX_AGE, id="exactly-max-age"),
        pytest.param(NOW - FUTURE_SKEW, id="exactly-future-skew"),
    ],
)
def test_iat_at_the_boundary_is_accepted(now: float) -> None:
    assert verify(make_proof(), now=now).jti == JTI


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        pytest.param(NOW + MAX_AGE + 0.001, "iat_too_old", id="max-age-plus-1ms"),
        pytest.param(NOW + MAX_AGE + 1, "iat_too_old", id="max-age-plus-1s"),
        pytest.param(NOW - FUTURE_SKEW - 0.001, "iat_in_future", id="future-skew-plus-1ms"),
        pytest.param(NOW - FUTURE_SKEW - 1, "iat_in_future", id="future-skew-plus-1s"),
    ],
)
def test_iat_beyond_the_boundary_is_refused(now: float, reason: str) -> None:
    assert_refused(make_proof(), reason, now=now)


# --- htu: normalization equivalences and real differences --------------------------------------


@pytest.mark.parametrize(
    ("claim_htu", "request_htu"),
    [
        pytest.param("https://api.example:443/payments/send", HTU, id="https-default-port"),
        pytest.param("http://api.example:80/a", "http://api.example/a", id="http-default-port"),
        pytest.param(HTU, "https://api.example:443/payments/send", id="default-port-on-server"),
        pytest.param("HTTPS://API.Example/payments/send", HTU, id="scheme-and-host-case"),
        pytest.param("https://api.example/payments/./x/../send", HTU, id="dot-segments"),
        pytest.param("https://api.example/%70ayments/sen%64", HTU, id="pct-unreserved-letters"),
        pytest.param("https://api.example/%7euser", "https://api.example/~user", id="pct-tilde"),
        pytest.param(
            "https://api.example/a%2fb", "https://api.example/a%2Fb", id="pct-hex-case-reserved"
        ),
        pytest.param(HTU + "?amount=5", HTU, id="query-in-proof"),
        pytest.param(HTU, HTU + "?amount=5", id="query-in-request"),
        pytest.param(HTU + "#frag", HTU, id="fragment"),
        pytest.param("https://api.example", "https://api.example/", id="empty-path"),
        pytest.param("https://[::1]:443/a", "https://[::1]/a", id="ipv6-default-port"),
    ],
)
def test_htu_equivalences_are_accepted(claim_htu: str, request_htu: str) -> None:
    proof = make_proof(claims_edit=put("htu", claim_htu))
    assert verify(proof, htu=request_htu).htu == claim_htu
    assert normalize_htu(claim_htu) == normalize_htu(request_htu)


@pytest.mark.parametrize(
    "claim_htu",
    [
        pytest.param("https://evil.example/payments/send", id="other-host"),
        pytest.param("https://api.example.evil.com/payments/send", id="host-suffix"),
        pytest.param("https://sub.api.example/payments/send", id="subdomain"),
        pytest.param("http://api.example/payments/send", id="scheme-http"),
        pytest.param("ftp://api.example/payments/send", id="scheme-ftp"),
        pytest.param("https://api.example:8443/payments/send", id="other-port"),
        pytest.param("https://api.example:80/payments/send", id="http-port-on-https"),
        pytest.param("https://api.example:99999/payments/send", id="invalid-port"),
        pytest.param("https://api.example/payments/receive", id="other-path"),
        pytest.param("https://api.example/payments", id="path-prefix"),
        pytest.param("https://api.example/payments/send/", id="trailing-slash"),
        pytest.param("https://api.example/payments/send/x", id="longer-path"),
        pytest.param("https://api.example/Payments/send", id="path-case"),
        pytest.param("https://api.example/payments%2Fsend", id="encoded-slash"),
        pytest.param("https://api.example/payments/send/../receive", id="dot-segments-elsewhere"),
        pytest.param("https://user@api.example/payments/send", id="userinfo"),
        pytest.param("/payments/send", id="relative"),
        pytest.param("api.example/payments/send", id="no-scheme"),
        pytest.param("", id="empty"),
    ],
)
def test_htu_mismatch_is_refused(claim_htu: str) -> None:
    assert_refused(make_proof(claims_edit=put("htu", claim_htu)), "htu_mismatch")


def test_invalid_request_htu_fails_closed() -> None:
    assert_refused(make_proof(), "htu_mismatch", htu="not a url")


def test_normalize_htu_refuses_non_http_urls() -> None:
    for url in ("ftp://api.example/", "https://u:p@api.example/", "/relative", "https://"):
        with pytest.raises(InvalidRequest):
            normalize_htu(url)


# --- Server nonces -----------------------------------------------------------------------------


def nonce_verifier(*secrets: bytes) -> DPoPVerifier:
    return DPoPVerifier(nonces=DPoPNonces(list(secrets or (SECRET_A,))))


def proof_with_nonce(nonce: object) -> str:
    return make_proof(claims_edit=put("nonce", nonce))


def assert_nonce_required(proof: str, verifier: DPoPVerifier, *, now: float = NOW) -> str:
    with pytest.raises(UseDPoPNonce) as excinfo:
        verify(proof, verifier=verifier, now=now)
    assert excinfo.value.reason == "nonce_required"
    assert excinfo.value.error == "use_dpop_nonce"
    assert excinfo.value.status_hint == 401
    assert isinstance(excinfo.value, InvalidDPoPProof)
    assert isinstance(excinfo.value.nonce, str)
    return excinfo.value.nonce


def test_missing_nonce_is_answered_with_one_that_works() -> None:
    verifier = nonce_verifier()
    nonce = assert_nonce_required(make_proof(), verifier)
    assert verify(proof_with_nonce(nonce), verifier=verifier).jti == JTI


def test_nonce_flow_with_created_proofs() -> None:
    verifier = nonce_verifier()
    first = create_dpop_proof(AGENT_ES, htm=HTM, htu=HTU, now=NOW, access_token=ACCESS_TOKEN)
    nonce = assert_nonce_required(first, verifier)
    second = create_dpop_proof(
        AGENT_ES, htm=HTM, htu=HTU, now=NOW + 1, access_token=ACCESS_TOKEN, nonce=nonce
    )
    assert verify(second, verifier=verifier, now=NOW + 1).jkt == AGENT_ES.thumbprint


def test_a_bad_proof_is_refused_for_its_fault_not_asked_for_a_nonce() -> None:
    # A nonce challenge invites a retry; a proof with another fault must not get one.
    with pytest.raises(InvalidDPoPProof) as excinfo:
        verify(make_proof(claims_edit=put("htm", "GET")), verifier=nonce_verifier())
    assert type(excinfo.value) is InvalidDPoPProof
    assert excinfo.value.reason == "htm_mismatch"


@pytest.mark.parametrize(
    "issued_at",
    [
        pytest.param(NOW - 300, id="exactly-lifetime-old"),
        pytest.param(NOW + 10, id="exactly-skew-ahead"),
        pytest.param(NOW, id="fresh"),
    ],
)
def test_nonce_within_its_lifetime_is_accepted(issued_at: int) -> None:
    nonce = DPoPNonces([SECRET_A]).issue(issued_at)
    assert verify(proof_with_nonce(nonce), verifier=nonce_verifier()).jti == JTI


def _forge_stamp(nonce: str) -> str:
    raw = b64url_decode(nonce)
    stamp = (int.from_bytes(raw[:8], "big") + 1).to_bytes(8, "big")
    return b64url_encode(stamp + raw[8:])


def _flip_mac(nonce: str) -> str:
    raw = b64url_decode(nonce)
    return b64url_encode(raw[:-1] + bytes([raw[-1] ^ 1]))


GOOD_NONCE = DPoPNonces([SECRET_A]).issue(NOW)

NONCE_CASES = [
    pytest.param(DPoPNonces([SECRET_A]).issue(NOW - 301), id="expired"),
    pytest.param(DPoPNonces([SECRET_A]).issue(NOW - 86_400), id="long-expired"),
    pytest.param(DPoPNonces([SECRET_A]).issue(NOW + 11), id="from-the-future"),
    pytest.param(DPoPNonces([SECRET_B]).issue(NOW), id="other-secret"),
    pytest.param(_forge_stamp(GOOD_NONCE), id="forged-stamp"),
    pytest.param(_flip_mac(GOOD_NONCE), id="forged-mac"),
    pytest.param(b64url_encode(NOW.to_bytes(8, "big") + b"\x00" * 16), id="forged-zero-mac"),
    pytest.param(GOOD_NONCE[:-1], id="truncated"),
    pytest.param(GOOD_NONCE + "A", id="extended"),
    pytest.param(GOOD_NONCE + "==", id="padded"),
    pytest.param(GOOD_NONCE[:-1] + "\u00e9", id="non-ascii"),
    pytest.param(GOOD_NONCE[:-1] + "+", id="std-alphabet"),
    pytest.param("", id="empty"),
    pytest.param(12345, id="number"),
    pytest.param(None, id="null"),
    pytest.param([GOOD_NONCE], id="array"),
]


@pytest.mark.parametrize("nonce", NONCE_CASES)
def test_bad_nonce_is_refused(nonce: object) -> None:
    assert_nonce_required(proof_with_nonce(nonce), nonce_verifier())


def test_good_nonce_control() -> None:
    assert verify(proof_with_nonce(GOOD_NONCE), verifier=nonce_verifier()).jti == JTI


def test_rotated_secrets_old_still_verifies_new_issues() -> None:
    old, rotated = DPoPNonces([SECRET_A]), DPoPNonces([SECRET_B, SECRET_A])
    old_nonce = old.issue(NOW)
    assert rotated.valid(old_nonce, NOW)
    new_nonce = rotated.issue(NOW)
    assert DPoPNonces([SECRET_B]).valid(new_nonce, NOW)
    assert not old.valid(new_nonce, NOW)
    verifier = nonce_verifier(SECRET_B, SECRET_A)
    assert verify(proof_with_nonce(old_nonce), verifier=verifier).jti == JTI
    challenge = assert_nonce_required(make_proof(), verifier)
    assert DPoPNonces([SECRET_B]).valid(challenge, NOW)
    # Once A is retired, its nonces stop working.
    assert_nonce_required(proof_with_nonce(old_nonce), nonce_verifier(SECRET_B))


def test_nonce_lifetime_is_configurable() -> None:
    short = DPoPVerifier(nonces=DPoPNonces([SECRET_A], lifetime=5, skew=0))
    nonce = DPoPNonces([SECRET_A]).issue(NOW - 5)
    assert verify(proof_with_nonce(nonce), verifier=short).jti == JTI
    assert_nonce_required(proof_with_nonce(DPoPNonces([SECRET_A]).issue(NOW - 6)), short)
    assert_nonce_required(proof_with_nonce(DPoPNonces([SECRET_A]).issue(NOW + 1)), short)


@pytest.mark.parametrize(
    ("age", "renewed"),
    [
        pytest.param(0, False, id="fresh"),
        pytest.param(149, False, id="just-under-half"),
        pytest.param(150, True, id="half-its-lifetime"),
        pytest.param(300, True, id="last-valid-second"),
        pytest.param(-10, False, id="from-the-skew-ahead"),
    ],
)
def test_a_nonce_past_half_its_lifetime_comes_back_with_its_successor(
    age: int, renewed: bool
) -> None:
    nonce = DPoPNonces([SECRET_A]).issue(NOW - age)
    result = verify(proof_with_nonce(nonce), verifier=nonce_verifier())
    if not renewed:
        assert result.next_nonce is None
        return
    assert result.next_nonce is not None and result.next_nonce != nonce
    # The successor is current from now, for a whole lifetime, and is not itself due.
    later = DPoPNonces([SECRET_A])
    assert later.valid(result.next_nonce, NOW + 300)
    assert not later.valid(result.next_nonce, NOW + 301)
    assert later.renewal(result.next_nonce, NOW) is None


def test_renewal_age_is_configurable_and_bounded() -> None:
    eager = DPoPVerifier(nonces=DPoPNonces([SECRET_A], renew_after=0))
    nonce = DPoPNonces([SECRET_A]).issue(NOW)
    assert verify(proof_with_nonce(nonce), verifier=eager).next_nonce is not None
    never = DPoPVerifier(nonces=DPoPNonces([SECRET_A], renew_after=300))
    old = DPoPNonces([SECRET_A]).issue(NOW - 299)
    assert verify(proof_with_nonce(old), verifier=never).next_nonce is None
    for bad in (-1, 301):
        with pytest.raises(ValueError, match="renew_after"):
            DPoPNonces([SECRET_A], renew_after=bad)


def test_without_nonces_no_successor_is_offered() -> None:
    assert verify(make_proof()).next_nonce is None


@pytest.mark.parametrize(
    "secrets",
    [
        pytest.param([], id="none"),
        pytest.param([b"short"], id="short"),
        pytest.param([SECRET_A, b"x" * 31], id="one-short"),
    ],
)
def test_nonce_secrets_must_be_long(secrets: list[bytes]) -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        DPoPNonces(secrets)


# --- Property: any one-character change is refused ---------------------------------------------

VALID_ES_PROOF = make_proof()
VALID_ED_PROOF = make_proof(key=AGENT_ED)


@settings(max_examples=300, deadline=None)
@given(
    which=st.sampled_from([(VALID_ES_PROOF, AGENT_ES), (VALID_ED_PROOF, AGENT_ED)]),
    position=st.floats(min_value=0, max_value=1, exclude_max=True),
    replacement=st.sampled_from(B64URL_ALPHABET),
)
def test_any_single_character_change_is_refused(
    which: tuple[str, PrivateKey], position: float, replacement: str
) -> None:
    proof, key = which
    assert verify(proof, jkt=key.thumbprint).jti == JTI
    index = int(position * len(proof))
    if proof[index] == replacement:
        replacement = B64URL_ALPHABET[(B64URL_ALPHABET.index(replacement) + 1) % 64]
    mutated = proof[:index] + replacement + proof[index + 1 :]
    with pytest.raises(InvalidDPoPProof):
        verify(mutated, jkt=key.thumbprint)
