"""Verification traffic with fresh DPoP proofs, replays mixed in, every answer recorded.

A ``Subject`` is an agent with an approved grant and an access token, created through the
registry's HTTP API by the tests' ``World`` driver (a human with a software passkey). The
``Traffic`` driver runs a few concurrent workers against ``POST /verifier/v1/verify``; each
answer becomes an ``Outcome`` with monotonic send/receive times, so an experiment can ask
what was decided before, during and after its fault window.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
from registry_world import Agent, Provider, World

from agentauth.actors import shard_for
from agentauth.protocol import Capability, create_dpop_proof

__all__ = [
    "API",
    "READ",
    "Outcome",
    "Subject",
    "Traffic",
    "audit_rows_missing",
    "make_subjects",
    "summarize",
]

API = "https://api.example/v1/things"
READ = {"kind": "read", "resource": "things/1"}


@dataclass
class Subject:
    agent: Agent
    provider: Provider
    grant_id: str
    token: str
    shard: int

    def body(self, *, skew: float = 0.0) -> dict[str, Any]:
        """A verify request with a fresh proof; ``skew`` shifts the agent's clock."""
        proof = create_dpop_proof(
            self.agent.key, htm="GET", htu=API, now=time.time() + skew, access_token=self.token
        )
        return {"token": self.token, "proof": proof, "method": "GET", "url": API, "action": READ}


async def make_subjects(world: World, count: int, shards: int) -> list[Subject]:
    """``count`` agents of one human, each with a read grant at one provider, and a token."""
    human = await world.human("Chaos")
    provider = await world.provider()
    subjects = []
    for _ in range(count):
        agent = await world.agent(human)
        request = await world.request(
            agent, provider, capabilities=[Capability.read("things/*").to_document()]
        )
        grant = await world.approve(human, request["id"])
        subjects.append(await refresh_token(world, agent, provider, grant["id"], shards))
    return subjects


async def refresh_token(
    world: World, agent: Agent, provider: Provider, grant_id: str, shards: int
) -> Subject:
    r = await world.token(agent, grant_id)
    if r.status_code != 200:
        raise RuntimeError(f"token issuance failed: {r.status_code} {r.text}")
    token = r.json()["access_token"]
    return Subject(agent, provider, grant_id, token, shard_for(agent.id, shards))


@dataclass
class Outcome:
    sent: float  # time.monotonic() when the request left
    done: float  # ... and when its answer (or error) arrived
    subject: int  # index into the subjects list
    replay: bool  # a proof that was already allowed once
    status: int | None  # HTTP status; None for a transport error or timeout
    decision: str | None  # "allow" | "deny" | None (no decision: an error)
    reason: str  # the deny reason, "ok", or the error's kind
    audit_event: str | None = None
    label: str = ""  # free tag (e.g. the skew of the proof)
    detail: str = ""  # for errors: the start of the response body

    @property
    def allowed(self) -> bool:
        return self.decision == "allow"


@dataclass
class Traffic:
    """Workers posting verifications until ``stop()``; ``outcomes`` grows as answers arrive.

    Every ``replay_every``-th request of a worker re-sends a proof that was allowed before
    (a replay: it must be denied, whatever is broken). ``pace`` is the pause between one
    worker's requests: a few dozen requests a second in all keeps the two shared cores
    usable for the stack itself.
    """

    client: httpx.AsyncClient
    url: str
    subjects: list[Subject]
    concurrency: int = 4
    pace: float = 0.05
    replay_every: int = 8
    timeout: float = 5.0
    outcomes: list[Outcome] = field(default_factory=list)
    # Every fresh proof that was allowed, with its outcome: the replay material.
    allowed: list[tuple[Outcome, dict[str, Any]]] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> Traffic:
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.concurrency)]
        return self

    def allowed_bodies(self) -> list[tuple[Outcome, dict[str, Any]]]:
        return list(self.allowed)

    async def stop(self) -> list[Outcome]:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.outcomes

    async def _worker(self, worker: int) -> None:
        for n in itertools.count(1):
            if self._stop.is_set():
                return
            index = (worker + n) % len(self.subjects)
            replay = bool(self.replay_every and n % self.replay_every == 0 and self.allowed)
            if replay:
                # The most recent allowed proofs: young enough that only the jti window
                # (not the 60 s iat window) stands between them and a second allow.
                previous, body = self.allowed[-1 - (n % min(len(self.allowed), 8))]
                index = previous.subject
            else:
                body = self.subjects[index].body()
            outcome = await post(
                self.client, self.url, self.subjects[index], body, timeout=self.timeout
            )
            outcome.subject, outcome.replay = index, replay
            self.outcomes.append(outcome)
            if outcome.allowed and not replay:
                self.allowed.append((outcome, body))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.pace)


