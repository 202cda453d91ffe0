"""Kill one of the two verifier replicas under load; Serve must replace it.

Fail-open here: a replayed proof allowed, or an allow whose audit row is not committed in
PostgreSQL. Requests in flight on the dying replica may fail (a 5xx or a dropped
connection): those are errors, never allows, and the provider would retry them.
Recovery: from the kill until Serve runs two replicas again and the last error is behind us.
"""

from __future__ import annotations

import asyncio
import time

import ray

from ._context import Context, first_allow_after
from ._report import Result

NAME = "replica_kill"
HYPOTHESIS = (
    "ray.kill of one verifier replica (of 2) under load costs at most the requests in flight "
    "on it (errors, never allows); the other replica keeps deciding, Serve starts a "
    "replacement within its health-check period, no replay is allowed and every allow has "
    "its committed audit row."
)
BOUND_S = 60.0


def _verifier_replicas() -> list[str]:
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::verifier#")
    )


async def run(ctx: Context) -> Result:
    result = Result(NAME, HYPOTHESIS, recovery_bound_s=BOUND_S)
    result.recovery_what = "kill -> 2 replicas running again and no more errors"
    subjects = await ctx.subjects(2)
    before = _verifier_replicas()
    traffic = ctx.traffic(subjects)
    await asyncio.sleep(3.0)

    victim = before[0]
    actor = ray.get_actor(victim, namespace="serve")
    killed_at = time.monotonic()
    # In a thread, as in shard_kill: this loop also times the traffic's answers.
    await asyncio.to_thread(ray.kill, actor, no_restart=True)

    async def replaced() -> bool:
        # A replica named anew (the replacement), the victim gone, and the controller
        # counting the full set as RUNNING: right after the kill it still counts the dead one.
        names = await asyncio.to_thread(_verifier_replicas)
        states = await asyncio.to_thread(ctx.stack.replica_states)
        return (
            victim not in names
            and bool(set(names) - set(before))
            and len(names) == ctx.stack.verifier_replicas
            and states.get("RUNNING", 0) == ctx.stack.verifier_replicas
        )

    try:
        await ctx.stack.wait_until(replaced, timeout=BOUND_S, interval=0.5)
        running_at: float | None = time.monotonic()
    except TimeoutError:
        running_at = None
    await asyncio.sleep(3.0)  # steady state after the replacement
    outcomes = await traffic.stop()

    ctx.fill(result, outcomes)
    result.fail_opens["allow without its audit row"] = await ctx.missing_audit_rows(outcomes)
    await ctx.note_allows_nobody_got(result, subjects, outcomes)
    # Requests in flight at the kill count too: they are the ones the dying replica drops.
    errors = [o for o in outcomes if o.decision is None and o.done >= killed_at]
    last_error = max((o.done for o in errors), default=killed_at)
    if running_at is not None:
        result.recovery_s = max(running_at, last_error) - killed_at
        result.notes.append(
            f"replacement replica running {running_at - killed_at:.2f} s after kill"
        )
    result.notes.append(
        f"errors in flight at or after the kill: {len(errors)}"
        f" ({sorted({o.reason for o in errors})}), the last {last_error - killed_at:.2f} s after it"
    )
    for o in errors:
        result.notes.append(
            f"error {o.reason} sent {o.sent - killed_at:+.3f} s from the kill {o.detail!r}"
        )
    took = first_allow_after(outcomes, killed_at)
    result.notes.append(
        "first allow after the kill: "
        + ("none" if took is None else f"{took:.3f} s (the surviving replica)")
    )
    result.notes.append(f"killed {victim}; replicas now {_verifier_replicas()}")
    return result
