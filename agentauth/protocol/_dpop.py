"""DPoP proofs (RFC 9449): made by agents, checked by the registry and verifiers.

``DPoPVerifier.verify`` performs every check of RFC 9449 §4.3 that does not need storage
and returns the proof's ``jti`` and key thumbprint; the caller then reserves ``(jkt, jti)``
atomically to stop replays (step 12 of §4.3 is the caller's, by design: it is state).
Server nonces (§8, §9) are stateless: an HMAC over their issue time.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ._cache import remember
from ._encoding import b64url_decode, b64url_encode
from ._errors import InvalidDPoPProof, InvalidRequest, UseDPoPNonce
from ._jws import parse_compact, sign_compact
from ._keys import ALG_NAMES, PublicKey, Signer, normalize_alg
from ._tokens import access_token_hash

__all__ = [
    "DPOP_ALGS",
    "DPOP_TYP",
    "DPoPNonces",
    "DPoPPolicy",
    "DPoPVerifier",
    "ScreenedProof",
    "VerifiedProof",
    "create_dpop_proof",
    "normalize_htu",
]

DPOP_TYP = "dpop+jwt"
#: The ``alg`` values a proof may carry: what RFC 9449 §7.1's ``algs`` challenge parameter
#: and the discovery document's ``dpop_signing_alg_values_supported`` list.
DPOP_ALGS: tuple[str, ...] = ALG_NAMES
_HEADER_MEMBERS = frozenset({"typ", "alg", "jwk"})
_JTI_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
_ATH_LENGTH = 43  # base64url of a SHA-256 digest, unpadded
_PCT_RE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class DPoPPolicy:
    """Limits for DPoP proofs; each default says why."""

    # A proof is a header with one public JWK and five short claims: 2 KiB is generous.
    max_proof_bytes: int = 2048
    # RFC 9449 §11.1: accept proofs only for a short time after iat. 60 s bounds the replay
    # window that the jti store must cover.
    max_age: int = 60
    # Agents' clocks run ahead of ours by a little; beyond this a proof is "from the future".
    future_skew: int = 10


@dataclass(frozen=True, slots=True)
class VerifiedProof:
    """What a valid proof tells the caller. Replay key: ``(jkt, jti)``."""

    jti: str
    iat: float
    jkt: str
    htm: str
    htu: str
    # A fresh server nonce when the proof's is past its renewal age (RFC 9449 §8.2: a new
    # one may be sent with any answer), so the agent changes nonce before the old one
    # lapses instead of paying a refused request and a retry for it.
    next_nonce: str | None = None


@dataclass(frozen=True, slots=True)
class ScreenedProof:
    """A proof that passed ``DPoPVerifier.screen``: not yet trusted (its signature is
    unchecked), but its key's thumbprint may be looked up before ``confirm`` checks it."""

    jti: str
    iat: float
    jkt: str
    htm: str
    htu: str
    nonce: object = field(repr=False)
    key: PublicKey = field(repr=False)
    signing_input: bytes = field(repr=False)
    signature: bytes = field(repr=False)


def _normalize_percent(match: re.Match[str]) -> str:
    byte = int(match.group(1), 16)
    return chr(byte) if byte in _UNRESERVED else "%" + match.group(1).upper()


def _remove_dot_segments(path: str) -> str:
    # RFC 3986 §5.2.4, on a path that starts with "/".
    output: list[str] = []
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if output:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    return "/" + "/".join(output)


