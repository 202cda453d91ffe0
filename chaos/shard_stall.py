"""Stop a state shard's process (SIGSTOP) under load for a few seconds, then let it go on.

A hung shard, unlike a dead one, keeps its link open: nothing tells a replica it is gone,
only that its calls do not come back. Each replica must then deny that shard's agents
within its timeout (the fail-closed bound), keep deciding for the other shard, and, when
the shard runs again, take its late answers without handing them to anyone: the allows
the shard decided for calls that had already been denied must be voided on its chain.

Fail-open here: an allow answered while the shard was stopped for one of its agents (it
could not have decided it), a replay allowed, an allow without its committed audit row.
Recovery: from SIGCONT to the first allow on the stalled shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import ray

from ._context import Context, first_allow_after
from ._report import Result

NAME = "shard_stall"
HYPOTHESIS = (
    "SIGSTOP of the shard that owns an agent, for 4 s under load (hung, not dead: its link "
    "stays open): its agents are denied state_timeout, fast (p99 < 50 ms), agents on the "
    "other shard keep being allowed; after SIGCONT the shard answers again by itself, and "
    "every allow it decided for a call already denied is voided on its chain; no replay is "
    "allowed and every allow has its audit row."
)
BOUND_S = 10.0
STALL_S = 4.0  # under the replicas' call_timeout (5 s), so the link is not torn down


def _pid(shard: object) -> int:
    return int(ray.get(shard.__ray_call__.remote(lambda _: os.getpid())))  # type: ignore[attr-defined]


async def run(ctx: Context) -> Result:
    result = Result(NAME, HYPOTHESIS, recovery_bound_s=BOUND_S)
    result.recovery_what = "SIGCONT -> first allow on the stalled shard"
    subjects = await ctx.subjects(2)
    victim = subjects[0].shard
    on_victim = {i for i, s in enumerate(subjects) if s.shard == victim}
    others = {i for i, s in enumerate(subjects) if s.shard != victim}
    handle = ray.get_actor(f"agentauth-shard-{victim}", namespace="agentauth")
    pid = await asyncio.to_thread(_pid, handle)
    traffic = ctx.traffic(subjects)
    await asyncio.sleep(3.0)

    stopped_at = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(STALL_S)
    finally:
        os.kill(pid, signal.SIGCONT)
    resumed_at = time.monotonic()

    async def recovered() -> bool:
        return (
            first_allow_after(traffic.outcomes, resumed_at, lambda o: o.subject in on_victim)
            is not None
        )

    with contextlib.suppress(TimeoutError):
        await ctx.stack.wait_until(recovered, timeout=BOUND_S, interval=0.25)
    await asyncio.sleep(2.0)  # the late answers' voids reach the chain meanwhile
    outcomes = await traffic.stop()

    ctx.fill(result, outcomes)
    # A stopped process decides nothing: an allow sent after the stop (plus a moment for
    # a call the shard had already answered) and answered before SIGCONT came from nowhere.
    result.fail_opens["allow for the stopped shard while it was stopped"] = sum(
        1
        for o in outcomes
        if o.allowed
        and o.subject in on_victim
        and o.sent > stopped_at + 0.1
        and o.done < resumed_at
    )
    result.fail_opens["allow without its audit row"] = await ctx.missing_audit_rows(outcomes)
    conn = await ctx.stack.db()
    try:
        from ._traffic import allows_nobody_got  # noqa: PLC0415 - as in _context

        nobody, voided = await allows_nobody_got(conn, subjects, outcomes)
    finally:
        await conn.close()
    result.notes.append(f"allows on the chain that no client got: {nobody}, {voided} voided")
    result.checks["every allow on the chain that no client got is voided"] = nobody == voided
    result.recovery_s = first_allow_after(outcomes, resumed_at, lambda o: o.subject in on_victim)
    stalled = [
        o for o in outcomes if o.subject in on_victim and stopped_at + 0.1 < o.sent < resumed_at
    ]
    reasons = sorted({o.reason for o in stalled if not o.allowed})
    result.checks["the stalled shard's agents were denied state_timeout"] = bool(stalled) and (
        reasons == ["state_timeout"]
    )
    during = [o for o in outcomes if o.subject in others and stopped_at < o.sent < resumed_at]
    result.checks["agents on the other shard kept being allowed"] = any(o.allowed for o in during)
    result.notes.append(
        f"stopped agentauth-shard-{victim} (pid {pid}) for {resumed_at - stopped_at:.2f} s;"
        f" its agents meanwhile: {len(stalled)} requests, denied {reasons};"
        f" the other shard: {sum(o.allowed for o in during)} allowed of {len(during)}"
    )
    return result
