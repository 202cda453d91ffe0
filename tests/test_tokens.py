"""Access tokens (AATs): RFC 8725 rules, claims, time, the verifier cache and key sets.

Every malformed token below is built by hand with ``build_jws``: the same helper, fed the
unchanged header and claims, makes the positive control, so each negative case differs from
an accepted token in exactly one respect. Each negative asserts both the exception type and
its ``reason`` code.
"""

from __future__ import annotations

import gc
import hashlib
import hmac
import json
import string
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agentauth.protocol import (
    ACCESS_TOKEN_TYP,
    CHECKPOINT_TYP,
    DPOP_TYP,
    AccessToken,
    AccessTokenVerifier,
    Capability,
    Checkpoint,
    Envelope,
    Grant,
    InvalidRequest,
    InvalidToken,
    KeySet,
    PrivateKey,
    PublicKey,
    TokenPolicy,
    access_token_hash,
    access_token_parts,
    b64url_decode,
    b64url_encode,
    create_dpop_proof,
    mint_access_token,
    sign_checkpoint,
)

NOW = 1_760_000_000
LIFETIME = 600
LEEWAY = TokenPolicy().leeway
MAX_LIFETIME = TokenPolicy().max_lifetime
ISSUER = "https://registry.example"
AUDIENCE = "https://api.example"
JTI = "token-jti-0123456789abcdef"

REGISTRY_ES = PrivateKey.generate("ES256", kid="registry-es256")
REGISTRY_ED = PrivateKey.generate("Ed25519", kid="registry-ed25519")
# Same kids, other keys: what an attacker who knows the JWKS but not the keys would sign with.
IMPOSTOR_ES = PrivateKey.generate("ES256", kid="registry-es256")
IMPOSTOR_ED = PrivateKey.generate("Ed25519", kid="registry-ed25519")
AGENT = PrivateKey.generate("ES256")
KEYS = KeySet(
    [PublicKey.from_jwk(REGISTRY_ES.public_jwk()), PublicKey.from_jwk(REGISTRY_ED.public_jwk())]
)
RECEIPT_HASH = b64url_encode(hashlib.sha256(b"approval receipt").digest())
GRANT = Grant(
    grant_id="grant-1",
    agent_id="agent-1",
    principal_id="human-1",
    provider_id="provider-1",
    audience=AUDIENCE,
    capabilities=(
        Capability.read("calendar/*"),
        Capability.transact("payments", max_amount="50", currency="USD"),
    ),
    envelope=Envelope(),
    created_at=NOW - 100,
)
B64URL_ALPHABET = string.ascii_letters + string.digits + "-_"

Doc = dict[str, Any]
Edit = Callable[[Doc], None]


# --- Building tokens by hand -------------------------------------------------------------------


def json_bytes(document: Doc) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def _same(value: Any) -> Any:
    return value


def build_jws(
    header: Doc | bytes,
    claims: Doc | bytes,
    signer: PrivateKey,
    *,
    header_segment: Callable[[str], str] = _same,
    claims_segment: Callable[[str], str] = _same,
    signature: Callable[[bytes], bytes] = _same,
) -> str:
    """A compact JWS over exactly the bytes given; the segment hooks run before signing."""
    header_bytes = header if isinstance(header, bytes) else json_bytes(header)
    claims_bytes = claims if isinstance(claims, bytes) else json_bytes(claims)
    data = header_segment(b64url_encode(header_bytes)) + "."
    data += claims_segment(b64url_encode(claims_bytes))
    return data + "." + b64url_encode(signature(signer.sign(data.encode("ascii"))))


def token_parts(signer: PrivateKey = REGISTRY_ES, *, lifetime: int = LIFETIME) -> tuple[Doc, Doc]:
    return access_token_parts(
        kid=signer.kid,
        alg=signer.alg,
        issuer=ISSUER,
        grant=GRANT,
        jkt=AGENT.thumbprint,
        receipt_hash=RECEIPT_HASH,
        now=NOW,
        lifetime=lifetime,
        jti=JTI,
    )


def make_token(
    header_edit: Edit | None = None,
    claims_edit: Edit | None = None,
    *,
    signer: PrivateKey = REGISTRY_ES,
    parts_from: PrivateKey | None = None,
    **hooks: Any,
) -> str:
    """A valid token, or one differing from it by the given edits."""
    header, claims = token_parts(parts_from or signer)
    if header_edit is not None:
        header_edit(header)
    if claims_edit is not None:
        claims_edit(claims)
    return build_jws(header, claims, signer, **hooks)


def put(key: str, value: Any) -> Edit:
    def edit(document: Doc) -> None:
        document[key] = value

    return edit


def drop(key: str) -> Edit:
    def edit(document: Doc) -> None:
        del document[key]

    return edit


def with_duplicate(document: Doc, key: str) -> bytes:
    """The JSON of ``document`` with member ``key`` appearing twice (same value)."""
    return json_bytes(document)[:-1] + b"," + json_bytes({key: document[key]})[1:]


def noncanonical(segment: str) -> str:
    """The same bytes with a spare bit of the last character set (needs len % 3 != 0)."""
    assert len(b64url_decode(segment)) % 3 != 0
    last = B64URL_ALPHABET.index(segment[-1])
    return segment[:-1] + B64URL_ALPHABET[last ^ 1]


def verifier(**kwargs: Any) -> AccessTokenVerifier:
    return AccessTokenVerifier(keys=KEYS, issuer=ISSUER, **kwargs)


def verify(token: object, *, now: float = NOW, audience: str = AUDIENCE) -> AccessToken:
    return verifier().verify(token, audience=audience, now=now)


def assert_refused(
    token: object, reason: str, *, now: float = NOW, audience: str = AUDIENCE
) -> None:
    with pytest.raises(InvalidToken) as excinfo:
        verify(token, now=now, audience=audience)
    assert excinfo.value.reason == reason, repr(excinfo.value)
    assert excinfo.value.error == "invalid_token"


# --- Positive controls -------------------------------------------------------------------------


@pytest.mark.parametrize("signer", [REGISTRY_ES, REGISTRY_ED], ids=["ES256", "Ed25519"])
def test_hand_built_control_is_accepted(signer: PrivateKey) -> None:
    token = make_token(signer=signer)
    verified = verify(token)
    assert verified.kid == signer.kid
    assert verified.jkt == AGENT.thumbprint
    assert verified.ath == access_token_hash(token)
    assert verified.claims.jti == JTI
    assert verified.claims.grant_hash == GRANT.digest_b64()


@pytest.mark.parametrize("signer", [REGISTRY_ES, REGISTRY_ED], ids=["ES256", "Ed25519"])
def test_minted_token_is_accepted(signer: PrivateKey) -> None:
    token = mint_access_token(
        signer=signer,
        issuer=ISSUER,
        grant=GRANT,
        jkt=AGENT.thumbprint,
        receipt_hash=RECEIPT_HASH,
        now=NOW,
        lifetime=LIFETIME,
    )
    verified = verify(token)
    assert verified.claims.sub == GRANT.agent_id
    assert verified.claims.aud == AUDIENCE
    assert verified.claims.capabilities == GRANT.capabilities
    assert verified.claims.exp == NOW + LIFETIME


