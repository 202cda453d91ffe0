"""Stop the embedded PostgreSQL (pg_ctl stop, fast mode) under load; start it again.

PostgreSQL is where every decision's audit row must be committed before an allow may
leave, so with it down the only honest answer is a deny: ``audit_unavailable`` from the
shards, ``revocation_state_stale`` once the revocation poll (every 250 ms, from PostgreSQL)
is more than 1 s old, ``dependency_unavailable`` on a grant-status cache miss.

Fail-open here: an allow for a request sent after the server had stopped and answered
before it started again (no commit was possible); an allow, at any time, whose audit row
is not in PostgreSQL afterwards; a replayed proof allowed. Recovery: from PostgreSQL
accepting connections again to the first allow of a fresh proof, with no component
restarted by hand (the pools must reconnect by themselves).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from ._context import Context, first_allow_after, in_window
from ._report import Result

NAME = "postgres_down"
HYPOTHESIS = (
    "With PostgreSQL stopped nothing can be committed, so every verification is denied "
    "(audit_unavailable / revocation_state_stale / dependency_unavailable) and no token is "
    "issued; after it restarts on the same socket the replicas' and shards' pools reconnect "
    "and allows resume within seconds; every allow received has its committed audit row."
)
DOWN_S = 5.0
BOUND_S = 20.0
ALLOWED_REASONS = {"audit_unavailable", "revocation_state_stale", "dependency_unavailable"}


async def run(ctx: Context) -> Result:
    result = Result(NAME, HYPOTHESIS, recovery_bound_s=BOUND_S)
    result.recovery_what = "PostgreSQL back -> first allow"
    subjects = await ctx.subjects(2)
    s = subjects[0]
    traffic = ctx.traffic(subjects)
    await asyncio.sleep(3.0)

    stopping_at = time.monotonic()
    await asyncio.to_thread(ctx.stack.stop_postgres)
    stopped_at = time.monotonic()
    await asyncio.sleep(1.0)
    r = await ctx.world.token(s.agent, s.grant_id)
    outage_token = r.status_code
    await asyncio.sleep(max(0.0, stopped_at + DOWN_S - time.monotonic()))
    start_began = time.monotonic()
    await asyncio.to_thread(ctx.stack.start_postgres)
    started_at = time.monotonic()

    async def recovered() -> bool:
        return first_allow_after(traffic.outcomes, started_at) is not None

    with contextlib.suppress(TimeoutError):
        await ctx.stack.wait_until(recovered, timeout=BOUND_S, interval=0.2)
    await asyncio.sleep(2.0)
    outcomes = await traffic.stop()

    ctx.fill(result, outcomes)
    down = in_window(outcomes, stopped_at, start_began)
    result.fail_opens["allow while PostgreSQL was down"] = sum(o.allowed for o in down)
    result.fail_opens["token issued while PostgreSQL was down"] = int(outage_token == 200)
    result.fail_opens["allow without its audit row"] = await ctx.missing_audit_rows(outcomes)
    await ctx.note_allows_nobody_got(result, subjects, outcomes)
    result.recovery_s = first_allow_after(outcomes, started_at)
    result.checks["requests were decided while PostgreSQL was down"] = len(down) > 0
    unexpected = sorted({o.reason for o in down if o.reason not in ALLOWED_REASONS})
    result.checks["every answer while down is a fail-closed deny"] = not unexpected
    slowest = max((o.done - o.sent for o in down), default=0.0)
    result.notes.append(
        f"stop took {stopped_at - stopping_at:.2f} s, start {started_at - start_began:.2f} s;"
        f" {len(down)} answers while down, slowest {slowest * 1000:.0f} ms"
        + (f"; unexpected reasons {unexpected}" if unexpected else "")
    )
    result.notes.append(f"token request while down: HTTP {outage_token}")
    return result
