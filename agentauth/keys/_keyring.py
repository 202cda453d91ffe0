"""Which key signs now and which keys are published: the rotation timeline, without I/O.

Rotation in three moments (times are integers, seconds; ``now`` is always an argument):

    rotate at t        B is published (JWKS: A, B); A still signs
    t + publish_ahead  B activates and signs; A stays published
    + max_token_life   A retires: its last token has expired (JWKS: B)

A new kid appears in the JWKS before it signs anything, so verifiers that cache the JWKS
know it by the time its first token arrives; the old kid stays until its last token expires.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from agentauth.protocol import Algorithm, Conflict

from ._base import AsyncSigner, SignerUnavailable

__all__ = ["KeyRecord", "KeyRing"]


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One signing key's public half and its timeline (``retires_at`` None: not scheduled)."""

    kid: str
    public_jwk: dict[str, Any] = field(hash=False, compare=False)
    alg: Algorithm
    created_at: int
    activates_at: int
    retires_at: int | None = None

    @classmethod
    def from_signer(cls, signer: AsyncSigner, *, created_at: int) -> KeyRecord:
        """A record for ``signer``'s key, active from ``created_at`` until a rotation says."""
        jwk = {k: v for k, v in signer.public_key().jwk.items() if k != "kid"}
        return cls(signer.kid, jwk, signer.alg, created_at, activates_at=created_at)

    def published_at(self, now: int) -> bool:
        return self.retires_at is None or now < self.retires_at

    def signs_at(self, now: int) -> bool:
        return self.activates_at <= now and self.published_at(now)


class KeyRing:
    """An immutable set of key records; ``rotate`` returns a new ring."""

    __slots__ = ("_records",)

    def __init__(self, records: Iterable[KeyRecord] = ()) -> None:
        self._records = tuple(records)
        kids = [r.kid for r in self._records]
        if len(set(kids)) != len(kids):
            raise Conflict("duplicate kid in key ring")

    @property
    def records(self) -> tuple[KeyRecord, ...]:
        return self._records

    def signing_kid(self, now: int) -> str:
        """The newest active key: activated at or before ``now`` and not retired."""
        active = [r for r in self._records if r.signs_at(now)]
        if not active:
            raise SignerUnavailable("no signing key is active", reason="no_active_key")
        return max(active, key=lambda r: (r.activates_at, r.created_at)).kid

    def published(self, now: int) -> list[dict[str, Any]]:
        """JWKS ``keys``: every key not yet retired, including keys that are not active yet."""
        return [
            {**r.public_jwk, "kid": r.kid, "alg": r.alg, "use": "sig"}
            for r in self._records
            if r.published_at(now)
        ]

    def rotate(
        self, new: KeyRecord, *, now: int, publish_ahead: int, max_token_lifetime: int
    ) -> KeyRing:
        """Publish ``new`` now, activate it at ``now + publish_ahead``, retire the current key.

        The current key (any active key) retires once every token it can still sign has
        expired: ``max_token_lifetime`` after the new key takes over (include the verifiers' clock
        leeway in it). Keys already retired at ``now`` are dropped. One rotation at a time:
        rotating while a key is still waiting to activate is refused.
        """
        if publish_ahead < 0 or max_token_lifetime <= 0:
            raise ValueError("publish_ahead must be >= 0 and max_token_lifetime > 0")
        if any(r.activates_at > now and r.published_at(now) for r in self._records):
            raise Conflict("a rotation is already pending")
        if any(r.kid == new.kid for r in self._records):
            raise Conflict("the new key's kid is already in the ring")
        activates_at = now + publish_ahead
        retires_at = activates_at + max_token_lifetime
        kept = [
            # Whatever may sign now (the current key) stops being needed once the tokens it
            # signs before the new key takes over have expired.
            dataclasses.replace(r, retires_at=retires_at)
            if r.signs_at(now) and (r.retires_at is None or r.retires_at > retires_at)
            else r
            for r in self._records
            if r.published_at(now)
        ]
        kept.append(dataclasses.replace(new, activates_at=activates_at, retires_at=None))
        return KeyRing(kept)

    def __repr__(self) -> str:
        return f"KeyRing({[r.kid for r in self._records]!r})"