def test_legacy_eddsa_name_is_accepted_with_an_ed25519_kid() -> None:
    assert verify(make_token(put("alg", "EdDSA"), signer=REGISTRY_ED)).kid == REGISTRY_ED.kid


def test_header_member_order_does_not_matter() -> None:
    header, claims = token_parts()
    reordered = dict(reversed(list(header.items())))
    assert verify(build_jws(reordered, claims, REGISTRY_ES)).kid == REGISTRY_ES.kid


def test_lifetime_of_exactly_the_maximum_is_accepted() -> None:
    token = make_token(claims_edit=put("exp", NOW + MAX_LIFETIME))
    assert verify(token).claims.exp == NOW + MAX_LIFETIME


def test_nbf_after_iat_is_accepted() -> None:
    assert verify(make_token(claims_edit=put("nbf", NOW + 5)), now=NOW + 5).claims.nbf == NOW + 5


# --- Negative cases: header (RFC 8725) ---------------------------------------------------------

HEADER_CASES = [
    pytest.param(drop("typ"), "wrong_typ", id="typ-missing"),
    pytest.param(put("typ", "JWT"), "wrong_typ", id="typ-JWT"),
    pytest.param(put("typ", "at+jwt"), "wrong_typ", id="typ-rfc9068-at+jwt"),
    pytest.param(put("typ", "AAT+JWT"), "wrong_typ", id="typ-uppercase"),
    pytest.param(put("typ", DPOP_TYP), "wrong_typ", id="typ-dpop"),
    pytest.param(put("typ", CHECKPOINT_TYP), "wrong_typ", id="typ-checkpoint"),
    pytest.param(put("typ", ["aat+jwt"]), "wrong_typ", id="typ-array"),
    pytest.param(put("alg", "none"), "alg_not_allowed", id="alg-none"),
    pytest.param(put("alg", "None"), "alg_not_allowed", id="alg-None"),
    pytest.param(put("alg", "HS256"), "alg_not_allowed", id="alg-HS256"),
    pytest.param(put("alg", "RS256"), "alg_not_allowed", id="alg-RS256"),
    pytest.param(put("alg", "PS256"), "alg_not_allowed", id="alg-PS256"),
    pytest.param(put("alg", "es256"), "alg_not_allowed", id="alg-lowercase"),
    pytest.param(put("alg", ["ES256"]), "alg_not_allowed", id="alg-array"),
    pytest.param(drop("alg"), "alg_not_allowed", id="alg-missing"),
    pytest.param(put("jwk", AGENT.public_jwk()), "unexpected_header", id="header-jwk"),
    pytest.param(put("jku", "https://evil.example/jwks"), "unexpected_header", id="header-jku"),
    pytest.param(put("x5u", "https://evil.example/cert"), "unexpected_header", id="header-x5u"),
    pytest.param(put("x5c", ["MIIB"]), "unexpected_header", id="header-x5c"),
    pytest.param(put("crit", ["exp"]), "unexpected_header", id="header-crit"),
    pytest.param(put("cty", "JWT"), "unexpected_header", id="header-cty"),
    pytest.param(put("b64", False), "unexpected_header", id="header-b64"),
    pytest.param(drop("kid"), "missing_kid", id="kid-missing"),
    pytest.param(put("kid", ""), "missing_kid", id="kid-empty"),
    pytest.param(put("kid", 7), "missing_kid", id="kid-number"),
    pytest.param(put("kid", "registry-retired"), "unknown_kid", id="kid-unknown"),
    pytest.param(put("kid", "REGISTRY-ES256"), "unknown_kid", id="kid-other-case"),
    pytest.param(put("alg", "Ed25519"), "alg_mismatch", id="alg-Ed25519-under-ES256-kid"),
    pytest.param(put("alg", "EdDSA"), "alg_mismatch", id="alg-EdDSA-under-ES256-kid"),
]


@pytest.mark.parametrize(("header_edit", "reason"), HEADER_CASES)
def test_header_negative(header_edit: Edit, reason: str) -> None:
    assert_refused(make_token(header_edit), reason)


@pytest.mark.parametrize(
    ("signer", "kid"),
    [
        pytest.param(REGISTRY_ED, REGISTRY_ES.kid, id="Ed25519-signed-under-ES256-kid"),
        pytest.param(REGISTRY_ES, REGISTRY_ED.kid, id="ES256-signed-under-Ed25519-kid"),
    ],
)
def test_algorithm_is_pinned_by_the_kid(signer: PrivateKey, kid: str) -> None:
    # A genuine registry signature, its header honestly naming its algorithm, but under the
    # other key's kid: the kid's pinned algorithm wins.
    assert_refused(make_token(put("kid", kid), signer=signer), "alg_mismatch")


def test_hmac_keyed_with_the_public_key_is_refused() -> None:
    # The classic key-confusion attack: HS256 keyed with the verifier's public key bytes.
    header, claims = token_parts()
    header["alg"] = "HS256"
    data = b64url_encode(json_bytes(header)) + "." + b64url_encode(json_bytes(claims))
    secret = json_bytes(REGISTRY_ES.public_jwk())
    mac = hmac.new(secret, data.encode("ascii"), hashlib.sha256).digest()
    assert_refused(data + "." + b64url_encode(mac), "alg_not_allowed")


@pytest.mark.parametrize("member", ["alg", "kid", "typ"])
def test_duplicate_header_member_is_refused(member: str) -> None:
    header, claims = token_parts()
    assert_refused(build_jws(with_duplicate(header, member), claims, REGISTRY_ES), "malformed")


def test_duplicate_header_member_with_other_value_is_refused() -> None:
    # Last-wins parsers would read alg "none" here; first-wins parsers ES256.
    header, claims = token_parts()
    raw = json_bytes(header)[:-1] + b',"alg":"none"}'
    assert_refused(build_jws(raw, claims, REGISTRY_ES), "malformed")


def test_checkpoint_never_passes_as_a_token() -> None:
    checkpoint = Checkpoint(
        chain="shard-0", size=1, root=b64url_encode(hashlib.sha256(b"x").digest()), time=NOW
    )
    assert_refused(sign_checkpoint(checkpoint, REGISTRY_ES), "wrong_typ")


def test_dpop_proof_never_passes_as_a_token() -> None:
    proof = create_dpop_proof(REGISTRY_ES, htm="GET", htu=AUDIENCE + "/x", now=NOW)
    assert_refused(proof, "wrong_typ")


def test_token_claims_under_a_dpop_header_are_refused() -> None:
    # Token claims, signed by the registry key, but typed and shaped as a DPoP proof.
    _, claims = token_parts()
    header = {"typ": DPOP_TYP, "alg": "ES256", "jwk": REGISTRY_ES.public_jwk()}
    assert_refused(build_jws(header, claims, REGISTRY_ES), "wrong_typ")