@functools.lru_cache(maxsize=4096)
def normalize_htu(url: str) -> str:
    """Syntax- and scheme-based normalization (RFC 3986 §6.2.2-3) without query/fragment.

    Cached: a verifier sees the same few URLs over and over.

    RFC 9449 §4.3 compares ``htu`` ignoring query and fragment; both sides normalize so
    that ``HTTPS://Api.Example:443/a/./b`` and ``https://api.example/a/b`` agree.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidRequest("malformed URL") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname or parts.username is not None:
        raise InvalidRequest("htu must be an absolute http(s) URL without credentials")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port in (None, _DEFAULT_PORTS[scheme]) else f"{host}:{port}"
    path = _PCT_RE.sub(_normalize_percent, parts.path or "/")
    if not path.startswith("/"):
        path = "/" + path
    return f"{scheme}://{netloc}{_remove_dot_segments(path)}"


def create_dpop_proof(
    key: Signer,
    *,
    htm: str,
    htu: str,
    now: float,
    access_token: str | None = None,
    nonce: str | None = None,
    jti: str | None = None,
) -> str:
    """A DPoP proof for one request (agent side). ``htu`` is sent without query/fragment."""
    parts = urlsplit(htu)
    header = {"typ": DPOP_TYP, "alg": key.alg, "jwk": _public_members(key.public_jwk())}
    claims: dict[str, Any] = {
        "jti": jti or secrets.token_urlsafe(16),
        "htm": htm,
        "htu": f"{parts.scheme}://{parts.netloc}{parts.path or '/'}",
        "iat": int(now),
    }
    if access_token is not None:
        claims["ath"] = access_token_hash(access_token)
    if nonce is not None:
        claims["nonce"] = nonce
    return sign_compact(header, claims, key)


def _public_members(jwk: dict[str, Any]) -> dict[str, Any]:
    # Only the key itself travels in the proof: kid/alg/use are the agent's own business.
    names = ("kty", "crv", "x", "y")
    return {k: jwk[k] for k in names if k in jwk}


class DPoPNonces:
    """Stateless server nonces: base64url(issued_at || HMAC(secret, issued_at)[:16]).

    The first secret issues; all secrets verify, so secrets rotate without a flag day.
    A nonce older than ``renew_after`` (half its lifetime unless given) is still valid, but
    ``renewal`` hands out its successor, to be sent with the answer that accepted it.
    """

    _CONTEXT = b"agentauth.dpop-nonce.v1"

    def __init__(
        self,
        secrets_: Sequence[bytes],
        *,
        lifetime: int = 300,
        skew: int = 10,
        renew_after: int | None = None,
    ) -> None:
        if not secrets_ or any(len(s) < 32 for s in secrets_):
            raise ValueError("nonce secrets must be at least 32 bytes")
        renew = lifetime // 2 if renew_after is None else renew_after
        if not 0 <= renew <= lifetime:
            raise ValueError("renew_after must be between 0 and the lifetime")
        self._secrets = tuple(secrets_)
        self._lifetime = lifetime
        self._skew = skew
        self._renew_after = renew

    def _mac(self, secret: bytes, stamp: bytes) -> bytes:
        return hmac.new(secret, self._CONTEXT + stamp, hashlib.sha256).digest()[:16]

    def issue(self, now: float) -> str:
        stamp = struct.pack(">Q", int(now))
        return b64url_encode(stamp + self._mac(self._secrets[0], stamp))

    def valid(self, nonce: object, now: float) -> bool:
        if not isinstance(nonce, str) or len(nonce) != 32:
            return False
        try:
            raw = b64url_decode(nonce)
        except InvalidRequest:
            return False
        stamp, mac = raw[:8], raw[8:]
        (issued,) = struct.unpack(">Q", stamp)
        if not (now - self._lifetime <= issued <= now + self._skew):
            return False
        # Check every secret (no early exit) so timing does not reveal which one matched.
        matches = [hmac.compare_digest(mac, self._mac(s, stamp)) for s in self._secrets]
        return any(matches)

    def renewal(self, nonce: str, now: float) -> str | None:
        """A new nonce if ``nonce`` (one ``valid`` accepted) is older than the renewal age;
        None while it is young. Its successor then serves a whole lifetime from ``now``."""
        (issued,) = struct.unpack(">Q", b64url_decode(nonce)[:8])
        if now - issued < self._renew_after:
            return None
        return self.issue(now)


class DPoPVerifier:
    """Checks DPoP proofs; caches parsed proof headers (one per agent key) by their bytes."""

    def __init__(
        self,
        *,
        policy: DPoPPolicy | None = None,
        nonces: DPoPNonces | None = None,
        cache_size: int = 4096,
    ) -> None:
        self._policy = policy or DPoPPolicy()
        self._nonces = nonces
        self._cache_size = cache_size
        self._keys: dict[str, PublicKey] = {}

    @property
    def nonces(self) -> DPoPNonces | None:
        return self._nonces

    def verify(
        self,
        proof: object,
        *,
        htm: str,
        htu: str,
        now: float,
        access_token: str | None = None,
        ath: str | None = None,
        jkt: str | None = None,
    ) -> VerifiedProof:
        """Check one proof for a request to ``htm htu``; raise ``InvalidDPoPProof`` if bad.

        With ``access_token`` (or its precomputed ``ath``) the proof must carry the matching
        ``ath``; with ``jkt`` its key must have that thumbprint (the token's ``cnf.jkt``).
        Raises ``UseDPoPNonce`` carrying a fresh nonce when nonces are on and the proof lacks
        a current one.
        """
        screened = self.screen(
            proof, htm=htm, htu=htu, now=now, access_token=access_token, ath=ath, jkt=jkt
        )
        return self.confirm(screened, now=now)

    def screen(
        self,
        proof: object,
        *,
        htm: str,
        htu: str,
        now: float,
        access_token: str | None = None,
        ath: str | None = None,
        jkt: str | None = None,
    ) -> ScreenedProof:
        """Every check of ``verify`` but the signature and the nonce: the cheap ones, which
        refuse a proof too large, stale, or for another request before anyone pays for a
        signature check. A caller that must look the key up (the registry: is it an
        agent's?) does so between this and ``confirm``."""
        try:
            parsed = parse_compact(proof, max_bytes=self._policy.max_proof_bytes)
        except InvalidRequest as exc:
            raise InvalidDPoPProof(exc.description, reason="malformed") from None
        key = self._keys.get(parsed.header_segment)
        if key is None:
            key = self._key_from_header(parsed.header)
            remember(self._keys, parsed.header_segment, key, self._cache_size)

        claims = parsed.claims
        jti, claim_htm = claims.get("jti"), claims.get("htm")
        claim_htu, iat = claims.get("htu"), claims.get("iat")
        if not isinstance(jti, str) or not _JTI_RE.fullmatch(jti):
            raise InvalidDPoPProof("missing or malformed jti", reason="bad_jti")
        if not isinstance(claim_htm, str) or claim_htm != htm:
            raise InvalidDPoPProof("htm does not match the request", reason="htm_mismatch")
        if not isinstance(claim_htu, str):
            raise InvalidDPoPProof("missing htu", reason="htu_mismatch")
        try:
            same_uri = normalize_htu(claim_htu) == normalize_htu(htu)
        except InvalidRequest:
            same_uri = False
        if not same_uri:
            raise InvalidDPoPProof("htu does not match the request", reason="htu_mismatch")
        if isinstance(iat, bool) or not isinstance(iat, int | float):
            raise InvalidDPoPProof("missing or malformed iat", reason="bad_iat")
        if iat > now + self._policy.future_skew:
            raise InvalidDPoPProof("proof issued in the future", reason="iat_in_future")
        if iat < now - self._policy.max_age:
            raise InvalidDPoPProof("proof is too old", reason="iat_too_old")

        if access_token is not None:
            ath = access_token_hash(access_token)
        if ath is not None:
            claim_ath = claims.get("ath")
            # base64url(SHA-256) is 43 ASCII characters. Checking that first means .encode()
            # only ever sees ASCII; any other character then fails the comparison itself.
            # (len and isascii: 0.04 µs, against 0.2-0.3 for a regular expression.)
            if (
                not isinstance(claim_ath, str)
                or len(claim_ath) != _ATH_LENGTH
                or not claim_ath.isascii()
                or not hmac.compare_digest(claim_ath.encode(), ath.encode())
            ):
                raise InvalidDPoPProof("ath does not match the token", reason="ath_mismatch")
        if jkt is not None and not hmac.compare_digest(key.thumbprint.encode(), jkt.encode()):
            raise InvalidDPoPProof("proof key is not the token's key", reason="jkt_mismatch")
        return ScreenedProof(
            jti=jti,
            iat=float(iat),
            jkt=key.thumbprint,
            htm=htm,
            htu=claim_htu,
            nonce=claims.get("nonce"),
            key=key,
            signing_input=parsed.signing_input,
            signature=parsed.signature,
        )

    def confirm(self, screened: ScreenedProof, *, now: float) -> VerifiedProof:
        """The rest of ``verify`` for a proof ``screen`` passed: its signature, then (when
        nonces are on) its nonce."""
        if not screened.key.verify(screened.signature, screened.signing_input):
            raise InvalidDPoPProof("bad signature", reason="bad_signature")
        next_nonce = None
        if self._nonces is not None:
            nonce = screened.nonce
            if not isinstance(nonce, str) or not self._nonces.valid(nonce, now):
                raise UseDPoPNonce(nonce=self._nonces.issue(now), reason="nonce_required")
            next_nonce = self._nonces.renewal(nonce, now)
        return VerifiedProof(
            jti=screened.jti,
            iat=screened.iat,
            jkt=screened.jkt,
            htm=screened.htm,
            htu=screened.htu,
            next_nonce=next_nonce,
        )

    @staticmethod
    def _key_from_header(header: Mapping[str, Any]) -> PublicKey:
        if header.get("typ") != DPOP_TYP:
            raise InvalidDPoPProof("wrong proof type", reason="wrong_typ")
        if not header.keys() <= _HEADER_MEMBERS:
            raise InvalidDPoPProof("unexpected JOSE header member", reason="unexpected_header")
        try:
            alg = normalize_alg(header.get("alg"))
        except InvalidRequest:
            raise InvalidDPoPProof("algorithm not allowed", reason="alg_not_allowed") from None
        try:
            return PublicKey.from_jwk(header.get("jwk"), alg=alg)
        except InvalidRequest as exc:
            raise InvalidDPoPProof(exc.description, reason="bad_jwk") from None
