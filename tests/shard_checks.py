"""Checks as a verifier replica sends them to a shard, for the shard tests.

One factory instead of one per test module: ``a_check("chain", ...)`` is a check for agent
``agt_chain`` at provider ``prov_chain`` on grant ``grt_chain`` that passed the stateless
checks (a fresh proof: a random jti issued now), reading ``things/1`` under no limits;
each test names what it needs to differ. ``timed`` and ``arriving`` send checks through a
``ShardClient`` and time each answer from the check's arrival; ``frozen_clock`` holds the
shard's clock still for tests that set it by hand; ``fail_once_after_the_head_read`` makes a
shard's (re)connect fail once, just after it read its chain's head.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import asyncpg.connection
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


def fail_once_after_the_head_read(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Once: the first statement a shard runs after reading its chain's head fails (as a
    statement timeout or a lost connection would), and the reconnect tries again. The
    list returned counts the faults still to fire."""
    left, armed = [1], [False]

    def wrap(name: str) -> None:
        real = getattr(asyncpg.connection.Connection, name)

        async def call(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
            if armed[0] and left[0]:
                left[0] -= 1
                raise TimeoutError("injected: the statement timed out")
            result = await real(self, query, *args, **kwargs)
            if "FROM audit_heads" in query and query.lstrip().startswith("SELECT"):
                armed[0] = True
            return result

        monkeypatch.setattr(asyncpg.connection.Connection, name, call)

    for name in ("fetch", "fetchrow", "fetchval", "execute"):
        wrap(name)
    return left


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
