"""The revocation channel's listener in a verifier replica, against a real Redis."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from agentauth.store import REVOCATION_CHANNEL
from agentauth.verifier._service import _Revocations


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


@pytest.mark.asyncio
async def test_a_message_the_listener_cannot_read_leaves_no_subscribed_connection_behind(
    redis_url: str,
) -> None:
    """A message the listener cannot read ends its round (the replica is not fresh until
    it has subscribed again, so it denies meanwhile). The round's connection is still up
    and subscribed: dropped without being closed, every such message left one more
    connection subscribed to the channel in every replica, for good."""
    name = f"revocation-listener-{secrets.token_hex(4)}"
    redis = aioredis.Redis.from_url(redis_url, client_name=name)
    publisher = aioredis.Redis.from_url(redis_url)
    revocations = _Revocations(
        cast(Any, None), redis, cast(Any, None), also=lambda: asyncio.sleep(0)
    )
    listener = asyncio.create_task(revocations._listen())
    try:
        await _until(lambda: revocations._listening)
        for _ in range(4):
            await publisher.publish(REVOCATION_CHANNEL, b"{not json")
            await _until(lambda: not revocations._listening)
            await _until(lambda: revocations._listening)
        mine = [c for c in await publisher.client_list() if c.get("name") == name]
        assert [c["sub"] for c in mine] == ["1"], mine
        # And the one subscribed connection is the live listener: it still hears.
        target = f"agt_{secrets.token_hex(4)}"
        await publisher.publish(REVOCATION_CHANNEL, json.dumps({"kind": "agent", "target": target}))
        await _until(lambda: ("agent", target) in revocations._revoked)
    finally:
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await redis.aclose()
        await publisher.aclose()