# --- Negative cases: signature ----------------------------------------------------------------


def _flip_bit(sig: bytes) -> bytes:
    return sig[:10] + bytes([sig[10] ^ 0x01]) + sig[11:]


SIGNATURE_CASES = [
    pytest.param(REGISTRY_ES, _flip_bit, id="es256-bit-flipped"),
    pytest.param(REGISTRY_ED, _flip_bit, id="ed25519-bit-flipped"),
    pytest.param(REGISTRY_ES, lambda s: s[:-1], id="es256-truncated-63-bytes"),
    pytest.param(REGISTRY_ES, lambda s: s + b"\x00", id="es256-65-bytes"),
    pytest.param(REGISTRY_ES, lambda s: b"", id="empty-signature"),
    pytest.param(REGISTRY_ES, lambda s: b"\x00" * 64, id="es256-r-s-zero"),
    pytest.param(REGISTRY_ES, lambda s: s[32:] + s[:32], id="es256-r-s-swapped"),
    pytest.param(REGISTRY_ED, lambda s: s[:-1], id="ed25519-truncated"),
]


@pytest.mark.parametrize(("signer", "mangle"), SIGNATURE_CASES)
def test_signature_negative(signer: PrivateKey, mangle: Callable[[bytes], bytes]) -> None:
    assert_refused(make_token(signer=signer, signature=mangle), "bad_signature")


@pytest.mark.parametrize(
    ("impostor", "real"),
    [
        pytest.param(IMPOSTOR_ES, REGISTRY_ES, id="es256-other-key-same-kid"),
        pytest.param(IMPOSTOR_ED, REGISTRY_ED, id="ed25519-other-key-same-kid"),
    ],
)
def test_signature_by_another_key_is_refused(impostor: PrivateKey, real: PrivateKey) -> None:
    assert_refused(make_token(signer=impostor, parts_from=real), "bad_signature")


def test_signature_over_other_claims_is_refused() -> None:
    # A valid signature from one token spliced onto the claims of another.
    good = make_token()
    other = make_token(claims_edit=put("exp", NOW + LIFETIME - 1))
    header, _, signature = good.split(".")
    assert_refused(f"{header}.{other.split('.')[1]}.{signature}", "bad_signature")


# --- Negative cases: encoding and framing ------------------------------------------------------

RAW_CASES = [
    pytest.param(lambda t: "", id="empty-string"),
    pytest.param(lambda t: t.rsplit(".", 1)[0], id="two-segments"),
    pytest.param(lambda t: t.split(".", 1)[0], id="header-only"),
    pytest.param(lambda t: t + ".", id="trailing-dot"),
    pytest.param(lambda t: t + "." + t.split(".")[2], id="four-segments"),
    pytest.param(lambda t: "." + t, id="leading-dot"),
    pytest.param(lambda t: t + "," + t, id="two-tokens-comma"),
    pytest.param(lambda t: " " + t, id="leading-space"),
    pytest.param(lambda t: t + " ", id="trailing-space"),
    pytest.param(lambda t: t + "\n", id="trailing-newline"),
    pytest.param(lambda t: "Bearer " + t, id="scheme-prefix"),
    pytest.param(lambda t: t + "==", id="signature-padding"),
    pytest.param(lambda t: "+" + t[1:], id="std-base64-plus"),
    pytest.param(lambda t: t[:-1] + "/", id="std-base64-slash"),
    pytest.param(lambda t: t[:-1] + "\u00e9", id="non-ascii-char"),
    pytest.param(lambda t: t[:-1] + "\x00", id="nul-char"),
    pytest.param(lambda t: t[:-1], id="signature-one-char-short"),
    pytest.param(
        lambda t: t.rsplit(".", 1)[0] + "." + noncanonical(t.rsplit(".", 1)[1]),
        id="signature-noncanonical-base64",
    ),
]


@pytest.mark.parametrize("mangle", RAW_CASES)
def test_framing_negative(mangle: Callable[[str], str]) -> None:
    assert_refused(mangle(make_token()), "malformed")


def _pad_to_noncanonical_length(document: Doc) -> bytes:
    raw = json_bytes(document)
    while len(raw) % 3 != 1:
        raw = raw[:-1] + b" }"  # JSON whitespace, so only the encoding is in question
    return raw


# Each of these is signed over the altered segment, so the signature itself is valid: only
# the encoding of the header or claims is at fault.
SIGNED_SEGMENT_CASES = [
    pytest.param("header", noncanonical, id="header-noncanonical-base64"),
    pytest.param("claims", noncanonical, id="claims-noncanonical-base64"),
    pytest.param("header", lambda s: s + "==", id="header-padding"),
    pytest.param("claims", lambda s: s + "==", id="claims-padding"),
    pytest.param("header", lambda s: s[:8] + " " + s[8:], id="header-inner-space"),
    pytest.param("claims", lambda s: s[:8] + "\n" + s[8:], id="claims-inner-newline"),
    pytest.param("claims", lambda s: s[:5] + "+" + s[6:], id="claims-std-alphabet-plus"),
    pytest.param("header", lambda s: s[:5] + "/" + s[6:], id="header-std-alphabet-slash"),
]


@pytest.mark.parametrize(("segment", "alter"), SIGNED_SEGMENT_CASES)
def test_signed_segment_encoding_negative(segment: str, alter: Callable[[str], str]) -> None:
    header, claims = token_parts()
    token = build_jws(
        _pad_to_noncanonical_length(header),
        _pad_to_noncanonical_length(claims),
        REGISTRY_ES,
        header_segment=alter if segment == "header" else _same,
        claims_segment=alter if segment == "claims" else _same,
    )
    assert_refused(token, "malformed")


def test_padded_json_whitespace_control_is_accepted() -> None:
    header, claims = token_parts()
    token = build_jws(
        _pad_to_noncanonical_length(header), _pad_to_noncanonical_length(claims), REGISTRY_ES
    )
    assert verify(token).kid == REGISTRY_ES.kid


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(None, id="None"),
        pytest.param(12345, id="int"),
        pytest.param(b"a.b.c", id="bytes"),
        pytest.param(["a", "b", "c"], id="list"),
    ],
)
def test_non_string_token_is_refused(token: object) -> None:
    assert_refused(token, "malformed")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"[]", id="claims-array"),
        pytest.param(b'"claims"', id="claims-string"),
        pytest.param(b"", id="claims-empty"),
        pytest.param(b"{", id="claims-truncated-json"),
        pytest.param(b'{"iss":NaN}', id="claims-NaN"),
        pytest.param(b"\xff\xfe{}", id="claims-invalid-utf8"),
    ],
)
def test_undecodable_claims_are_refused(raw: bytes) -> None:
    header, _ = token_parts()
    assert_refused(build_jws(header, raw, REGISTRY_ES), "malformed")


