"""What every experiment gets (the shared stack, an HTTP client, a registry driver) and the
measurements they share: fault windows, replays, audit rows, recovery."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from registry_world import World

from agentauth.verifier import FAIL_CLOSED

from ._report import Result
from ._stack import Stack
from ._traffic import (
    Outcome,
    Subject,
    Traffic,
    allows_nobody_got,
    audit_rows_missing,
    make_subjects,
    post,
    summarize,
)

__all__ = ["Context", "Experiment", "first_allow_after", "in_window"]


@dataclass
class Context:
    stack: Stack
    client: httpx.AsyncClient
    world: World

    async def subjects(self, count: int = 2) -> list[Subject]:
        """Agents for one experiment; at least one per shard when ``count`` allows it."""
        subjects = await make_subjects(self.world, count, self.stack.shards)
        # Agents hash to shards; add agents until every shard has one (a few tries).
        for _ in range(12):
            if len({s.shard for s in subjects}) >= min(count, self.stack.shards):
                break
            subjects += await make_subjects(self.world, 1, self.stack.shards)
        return subjects

    traffics: list[Traffic] = field(default_factory=list)

    def traffic(self, subjects: list[Subject], **options: Any) -> Traffic:
        traffic = Traffic(self.client, self.stack.verifier_url, subjects, **options).start()
        self.traffics.append(traffic)
        return traffic

    async def stop_traffic(self) -> None:
        """Stop traffic an experiment left running (it failed or timed out midway)."""
        for traffic in self.traffics:
            await traffic.stop()
        self.traffics.clear()

    async def verify(self, subject: Subject, body: dict[str, Any], label: str = "") -> Outcome:
        return await post(self.client, self.stack.verifier_url, subject, body, label=label)

    async def healthy(self, timeout: float = 60.0) -> float:
        """Wait until a fresh proof is allowed on every shard (the stack is whole again)."""
        subjects: list[Subject] = []

        async def every_shard_allows() -> bool:
            # Fresh agents and tokens: the registry itself must work again, too.
            if not subjects:
                subjects.extend(await self.subjects(self.stack.shards))
            answers = await asyncio.gather(*(self.verify(s, s.body()) for s in subjects))
            return all(a.allowed for a in answers)

        return await self.stack.wait_until(every_shard_allows, timeout=timeout, interval=0.5)

    async def missing_audit_rows(self, outcomes: list[Outcome]) -> int:
        conn = await self.stack.db()
        try:
            return len(await audit_rows_missing(conn, outcomes))
        finally:
            await conn.close()

    async def note_allows_nobody_got(
        self, result: Result, subjects: list[Subject], outcomes: list[Outcome]
    ) -> None:
        conn = await self.stack.db()
        try:
            nobody, voided = await allows_nobody_got(conn, subjects, outcomes)
        finally:
            await conn.close()
        result.notes.append(
            f"allows on the chain that no client got: {nobody}, {voided} of them voided"
        )

    @staticmethod
    def fill(result: Result, outcomes: list[Outcome]) -> None:
        result.requests = len(outcomes)
        result.decisions = summarize(outcomes)
        result.fail_opens["replayed proof allowed"] = sum(
            1 for o in outcomes if o.replay and o.allowed
        )
        # A dead dependency must still get a fast answer: denials it caused, as the
        # provider saw them (HTTP included), p99 under 50 ms.
        denials = sorted(
            (o for o in outcomes if o.reason in FAIL_CLOSED), key=lambda o: o.done - o.sent
        )
        waits = [o.done - o.sent for o in denials]
        if len(waits) >= 5:
            p99 = waits[min(len(waits) - 1, math.ceil(0.99 * len(waits)) - 1)]
            start = min(o.sent for o in outcomes)
            # Which denials were slow, and when: a slow one at the fault's start tells
            # another story than one at the recovery.
            slowest = ", ".join(
                f"{(o.done - o.sent) * 1000:.1f} ms {o.reason} sent at +{o.sent - start:.2f} s"
                for o in reversed(denials[-3:])
            )
            result.notes.append(
                f"{len(waits)} fail-closed denials: p50 {waits[len(waits) // 2] * 1000:.1f} ms,"
                f" p99 {p99 * 1000:.1f} ms; slowest {slowest}"
            )
            result.checks["fail-closed denials answered with p99 < 50 ms"] = p99 < 0.05


Experiment = Callable[[Context], Awaitable[Result]]


def in_window(outcomes: list[Outcome], start: float, end: float) -> list[Outcome]:
    """Requests sent at or after ``start`` whose answer arrived by ``end``: wholly inside."""
    return [o for o in outcomes if o.sent >= start and o.done <= end]


def first_allow_after(
    outcomes: list[Outcome], moment: float, where: Callable[[Outcome], bool] | None = None
) -> float | None:
    """Seconds from ``moment`` to the first allow of a fresh proof sent after it."""
    allows = [
        o.done
        for o in outcomes
        if o.allowed and not o.replay and o.sent >= moment and (where is None or where(o))
    ]
    return min(allows) - moment if allows else None


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))