async def post(
    client: httpx.AsyncClient,
    url: str,
    subject: Subject,
    body: dict[str, Any],
    *,
    timeout: float = 5.0,
    label: str = "",
) -> Outcome:
    """One verification; transport errors and 5xx become outcomes, not exceptions."""
    sent = time.monotonic()
    common: dict[str, Any] = {"sent": sent, "subject": 0, "replay": False, "label": label}
    try:
        r = await client.post(
            url + "/v1/verify", headers=subject.provider.headers, json=body, timeout=timeout
        )
    except httpx.HTTPError as exc:
        return Outcome(
            done=time.monotonic(), status=None, decision=None, reason=type(exc).__name__, **common
        )
    done = time.monotonic()
    if r.status_code != 200:
        # Keep the start of the body: which component answered (the app's JSON error, a
        # proxy's page) is what explains an error.
        return Outcome(
            done=done,
            status=r.status_code,
            decision=None,
            reason=f"http_{r.status_code}",
            detail=r.text[:120],
            **common,
        )
    try:
        answer = r.json()
        decision, reason = answer["decision"], answer["reason"]
    except (ValueError, KeyError, TypeError):
        return Outcome(
            done=done, status=200, decision=None, reason="bad_answer", detail=r.text[:120], **common
        )
    return Outcome(
        done=done,
        status=200,
        decision=decision,
        reason=reason,
        audit_event=answer.get("audit_event"),
        **common,
    )


def summarize(outcomes: list[Outcome]) -> dict[str, Counter[str]]:
    """Counts by decision: allow, deny by reason, error by kind."""
    counts: dict[str, Counter[str]] = {"allow": Counter(), "deny": Counter(), "error": Counter()}
    for o in outcomes:
        counts[o.decision or "error"][o.reason] += 1
    return counts


async def audit_rows_missing(conn: Any, outcomes: list[Outcome]) -> list[Outcome]:
    """Allows whose audit event is not a committed ``verify.allow`` row: each is a fail-open.

    The verifier promises no allow leaves before its audit row is committed; an allow with
    no event id, a missing row or a row saying anything but ``verify.allow`` breaks it.
    """
    allows = [o for o in outcomes if o.allowed]
    keyed: dict[tuple[str, int], Outcome] = {}
    missing = []
    for o in allows:
        chain, _, seq = (o.audit_event or "").partition(":")
        if not chain or not seq.isdigit():
            missing.append(o)
        else:
            keyed[(chain, int(seq))] = o
    if keyed:
        rows = await conn.fetch(
            "SELECT e.chain, e.seq FROM audit_events e"
            " JOIN unnest($1::text[], $2::bigint[]) AS k(chain, seq)"
            " ON e.chain = k.chain AND e.seq = k.seq WHERE e.event = 'verify.allow'",
            [c for c, _ in keyed],
            [s for _, s in keyed],
        )
        for row in rows:
            keyed.pop((row["chain"], row["seq"]), None)
        missing.extend(keyed.values())
    return missing


async def allows_nobody_got(
    conn: Any, subjects: list[Subject], outcomes: list[Outcome]
) -> tuple[int, int]:
    """Allows on the chains, for these subjects' grants, that no client was answered with,
    and how many of them carry a ``verify.void`` (docs/verifier.md: a shard call that
    overran). Not a fail-open (nothing got through); the chain and the answers disagree.
    """
    rows = await conn.fetch(
        "SELECT chain, seq, event, body FROM audit_events WHERE grant_id = ANY($1::text[])"
        " AND event IN ('verify.allow', 'verify.void')",
        [s.grant_id for s in subjects],
    )
    allows = {f"{r['chain']}:{r['seq']}" for r in rows if r["event"] == "verify.allow"}
    voided = {
        json.loads(r["body"])["data"].get("voids") for r in rows if r["event"] == "verify.void"
    }
    nobody = allows - {o.audit_event for o in outcomes if o.allowed}
    return len(nobody), len(nobody & voided)