def test_header_not_an_object_is_refused() -> None:
    _, claims = token_parts()
    assert_refused(build_jws(b'["ES256"]', claims, REGISTRY_ES), "malformed")


# --- Negative cases: claims --------------------------------------------------------------------

CLAIM_NAMES = [
    "iss",
    "sub",
    "aud",
    "iat",
    "nbf",
    "exp",
    "jti",
    "cnf",
    "grant_id",
    "grant_hash",
    "receipt_hash",
    "capabilities",
    "envelope",
]


@pytest.mark.parametrize("name", CLAIM_NAMES)
def test_missing_claim_is_refused(name: str) -> None:
    assert_refused(make_token(claims_edit=drop(name)), "malformed_claims")


def test_claim_names_cover_the_model() -> None:
    # If a claim is added to the model, the missing-claim cases above must grow with it.
    _, claims = token_parts()
    assert sorted(claims) == sorted(CLAIM_NAMES)


def _nested(outer: str, key: str, value: Any) -> Edit:
    def edit(claims: Doc) -> None:
        claims[outer] = dict(claims[outer], **{key: value})

    return edit


CLAIM_CASES = [
    pytest.param(put("scope", "admin"), "malformed_claims", id="extra-claim-scope"),
    pytest.param(put("admin", True), "malformed_claims", id="extra-claim-admin"),
    pytest.param(put("iss", "https://evil.example"), "wrong_issuer", id="iss-other"),
    pytest.param(put("iss", ISSUER + "/"), "wrong_issuer", id="iss-trailing-slash"),
    pytest.param(put("iss", 1), "malformed_claims", id="iss-number"),
    pytest.param(put("iss", ""), "malformed_claims", id="iss-empty"),
    pytest.param(put("aud", [AUDIENCE]), "malformed_claims", id="aud-array"),
    pytest.param(put("aud", None), "malformed_claims", id="aud-null"),
    pytest.param(put("sub", "agent 1"), "malformed_claims", id="sub-with-space"),
    pytest.param(put("sub", 1), "malformed_claims", id="sub-number"),
    # NumericDate is a JSON number (RFC 7519 §2): a string holding digits is a wrong type.
    pytest.param(put("iat", str(NOW)), "malformed_claims", id="iat-string"),
    pytest.param(put("exp", str(NOW + LIFETIME)), "malformed_claims", id="exp-string"),
    pytest.param(put("nbf", str(NOW)), "malformed_claims", id="nbf-string"),
    pytest.param(put("exp", NOW + LIFETIME + 0.5), "malformed_claims", id="exp-fractional"),
    pytest.param(put("exp", None), "malformed_claims", id="exp-null"),
    pytest.param(put("jti", "short"), "malformed_claims", id="jti-too-short"),
    pytest.param(put("jti", "j" * 65), "malformed_claims", id="jti-too-long"),
    pytest.param(put("jti", "jti.with.dots.123456"), "malformed_claims", id="jti-bad-chars"),
    pytest.param(put("jti", 1234567890123456789), "malformed_claims", id="jti-number"),
    pytest.param(put("cnf", {}), "malformed_claims", id="cnf-empty"),
    pytest.param(put("cnf", AGENT.thumbprint), "malformed_claims", id="cnf-string"),
    pytest.param(
        _nested("cnf", "jkt", AGENT.thumbprint[:-1]), "malformed_claims", id="cnf-jkt-short"
    ),
    pytest.param(
        _nested("cnf", "jkt", AGENT.thumbprint + "="), "malformed_claims", id="cnf-jkt-padded"
    ),
    pytest.param(
        _nested("cnf", "jkt", AGENT.thumbprint + "\n"), "malformed_claims", id="cnf-jkt-newline"
    ),
    pytest.param(
        _nested("cnf", "x5t#S256", AGENT.thumbprint), "malformed_claims", id="cnf-extra-member"
    ),
    pytest.param(put("capabilities", []), "malformed_claims", id="capabilities-empty"),
    pytest.param(put("capabilities", None), "malformed_claims", id="capabilities-null"),
    pytest.param(put("capabilities", "read"), "malformed_claims", id="capabilities-string"),
    pytest.param(
        put("capabilities", [{"kind": "admin", "resource": "*"}]),
        "malformed_claims",
        id="capabilities-unknown-kind",
    ),
    pytest.param(
        put("capabilities", [{"kind": "read", "resource": "calendar/*", "sudo": True}]),
        "malformed_claims",
        id="capabilities-extra-member",
    ),
    pytest.param(put("grant_hash", "A" * 42), "malformed_claims", id="grant-hash-short"),
    pytest.param(put("receipt_hash", RECEIPT_HASH + "="), "malformed_claims", id="receipt-padded"),
    pytest.param(put("grant_id", ""), "malformed_claims", id="grant-id-empty"),
    pytest.param(put("envelope", {"bogus": 1}), "malformed_claims", id="envelope-unknown-member"),
    pytest.param(put("envelope", []), "malformed_claims", id="envelope-array"),
    pytest.param(put("exp", NOW + MAX_LIFETIME + 1), "bad_lifetime", id="lifetime-over-max"),
    pytest.param(put("nbf", NOW - 1), "bad_lifetime", id="nbf-before-iat"),
    pytest.param(put("exp", NOW), "bad_lifetime", id="exp-equals-nbf"),
    pytest.param(put("exp", NOW - 1), "bad_lifetime", id="exp-before-iat"),
]


@pytest.mark.parametrize(("claims_edit", "reason"), CLAIM_CASES)
def test_claims_negative(claims_edit: Edit, reason: str) -> None:
    assert_refused(make_token(claims_edit=claims_edit), reason)


@pytest.mark.parametrize("member", ["iss", "aud", "exp", "cnf", "capabilities", "envelope"])
def test_duplicate_claim_is_refused(member: str) -> None:
    header, claims = token_parts()
    assert_refused(build_jws(header, with_duplicate(claims, member), REGISTRY_ES), "malformed")


def test_duplicate_nested_claim_is_refused() -> None:
    header, claims = token_parts()
    raw = json_bytes(claims).replace(b'"cnf":{', b'"cnf":{"jkt":"' + b"A" * 43 + b'",', 1)
    assert_refused(build_jws(header, raw, REGISTRY_ES), "malformed")


# --- Time: exp, nbf, iat with leeway, at and just beyond each boundary -------------------------


