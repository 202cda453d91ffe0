"""Compact JWS (RFC 7515), only as strict as AgentAuth needs and no looser.

Parsing is split from checking so callers can cache: ``parse_compact`` does the cheap,
key-independent work; the signature is then checked with a key chosen by the caller.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ._encoding import b64url_decode, b64url_encode, canonical_json, strict_json_loads
from ._errors import AgentAuthError, InvalidRequest, PayloadTooLarge
from ._keys import KeySet, Signer, normalize_alg

__all__ = [
    "ParsedJWS",
    "attach_signature",
    "check_signature",
    "parse_compact",
    "sign_compact",
    "signing_input",
]

# Registry-signed documents (tokens, checkpoints) name their key and nothing else: no
# jwk/jku/x5u/x5c that could smuggle in a key, and no crit extensions we would not honour.
_SIGNED_HEADER_MEMBERS = frozenset({"alg", "kid", "typ"})


@dataclass(frozen=True, slots=True)
class ParsedJWS:
    header: Mapping[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes
    header_segment: str


def signing_input(header: dict[str, Any], claims: dict[str, Any]) -> bytes:
    """The ASCII bytes a signer signs: base64url(header) '.' base64url(claims)."""
    return (
        b64url_encode(canonical_json(header)) + "." + b64url_encode(canonical_json(claims))
    ).encode("ascii")


def attach_signature(data: bytes, signature: bytes) -> str:
    """Complete a compact JWS from its signing input and a signature made elsewhere."""
    return data.decode("ascii") + "." + b64url_encode(signature)


def sign_compact(header: dict[str, Any], claims: dict[str, Any], signer: Signer) -> str:
    data = signing_input(header, claims)
    return attach_signature(data, signer.sign(data))


@functools.lru_cache(maxsize=4096)
def _decode_header(segment: str) -> Mapping[str, Any]:
    # Headers repeat: every token of one kid, every proof of one agent key has the same
    # header bytes, so decoding each once saves a base64 and a JSON parse per request.
    # The read-only view keeps one caller from altering what the next one sees.
    header = strict_json_loads(b64url_decode(segment))
    if not isinstance(header, dict):
        raise InvalidRequest("JOSE header must be a JSON object")
    return MappingProxyType(header)


def parse_compact(token: object, *, max_bytes: int, max_header_bytes: int = 1024) -> ParsedJWS:
    """Split and decode a compact JWS, refusing anything malformed before any crypto runs.

    Raises ``InvalidRequest`` (or ``PayloadTooLarge``); callers re-raise as the error their
    context calls for (invalid_token, invalid_dpop_proof...).
    """
    if not isinstance(token, str):
        raise InvalidRequest("token must be a string")
    # The size cap comes first: nothing about an oversized token is worth decoding.
    if len(token) > max_bytes:
        raise PayloadTooLarge("token exceeds the size limit")
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidRequest("not a compact JWS")
    header_segment, payload_segment, signature_segment = parts
    if len(header_segment) > max_header_bytes:
        raise PayloadTooLarge("JOSE header exceeds the size limit")
    header = _decode_header(header_segment)
    claims = strict_json_loads(b64url_decode(payload_segment))
    if not isinstance(claims, dict):
        raise InvalidRequest("JWS claims must be a JSON object")
    signature = b64url_decode(signature_segment)
    data = token[: len(header_segment) + 1 + len(payload_segment)].encode("ascii")
    return ParsedJWS(header, claims, data, signature, header_segment)


def check_signature(
    parsed: ParsedJWS, keys: KeySet, *, typ: str, error: type[AgentAuthError]
) -> str:
    """Check a registry-signed JWS against a key set; return its ``kid`` or raise ``error``.

    The algorithm comes from the key set (pinned per kid), never from the token alone.
    """
    header = parsed.header
    if header.get("typ") != typ:
        raise error("wrong type", reason="wrong_typ")
    if not header.keys() <= _SIGNED_HEADER_MEMBERS:
        raise error("unexpected JOSE header member", reason="unexpected_header")
    try:
        alg = normalize_alg(header.get("alg"))
    except InvalidRequest:
        raise error("algorithm not allowed", reason="alg_not_allowed") from None
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise error("missing kid", reason="missing_kid")
    key = keys.get(kid)
    if key is None:
        raise error("the signing key is unknown", reason="unknown_kid")
    if alg != key.alg:
        raise error("algorithm does not match the key", reason="alg_mismatch")
    if not key.verify(parsed.signature, parsed.signing_input):
        raise error("bad signature", reason="bad_signature")
    return kid
