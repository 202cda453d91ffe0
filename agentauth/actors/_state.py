"""Per-agent state of one shard, pure: replay windows, usage per grant, one-time step-ups.

``ShardState.decide`` is the atomic check-and-reserve for one verification; the actor
around it (``_shard.py``) feeds it batches in order and persists what it decided.
Time is an argument; nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from ..protocol import Action, DPoPPolicy, Envelope, Remaining, UsageState, evaluate

__all__ = ["ANY_ALLOW", "Check", "Outcome", "ShardState"]

# ``Check.voids`` value for "this proof's allow, if the shard committed one": sent for checks
# whose call never answered, so the replica never learnt their event ids.
ANY_ALLOW = "*"


@dataclass(frozen=True, slots=True)
class Check:
    """The stateful half of one verification, sent by a verifier replica to the shard.

    ``deny`` set means the verifier already refused (bad token, revoked...): the shard only
    records the decision in its audit chain. ``voids`` (with ``deny``) names an allow of
    this shard's chain (``chain:seq``) whose client was answered ``deny`` instead, its call
    having overrun: the shard records a ``verify.void`` event for it. ``ANY_ALLOW`` asks the
    shard to find the allow of this check's proof (``jti``) itself; with none, it records
    the denial.
    """

    agent_id: str
    provider_id: str
    grant_id: str | None = None
    jkt: str | None = None
    jti: str | None = None
    iat: float = 0.0
    action: Action | None = None
    envelope: Envelope | None = None
    step_up_ref: str | None = field(default=None, repr=False)  # one-time: the agent's to spend
    step_up_valid: bool = False
    token_jti: str | None = None
    deny: str | None = None
    voids: str | None = None

    def voiding(self, answer: str, event: str | None) -> Check:
        """The record that this check's allow (``event``, or ``ANY_ALLOW``) reached no
        client, which was told ``answer``. It keeps what names the request (agent, grant,
        action, proof jti) and drops the envelope, which nothing decides on again."""
        return dataclasses.replace(self, deny=answer, voids=event, envelope=None)


@dataclass(frozen=True, slots=True)
class Outcome:
    allowed: bool
    reason: str
    remaining: Remaining | None = None
    retry_after: float | None = None
    usage: UsageState | None = None


# One grant's usage (UsageState's two fields) and when it was last decided on, as a tuple
# of tuples of floats, strings and Decimals: the collector stops tracking such tuples once
# collections have seen them (one per level of nesting), so the grants a shard holds add
# nothing to a full collection's pause. (With an object and its UsageState per grant,
# 100,000 grants made a full collection take 34 ms here, most of the verifier's 40 ms
# shard timeout: every check waiting on the shard meanwhile would have been denied.)
_Entry = tuple[tuple[float, ...], tuple[tuple[str, Decimal], ...], float]


@dataclass
class ShardState:
    """One shard's memory. ``started_at`` is when this incarnation began.

    ``replay_floor``: proofs issued at or before it are refused, because a writer whose
    jti window is not here (a previous incarnation, another writer on the chain) may have
    seen them; 0 for a new chain. The actor sets it from the chain (see _shard.py).
    ``newest_reserved``: the latest ``iat`` among the proofs this incarnation has reserved,
    which its commits record so that the next incarnation's floor can be exactly that.
    """

    started_at: float
    replay_floor: float = 0.0
    newest_reserved: float = 0.0
    policy: DPoPPolicy = field(default_factory=DPoPPolicy)
    # replay key (see _replay_key) -> time after which the proof can no longer verify, so
    # may be forgotten. Plain strings and floats only: such a dict is not tracked by the
    # garbage collector, so tens of thousands of live jtis add nothing to a GC pause. Its
    # order is arrival order, which is expiry order give or take the clock skew proofs may
    # carry: pruning takes expired entries off the front instead of scanning them all. (A
    # separate queue in that order held the same entries again, and a full collection had
    # to walk it: 5 ms for 110,000 entries here.)
    jtis: dict[str, float] = field(default_factory=dict)
    # In order of last use (an allow moves its grant to the back), so eviction takes idle
    # grants off the front instead of copying the whole map every prune (12 ms for 100,000
    # grants here, with every check on the shard waiting).
    grants: dict[str, _Entry] = field(default_factory=dict)
    # Spent step-up references -> when they may be forgotten: with the proof that spent
    # them, pruned the same way. The durable guard is verifier_step_up_uses: the shard
    # looks every batch's references up there before deciding, and its primary key fails
    # a commit that would spend one twice. This map covers what that table cannot hold
    # yet: a second use in the same batch, and uses whose commit failed.
    used_refs: dict[str, float] = field(default_factory=dict)

    def knows(self, grant_id: str, fresh_since: float = float("-inf")) -> bool:
        """Whether the grant's usage is here, used (or restored) at ``fresh_since`` or
        later (Unix time)."""
        entry = self.grants.get(grant_id)
        return entry is not None and entry[2] >= fresh_since

    def usage(self, grant_id: str) -> UsageState | None:
        entry = self.grants.get(grant_id)
        return None if entry is None else UsageState(entry[0], entry[1])

    def restore(self, grant_id: str, usage: UsageState, now: float) -> None:
        """Usage rebuilt from durable decisions (after a restart or an eviction)."""
        self.grants.pop(grant_id, None)
        self.grants[grant_id] = (usage.recent, usage.spend, now)

    def spent_elsewhere(self, refs: Iterable[str], now: float) -> None:
        """Step-up references the durable record says are spent: refused like those spent
        here, and kept as long."""
        until = now + self.policy.max_age + self.policy.future_skew
        for ref in refs:
            self.used_refs.setdefault(ref, until)

    def decide(self, check: Check, now: float) -> Outcome:
        """Check and reserve, atomically: replay, one-time step-up, envelope."""
        if check.deny is not None:
            return Outcome(False, check.deny)
        if check.jkt is None or check.jti is None or check.grant_id is None:
            return Outcome(False, "malformed_check")
        if check.action is None or check.envelope is None:
            return Outcome(False, "malformed_check")
        # The verifier checked the proof's age on its own clock; this window and the replay
        # floor below are kept on this one. By this clock, too, a proof must be within its
        # age: otherwise, with the two clocks apart by more than the skew, a replay could
        # outlive its jti entry, or a proof from the future pass a new incarnation's floor.
        if check.iat < now - self.policy.max_age:
            return Outcome(False, "invalid_dpop_proof:iat_too_old")
        if check.iat > now + self.policy.future_skew:
            return Outcome(False, "invalid_dpop_proof:iat_in_future")
        # A proof the previous incarnation may have accepted: its jti window is lost.
        if check.iat <= self.replay_floor:
            return Outcome(False, "shard_restarted")
        key = _replay_key(check.jkt, check.jti)
        if key in self.jtis:
            return Outcome(False, "replay_detected")
        # Reserved whatever the outcome: a proof is single-use even when denied.
        expires = check.iat + self.policy.max_age + self.policy.future_skew
        self.jtis[key] = expires
        # Only here, past the age checks: a proof dated far ahead, refused above, must not
        # move the next incarnation's floor (and deny every agent of the shard) with it.
        self.newest_reserved = max(self.newest_reserved, check.iat)
        if check.step_up_ref is not None and (
            not check.step_up_valid or check.step_up_ref in self.used_refs
        ):
            return Outcome(False, "step_up_invalid")
        usage = self.usage(check.grant_id) or UsageState()
        decision = evaluate(
            check.envelope,
            usage,
            check.action,
            now=now,
            step_up_approved=check.step_up_ref is not None,
        )
        if not decision.allowed:
            return Outcome(False, decision.reason, decision.remaining, decision.retry_after)
        self.grants.pop(check.grant_id, None)
        self.grants[check.grant_id] = (decision.state.recent, decision.state.spend, now)
        if check.step_up_ref is not None:
            self.used_refs[check.step_up_ref] = expires
        return Outcome(True, "ok", decision.remaining, None, decision.state)

    def prune(self, now: float, *, idle_grants_after: float) -> None:
        """Forget what can no longer matter: expired jtis and step-up references, grants
        idle for a while.

        An evicted grant is rebuilt from the audit log when next seen, so eviction trades
        memory for one query, never correctness.
        """
        _drop_expired(self.jtis, now)
        _drop_expired(self.used_refs, now)
        # Last-use order is time order: the shard's decision times never go back. (If they
        # did, an idle grant behind a fresher one would only be evicted later.)
        idle = []
        for grant_id, entry in self.grants.items():
            if now - entry[2] < idle_grants_after:
                break
            idle.append(grant_id)
        for grant_id in idle:
            del self.grants[grant_id]

    def memory_bytes(self) -> int:
        """A rough deep size of the state, for the bytes-per-agent report."""
        total = sys.getsizeof(self.jtis) + sys.getsizeof(self.grants)
        total += sys.getsizeof(self.used_refs)
        for key in itertools.chain(self.jtis, self.used_refs):
            # the key, its float, and its slot in the dict (hash, key and value pointers)
            total += sys.getsizeof(key) + 24 + 24
        for grant_id, (recent, spend, _) in self.grants.items():
            total += sys.getsizeof(grant_id) + 64 + _usage_bytes(recent, spend)
        return total


def _drop_expired(window: dict[str, float], now: float) -> None:
    """Take the expired front off ``window``, a map to expiry times in arrival order."""
    expired = []
    # An entry stuck behind a later-expiring one (a proof with an earlier iat that arrived
    # later) waits for the next prune: at most the clock skew longer.
    for key, expires in window.items():
        if expires >= now:
            break
        expired.append(key)
    for key in expired:
        del window[key]


def _replay_key(jkt: str, jti: str) -> str:
    # Length-prefixed so that no two (jkt, jti) pairs share a key.
    return f"{len(jkt)}:{jkt}{jti}"


def _usage_bytes(recent: tuple[float, ...], spend: tuple[tuple[str, Decimal], ...]) -> int:
    # the entry's 3-tuple is counted by the caller (64 bytes)
    total = sys.getsizeof(recent) + 24 * len(recent) + sys.getsizeof(spend)
    for pair in spend:
        total += sys.getsizeof(pair) + sys.getsizeof(pair[0]) + sys.getsizeof(pair[1])
    return total


def usage_to_json(usage: UsageState) -> dict[str, Any]:
    """The durable part of usage kept in each allow event: the spend buckets."""
    return {"spend": [[key, format(amount, "f")] for key, amount in usage.spend]}


def usage_from_events(spend_doc: dict[str, Any] | None, recent: list[float]) -> UsageState:
    spend = tuple((k, Decimal(v)) for k, v in (spend_doc or {}).get("spend", []))
    return UsageState(recent=tuple(sorted(recent)), spend=spend)