@pytest.mark.parametrize(
    "now",
    [
        pytest.param(NOW - LEEWAY, id="iat-minus-leeway"),
        pytest.param(NOW, id="iat"),
        pytest.param(NOW + LIFETIME, id="exp"),
        pytest.param(NOW + LIFETIME + LEEWAY - 1, id="exp-plus-leeway-minus-1s"),
        pytest.param(NOW + LIFETIME + LEEWAY - 0.001, id="exp-plus-leeway-minus-1ms"),
    ],
)
def test_inside_the_leeway_is_accepted(now: float) -> None:
    assert verify(make_token(), now=now).claims.jti == JTI


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        pytest.param(NOW + LIFETIME + LEEWAY, "expired", id="exactly-exp-plus-leeway"),
        pytest.param(NOW + LIFETIME + LEEWAY + 0.001, "expired", id="exp-plus-leeway-plus-1ms"),
        pytest.param(NOW + LIFETIME + LEEWAY + 1, "expired", id="exp-plus-leeway-plus-1s"),
        pytest.param(NOW + 10 * LIFETIME, "expired", id="long-expired"),
        pytest.param(NOW - LEEWAY - 0.001, "not_yet_valid", id="iat-minus-leeway-minus-1ms"),
        pytest.param(NOW - LEEWAY - 1, "not_yet_valid", id="iat-minus-leeway-minus-1s"),
        pytest.param(NOW - 3600, "not_yet_valid", id="far-future-token"),
    ],
)
def test_outside_the_leeway_is_refused(now: float, reason: str) -> None:
    assert_refused(make_token(), reason, now=now)


def test_nbf_is_checked_with_leeway() -> None:
    token = make_token(claims_edit=put("nbf", NOW + 100))
    assert verify(token, now=NOW + 100 - LEEWAY).claims.nbf == NOW + 100
    assert_refused(token, "not_yet_valid", now=NOW + 100 - LEEWAY - 1)


def test_zero_leeway_policy() -> None:
    strict = verifier(policy=TokenPolicy(leeway=0))
    token = make_token()
    assert strict.verify(token, audience=AUDIENCE, now=NOW + LIFETIME - 1).kid == REGISTRY_ES.kid
    with pytest.raises(InvalidToken) as excinfo:
        strict.verify(token, audience=AUDIENCE, now=NOW + LIFETIME)
    assert excinfo.value.reason == "expired"
    with pytest.raises(InvalidToken) as excinfo:
        strict.verify(token, audience=AUDIENCE, now=NOW - 1)
    assert excinfo.value.reason == "not_yet_valid"


@pytest.mark.parametrize(
    "audience",
    [
        pytest.param("https://other.example", id="other"),
        pytest.param(AUDIENCE + "/", id="trailing-slash"),
        pytest.param(AUDIENCE.upper(), id="other-case"),
        pytest.param("", id="empty"),
    ],
)
def test_wrong_audience_is_refused(audience: str) -> None:
    assert_refused(make_token(), "wrong_audience", audience=audience)


def test_verifier_for_another_issuer_refuses() -> None:
    other = AccessTokenVerifier(keys=KEYS, issuer="https://other-registry.example")
    with pytest.raises(InvalidToken) as excinfo:
        other.verify(make_token(), audience=AUDIENCE, now=NOW)
    assert excinfo.value.reason == "wrong_issuer"


# --- Size cap ----------------------------------------------------------------------------------


def _token_of_length(length: int) -> str:
    """A validly signed token of exactly ``length`` characters (padded with JSON whitespace)."""
    header, claims = token_parts()
    for header_pad in range(3):
        for claims_pad in range(length):
            token = build_jws(
                json_bytes(header)[:-1] + b" " * header_pad + b"}",
                json_bytes(claims)[:-1] + b" " * claims_pad + b"}",
                REGISTRY_ES,
            )
            if len(token) == length:
                return token
            if len(token) > length:
                break
    raise AssertionError("no padding reaches that length")


def test_token_of_exactly_the_size_cap_is_accepted() -> None:
    token = _token_of_length(TokenPolicy().max_token_bytes)
    assert verify(token).kid == REGISTRY_ES.kid


def test_token_one_byte_over_the_cap_is_refused() -> None:
    assert_refused(_token_of_length(TokenPolicy().max_token_bytes + 1), "malformed")


def test_size_cap_applies_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    token = _token_of_length(TokenPolicy().max_token_bytes + 1)

    def must_not_run(*args: object) -> object:
        raise AssertionError("an oversized token was decoded")

    monkeypatch.setattr("agentauth.protocol._jws.b64url_decode", must_not_run)
    monkeypatch.setattr("agentauth.protocol._jws.strict_json_loads", must_not_run)
    assert_refused(token, "malformed")
    assert_refused("A" * 10**6, "malformed")


def test_policy_size_cap_is_configurable() -> None:
    small = verifier(policy=TokenPolicy(max_token_bytes=500))
    token = make_token()
    assert len(token) > 500
    with pytest.raises(InvalidToken) as excinfo:
        small.verify(token, audience=AUDIENCE, now=NOW)
    assert excinfo.value.reason == "malformed"


# --- The verifier's cache ----------------------------------------------------------------------


def test_cached_token_is_still_refused_once_expired() -> None:
    cached = verifier()
    token = make_token()
    assert cached.verify(token, audience=AUDIENCE, now=NOW).kid == REGISTRY_ES.kid
    assert cached.verify(token, audience=AUDIENCE, now=NOW + 1).kid == REGISTRY_ES.kid  # cache hit
    with pytest.raises(InvalidToken) as excinfo:
        cached.verify(token, audience=AUDIENCE, now=NOW + LIFETIME + LEEWAY)
    assert excinfo.value.reason == "expired"


def test_cached_token_is_still_refused_for_another_audience() -> None:
    cached = verifier()
    token = make_token()
    cached.verify(token, audience=AUDIENCE, now=NOW)
    with pytest.raises(InvalidToken) as excinfo:
        cached.verify(token, audience="https://other.example", now=NOW)
    assert excinfo.value.reason == "wrong_audience"


def test_cached_token_is_still_refused_before_nbf() -> None:
    cached = verifier()
    token = make_token()
    cached.verify(token, audience=AUDIENCE, now=NOW)
    with pytest.raises(InvalidToken) as excinfo:
        cached.verify(token, audience=AUDIENCE, now=NOW - LEEWAY - 1)
    assert excinfo.value.reason == "not_yet_valid"


def test_removing_a_key_invalidates_cached_tokens() -> None:
    cached = verifier()
    token = make_token()
    cached.verify(token, audience=AUDIENCE, now=NOW)
    cached.set_keys(KeySet([PublicKey.from_jwk(REGISTRY_ED.public_jwk())]))
    assert list(cached.keys) == [REGISTRY_ED.kid]
    with pytest.raises(InvalidToken) as excinfo:
        cached.verify(token, audience=AUDIENCE, now=NOW)
    assert excinfo.value.reason == "unknown_kid"


def test_replacing_a_key_under_the_same_kid_invalidates_cached_tokens() -> None:
    cached = verifier()
    token = make_token()
    cached.verify(token, audience=AUDIENCE, now=NOW)
    cached.set_keys(
        KeySet(
            [
                PublicKey.from_jwk(IMPOSTOR_ES.public_jwk()),
                PublicKey.from_jwk(REGISTRY_ED.public_jwk()),
            ]
        )
    )
    with pytest.raises(InvalidToken) as excinfo:
        cached.verify(token, audience=AUDIENCE, now=NOW)
    assert excinfo.value.reason == "bad_signature"


