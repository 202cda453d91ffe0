"""Checking an agent's audit trail in the page's server, with ``agentauth.protocol`` only.

The registry serves events, signed checkpoints, inclusion proofs and its audit key list
(every key it has signed checkpoints with, and when); nothing it says is taken on trust here:

- each event must be a well-formed audit event, and where the trail holds two neighbours
  of one chain (seq n and n+1) the later one must link to the earlier one's hash (an
  agent's events share their chains with other agents, so the rest of the links belong to
  events this human may not see);
- the latest checkpoint of each chain must carry a valid signature by a key of the audit
  key list, dated inside that key's signing window (the JWKS would not do: it drops a key
  once its tokens have expired, and a quiet chain's latest checkpoint may be older);
- an event's inclusion proof must lead from that very event (the same hash as listed) to
  the root of a checkpoint that verifies: then the event sits in the signed log at its place.

The checks are pure functions over documents; ``AuditTrail.fetch`` does the HTTP.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..protocol import (
    GENESIS_HASH,
    AgentAuthError,
    AuditEvent,
    AuditKeys,
    Checkpoint,
    KeySet,
    b64url_decode,
    canonical_json,
    check_checkpoint_dated,
    verify_inclusion,
)
from ._registry import RegistryClient, RegistryError

__all__ = [
    "AuditTrail",
    "ChainCheck",
    "InclusionCheck",
    "check_chains",
    "check_checkpoints",
    "check_inclusion",
    "parse_events",
]


@dataclass(frozen=True, slots=True)
class InclusionCheck:
    """Whether one event is proven to be in the signed log."""

    chain: str
    seq: int
    ok: bool | None  # None: not yet covered by a checkpoint
    detail: str
    tree_size: int | None = None
    kid: str | None = None


@dataclass(slots=True)
class ChainCheck:
    """What was checked of one chain the agent's events live in."""

    chain: str
    events: int = 0
    links_checked: int = 0
    checkpoint: Checkpoint | None = None
    checkpoint_kid: str | None = None
    problems: list[str] = field(default_factory=list)
    #: seq -> time_ms of the listed events, to check the checkpoint's date against
    times: dict[int, int] = field(default_factory=dict)

    @property
    def covered(self) -> int:
        """How many of this chain's listed events the latest checkpoint covers."""
        return 0 if self.checkpoint is None else self.checkpoint.size


def parse_events(documents: Iterable[Mapping[str, Any]]) -> tuple[list[AuditEvent], list[str]]:
    """Events as the registry lists them (JSON objects) back to ``AuditEvent``s."""
    events: list[AuditEvent] = []
    problems: list[str] = []
    for i, document in enumerate(documents):
        try:
            events.append(AuditEvent.from_canonical(canonical_json(dict(document))))
        except (AgentAuthError, ValueError, TypeError):
            problems.append(f"listed event #{i + 1} is not a well-formed audit event")
    return events, problems


def check_chains(events: Sequence[AuditEvent]) -> dict[str, ChainCheck]:
    """Per chain: every link between neighbouring listed events, and the genesis link."""
    checks: dict[str, ChainCheck] = {}
    by_chain: dict[str, list[AuditEvent]] = {}
    for event in events:
        by_chain.setdefault(event.chain, []).append(event)
    for chain, members in sorted(by_chain.items()):
        check = checks[chain] = ChainCheck(chain=chain, events=len(members))
        members.sort(key=lambda e: e.seq)
        seen: set[int] = set()
        for i, event in enumerate(members):
            check.times[event.seq] = event.time_ms
            if event.seq in seen:
                check.problems.append(f"{chain}: two different events claim seq {event.seq}")
            seen.add(event.seq)
            try:
                if event.seq == 0:
                    check.links_checked += 1
                    if b64url_decode(event.prev) != GENESIS_HASH:
                        check.problems.append(f"{chain}: event 0 does not start the chain")
                elif i > 0 and members[i - 1].seq == event.seq - 1:
                    check.links_checked += 1
                    if event.prev != members[i - 1].entry_hash_b64():
                        check.problems.append(
                            f"{chain}: event {event.seq} does not link to event {event.seq - 1}"
                        )
            except AgentAuthError as exc:  # odd bytes are a finding, not a crash
                check.problems.append(
                    f"{chain}: event {event.seq} cannot be checked ({exc.reason or exc.error})"
                )
    return checks


