"""Agents with skewed clocks: DPoP proofs whose ``iat`` is shifted by ±10 s and ±10 min.

The policy (``agentauth.protocol.DPoPPolicy``): a proof is accepted when
``now - max_age <= iat <= now + future_skew`` with ``max_age = 60`` and ``future_skew = 10``
(``iat`` is whole seconds, truncated). So:

    -10 min   deny  invalid_dpop_proof:iat_too_old
    -70 s     deny  invalid_dpop_proof:iat_too_old     (just outside the 60 s window)
    -10 s     allow                                    (well inside the 60 s window)
      0       allow
    +10 s     allow (the edge: int(t + 10) <= server now + 10 always holds)
    +20 s     deny  invalid_dpop_proof:iat_in_future   (just outside the 10 s skew)
    +10 min   deny  invalid_dpop_proof:iat_in_future

Fail-open here: any allow for a proof outside the window, or a replayed proof allowed (each
allowed skewed proof is sent a second time). There is no fault to remove, so no recovery
time; instead every ±10 s proof must be allowed.
"""

from __future__ import annotations

import asyncio

from ._context import Context
from ._report import Result
from ._traffic import Outcome, Subject

NAME = "clock_skew"
HYPOTHESIS = (
    "Proofs from clocks 10 s behind or ahead are allowed (60 s max age, 10 s future skew); "
    "10 min behind or ahead, and just outside the window (-70 s, +20 s), are denied with "
    "iat_too_old / iat_in_future; no skewed proof is ever allowed twice."
)
EXPECTED = {
    -600.0: "invalid_dpop_proof:iat_too_old",
    -70.0: "invalid_dpop_proof:iat_too_old",
    -10.0: "ok",
    0.0: "ok",
    10.0: "ok",
    20.0: "invalid_dpop_proof:iat_in_future",
    600.0: "invalid_dpop_proof:iat_in_future",
}
PER_SKEW = 40


async def _all_allowed(ctx: Context, subjects: list[Subject], skew: float) -> bool:
    answers = await asyncio.gather(*(ctx.verify(s, s.body(skew=skew)) for s in subjects))
    return all(a.allowed for a in answers)


async def run(ctx: Context) -> Result:
    result = Result(NAME, HYPOTHESIS)
    subjects = await ctx.subjects(2)
    # A shard restarted less than ~10 s ago (shard_kill, when run before this) still refuses
    # proofs from 10 s behind: its replay floor is its predecessor's newest proof, by design.
    # Wait that out so this experiment measures the iat policy alone.
    waited = await ctx.stack.wait_until(
        lambda: _all_allowed(ctx, subjects, -10.0), timeout=40, interval=1.0
    )
    if waited > 0.5:
        result.notes.append(f"waited {waited:.1f} s for a recent shard restart's replay floor")
    limit = asyncio.Semaphore(4)  # a few concurrent, like the other experiments

    async def one(subject: Subject, skew: float) -> list[Outcome]:
        async with limit:
            body = subject.body(skew=skew)
            first = await ctx.verify(subject, body, label=f"{skew:+g}")
            if not first.allowed:
                return [first]
            again = await ctx.verify(subject, body, label=f"{skew:+g}")
            again.replay = True
            return [first, again]

    outcomes: list[Outcome] = []
    for skew in EXPECTED:
        batches = await asyncio.gather(
            *(one(subjects[i % len(subjects)], skew) for i in range(PER_SKEW))
        )
        outcomes += [o for batch in batches for o in batch]

    ctx.fill(result, outcomes)
    fresh = [o for o in outcomes if not o.replay]
    outside = [o for o in fresh if EXPECTED[float(o.label)] != "ok"]
    result.fail_opens["allow of a proof outside the iat window"] = sum(o.allowed for o in outside)
    result.fail_opens["allow without its audit row"] = await ctx.missing_audit_rows(outcomes)
    for skew, expected in EXPECTED.items():
        mine = [o for o in fresh if float(o.label) == skew]
        reasons = sorted({o.reason for o in mine})
        ok = len(mine) == PER_SKEW and reasons == [expected]
        verdict = "allowed" if expected == "ok" else f"denied ({expected.split(':')[-1]})"
        result.checks[f"{skew:+g} s: all {PER_SKEW} {verdict}"] = ok
        if not ok:
            result.notes.append(f"{skew:+g} s: reasons {reasons}")
    return result
