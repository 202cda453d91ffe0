"""Micro-batching calls to the shard actors from a verifier replica.

A Ray actor round trip costs about 1.5 ms here, while one call can carry a whole batch of
checks. Each shard gets a queue: the first check to arrive schedules a flush a fraction of
a millisecond later; everything queued by then travels in one call. Calls to one shard may
overlap (pipelining); the shard serializes them itself. Every wait is bounded: a dead or
stuck shard turns into a deny, never into a hang or an allow.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ._shard import Result
from ._state import Check

__all__ = ["ShardClient"]


class ShardClient:
    def __init__(
        self,
        handles: list[Any],
        *,
        max_batch: int = 128,
        max_wait: float = 0.0005,
        timeout: float = 0.04,
    ) -> None:
        self._handles = handles
        self._max_batch = max_batch
        self._max_wait = max_wait
        self._timeout = timeout
        self._queues: list[list[tuple[Check, asyncio.Future[Result]]]] = [[] for _ in handles]
        self._scheduled = [False] * len(handles)
        self.batches = 0
        self.checks = 0

    @property
    def shards(self) -> int:
        return len(self._handles)

    def queue_depth(self) -> int:
        return sum(len(q) for q in self._queues)

    async def check(self, shard: int, check: Check) -> Result:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        queue = self._queues[shard]
        queue.append((check, future))
        if len(queue) >= self._max_batch:
            self._flush(shard)
        elif not self._scheduled[shard]:
            self._scheduled[shard] = True
            loop.call_later(self._max_wait, self._flush, shard)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._timeout)
        except TimeoutError:
            # The shard may still record this decision; the client gets a deny either way.
            return Result(False, "state_timeout")

    def _flush(self, shard: int) -> None:
        self._scheduled[shard] = False
        queue, self._queues[shard] = self._queues[shard], []
        if queue:
            self.batches += 1
            self.checks += len(queue)
            asyncio.get_running_loop().create_task(self._send(shard, queue))

    async def _send(self, shard: int, items: list[tuple[Check, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._handles[shard].check_batch.remote([c for c, _ in items])
        except Exception:  # actor dead, restarting or unreachable: deny, never allow
            results = [Result(False, "state_unavailable")] * len(items)
        if len(results) != len(items):
            results = [Result(False, "state_unavailable")] * len(items)
        for (_, future), result in zip(items, results, strict=True):
            if not future.done():
                future.set_result(result)
