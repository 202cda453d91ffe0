"""The audit key list: every key that signed checkpoints, each with its signing window.

The JWKS lists the keys that may sign *tokens*, so it drops a key once the last token the key
signed has expired. Signed checkpoints are kept for years, so checking them needs every key
the registry has used. The registry serves them at ``/.well-known/agentauth-audit-keys.json``.
That list only ever grows, and each key carries the window in which it signed:

    {"format": "agentauth.audit-keys.v1",
     "keys": [{"kid": "k1", "alg": "ES256", "jwk": {"kty": "EC", "crv": "P-256", ...},
               "activates_at": 1767225600, "retires_at": 1767226020}, ...]}

A checkpoint verifies only if its ``time`` lies in its key's window ``[activates_at,
retires_at)``. So a retired key, even one that leaks later, cannot vouch for a checkpoint
dated after it retired. Never verify tokens with these keys: the list keeps keys that must
no longer vouch for new tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._audit import Checkpoint, verify_checkpoint
from ._errors import IntegrityError, InvalidRequest
from ._jws import parse_compact
from ._keys import Algorithm, KeySet, PublicKey

__all__ = ["AUDIT_KEYS_FORMAT", "AuditKey", "AuditKeys"]

AUDIT_KEYS_FORMAT = "agentauth.audit-keys.v1"


class AuditKeyEntry(BaseModel):
    """One key of the audit key list."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    kid: str = Field(min_length=1, max_length=256)
    alg: Algorithm
    jwk: dict[str, Any] = Field(description="The public key (RFC 7517); kid and alg are above.")
    activates_at: int = Field(ge=0, description="Unix time, seconds: signs from then on.")
    retires_at: int | None = Field(
        ge=0, description="Unix time, seconds: signs nothing from then on; null: no end yet."
    )


class AuditKeysDocument(BaseModel):
    """The document the registry serves at ``/.well-known/agentauth-audit-keys.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    format: Literal["agentauth.audit-keys.v1"]
    keys: list[AuditKeyEntry]


@dataclass(frozen=True, slots=True)
class AuditKey:
    """One key (its JWK carries the kid) and the window it signs in; ``retires_at`` None:
    no end set yet."""

    key: PublicKey
    activates_at: int = 0
    retires_at: int | None = None

    @property
    def kid(self) -> str:
        return str(self.key.jwk["kid"])

    def signs_at(self, time: int) -> bool:
        return self.activates_at <= time and (self.retires_at is None or time < self.retires_at)


class AuditKeys(KeySet):
    """The keys to check signed checkpoints with, each with its signing window.

    Build it with ``from_document`` from the audit key list (``from_jwks`` takes a plain
    JWKS too, whose keys have no window, so any ``time`` passes). ``verify`` checks a
    checkpoint's signature and that its ``time`` lies in its key's window. It is a
    ``KeySet``, so it can go wherever checkpoint keys are expected. Never verify tokens with it.
    """

    def __init__(self, keys: Iterable[AuditKey], *, windowed: bool = True) -> None:
        entries = list(keys)
        super().__init__(entry.key for entry in entries)  # refuses a missing or repeated kid
        self._entries = {entry.kid: entry for entry in entries}
        self._windowed = windowed

    @property
    def windowed(self) -> bool:
        """False when the keys came from a plain JWKS: no window is known, none is checked."""
        return self._windowed

    @classmethod
    def from_document(cls, document: object, *, allow_jwks: bool = True) -> AuditKeys:
        """Parse an audit key list, or a plain JWKS (no windows) if ``allow_jwks``; raises
        ``InvalidRequest``.

        Refuse the JWKS wherever the document comes from the registry being checked: served
        as its audit key list, it turns every key window check off.
        """
        if isinstance(document, dict) and "format" not in document:
            if not allow_jwks:
                raise InvalidRequest("a plain JWKS, not an audit key list: no signing windows")
            return cls.from_jwks(document)
        try:
            parsed = AuditKeysDocument.model_validate(document)
        except ValidationError:
            raise InvalidRequest("malformed audit key list") from None
        return cls(
            AuditKey(
                PublicKey.from_jwk({**entry.jwk, "kid": entry.kid}, alg=entry.alg),
                entry.activates_at,
                entry.retires_at,
            )
            for entry in parsed.keys
        )

    @classmethod
    def from_jwks(cls, jwks: object) -> AuditKeys:
        return cls((AuditKey(key) for key in KeySet.from_jwks(jwks).values()), windowed=False)

    @classmethod
    def from_key_set(cls, keys: KeySet) -> AuditKeys:
        """``keys`` itself if it is an ``AuditKeys``, else its keys without windows."""
        if isinstance(keys, AuditKeys):
            return keys
        return cls((AuditKey(key) for key in keys.values()), windowed=False)

    def entry(self, kid: str) -> AuditKey | None:
        return self._entries.get(kid)

    def to_document(self) -> dict[str, Any]:
        """The audit key list, keys in the order they activated (one encoding per list)."""
        ordered = sorted(self._entries.values(), key=lambda e: (e.activates_at, e.kid))
        return {
            "format": AUDIT_KEYS_FORMAT,
            "keys": [
                {
                    "kid": e.kid,
                    "alg": e.key.alg,
                    "jwk": {k: v for k, v in e.key.jwk.items() if k != "kid"},
                    "activates_at": e.activates_at,
                    "retires_at": e.retires_at,
                }
                for e in ordered
            ],
        }

    def extends(self, earlier: AuditKeys) -> bool:
        """Is this list ``earlier`` grown the only ways the registry's list grows?

        Allowed changes are new keys, and a retirement set where ``earlier`` had none. Every
        other key must be the same key with the same window.
        """
        for kid, old in earlier._entries.items():
            new = self._entries.get(kid)
            if (
                new is None
                or new.key.thumbprint != old.key.thumbprint
                or new.activates_at != old.activates_at
                or (old.retires_at is not None and new.retires_at != old.retires_at)
            ):
                return False
        return True

    def verify(self, signed: object) -> Checkpoint:
        """Check a signed checkpoint: signature, and its ``time`` in its key's window.

        Raises ``IntegrityError``; reason ``key_window`` when the signature is good but the
        key did not sign at that time.
        """
        checkpoint = verify_checkpoint(signed, keys=self)
        # The signature verified, so the header parses and names a kid of this set.
        kid = str(parse_compact(signed, max_bytes=4096).header["kid"])
        entry = self._entries[kid]
        if not entry.signs_at(checkpoint.time):
            end = "" if entry.retires_at is None else f" to {entry.retires_at}"
            raise IntegrityError(
                f"checkpoint dated {checkpoint.time} is outside the signing window of key"
                f" {kid} (from {entry.activates_at}{end})",
                reason="key_window",
            )
        return checkpoint