def test_small_cache_evicts_and_still_verifies() -> None:
    tiny = verifier(cache_size=1)
    first = make_token()
    second = make_token(claims_edit=put("jti", "another-token-jti-0001"))
    for token in (first, second, first, second):
        assert tiny.verify(token, audience=AUDIENCE, now=NOW).kid == REGISTRY_ES.kid


def test_disabled_cache_verifies() -> None:
    uncached = verifier(cache_size=0)
    token = make_token()
    assert uncached.verify(token, audience=AUDIENCE, now=NOW).kid == REGISTRY_ES.kid
    assert uncached.verify(token, audience=AUDIENCE, now=NOW).kid == REGISTRY_ES.kid


def _jti(i: int) -> Edit:
    return put("jti", f"cache-test-jti-{i:08d}")


def test_cached_tokens_are_mostly_not_walked_by_the_collector() -> None:
    # A verifier replica caches thousands of tokens; as models they were ~20 objects each
    # for every full collection to walk (80-110 ms pauses here). Only the most recent
    # 1,024 may stay models now; the rest are tuples of atoms the collector untracks.
    tokens = [make_token(claims_edit=_jti(i)) for i in range(5000)]
    cached = verifier()
    gc.collect()
    before = len(gc.get_objects())
    for token in tokens:
        cached.verify(token, audience=AUDIENCE, now=NOW)
    gc.collect()
    held = len(gc.get_objects()) - before
    assert held < 12_000, held  # the models of 1,024 tokens and one memo entry, with slack
    for token in tokens[-4096:]:  # the cache holds the last 4,096, served without a check
        cached.verify(token, audience=AUDIENCE, now=NOW)
    assert (cached.cache_misses, cached.cache_hits) == (5000, 4096)


@pytest.mark.parametrize("memo_kept", [True, False], ids=["memo-kept", "memo-evicted"])
def test_a_token_rebuilt_from_the_cache_is_the_token_verified(memo_kept: bool) -> None:
    # Past the hot thousand, a cached token is rebuilt from its atoms without any check:
    # it must come back exactly as verified, and still meet the per-call checks.
    cached = verifier(grant_memo_size=1)
    first = make_token(claims_edit=_jti(0))
    original = cached.verify(first, audience=AUDIENCE, now=NOW)
    for i in range(1, 1100):  # push it out of the hot set; same grant, so the memo keeps it
        cached.verify(make_token(claims_edit=_jti(i)), audience=AUDIENCE, now=NOW)
    if not memo_kept:  # another grant's capabilities take the one memo slot
        other = make_token(claims_edit=_in_grant("max_count", 3))
        cached.verify(other, audience=AUDIENCE, now=NOW)
    misses = cached.cache_misses
    rebuilt = cached.verify(first, audience=AUDIENCE, now=NOW)
    assert cached.cache_misses == misses  # from the cache: no signature check
    assert rebuilt is not original
    assert (rebuilt.claims, rebuilt.kid, rebuilt.ath) == (
        original.claims,
        original.kid,
        original.ath,
    )
    assert rebuilt.claims.model_dump() == verify(first).claims.model_dump()
    with pytest.raises(InvalidToken) as excinfo:
        cached.verify(first, audience=AUDIENCE, now=NOW + LIFETIME + LEEWAY)
    assert excinfo.value.reason == "expired"
    with pytest.raises(InvalidToken) as excinfo:
        cached.verify(first, audience="https://other.example", now=NOW)
    assert excinfo.value.reason == "wrong_audience"


def test_refused_token_is_refused_again() -> None:
    cached = verifier()
    token = make_token(put("alg", "none"))
    for _ in range(2):
        with pytest.raises(InvalidToken) as excinfo:
            cached.verify(token, audience=AUDIENCE, now=NOW)
        assert excinfo.value.reason == "alg_not_allowed"


# --- Key sets ----------------------------------------------------------------------------------


def test_keyset_jwks_round_trip() -> None:
    jwks = KEYS.to_jwks()
    assert json.loads(json.dumps(jwks)) == jwks
    again = KeySet.from_jwks(jwks)
    assert set(again) == {REGISTRY_ES.kid, REGISTRY_ED.kid}
    for kid in again:
        assert again[kid].alg == KEYS[kid].alg
        assert again[kid].thumbprint == KEYS[kid].thumbprint
    assert again.to_jwks() == jwks
    assert (
        AccessTokenVerifier(keys=again, issuer=ISSUER)
        .verify(make_token(), audience=AUDIENCE, now=NOW)
        .kid
        == REGISTRY_ES.kid
    )


def test_jwks_members_carry_no_private_material() -> None:
    for jwk in KEYS.to_jwks()["keys"]:
        assert not {"d", "p", "q", "k"} & set(jwk)


def _without(jwk: Doc, *members: str) -> Doc:
    return {k: v for k, v in jwk.items() if k not in members}


