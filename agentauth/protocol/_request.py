"""One request's stateless checks, in order: token, proof, capability.

What remains after ``RequestVerifier.verify`` is stateful and belongs to the caller: the
revocation lookup, the atomic ``(jkt, jti)`` reservation, and the envelope evaluation
against the agent's usage state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._capabilities import Action, Capability, allowing_capability
from ._dpop import DPoPVerifier, VerifiedProof
from ._errors import InsufficientCapability
from ._tokens import AccessToken, AccessTokenVerifier

__all__ = ["AuthorizedRequest", "RequestVerifier", "path_as_sent"]


@dataclass(frozen=True, slots=True)
class AuthorizedRequest:
    token: AccessToken
    proof: VerifiedProof
    capability: Capability


@dataclass(frozen=True, slots=True)
class RequestVerifier:
    tokens: AccessTokenVerifier
    proofs: DPoPVerifier

    def verify(
        self,
        *,
        token: object,
        proof: object,
        htm: str,
        htu: str,
        audience: str,
        action: Action,
        now: float,
    ) -> AuthorizedRequest:
        """Token signature and claims, then the DPoP proof bound to it, then a capability."""
        access = self.tokens.verify(token, audience=audience, now=now)
        verified = self.proofs.verify(
            proof, htm=htm, htu=htu, now=now, ath=access.ath, jkt=access.jkt
        )
        capability = allowing_capability(access.claims.capabilities, action)
        if capability is None:
            raise InsufficientCapability(reason="no_matching_capability")
        return AuthorizedRequest(token=access, proof=verified, capability=capability)


def path_as_sent(scope: Mapping[str, Any]) -> str:
    """An ASGI request's path as its client sent it, percent-encoding kept, without the
    mount prefix (``root_path``): the path part of the ``htu`` its DPoP proof must name.

    ASGI's ``path`` is decoded (``a%2Fb`` reads ``a/b``, ``my%20notes`` reads ``my notes``),
    while the client signed the encoded form, and RFC 9449 compares that one. ``raw_path``
    holds it; a server without it gets ``path``.
    """
    raw = scope.get("raw_path")
    path = raw.partition(b"?")[0].decode("latin-1") if raw else str(scope["path"])
    root = str(scope.get("root_path", ""))
    if root and path.startswith(root):
        path = path[len(root) :]
    return path
