"""The agent SDK and the provider-side helpers (base install: no Ray, no database)."""

from ._auth import STEP_UP_HEADER, DPoPAuth, is_nonce_challenge
from ._client import AgentAuthClient, AgentAuthClientSync, Approval, GrantPending
from ._errors import ServerError, error_from_response
from ._provider import (
    AgentAuthMiddleware,
    OfflineVerifier,
    Verification,
    VerifierClient,
    require,
)

__all__ = [
    "STEP_UP_HEADER",
    "AgentAuthClient",
    "AgentAuthClientSync",
    "AgentAuthMiddleware",
    "Approval",
    "DPoPAuth",
    "GrantPending",
    "OfflineVerifier",
    "ServerError",
    "Verification",
    "VerifierClient",
    "error_from_response",
    "is_nonce_challenge",
    "require",
]