@pytest.mark.parametrize(
    "jwk",
    [
        pytest.param(dict(REGISTRY_ED.public_jwk(), alg="ES256"), id="okp-key-alg-ES256"),
        pytest.param(dict(REGISTRY_ES.public_jwk(), alg="Ed25519"), id="ec-key-alg-Ed25519"),
        pytest.param(dict(REGISTRY_ES.public_jwk(), alg="EdDSA"), id="ec-key-alg-EdDSA"),
        pytest.param({"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}, id="symmetric-key"),
        # Published for encryption or not, a secret or private key in the set is refused:
        # its publisher is not one to trust with the rest.
        pytest.param(
            {"kty": "oct", "k": "c2VjcmV0", "kid": "aes", "use": "enc"}, id="symmetric-enc-key"
        ),
        pytest.param(
            {"kty": "RSA", "n": "AQAB", "e": "AQAB", "d": "AQAB", "kid": "r", "use": "enc"},
            id="rsa-private-enc-key",
        ),
        pytest.param(
            dict(
                REGISTRY_ES.public_jwk(),
                d=b64url_encode(
                    REGISTRY_ES.crypto_key.private_numbers().private_value.to_bytes(32, "big")  # type: ignore[union-attr]
                ),
            ),
            id="private-key",
        ),
        # Members of the wrong shape make the set malformed, whatever the key is for.
        pytest.param("not a key", id="entry-not-an-object"),
        pytest.param(
            {k: v for k, v in REGISTRY_ES.public_jwk().items() if k != "kty"}, id="no-kty"
        ),
        pytest.param(dict(REGISTRY_ES.public_jwk(), use=["sig"]), id="use-not-a-string"),
        pytest.param(dict(REGISTRY_ES.public_jwk(), key_ops="verify"), id="key-ops-a-string"),
        pytest.param(dict(REGISTRY_ES.public_jwk(), key_ops=["verify", 1]), id="key-ops-number"),
        pytest.param(
            dict(REGISTRY_ES.public_jwk(), key_ops=["verify", "verify"]), id="key-ops-repeated"
        ),
        pytest.param(dict(REGISTRY_ES.public_jwk(), alg=256), id="alg-not-a-string"),
        pytest.param(dict(REGISTRY_ES.public_jwk(), kid=7), id="kid-not-a-string"),
        pytest.param(dict(REGISTRY_ES.public_jwk(), kid=""), id="kid-empty"),
        # Without an alg, crv decides whether the key is one of AgentAuth's: a list or an
        # object there raised TypeError (unhashable) out of from_jwks.
        pytest.param(
            dict(_without(REGISTRY_ES.public_jwk(), "alg"), crv=["P-256"]), id="crv-array"
        ),
        pytest.param(
            dict(_without(REGISTRY_ED.public_jwk(), "alg"), crv={"name": "Ed25519"}),
            id="crv-object",
        ),
        pytest.param(dict(_without(REGISTRY_ES.public_jwk(), "alg"), crv=256), id="crv-number"),
        # Claims one of AgentAuth's key types, is not one: not silently left out.
        pytest.param(dict(REGISTRY_ES.public_jwk(), x="AAAA"), id="ec-key-bad-coordinate"),
        pytest.param(
            {k: v for k, v in REGISTRY_ED.public_jwk().items() if k != "alg"} | {"x": "AA"},
            id="ed-key-bad-coordinate-no-alg",
        ),
    ],
)
def test_jwks_entry_is_refused(jwk: Doc) -> None:
    with pytest.raises(InvalidRequest):
        KeySet.from_jwks({"keys": [REGISTRY_ED.public_jwk(), jwk]})


# A JWKS may publish keys that are not for verifying AgentAuth's signatures: an encryption
# key beside the signing keys, a key for an algorithm AgentAuth does not use. RFC 7517
# §4.2-4.3: a key whose use is not "sig", or whose key_ops leaves out "verify", must not
# verify a signature. These are left out and the rest of the set kept.
@pytest.mark.parametrize(
    "jwk",
    [
        pytest.param(dict(REGISTRY_ED.public_jwk(), use="enc"), id="use-enc"),
        pytest.param(dict(REGISTRY_ED.public_jwk(), use="attest"), id="use-unregistered"),
        pytest.param(
            dict(_without(REGISTRY_ED.public_jwk(), "use"), key_ops=["encrypt"]),
            id="key-ops-encrypt",
        ),
        pytest.param(
            dict(_without(REGISTRY_ED.public_jwk(), "use"), key_ops=["sign"]),
            id="key-ops-sign-without-verify",
        ),
        pytest.param(dict(REGISTRY_ED.public_jwk(), key_ops=[]), id="key-ops-empty"),
        pytest.param(dict(REGISTRY_ED.public_jwk(), key_ops=["deriveKey"]), id="use-sig-ops-not"),
        pytest.param(_without(REGISTRY_ED.public_jwk(), "kid"), id="no-kid"),
        pytest.param(dict(REGISTRY_ED.public_jwk(), alg="none"), id="alg-none"),
        pytest.param(dict(REGISTRY_ED.public_jwk(), alg="HS256"), id="alg-HS256"),
        pytest.param(dict(REGISTRY_ED.public_jwk(), alg="Ed448"), id="alg-Ed448"),
    ],
)
def test_jwks_key_that_must_not_verify_signatures_is_left_out(jwk: Doc) -> None:
    # The left-out key is the real Ed25519 registry key: its tokens must not verify.
    keys = KeySet.from_jwks({"keys": [REGISTRY_ES.public_jwk(), jwk]})
    assert set(keys) == {REGISTRY_ES.kid}
    tokens = AccessTokenVerifier(keys=keys, issuer=ISSUER)
    assert tokens.verify(make_token(), audience=AUDIENCE, now=NOW).kid == REGISTRY_ES.kid
    with pytest.raises(InvalidToken) as excinfo:
        tokens.verify(make_token(signer=REGISTRY_ED), audience=AUDIENCE, now=NOW)
    assert excinfo.value.reason == "unknown_kid"


@pytest.mark.parametrize(
    "jwk",
    [
        pytest.param(
            {"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "rsa", "alg": "RS256"}, id="rsa"
        ),
        pytest.param({"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "rsa"}, id="rsa-no-alg"),
        pytest.param({"kty": "oct", "kid": "hmac"}, id="oct-without-k"),
        pytest.param(
            {"kty": "EC", "crv": "P-384", "x": "AAAA", "y": "AAAA", "kid": "p384"}, id="ec-p384"
        ),
        pytest.param(
            {"kty": "OKP", "crv": "X25519", "x": "AAAA", "kid": "ecdh", "use": "enc"},
            id="x25519-enc",
        ),
        pytest.param(
            {
                "kty": "EC",
                "crv": "P-256",
                "x": "AAAA",
                "y": "AAAA",
                "kid": "ecdh",
                "alg": "ECDH-ES",
            },
            id="p256-ecdh",
        ),
        pytest.param({"kty": "AKP", "kid": "future"}, id="unknown-key-type"),
    ],
)
def test_jwks_key_of_another_type_or_algorithm_is_left_out(jwk: Doc) -> None:
    keys = KeySet.from_jwks({"keys": [REGISTRY_ES.public_jwk(), jwk]})
    assert set(keys) == {REGISTRY_ES.kid}


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param({}, id="use-sig"),
        pytest.param({"key_ops": ["verify"]}, id="key-ops-verify"),
        pytest.param({"key_ops": ["sign", "verify"]}, id="key-ops-sign-verify"),
        pytest.param({"use": None}, id="no-use"),
        pytest.param({"alg": None}, id="no-alg"),
        pytest.param({"alg": "EdDSA"}, id="alg-legacy-name"),
    ],
)
def test_jwks_signature_key_is_kept(edit: Doc) -> None:
    jwk = {k: v for k, v in (REGISTRY_ED.public_jwk() | edit).items() if v is not None}
    keys = KeySet.from_jwks({"keys": [jwk]})
    # alg left out is the key type's own: an Ed25519 key verifies Ed25519 and nothing else.
    assert keys[REGISTRY_ED.kid].alg == "Ed25519"
    tokens = AccessTokenVerifier(keys=keys, issuer=ISSUER)
    assert tokens.verify(make_token(signer=REGISTRY_ED), audience=AUDIENCE, now=NOW)


def test_jwks_kid_shared_with_a_left_out_key_is_no_duplicate() -> None:
    # A kid names one key among those that verify; an encryption key may reuse it.
    enc = dict(IMPOSTOR_ES.public_jwk(), use="enc")
    for order in ([enc, REGISTRY_ES.public_jwk()], [REGISTRY_ES.public_jwk(), enc]):
        keys = KeySet.from_jwks({"keys": order})
        assert keys[REGISTRY_ES.kid].thumbprint == REGISTRY_ES.thumbprint


def test_jwks_with_only_keys_left_out_verifies_nothing() -> None:
    keys = KeySet.from_jwks({"keys": [dict(REGISTRY_ES.public_jwk(), use="enc")]})
    assert len(keys) == 0
    with pytest.raises(InvalidToken) as excinfo:
        AccessTokenVerifier(keys=keys, issuer=ISSUER).verify(
            make_token(), audience=AUDIENCE, now=NOW
        )
    assert excinfo.value.reason == "unknown_kid"


def test_jwks_with_duplicate_kid_is_refused() -> None:
    with pytest.raises(InvalidRequest):
        KeySet.from_jwks({"keys": [REGISTRY_ES.public_jwk(), IMPOSTOR_ES.public_jwk()]})


@pytest.mark.parametrize(
    "jwks",
    [
        pytest.param([], id="array"),
        pytest.param({}, id="no-keys"),
        pytest.param({"keys": {}}, id="keys-object"),
    ],
)
def test_malformed_jwks_is_refused(jwks: object) -> None:
    with pytest.raises(InvalidRequest):
        KeySet.from_jwks(jwks)


# --- Minting -----------------------------------------------------------------------------------


def _mint(**overrides: Any) -> str:
    arguments: dict[str, Any] = {
        "signer": REGISTRY_ES,
        "issuer": ISSUER,
        "grant": GRANT,
        "jkt": AGENT.thumbprint,
        "receipt_hash": RECEIPT_HASH,
        "now": NOW,
        "lifetime": LIFETIME,
    }
    arguments.update(overrides)
    return mint_access_token(**arguments)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"jkt": "not-a-thumbprint"}, id="bad-jkt"),
        pytest.param({"jkt": AGENT.thumbprint + "="}, id="padded-jkt"),
        pytest.param({"receipt_hash": "x"}, id="bad-receipt-hash"),
        pytest.param({"jti": "short"}, id="short-jti"),
        pytest.param({"jti": "has spaces in it 1234"}, id="jti-with-spaces"),
        pytest.param({"issuer": ""}, id="empty-issuer"),
    ],
)
def test_mint_refuses_invalid_claims(overrides: Doc) -> None:
    with pytest.raises(ValidationError):
        _mint(**overrides)