def _kid(signed: str) -> str | None:
    """The signing key's id, for display (the signature itself is checked elsewhere)."""
    try:
        parsed = json.loads(b64url_decode(signed.split(".", 1)[0]))
    except (ValueError, AgentAuthError):
        return None
    kid = parsed.get("kid") if isinstance(parsed, dict) else None
    return kid if isinstance(kid, str) else None


def check_checkpoints(
    checks: Mapping[str, ChainCheck],
    checkpoints: Iterable[Mapping[str, Any]],
    keys: KeySet,
    *,
    now: float | None = None,
) -> None:
    """Verify the latest signed checkpoint of each chain in ``checks`` (in place).

    With ``AuditKeys``, each must also be dated inside its key's signing window. Its date
    must not precede the newest listed event it covers, nor lie in the future when ``now``
    is given (``check_checkpoint_dated``).
    """
    audit_keys = AuditKeys.from_key_set(keys)
    latest = {str(c.get("chain")): c for c in checkpoints}
    for chain, check in checks.items():
        listed = latest.get(chain)
        if listed is None:
            continue  # no checkpoint yet: the events are awaiting one, not failing
        try:
            checkpoint = audit_keys.verify(listed.get("signed"))
        except AgentAuthError as exc:
            check.problems.append(
                f"{chain}: the latest checkpoint does not verify ({exc.reason or exc.error})"
            )
            continue
        if checkpoint.chain != chain or checkpoint.size != listed.get("size"):
            check.problems.append(f"{chain}: the checkpoint is signed for another chain or size")
            continue
        covered = [t for seq, t in check.times.items() if seq < checkpoint.size]
        try:
            check_checkpoint_dated(checkpoint, newest_event_ms=max(covered, default=None), now=now)
        except AgentAuthError as exc:
            check.problems.append(f"{chain}: the latest checkpoint: {exc.description}")
            continue
        check.checkpoint = checkpoint
        check.checkpoint_kid = _kid(str(listed.get("signed")))


def check_inclusion(event: AuditEvent, proof: Mapping[str, Any], keys: KeySet) -> InclusionCheck:
    """Check the registry's inclusion proof for ``event`` against its signed checkpoint."""
    chain, seq = event.chain, event.seq
    if proof.get("checkpoint") is None:
        return InclusionCheck(chain, seq, None, "not yet covered by a signed checkpoint")
    try:
        served = AuditEvent.from_canonical(str(proof.get("event")))
        if served.entry_hash() != event.entry_hash():
            return InclusionCheck(chain, seq, False, "the registry's copy differs from the list")
        checkpoint = AuditKeys.from_key_set(keys).verify(proof["checkpoint"])
        if checkpoint.chain != chain or proof.get("tree_size") != checkpoint.size:
            return InclusionCheck(chain, seq, False, "the proof names another checkpoint")
        path = proof.get("proof")
        if not isinstance(path, list):
            return InclusionCheck(chain, seq, False, "malformed proof")
        verify_inclusion(
            leaf_hash=event.entry_hash(),
            index=seq,
            tree_size=checkpoint.size,
            proof=[b64url_decode(str(h)) for h in path],
            root=checkpoint.root_bytes(),
        )
    except AgentAuthError as exc:
        return InclusionCheck(chain, seq, False, f"does not verify ({exc.reason or exc.error})")
    except (KeyError, TypeError, ValueError):
        return InclusionCheck(chain, seq, False, "malformed proof")
    return InclusionCheck(
        chain,
        seq,
        True,
        f"in the signed log: leaf {seq} of {checkpoint.size}, root {checkpoint.root[:12]}…",
        tree_size=checkpoint.size,
        kid=_kid(str(proof["checkpoint"])),
    )


