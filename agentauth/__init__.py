"""AgentAuth: capability-based authorization for AI agents.

The base install is the agent SDK (``AgentAuthClient``) and the pure protocol
(``agentauth.protocol``); the services (Ray actors and Serve deployments, the approval
page) need the ``server`` extra.
"""

from .protocol import Action, AgentAuthError, Capability, Envelope
from .sdk import AgentAuthClient, AgentAuthClientSync, AgentAuthMiddleware, VerifierClient

__all__ = [
    "Action",
    "AgentAuthClient",
    "AgentAuthClientSync",
    "AgentAuthError",
    "AgentAuthMiddleware",
    "Capability",
    "Envelope",
    "VerifierClient",
]
__version__ = "0.1.0"