def test_minted_header_is_minimal_and_typed() -> None:
    header = json.loads(b64url_decode(_mint().split(".")[0]))
    assert header == {"alg": "ES256", "kid": REGISTRY_ES.kid, "typ": ACCESS_TOKEN_TYP}


def test_minted_jtis_are_unique() -> None:
    jtis = {verify(_mint()).claims.jti for _ in range(20)}
    assert len(jtis) == 20


# --- Property: any one-character change is refused ---------------------------------------------

VALID_TOKEN = make_token()
VALID_ED_TOKEN = make_token(signer=REGISTRY_ED)


@settings(max_examples=300, deadline=None)
@given(
    which=st.sampled_from([VALID_TOKEN, VALID_ED_TOKEN]),
    position=st.floats(min_value=0, max_value=1, exclude_max=True),
    replacement=st.sampled_from(B64URL_ALPHABET),
)
def test_any_single_character_change_is_refused(
    which: str, position: float, replacement: str
) -> None:
    index = int(position * len(which))
    if which[index] == replacement:
        replacement = B64URL_ALPHABET[(B64URL_ALPHABET.index(replacement) + 1) % 64]
    mutated = which[:index] + replacement + which[index + 1 :]
    with pytest.raises(InvalidToken):
        verify(mutated)


# --- The verifier's per-grant memo of validated capabilities and envelopes ---------------------


def _in_grant(where: str, value: Any) -> Edit:
    """Put ``value`` at one numeric spot of the capabilities or envelope; a fresh jti."""

    def edit(claims: Doc) -> None:
        if where == "max_amount":
            claims["capabilities"] = [
                dict(c, max_amount=value) if c["kind"] == "transact" else c
                for c in claims["capabilities"]
            ]
        elif where == "max_count":
            claims["envelope"] = dict(
                claims["envelope"], rate_limits=[{"max_count": value, "window_seconds": 60}]
            )
        else:
            claims["envelope"] = dict(claims["envelope"], expires_at=value)
        claims["jti"] = "memo-" + hashlib.sha256(repr((where, value)).encode()).hexdigest()[:32]

    return edit


def _outcome(check: AccessTokenVerifier, token: str) -> str:
    try:
        check.verify(token, audience=AUDIENCE, now=NOW)
    except InvalidToken as exc:
        return str(exc.reason)
    return "accepted"


# Values Python holds equal (50 == 50.0, 1 == True) while JSON, and the claims model, need not.
_EXPIRY = NOW + 10**6
_EQUAL_IN_PYTHON = [
    ("max_amount", 50, 50.0),
    ("max_amount", 50.0, 50),
    ("max_amount", 1, True),
    ("max_count", 1, True),
    ("max_count", True, 1),
    ("max_count", 1, 1.0),
    ("max_count", 1.0, 1),
    ("expires_at", _EXPIRY, float(_EXPIRY)),
    ("expires_at", float(_EXPIRY), _EXPIRY),
]


@pytest.mark.parametrize(
    ("where", "first", "second"),
    [
        pytest.param(where, first, second, id=f"{where}-{first!r}-then-{second!r}")
        for where, first, second in _EQUAL_IN_PYTHON
    ],
)
def test_grant_memo_does_not_change_outcomes(where: str, first: Any, second: Any) -> None:
    # The verifier memoizes validated capabilities and envelopes by their JSON. A verifier
    # that has just seen a token of the same grant must answer exactly as a fresh one does.
    first_token = make_token(claims_edit=_in_grant(where, first))
    second_token = make_token(claims_edit=_in_grant(where, second))
    fresh = _outcome(verifier(), second_token)
    warm = verifier()
    _outcome(warm, first_token)
    assert _outcome(warm, second_token) == fresh


def test_amounts_in_token_claims_are_strings() -> None:
    for value in (50, 50.0, True):
        assert_refused(make_token(claims_edit=_in_grant("max_amount", value)), "malformed_claims")


def test_an_expiry_leeway_of_zero_refuses_a_token_at_its_exp() -> None:
    """Introspection asks with no leeway after ``exp`` (RFC 7662 §2.2: active means not
    expired); the policy's leeway still applies to everyone else, and to ``nbf``."""
    verifier = AccessTokenVerifier(keys=KEYS, issuer=ISSUER)
    token = _mint()
    exp = NOW + LIFETIME
    assert verifier.verify(token, audience=AUDIENCE, now=exp + 10).claims.exp == exp
    for now in (exp, exp + 10):
        with pytest.raises(InvalidToken) as refused:
            verifier.verify(token, audience=AUDIENCE, now=now, expiry_leeway=0)
        assert refused.value.reason == "expired"
    assert verifier.verify(token, audience=AUDIENCE, now=exp - 1, expiry_leeway=0)
    assert verifier.verify(token, audience=AUDIENCE, now=NOW - 10, expiry_leeway=0)
