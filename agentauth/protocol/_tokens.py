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
import secrets
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from ._capabilities import AnyCapability, Capability
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


class AccessTokenVerifier:
    """Checks access tokens for one issuer, caching signature results per token.

    The cache holds only tokens whose signature and claims shape verified; time and audience
    are checked on every call (revocation is the caller's). ``cache_size`` bounds the token
    cache, ``grant_memo_size`` the memo of validated capabilities and envelopes per grant.
    Replacing the key set empties the cache, so a removed key stops validating its tokens.
    """

    def __init__(
        self,
        *,
        keys: KeySet,
        issuer: str,
        policy: TokenPolicy | None = None,
        cache_size: int = 4096,
        grant_memo_size: int = 4096,
    ) -> None:
        self._keys = keys
        self._issuer = issuer
        self._policy = policy or TokenPolicy()
        self._cache_size = cache_size
        self._grant_memo_size = grant_memo_size
        self._cache: dict[str, AccessToken] = {}
        # Observability only (cache hit ratio): never consulted for a decision.
        self.cache_hits = 0
        self.cache_misses = 0
        self._grant_parts: dict[str, tuple[Any, Any, tuple[Capability, ...], Envelope]] = {}

    @property
    def keys(self) -> KeySet:
        return self._keys

    def set_keys(self, keys: KeySet) -> None:
        self._keys = keys
        self._cache = {}

    def verify(self, token: object, *, audience: str, now: float) -> AccessToken:
        """Return the verified token or raise ``InvalidToken`` with a reason code."""
        if not isinstance(token, str):
            raise InvalidToken("the token must be a string", reason="malformed")
        verified = self._cache.get(token)
        if verified is not None:
            self.cache_hits += 1
        else:
            self.cache_misses += 1
            verified = self._verify_signature_and_shape(token)
            if self._cache_size:
                if len(self._cache) >= self._cache_size:
                    del self._cache[next(iter(self._cache))]  # drop the oldest entry
                self._cache[token] = verified
        claims = verified.claims
        leeway = self._policy.leeway
        if now >= claims.exp + leeway:
            raise InvalidToken("the token has expired", reason="expired")
        if now + leeway < claims.nbf or now + leeway < claims.iat:
            raise InvalidToken("the token is not valid yet", reason="not_yet_valid")
        if not hmac.compare_digest(claims.aud.encode(), audience.encode()):
            raise InvalidToken("the token is for another audience", reason="wrong_audience")
        return verified

    def _validate_claims(self, document: dict[str, Any]) -> AccessTokenClaims:
        # Every token of one grant repeats the same capabilities and envelope. Validating
        # them is most of the claims' cost, so the results are memoized per grant hash and
        # reused only when the raw JSON values are equal. That is exact: these models
        # validate leniently, so values Python calls equal (1, 1.0, true) validate to the
        # same result, and amounts must be strings (so 50 == 50.0 cannot slip past).
        grant_hash = document.get("grant_hash")
        memo = self._grant_parts.get(grant_hash) if isinstance(grant_hash, str) else None
        if (
            memo is not None
            and memo[0] == document.get("capabilities")
            and memo[1] == document.get("envelope")
        ):
            return AccessTokenClaims.model_validate(
                dict(document, capabilities=memo[2], envelope=memo[3])
            )
        claims = AccessTokenClaims.model_validate(document)
        if self._grant_memo_size:
            if len(self._grant_parts) >= self._grant_memo_size:
                del self._grant_parts[next(iter(self._grant_parts))]
            self._grant_parts[claims.grant_hash] = (
                document["capabilities"],
                document["envelope"],
                claims.capabilities,
                claims.envelope,
            )
        return claims

    def _verify_signature_and_shape(self, token: str) -> AccessToken:
        try:
            parsed = parse_compact(token, max_bytes=self._policy.max_token_bytes)
        except InvalidRequest as exc:
            raise InvalidToken(exc.description, reason="malformed") from None
        kid = check_signature(parsed, self._keys, typ=ACCESS_TOKEN_TYP, error=InvalidToken)
        try:
            claims = self._validate_claims(parsed.claims)
        except ValidationError:
            raise InvalidToken("malformed claims", reason="malformed_claims") from None
        if claims.iss != self._issuer:
            raise InvalidToken("unknown issuer", reason="wrong_issuer")
        if not (claims.iat <= claims.nbf < claims.exp) or (
            claims.exp - claims.iat > self._policy.max_lifetime
        ):
            raise InvalidToken("token lifetime is not acceptable", reason="bad_lifetime")
        return AccessToken(claims=claims, kid=kid, ath=access_token_hash(token))
