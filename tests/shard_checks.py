"""Checks as a verifier replica sends them to a shard, for the shard tests.

One factory instead of one per test module: ``a_check("chain", ...)`` is a check for agent
``agt_chain`` at provider ``prov_chain`` on grant ``grt_chain`` that passed the stateless
checks (a fresh proof: a random jti issued now), reading ``things/1`` under no limits;
each test names what it needs to differ.
"""

from __future__ import annotations

import secrets
import time
from decimal import Decimal
from typing import Any

from agentauth.actors import Check
from agentauth.protocol import Action, Envelope

READ = Action(kind="read", resource="things/1")


def a_check(tag: str, **changes: Any) -> Check:
    fields: dict[str, Any] = {
        "agent_id": f"agt_{tag}",
        "provider_id": f"prov_{tag}",
        "grant_id": f"grt_{tag}",
        "jkt": "k" * 43,
        "jti": secrets.token_urlsafe(12),
        "iat": time.time(),
        "action": READ,
        "envelope": Envelope(),
        "token_jti": f"tok_{tag}",
    }
    fields.update(changes)
    return Check(**fields)


def payment(amount: str, currency: str = "EUR") -> Action:
    """A transaction on ``pay/x``."""
    return Action(kind="transact", resource="pay/x", amount=Decimal(amount), currency=currency)
