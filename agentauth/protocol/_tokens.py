"""Agent access tokens (AATs): compact JWS bound to the agent's key by ``cnf.jkt``.

Verification follows RFC 8725: the algorithm is pinned per ``kid`` by the key set (never
taken from the token), the header may hold only ``alg``, ``kid`` and ``typ`` (so ``jwk``,
``jku``, ``x5u``, ``x5c`` and ``crit`` are refused), ``typ`` must be ``aat+jwt`` (so a DPoP
proof or checkpoint can never pass as a token), the size is capped before decoding, and
duplicate JSON members are refused.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from ._cache import remember
from ._capabilities import AnyCapability
from ._encoding import b64url_encode
from ._envelope import Envelope
from ._errors import InvalidRequest, InvalidToken
from ._grants import Grant
from ._jws import attach_signature, check_signature, parse_compact, signing_input
from ._keys import KeySet, Signer
from ._types import Identifier

__all__ = [
    "ACCESS_TOKEN_TYP",
    "AccessToken",
    "AccessTokenClaims",
    "AccessTokenVerifier",
    "TokenPolicy",
    "access_token_hash",
    "access_token_parts",
    "mint_access_token",
]

ACCESS_TOKEN_TYP = "aat+jwt"  # noqa: S105 - a media type, not a secret
_B64_SHA256 = r"^[A-Za-z0-9_-]{43}$"


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """Limits for access tokens; each default says why."""

    # RFC 8725 §3.x asks for bounded input; 8 KiB fits a grant of dozens of capabilities
    # while keeping a hostile token from costing more than a few microseconds to reject.
    max_token_bytes: int = 8192
    # Clocks of issuer and verifier differ; 30 s covers NTP-synced hosts with margin.
    leeway: int = 30
    # A token claiming a longer life than this is refused even if signed: short-lived
    # tokens are what makes revocation lag bounded.
    max_lifetime: int = 3600


class Confirmation(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    jkt: str = Field(pattern=_B64_SHA256, description="RFC 7638 thumbprint of the agent key.")


class AccessTokenClaims(BaseModel):
    """The claims of an agent access token."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    iss: str = Field(min_length=1, max_length=512)
    sub: Identifier = Field(description="The agent id.")
    aud: str = Field(min_length=1, max_length=512, description="The provider's audience.")
    # NumericDates must be JSON numbers (RFC 7519 §2); strict refuses "123" and true.
    iat: StrictInt
    nbf: StrictInt
    exp: StrictInt
    jti: str = Field(min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    cnf: Confirmation
    grant_id: Identifier
    grant_hash: str = Field(pattern=_B64_SHA256)
    receipt_hash: str = Field(pattern=_B64_SHA256)
    capabilities: tuple[AnyCapability, ...] = Field(min_length=1)
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A verified token: its claims, the key that signed it, and its DPoP ``ath`` value."""

    claims: AccessTokenClaims
    kid: str
    ath: str = field(repr=False)

    @property
    def jkt(self) -> str:
        return self.claims.cnf.jkt


def access_token_hash(token: str) -> str:
    """The DPoP ``ath``: base64url SHA-256 of the token's ASCII bytes (RFC 9449 §4.2)."""
    return b64url_encode(hashlib.sha256(token.encode("ascii")).digest())


def access_token_parts(
    *,
    kid: str,
    alg: str,
    issuer: str,
    grant: Grant,
    jkt: str,
    receipt_hash: str,
    now: int,
    lifetime: int,
    jti: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Header and claims of a new token, for signers that sign asynchronously."""
    header = {"alg": alg, "kid": kid, "typ": ACCESS_TOKEN_TYP}
    claims = {
        "iss": issuer,
        "sub": grant.agent_id,
        "aud": grant.audience,
        "iat": now,
        "nbf": now,
        "exp": now + lifetime,
        "jti": jti or secrets.token_urlsafe(24),
        "cnf": {"jkt": jkt},
        "grant_id": grant.grant_id,
        "grant_hash": grant.digest_b64(),
        "receipt_hash": receipt_hash,
        "capabilities": [c.to_document() for c in grant.capabilities],
        "envelope": grant.envelope.model_dump(mode="json", exclude_none=True),
    }
    # Validate what we are about to sign: an issuer must never mint a token its own
    # verifier would refuse.
    AccessTokenClaims.model_validate(claims)
    return header, claims


def mint_access_token(
    *,
    signer: Signer,
    issuer: str,
    grant: Grant,
    jkt: str,
    receipt_hash: str,
    now: int,
    lifetime: int,
    jti: str | None = None,
) -> str:
    header, claims = access_token_parts(
        kid=signer.kid,
        alg=signer.alg,
        issuer=issuer,
        grant=grant,
        jkt=jkt,
        receipt_hash=receipt_hash,
        now=now,
        lifetime=lifetime,
        jti=jti,
    )
    data = signing_input(header, claims)
    return attach_signature(data, signer.sign(data))


# A verified token as the cache keeps it: strings and ints only (kid, ath, then the claims
# in AccessTokenClaims order, cnf as its jkt, capabilities and envelope as their memo key).
# The cycle collector stops tracking a tuple of atoms, where the same token as pydantic
# models is about 20 tracked objects: with 4,096 tokens cached a full collection walked
# some 80,000 of them, a pause of 80-110 ms on a slow day here (docs/verifier-bench.md).
_HOT_TOKENS = 1024

_Atoms = tuple[str, str, str, str, str, int, int, int, str, str, str, str, str, str]


def _parts_key(document: dict[str, Any]) -> str:
    # Equal strings mean equal JSON values of equal JSON types (50 and 50.0, 1 and true
    # serialize apart), so a memo hit validates to exactly what validation would give.
    return json.dumps(
        [document.get("capabilities"), document.get("envelope")],
        separators=(",", ":"),
        ensure_ascii=True,
    )


class AccessTokenVerifier:
    """Checks access tokens for one issuer, caching signature results per token.

    The cache holds only tokens whose signature and claims shape verified; time and audience
    are checked on every call (revocation is the caller's). ``cache_size`` bounds the token
    cache, ``grant_memo_size`` the memo of validated capabilities and envelopes (keyed by
    their JSON, so the tokens of one grant, and grants alike, share an entry). Replacing the
    key set empties the cache, so a removed key stops validating its tokens.
    """

    def __init__(
        self,
        *,
        keys: KeySet,
        issuer: str,
        policy: TokenPolicy | None = None,
        cache_size: int = 4096,
        grant_memo_size: int = 1024,
    ) -> None:
        self._keys = keys
        self._issuer = issuer
        self._policy = policy or TokenPolicy()
        self._cache_size = cache_size
        self._memo_size = grant_memo_size
        self._cache: dict[str, _Atoms] = {}
        # The most recently seen tokens also as built objects, so a busy agent's requests
        # skip the rebuild (about 10 us here, bench/protocol_bench.py): few enough to keep
        # collections short (about 7 tracked objects a token).
        self._hot: dict[str, AccessToken] = {}
        self._hot_size = min(cache_size, _HOT_TOKENS)
        # Observability only (cache hit ratio): never consulted for a decision.
        self.cache_hits = 0
        self.cache_misses = 0
        # Models, so tracked by the collector (about 8 objects an entry): kept smaller than
        # the token cache, and shared by every token whose grant says the same thing.
        self._parts: dict[str, tuple[str, tuple[AnyCapability, ...], Envelope]] = {}

    @property
    def keys(self) -> KeySet:
        return self._keys

    def set_keys(self, keys: KeySet) -> None:
        self._keys = keys
        self._cache = {}
        self._hot = {}

    def verify(
        self, token: object, *, audience: str, now: float, expiry_leeway: float | None = None
    ) -> AccessToken:
        """Return the verified token or raise ``InvalidToken`` with a reason code.

        ``expiry_leeway`` replaces the policy's leeway for ``exp`` alone: 0 for a caller
        whose answer must mean "not expired" by its own clock (RFC 7662 introspection).
        """
        if not isinstance(token, str):
            raise InvalidToken("the token must be a string", reason="malformed")
        verified = self._hot.get(token)
        if verified is not None:
            self.cache_hits += 1
        else:
            atoms = self._cache.get(token)
            if atoms is not None:
                self.cache_hits += 1
                verified = self._rebuild(atoms)
            else:
                self.cache_misses += 1
                verified, atoms = self._verify_signature_and_shape(token)
                remember(self._cache, token, atoms, self._cache_size)
            remember(self._hot, token, verified, self._hot_size)
        claims = verified.claims
        leeway = self._policy.leeway
        if now >= claims.exp + (leeway if expiry_leeway is None else expiry_leeway):
            raise InvalidToken("the token has expired", reason="expired")
        if now + leeway < claims.nbf or now + leeway < claims.iat:
            raise InvalidToken("the token is not valid yet", reason="not_yet_valid")
        if not hmac.compare_digest(claims.aud.encode(), audience.encode()):
            raise InvalidToken("the token is for another audience", reason="wrong_audience")
        return verified

    def _rebuild(self, atoms: _Atoms) -> AccessToken:
        """The verified token again from its atoms: no signature check, no validation.

        Every value was validated when the token was first verified; only capabilities and
        envelope are models, taken from the memo (or validated again if it let them go).
        """
        kid, ath, iss, sub, aud, iat, nbf, exp, jti, jkt, grant_id, grant_hash, receipt, key = atoms
        parts = self._parts.get(key)
        if parts is None:
            document: dict[str, Any] = {
                "iss": iss,
                "sub": sub,
                "aud": aud,
                "iat": iat,
                "nbf": nbf,
                "exp": exp,
                "jti": jti,
                "cnf": {"jkt": jkt},
                "grant_id": grant_id,
                "grant_hash": grant_hash,
                "receipt_hash": receipt,
            }
            document["capabilities"], document["envelope"] = json.loads(key)
            claims, _ = self._validate_claims(document)
            return AccessToken(claims=claims, kid=kid, ath=ath)
        claims = AccessTokenClaims.model_construct(
            iss=iss,
            sub=sub,
            aud=aud,
            iat=iat,
            nbf=nbf,
            exp=exp,
            jti=jti,
            cnf=Confirmation.model_construct(jkt=jkt),
            grant_id=grant_id,
            grant_hash=grant_hash,
            receipt_hash=receipt,
            capabilities=parts[1],
            envelope=parts[2],
        )
        return AccessToken(claims=claims, kid=kid, ath=ath)

    def _validate_claims(self, document: dict[str, Any]) -> tuple[AccessTokenClaims, str]:
        # Every token of one grant repeats the same capabilities and envelope. Validating
        # them is most of the claims' cost, so the results are memoized by their JSON.
        key = _parts_key(document)
        parts = self._parts.get(key)
        if parts is not None:
            claims = AccessTokenClaims.model_validate(
                dict(document, capabilities=parts[1], envelope=parts[2])
            )
            return claims, parts[0]  # one string shared by every token of these parts
        claims = AccessTokenClaims.model_validate(document)
        remember(self._parts, key, (key, claims.capabilities, claims.envelope), self._memo_size)
        return claims, key

    def _verify_signature_and_shape(self, token: str) -> tuple[AccessToken, _Atoms]:
        try:
            parsed = parse_compact(token, max_bytes=self._policy.max_token_bytes)
        except InvalidRequest as exc:
            raise InvalidToken(exc.description, reason="malformed") from None
        kid = check_signature(parsed, self._keys, typ=ACCESS_TOKEN_TYP, error=InvalidToken)
        try:
            claims, key = self._validate_claims(parsed.claims)
        except ValidationError:
            raise InvalidToken("malformed claims", reason="malformed_claims") from None
        if claims.iss != self._issuer:
            raise InvalidToken("unknown issuer", reason="wrong_issuer")
        if not (claims.iat <= claims.nbf < claims.exp) or (
            claims.exp - claims.iat > self._policy.max_lifetime
        ):
            raise InvalidToken("token lifetime is not acceptable", reason="bad_lifetime")
        ath = access_token_hash(token)
        atoms: _Atoms = (
            kid,
            ath,
            claims.iss,
            claims.sub,
            claims.aud,
            claims.iat,
            claims.nbf,
            claims.exp,
            claims.jti,
            claims.cnf.jkt,
            claims.grant_id,
            claims.grant_hash,
            claims.receipt_hash,
            key,
        )
        return AccessToken(claims=claims, kid=kid, ath=ath), atoms
