"""Kill redis-server (SIGKILL) under load, keep it down, start it again (empty).

The verifier needs Redis for the revocation channel: without a live channel it cannot know
a grant was not revoked a moment ago, so it must deny (``revocation_state_stale``). The
registry needs Redis for its DPoP replay cache (``SET NX`` per proof): without it, no
DPoP-authenticated call may succeed.

Fail-open here: an allow for a request sent more than the detection bound (1.5 s: the
pub/sub ping timeout of 0.5 s plus the 1 s staleness limit, verifier.md) after Redis was
dead and answered before the restart began (allows inside that bound are reported, with
their timing: the design accepts revocation data up to 1 s old); a token issued while
Redis was down; a replayed proof allowed (at the verifier, or at the registry once Redis is
back without its memory); an allow without its audit row. Recovery: from Redis accepting
connections again to the first allow of a fresh proof.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

from ._context import Context, first_allow_after, in_window
from ._report import Result
from ._traffic import Outcome, Subject

NAME = "redis_down"
HYPOTHESIS = (
    "With Redis killed, every verification is denied (revocation_state_stale, answered in "
    "< 1 s) once the loss is detected (bound 1.5 s), the registry issues no token (its "
    "replay cache is gone), and nothing is allowed until Redis is back; a grant revoked "
    "during the outage (its pub/sub message lost) stays denied afterwards; after the "
    "restart (empty) allows resume by themselves within seconds, and no proof used before "
    "the outage can be replayed, at the verifier or at the registry."
)
DETECTION_S = 1.5
DOWN_S = 6.0
BOUND_S = 15.0


async def _token(ctx: Context, subject: Subject, proof: str) -> int:
    """POST /v1/token with the given DPoP proof; the HTTP status."""
    r = await ctx.client.post(
        ctx.world.url("/v1/token"), headers={"DPoP": proof}, json={"grant_id": subject.grant_id}
    )
    return r.status_code


async def run(ctx: Context) -> Result:
    result = Result(NAME, HYPOTHESIS, recovery_bound_s=BOUND_S)
    result.recovery_what = "Redis back -> first allow"
    subjects = await ctx.subjects(2)
    s = subjects[0]
    traffic = ctx.traffic(subjects)
    await asyncio.sleep(3.0)

    # A registry call whose proof we will replay after Redis comes back without its memory.
    used_proof = ctx.world.proof(s.agent.key, "POST", "/v1/token")
    first_token = await _token(ctx, s, used_proof)

    killed_at = time.monotonic()
    await asyncio.to_thread(ctx.stack.redis.kill)
    dead_at = time.monotonic()  # SIGKILL delivered and the process reaped
    await asyncio.sleep(DETECTION_S + 0.5)
    outage_tokens = await asyncio.gather(
        *(_token(ctx, s, ctx.world.proof(s.agent.key, "POST", "/v1/token")) for _ in range(3))
    )
    # A revocation while Redis is down: the row commits, the pub/sub message is lost; the
    # verifiers must still learn it (they poll the table) before they allow anything again.
    revoked = subjects[-1]
    r = await ctx.client.post(
        ctx.world.url("/v1/revocations"),
        headers=revoked.agent.owner.headers,
        json={"kind": "grant", "target": revoked.grant_id},
    )
    revocation_status, revoked_at = r.status_code, time.monotonic()
    revoked_index = len(subjects) - 1
    await asyncio.sleep(max(0.0, killed_at + DOWN_S - time.monotonic()))
    restart_began = time.monotonic()
    await asyncio.to_thread(ctx.stack.redis.start)
    restarted_at = time.monotonic()

    def not_revoked(o: Outcome) -> bool:
        return o.subject != revoked_index

    async def recovered() -> bool:
        return first_allow_after(traffic.outcomes, restarted_at, not_revoked) is not None

    with contextlib.suppress(TimeoutError):
        await ctx.stack.wait_until(recovered, timeout=BOUND_S, interval=0.2)
    # Redis lost the registry's jti reservations with its memory: try the old proof again.
    replayed_token = await _token(ctx, s, used_proof)
    await asyncio.sleep(2.0)
    outcomes = await traffic.stop()

    ctx.fill(result, outcomes)
    down = in_window(outcomes, dead_at + DETECTION_S, restart_began)
    grace = [o for o in in_window(outcomes, killed_at, restart_began) if o not in down]
    grace_allows = [o for o in grace if o.allowed]
    result.fail_opens["allow while Redis was down (after the detection bound)"] = sum(
        o.allowed for o in down
    )
    result.fail_opens["token issued while Redis was down"] = sum(c == 200 for c in outage_tokens)
    result.fail_opens["registry accepted a pre-outage DPoP proof again after the restart"] = int(
        replayed_token == 200
    )
    # The design's bound for a revocation to reach every replica: one second.
    result.fail_opens["allow of the grant revoked during the outage"] = sum(
        1 for o in outcomes if o.subject == revoked_index and o.allowed and o.sent > revoked_at + 1
    )
    result.fail_opens["allow without its audit row"] = await ctx.missing_audit_rows(outcomes)
    await ctx.note_allows_nobody_got(result, subjects, outcomes)
    result.recovery_s = first_allow_after(outcomes, restarted_at, not_revoked)
    result.checks["the revocation was accepted while Redis was down"] = revocation_status == 200
    # After the restart: denied as revoked (or still stale while the listener reconnects).
    after = Counter(
        o.reason for o in outcomes if o.subject == revoked_index and o.sent >= restarted_at
    )
    result.checks["the revoked grant is denied 'revoked' after the restart"] = after[
        "revoked"
    ] > 0 and set(after) <= {"revoked", "replay_detected", "revocation_state_stale"}
    result.notes.append(f"the revoked grant after the restart: {dict(after)}")
    fresh_down = [o for o in down if not o.replay]
    result.checks["requests were decided while Redis was down"] = len(fresh_down) > 0
    result.checks["every denial while down says revocation_state_stale"] = all(
        o.reason == "revocation_state_stale" for o in down
    )
    slowest = max((o.done - o.sent for o in down), default=0.0)
    result.checks["answers while down were fast (< 1 s)"] = slowest < 1.0
    result.notes.append(
        f"{len(down)} answers while down, slowest {slowest * 1000:.0f} ms; in the "
        f"{DETECTION_S:g} s detection window: {len(grace_allows)} allowed of {len(grace)}"
        + (
            " (sent "
            + ", ".join(f"{(o.sent - dead_at) * 1000:+.0f} ms" for o in grace_allows)
            + " from the moment Redis was dead)"
            if grace_allows
            else ""
        )
    )
    result.notes.append(
        f"registry: token before the outage {first_token}, during it {sorted(outage_tokens)},"
        f" the pre-outage proof replayed after the restart {replayed_token}"
    )
    return result
