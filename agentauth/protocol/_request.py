"""One request's stateless checks, in order: token, proof, capability.

What remains after ``RequestVerifier.verify`` is stateful and belongs to the caller: the
revocation lookup, the atomic ``(jkt, jti)`` reservation, and the envelope evaluation
against the agent's usage state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote_to_bytes

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


def path_as_sent(scope: Mapping[str, Any], *, with_root: bool = False) -> str:
    """An ASGI request's path as its client sent it, percent-encoding kept, without the
    mount prefix (``root_path``) unless ``with_root``: the path part of the ``htu`` its
    DPoP proof must name.

    ASGI's ``path`` is decoded (``a%2Fb`` reads ``a/b``, ``my%20notes`` reads ``my notes``),
    while the client signed the encoded form, and RFC 9449 compares that one. ``raw_path``
    holds it; a server without it gets ``path``. ``root_path`` is decoded too, so the
    prefix is found in the raw path by what it reads (``/caf%C3%A9`` is ``/café``) and kept
    as it was sent; a prefix a proxy removed before this server is put back encoded.
    """
    raw = scope.get("raw_path")
    path = raw.partition(b"?")[0].decode("latin-1") if raw else str(scope["path"])
    root = str(scope.get("root_path", ""))
    if not root:
        return path
    if path.startswith(root):
        prefix, rest = root, path[len(root) :]
    else:
        # As many segments as the prefix has, read decoded: until 2026-12-01 a prefix
        # sent encoded (a space, a letter outside ASCII) was not found, and was then put
        # in front a second time, so every proof below such a mount was refused.
        cut = -1
        for _ in range(root.count("/") + 1):
            cut = path.find("/", cut + 1)
            if cut < 0:
                cut = len(path)
                break
        head = path[:cut]
        if unquote_to_bytes(head.encode("latin-1")).decode("utf-8", "replace") == root:
            prefix, rest = head, path[cut:]
        else:  # not in the raw path: a proxy took it off, the client had sent it
            prefix, rest = quote(root, safe="/!$&'()*+,;=:@~"), path
    return prefix + rest if with_root else rest
