"""Kill a state shard actor under load; Ray restarts it with empty memory.

The restarted shard has lost its jti window, the only thing that stops a replay. The design
answers with a replay floor: the new incarnation refuses every proof issued up to its
chain's replay mark, the newest proof any committed decision reserved
(``shard_restarted``), and serves younger proofs at once.

Fail-open here: any replay allowed, above all the proofs the old incarnation allowed just
before it died, replayed at the new one (its jti window cannot remember them); or an allow
without its committed audit row. Recovery: from the kill (Ray restarts the actor at once, so
the fault ends there) to the first allow of a fresh proof on the killed shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import ray

from ._context import Context, first_allow_after
from ._report import Result
from ._traffic import Outcome

NAME = "shard_kill"
HYPOTHESIS = (
    "ray.kill (with restart) of the shard that owns an agent: while it restarts its agents "
    "are denied (state_unavailable/state_timeout), then proofs issued after the newest one "
    "the old incarnation reserved are allowed at once; no replay is allowed (including the "
    "proofs allowed just before the kill, replayed at the new incarnation), agents on the "
    "other shard keep being allowed, and every allow has its audit row."
)
BOUND_S = 30.0


async def _new_incarnation(handle: Any, old_start: float, deadline: float) -> float:
    """The restarted shard's start time, once Ray runs it (asked again while the old one
    still answers or Ray reports the actor restarting)."""
    while True:
        try:
            started = float(await handle.ping.remote())
            if started > old_start:
                return started
        except ray.exceptions.RayError:  # ActorUnavailableError while it restarts
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            return old_start  # never restarted: the check on new_start reports it
        await asyncio.sleep(0.1)


async def run(ctx: Context) -> Result:
    result = Result(NAME, HYPOTHESIS, recovery_bound_s=BOUND_S)
    result.recovery_what = "kill -> first allow on the killed shard"
    subjects = await ctx.subjects(2)
    victim = subjects[0].shard
    on_victim = [i for i, s in enumerate(subjects) if s.shard == victim]
    others = [i for i, s in enumerate(subjects) if s.shard != victim]
    traffic = ctx.traffic(subjects)
    await asyncio.sleep(3.0)

    # Proofs the old incarnation allowed: replayed at the new one once it is back (below).
    handle = ray.get_actor(f"agentauth-shard-{victim}", namespace="agentauth")
    old_start = await handle.ping.remote()
    killed_at = time.monotonic()
    # In a thread: ray.kill blocks for a round trip to the GCS, and this loop also times the
    # traffic's answers; blocked, it would stamp the denials that arrive meanwhile late.
    await asyncio.to_thread(ray.kill, handle, no_restart=False)
    result.notes.append(
        f"ray.kill returned {(time.monotonic() - killed_at) * 1000:.1f} ms after the call"
    )
    allowed_before = [
        (o, body)
        for o, body in traffic.allowed_bodies()
        if o.subject in on_victim and o.done <= killed_at
    ]

    def victim_allows(o: Outcome) -> bool:
        return o.subject in on_victim

    # Recovery is counted from an allow the new incarnation gave: a request sent just
    # after killed_at can still be allowed by the old one, which dies a moment after
    # ray.kill is called (it happened: such an allow ended the wait at once).
    new_start = await _new_incarnation(handle, old_start, killed_at + BOUND_S)
    back_at = time.monotonic()

    async def recovered() -> bool:
        return first_allow_after(traffic.outcomes, back_at, victim_allows) is not None

    with contextlib.suppress(TimeoutError):
        await ctx.stack.wait_until(recovered, timeout=BOUND_S, interval=0.25)

    # The old incarnation's allowed proofs, now at the new one: every one must be denied
    # (4 at a time, like the traffic: a burst would only measure shard timeouts).
    limit = asyncio.Semaphore(4)

    async def replay(o: Outcome, body: dict[str, Any]) -> Outcome:
        async with limit:
            again = await ctx.verify(subjects[o.subject], body, label="replay-after-restart")
        again.subject, again.replay = o.subject, True
        return again

    replays = await asyncio.gather(*(replay(o, body) for o, body in allowed_before))
    await asyncio.sleep(2.0)
    outcomes = await traffic.stop() + list(replays)

    ctx.fill(result, outcomes)
    result.fail_opens["allow without its audit row"] = await ctx.missing_audit_rows(outcomes)
    await ctx.note_allows_nobody_got(result, subjects, outcomes)
    result.fail_opens["pre-kill proof allowed again by the new incarnation"] = sum(
        r.allowed for r in replays
    )
    first = first_allow_after(outcomes, back_at, victim_allows)
    result.recovery_s = None if first is None else back_at - killed_at + first
    result.checks["the shard was restarted (new incarnation)"] = new_start > old_start
    result.checks["pre-kill proofs were replayed after the restart"] = len(replays) > 0
    if others:
        during = [
            o
            for o in outcomes
            if o.subject in others
            and not o.replay
            and killed_at <= o.sent
            and o.done <= killed_at + (result.recovery_s or BOUND_S)
        ]
        result.checks["agents on the other shard kept being allowed"] = any(
            o.allowed for o in during
        )
        result.notes.append(
            f"other shard while the killed one recovered: {sum(o.allowed for o in during)}"
            f" allowed of {len(during)}"
        )
    start = min(o.sent for o in outcomes)
    result.notes.append(
        f"killed at +{killed_at - start:.2f} s, Ray ran the new incarnation at"
        f" +{back_at - start:.2f} s"
    )
    result.notes.append(
        f"killed agentauth-shard-{victim}; {len(replays)} proofs it allowed before the kill"
        f" replayed after the restart: reasons {sorted({r.reason for r in replays})}"
    )
    return result
