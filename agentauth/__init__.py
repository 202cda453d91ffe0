"""AgentAuth: capability-based authorization for AI agents.

The base install is the agent SDK and the pure protocol (``agentauth.protocol``); the
server parts (Ray actors and Serve deployments, the approval page) need the ``server`` extra.
"""

from .protocol import AgentAuthError, Capability

__all__ = ["AgentAuthError", "Capability"]
__version__ = "0.1.0"
