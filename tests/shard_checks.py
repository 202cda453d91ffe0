"""Checks as a verifier replica sends them to a shard, for the shard tests.

One factory instead of one per test module: ``a_check("chain", ...)`` is a check for agent
``agt_chain`` at provider ``prov_chain`` on grant ``grt_chain`` that passed the stateless
checks (a fresh proof: a random jti issued now), reading ``things/1`` under no limits;
each test names what it needs to differ. ``timed`` and ``arriving`` send checks through a
``ShardClient`` and time each answer from the check's arrival; ``frozen_clock`` holds the
shard's clock still for tests that set it by hand.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from agentauth.actors import Check, Result, ShardClient
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


def frozen_clock(monkeypatch: pytest.MonkeyPatch, at: float) -> list[float]:
    """``time.time`` held at ``[0]`` of the list returned, to be set by hand."""
    now = [at]
    monkeypatch.setattr(time, "time", lambda: now[0])
    return now


def payment(amount: str, currency: str = "EUR") -> Action:
    """A transaction on ``pay/x``."""
    return Action(kind="transact", resource="pay/x", amount=Decimal(amount), currency=currency)


async def timed(client: ShardClient, check: Check) -> tuple[float, Result]:
    """Shard 0's answer to ``check``, and the seconds it took from the check's arrival."""
    began = time.perf_counter()
    result = await client.check(0, check)
    return time.perf_counter() - began, result


async def arriving(
    client: ShardClient, make: Callable[[], Check], behind: int, every: float
) -> list[tuple[float, Result]]:
    """A check, then ``behind`` more arriving ``every`` seconds apart while it is out:
    each one's answer and its time, in arrival order."""
    first = asyncio.ensure_future(timed(client, make()))
    later = []
    for _ in range(behind):
        await asyncio.sleep(every)
        later.append(asyncio.ensure_future(timed(client, make())))
    return list(await asyncio.gather(first, *later))