@dataclass(slots=True)
class AuditTrail:
    """An agent's events with everything needed to check them, and the results."""

    agent_id: str
    documents: list[dict[str, Any]]
    events: list[AuditEvent]
    checkpoints: list[dict[str, Any]]
    audit_keys: dict[str, Any]
    chains: dict[str, ChainCheck]
    problems: list[str]
    inclusion: dict[tuple[str, int], InclusionCheck] = field(default_factory=dict)

    @classmethod
    async def fetch(
        cls, client: RegistryClient, token: str, agent_id: str, *, prove: int = 200
    ) -> AuditTrail:
        """Fetch and check an agent's trail; prove inclusion of up to ``prove`` events."""
        documents, checkpoints, audit_keys = await asyncio.gather(
            client.audit_events(token, agent_id=agent_id),
            client.checkpoints(token),
            client.audit_keys(),
        )
        events, problems = parse_events(documents)
        chains = check_chains(events)
        try:
            keys = AuditKeys.from_document(audit_keys)
        except AgentAuthError:
            keys = AuditKeys([])
            problems.append("the registry's audit key list is malformed")
        check_checkpoints(chains, checkpoints, keys, now=time.time())
        trail = cls(agent_id, documents, events, checkpoints, audit_keys, chains, problems)
        covered = [e for e in events if e.seq < chains[e.chain].covered][-prove:] if prove else []
        await trail.prove(client, token, covered, keys)
        return trail

    @property
    def keys(self) -> AuditKeys:
        try:
            return AuditKeys.from_document(self.audit_keys)
        except AgentAuthError:
            return AuditKeys([])

    async def prove(
        self,
        client: RegistryClient,
        token: str,
        events: Sequence[AuditEvent],
        keys: KeySet | None = None,
    ) -> None:
        """Fetch and check inclusion proofs for ``events`` (a few requests at a time)."""
        keys = keys if keys is not None else self.keys
        limit = asyncio.Semaphore(8)

        async def one(event: AuditEvent) -> None:
            async with limit:
                try:
                    proof = await client.audit_proof(token, event.chain, event.seq)
                except RegistryError as exc:
                    result = InclusionCheck(event.chain, event.seq, False, exc.message)
                else:
                    result = check_inclusion(event, proof, keys)
                self.inclusion[(event.chain, event.seq)] = result

        await asyncio.gather(*(one(e) for e in events))

    @property
    def all_problems(self) -> list[str]:
        found = list(self.problems)
        for check in self.chains.values():
            found += check.problems
        found += [f"{c.chain}:{c.seq} {c.detail}" for c in self.inclusion.values() if c.ok is False]
        return found

    @property
    def ok(self) -> bool:
        return not self.all_problems

    @property
    def links_checked(self) -> int:
        return sum(c.links_checked for c in self.chains.values())

    @property
    def proven(self) -> int:
        return sum(1 for c in self.inclusion.values() if c.ok)

    @property
    def awaiting_checkpoint(self) -> int:
        return sum(1 for e in self.events if e.seq >= self.chains[e.chain].covered)

    def export(self, *, now: float) -> dict[str, Any]:
        """Everything shown, as one JSON document anyone can re-check offline."""
        return {
            "format": "agentauth.audit-export.v1",
            "agent_id": self.agent_id,
            "exported_at": int(now),
            "events": self.documents,
            "checkpoints": [c for c in self.checkpoints if str(c.get("chain")) in self.chains],
            "audit_keys": self.audit_keys,
            "verification": {
                "ok": self.ok,
                "problems": self.all_problems,
                "links_checked": self.links_checked,
                "events_proven_included": self.proven,
                "events_awaiting_checkpoint": self.awaiting_checkpoint,
                "chains": {
                    chain: {
                        "events": c.events,
                        "links_checked": c.links_checked,
                        "checkpoint_size": c.covered,
                        "checkpoint_root": c.checkpoint.root if c.checkpoint else None,
                        "checkpoint_kid": c.checkpoint_kid,
                    }
                    for chain, c in self.chains.items()
                },
                "inclusion": [
                    {"chain": c.chain, "seq": c.seq, "ok": c.ok, "detail": c.detail}
                    for c in self.inclusion.values()
                ],
            },
        }
