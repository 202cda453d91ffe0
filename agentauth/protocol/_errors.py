"""The one error tree of AgentAuth.

Every failure the protocol (and the services built on it) reports is one of these. Each class
carries a wire ``error`` code, sent to clients, and an HTTP ``status_hint``. ``reason`` is a
finer, still public, code (``"expired"``, ``"rate_limited"``...). ``description`` is a short
human sentence safe to send; details that could help an attacker stay in server logs.

    AgentAuthError                      server_error              500
    ├── InvalidRequest                  invalid_request           400
    │   └── PayloadTooLarge             payload_too_large         413
    ├── Unauthenticated                 unauthenticated           401
    ├── InvalidToken                    invalid_token             401
    ├── InvalidDPoPProof                invalid_dpop_proof        401
    │   └── UseDPoPNonce                use_dpop_nonce            401
    ├── ReplayDetected                  replay_detected           401
    ├── Forbidden                       forbidden                 403
    │   ├── InsufficientCapability      insufficient_capability   403
    │   ├── EnvelopeExceeded            envelope_exceeded         403
    │   └── StepUpRequired              step_up_required          403
    ├── InvalidReceipt                  invalid_receipt           400
    ├── IntegrityError                  integrity_error           409
    ├── NotFound                        not_found                 404
    ├── Conflict                        conflict                  409
    ├── RateLimited                     rate_limited              429
    └── DependencyUnavailable           temporarily_unavailable   503
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AgentAuthError",
    "Conflict",
    "DependencyUnavailable",
    "EnvelopeExceeded",
    "Forbidden",
    "InsufficientCapability",
    "IntegrityError",
    "InvalidDPoPProof",
    "InvalidReceipt",
    "InvalidRequest",
    "InvalidToken",
    "NotFound",
    "PayloadTooLarge",
    "RateLimited",
    "ReplayDetected",
    "StepUpRequired",
    "Unauthenticated",
    "UseDPoPNonce",
]


class AgentAuthError(Exception):
    """Base of every AgentAuth error."""

    error: ClassVar[str] = "server_error"
    status_hint: ClassVar[int] = 500
    default_description: ClassVar[str] = "internal error"

    def __init__(self, description: str | None = None, *, reason: str | None = None) -> None:
        self.description = description or self.default_description
        self.reason = reason
        super().__init__(self.description)

    def to_dict(self) -> dict[str, str]:
        """The body sent to clients: code, optional reason, and the short description."""
        body = {"error": self.error, "error_description": self.description}
        if self.reason is not None:
            body["reason"] = self.reason
        return body

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r}, reason={self.reason!r})"


class InvalidRequest(AgentAuthError):
    error = "invalid_request"
    status_hint = 400
    default_description = "the request is malformed"


class PayloadTooLarge(InvalidRequest):
    error = "payload_too_large"
    status_hint = 413
    default_description = "the payload exceeds its size limit"


class Unauthenticated(AgentAuthError):
    error = "unauthenticated"
    status_hint = 401
    default_description = "the caller is not authenticated"


class InvalidToken(AgentAuthError):
    error = "invalid_token"
    status_hint = 401
    default_description = "the access token is invalid"


class InvalidDPoPProof(AgentAuthError):
    error = "invalid_dpop_proof"
    status_hint = 401
    default_description = "the DPoP proof is invalid"


class UseDPoPNonce(InvalidDPoPProof):
    """The server wants a proof carrying its nonce; ``nonce`` goes in the DPoP-Nonce header."""

    error = "use_dpop_nonce"
    status_hint = 401
    default_description = "a DPoP nonce from the server is required"

    def __init__(
        self, description: str | None = None, *, nonce: str, reason: str | None = None
    ) -> None:
        super().__init__(description, reason=reason)
        self.nonce = nonce


class ReplayDetected(AgentAuthError):
    error = "replay_detected"
    status_hint = 401
    default_description = "this proof has already been used"


class Forbidden(AgentAuthError):
    error = "forbidden"
    status_hint = 403
    default_description = "the caller may not do this"


class InsufficientCapability(Forbidden):
    error = "insufficient_capability"
    status_hint = 403
    default_description = "no granted capability allows this action"


class EnvelopeExceeded(Forbidden):
    error = "envelope_exceeded"
    status_hint = 403
    default_description = "the action is outside the grant's behavioral envelope"


class StepUpRequired(Forbidden):
    error = "step_up_required"
    status_hint = 403
    default_description = "this action needs a one-time human approval"


class InvalidReceipt(AgentAuthError):
    error = "invalid_receipt"
    status_hint = 400
    default_description = "the approval receipt does not verify"


class IntegrityError(AgentAuthError):
    error = "integrity_error"
    status_hint = 409
    default_description = "an integrity check failed"


class NotFound(AgentAuthError):
    error = "not_found"
    status_hint = 404
    default_description = "no such object"


class Conflict(AgentAuthError):
    error = "conflict"
    status_hint = 409
    default_description = "the request conflicts with the current state"


class RateLimited(AgentAuthError):
    """Too many requests: ``retry_after`` (whole seconds, at least 1) goes in Retry-After."""

    error = "rate_limited"
    status_hint = 429
    default_description = "too many requests; retry later"

    def __init__(
        self, description: str | None = None, *, retry_after: int, reason: str | None = None
    ) -> None:
        super().__init__(description, reason=reason)
        self.retry_after = max(1, retry_after)


class DependencyUnavailable(AgentAuthError):
    error = "temporarily_unavailable"
    status_hint = 503
    default_description = "a dependency is unavailable; the request was denied"
