"""Checking an agent's audit trail in the page's server, with ``agentauth.protocol`` only.

The registry serves events, signed checkpoints, inclusion proofs and its audit key list
(every key it has signed checkpoints with, and when); nothing it says is taken on trust here:

- each event must be a well-formed audit event, and where the trail holds two neighbours
  of one chain (seq n and n+1) the later one must link to the earlier one's hash (an
  agent's events share their chains with other agents, so the rest of the links belong to
  events this human may not see);
- the latest checkpoint of each chain must carry a valid signature by a key of the audit
  key list, dated inside that key's signing window (the JWKS would not do: it drops a key
  once its tokens have expired, and a quiet chain's latest checkpoint may be older; served
  in the list's place, a plain JWKS is refused: without windows it would let any date
  through), and dated neither before the newest listed event it covers nor in the future;
- it must also be the latest checkpoint an earlier visit of the same human verified
  (``seen``: size and root), or extend it, by the registry's consistency proof checked
  against both roots: a smaller one is a rollback, another root for the same size a fork;
- listed events no checkpoint covers must be younger than ``MAX_UNSEALED_AGE`` (the rule of
  ``agentauth audit verify``): older ones mean checkpoints withheld or deleted;
- an event's inclusion proof must lead from that very event (the same hash as listed) to
  the root of a checkpoint that verifies and is dated no earlier than the event; an event
  the latest checkpoint covers must have one. That checkpoint must be the chain's latest
  one, or be tied to it: one of the same size with another root is a fork, and one of
  another size must be consistent with it (the registry's consistency proof, checked
  against both roots as verified here). Then the event sits at its place in the history
  the latest checkpoint signs. A visit proves at most ``prove`` events (the newest); the
  other covered ones are ``unproven``, shown as such, and keep the trail from verifying
  completely (``complete``);
- an answer of the wrong shape (a list that is none, an entry that is no object, a body that
  is no JSON) is a problem, never an exception.

A visit reads the agent's newest ``most`` events (the registry's pages, newest first); an
older history is left unread, and the trail says so (``unread``), as it does when reading
stops on an error after the first page (``read_error``): either keeps it from verifying
completely. The checks above hold for any set of an agent's events, not only a whole
history: links are checked between shown neighbours only, each proof on its own, and the
dates against the shown events.

The checks are pure functions over documents (time and what earlier visits saw passed in);
``AuditTrail.fetch`` and ``AuditTrail.prove`` do the HTTP.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..protocol import (
    GENESIS_HASH,
    MAX_UNSEALED_AGE,
    AgentAuthError,
    AuditEvent,
    AuditKeys,
    Checkpoint,
    KeySet,
    b64url_decode,
    canonical_json,
    check_checkpoint_dated,
    verify_consistency,
    verify_inclusion,
)
from ._registry import AUDIT_PAGE_MAX, RegistryClient, RegistryError

__all__ = [
    "AuditTrail",
    "ChainCheck",
    "InclusionCheck",
    "Seen",
    "check_chains",
    "check_checkpoints",
    "check_consistency",
    "check_inclusion",
    "check_seen",
    "consistency_needed",
    "parse_events",
    "seen_consistency_needed",
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
    #: the checkpoint the proof leads to, when it verified (to tie it to the latest one)
    checkpoint: Checkpoint | None = None


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


def parse_events(documents: object) -> tuple[list[AuditEvent], list[str]]:
    """Events as the registry lists them (a list of JSON objects) back to ``AuditEvent``s;
    anything else it sends is a problem."""
    if not isinstance(documents, list):
        return [], ["the registry's event list is malformed (not a list)"]
    events: list[AuditEvent] = []
    problems: list[str] = []
    for i, document in enumerate(documents):
        try:
            if not isinstance(document, Mapping):  # dict() would take a list of pairs
                raise TypeError(document)
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


def _audit_keys(document: object) -> tuple[AuditKeys, str | None]:
    """The registry's audit key list, or no keys and the problem. A plain JWKS is refused:
    its keys have no signing windows, so served in its place it would let any checkpoint
    through whatever its date (a retired key's, one that leaked later, say)."""
    try:
        return AuditKeys.from_document(document, allow_jwks=False), None
    except AgentAuthError:
        if isinstance(document, dict) and "format" not in document:
            return AuditKeys([]), (
                "the registry serves a plain JWKS as its audit key list: keys without signing"
                " windows; no checkpoint is verified with it"
            )
        return AuditKeys([]), "the registry's audit key list is malformed"


def _kid(signed: str) -> str | None:
    """The signing key's id, for display (the signature itself is checked elsewhere)."""
    try:
        parsed = json.loads(b64url_decode(signed.split(".", 1)[0]))
    except (ValueError, AgentAuthError):
        return None
    kid = parsed.get("kid") if isinstance(parsed, dict) else None
    return kid if isinstance(kid, str) else None


def _check_sealed_in_time(check: ChainCheck, now: float | None) -> None:
    """A problem if the oldest listed event the latest checkpoint leaves out is older than
    ``MAX_UNSEALED_AGE`` at ``now`` (``agentauth audit verify``'s rule): the registry signs
    every chain that grew each few seconds, so its checkpoints were withheld or deleted."""
    waiting = {seq: t for seq, t in check.times.items() if seq >= check.covered}
    if now is None or not waiting:
        return
    age = now - min(waiting.values()) / 1000
    if age > MAX_UNSEALED_AGE:
        check.problems.append(
            f"{check.chain}: no checkpoint covers the listed events from {min(waiting)} on,"
            f" the oldest written {age:.0f} s ago (more than"
            f" {MAX_UNSEALED_AGE:.0f} s): checkpoints were withheld or removed, or the registry"
            " is not signing"
        )


def check_checkpoints(
    checks: Mapping[str, ChainCheck],
    checkpoints: object,
    keys: KeySet,
    *,
    now: float | None = None,
) -> list[str]:
    """Verify the latest signed checkpoint of each chain in ``checks`` (in place).

    With ``AuditKeys``, each must also be dated inside its key's signing window. Its date
    must not precede the newest listed event it covers, nor lie in the future when ``now``
    is given (``check_checkpoint_dated``). With ``now``, listed events that no checkpoint
    covers must also be younger than ``MAX_UNSEALED_AGE``. Returns the problems that belong
    to no chain (``checkpoints`` no list, or an entry of it that is no JSON object).
    """
    audit_keys = AuditKeys.from_key_set(keys)
    problems: list[str] = []
    latest: dict[str, Mapping[str, Any]] = {}
    if not isinstance(checkpoints, list):
        problems.append("the registry's checkpoint list is malformed")
        checkpoints = []  # each chain is then checked as one without a checkpoint
    for entry in checkpoints:
        if isinstance(entry, Mapping):
            latest[str(entry.get("chain"))] = entry
        elif not problems:
            problems.append("the registry's checkpoint list is malformed")
    for chain, check in checks.items():
        listed = latest.get(chain)
        if listed is None:
            _check_sealed_in_time(check, now)  # none yet: young events await one, old fail
            continue
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
        _check_sealed_in_time(check, now)
    return problems


def check_inclusion(
    event: AuditEvent,
    proof: object,
    keys: KeySet,
    *,
    latest: Checkpoint | None = None,
    now: float | None = None,
) -> InclusionCheck:
    """Check the registry's inclusion proof for ``event`` against its signed checkpoint.

    That checkpoint must be dated no earlier than the event (nor in the future, with
    ``now``). ``latest`` is the chain's latest checkpoint as verified
    (``ChainCheck.checkpoint``): an event it covers must come with a proof, and the proof's
    checkpoint must not be another of its size (a fork). One of another size is proven
    only once ``check_consistency`` has tied it to ``latest``.
    """
    chain, seq = event.chain, event.seq
    if not isinstance(proof, Mapping):
        return InclusionCheck(chain, seq, False, "malformed proof")
    if proof.get("checkpoint") is None:
        if latest is not None and seq < latest.size:
            # Not "awaiting a checkpoint": that would hide any event the registry rewrote.
            return InclusionCheck(
                chain,
                seq,
                False,
                f"no proof, yet the latest checkpoint (size {latest.size}) covers it",
            )
        return InclusionCheck(chain, seq, None, "not yet covered by a signed checkpoint")
    try:
        served = AuditEvent.from_canonical(str(proof.get("event")))
        if served.entry_hash() != event.entry_hash():
            return InclusionCheck(chain, seq, False, "the registry's copy differs from the list")
        checkpoint = AuditKeys.from_key_set(keys).verify(proof["checkpoint"])
        if checkpoint.chain != chain or proof.get("tree_size") != checkpoint.size:
            return InclusionCheck(chain, seq, False, "the proof names another checkpoint")
        try:  # a retired key that leaked could otherwise seal this event under an old date
            check_checkpoint_dated(checkpoint, newest_event_ms=event.time_ms, now=now)
        except AgentAuthError as exc:
            return InclusionCheck(chain, seq, False, f"its checkpoint: {exc.description}")
        if latest is not None and checkpoint.size == latest.size and checkpoint.root != latest.root:
            return InclusionCheck(
                chain,
                seq,
                False,
                f"a fork: its checkpoint and the latest both have size {latest.size}, with"
                " other roots",
            )
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
        checkpoint=checkpoint,
    )


def consistency_needed(result: InclusionCheck, latest: Checkpoint | None) -> tuple[int, int] | None:
    """The sizes (smaller, larger) to ask the registry a consistency proof between, when
    ``result`` was proven against another checkpoint than the chain's ``latest``."""
    proven = result.checkpoint
    if not result.ok or proven is None or latest is None or proven.size == latest.size:
        return None
    first, second = sorted((proven.size, latest.size))
    # Every tree extends the empty one: there is nothing to prove (nor will the registry).
    return None if first == 0 else (first, second)


def check_consistency(result: InclusionCheck, latest: Checkpoint, answer: object) -> InclusionCheck:
    """Tie an event proven against another checkpoint than the chain's ``latest`` to it.

    ``answer`` is the registry's reply to ``/v1/audit/consistency`` between the two sizes
    (``consistency_needed``). Its proof must show the smaller tree is a prefix of the
    larger (RFC 9162), each root taken from the checkpoint verified here, never from the
    reply: otherwise the two checkpoints sign two histories, and the event is not shown to
    be in the one the latest checkpoint signs.
    """
    sizes = consistency_needed(result, latest)
    if sizes is None or result.checkpoint is None:
        return result
    roots = {c.size: c.root_bytes() for c in (result.checkpoint, latest)}
    unproven = (
        f"its checkpoint (size {result.checkpoint.size}) is not consistent with the latest"
        f" (size {latest.size})"
    )
    path = answer.get("proof") if isinstance(answer, Mapping) else None
    if not isinstance(path, list):
        return replace(result, ok=False, detail=f"{unproven}: malformed consistency proof")
    try:
        verify_consistency(
            old_size=sizes[0],
            new_size=sizes[1],
            old_root=roots[sizes[0]],
            new_root=roots[sizes[1]],
            proof=[b64url_decode(str(h)) for h in path],
        )
    except AgentAuthError as exc:
        return replace(result, ok=False, detail=f"{unproven}: {exc.reason or exc.error}")
    return replace(
        result,
        detail=f"{result.detail}; consistent with the latest checkpoint (size {latest.size})",
    )


#: A chain's latest checkpoint as an earlier visit verified it: (size, root).
Seen = tuple[int, str]


def seen_consistency_needed(seen: Seen | None, latest: Checkpoint | None) -> tuple[int, int] | None:
    """The sizes (remembered, latest) to ask the registry a consistency proof between, when
    the chain's verified ``latest`` checkpoint is larger than the one remembered."""
    if seen is None or latest is None or latest.size <= seen[0] or seen[0] == 0:
        return None
    return seen[0], latest.size


def check_seen(
    chain: str, seen: Seen | None, latest: Checkpoint | None, answer: object = None
) -> str | None:
    """A problem unless the chain's verified ``latest`` checkpoint is the one an earlier
    visit verified (``seen``), or extends it.

    Larger, it needs the registry's consistency proof between the two sizes
    (``seen_consistency_needed``), checked against the remembered root and the latest one
    as verified here. Smaller is a rollback, and the same size with another root is a
    fork: a registry serving a rewritten history would need one or the other.
    """
    if seen is None:
        return None
    size, root = seen
    earlier = f"the one verified on an earlier visit (size {size}, root {root[:12]}…)"
    if latest is None:
        return f"{chain}: no latest checkpoint verifies now, yet {earlier} did: rolled back?"
    if latest.size < size:
        return f"{chain}: rolled back: the latest checkpoint has size {latest.size}, {earlier}"
    if latest.size == size:
        if latest.root == root:
            return None
        return f"{chain}: a fork: the latest checkpoint has another root than {earlier}"
    sizes = seen_consistency_needed(seen, latest)
    if sizes is None:
        return None  # the remembered tree was empty: every tree extends it
    path = answer.get("proof") if isinstance(answer, Mapping) else None
    forked = f"{chain}: the latest checkpoint (size {latest.size}) is not consistent with {earlier}"
    if not isinstance(path, list):
        return f"{forked}: malformed consistency proof"
    try:
        verify_consistency(
            old_size=size,
            new_size=latest.size,
            old_root=b64url_decode(root),
            new_root=latest.root_bytes(),
            proof=[b64url_decode(str(h)) for h in path],
        )
    except AgentAuthError as exc:
        return f"{forked}: {exc.reason or exc.error}"
    return None


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
    #: per chain, the checkpoint remembered from earlier visits that this one was held to
    seen: dict[str, Seen] = field(default_factory=dict)
    #: per chain, the latest checkpoint if it verified and extends the one in ``seen``: the
    #: one to hold the next visit to
    to_remember: dict[str, Seen] = field(default_factory=dict)
    #: None when the agent's whole history was read; "older" or "newer" when the registry
    #: holds events of the agent that were not (past the bound, or after ``read_error``)
    unread: str | None = None
    #: the registry's failure that stopped the reading after its first page
    read_error: RegistryError | None = None

    @classmethod
    async def fetch(
        cls,
        client: RegistryClient,
        token: str,
        agent_id: str,
        *,
        prove: int = 200,
        most: int = AUDIT_PAGE_MAX,
        now: float | None = None,
        seen: Mapping[str, Seen] | None = None,
    ) -> AuditTrail:
        """Fetch and check an agent's trail at ``now`` (the clock's time unless given): its
        newest ``most`` events; prove inclusion of up to ``prove`` events. ``seen``: the
        latest checkpoints earlier visits verified (``to_remember`` of the last trail),
        which the latest ones now must equal or extend."""
        now = time.time() if now is None else now
        history, checkpoints, audit_keys = await asyncio.gather(
            client.newest_audit_events(token, agent_id, most=most),
            client.checkpoints(token),
            client.audit_keys(),
        )
        documents = history.events
        events, problems = parse_events(documents)
        # Oldest first whatever order the registry answered in: the proofs below go to the
        # newest, and the list's end is where they are.
        events.sort(key=lambda e: (e.time_ms, e.chain, e.seq))
        chains = check_chains(events)
        keys, problem = _audit_keys(audit_keys)
        problems += [problem] if problem else []
        problems += check_checkpoints(chains, checkpoints, keys, now=now)
        trail = cls(
            agent_id,
            documents if isinstance(documents, list) else [],
            events,
            checkpoints if isinstance(checkpoints, list) else [],
            audit_keys,
            chains,
            problems,
            seen={c: seen[c] for c in chains if seen and c in seen},
            unread=history.unread,
            read_error=history.error,
        )
        # Bounded: one request per event, to a registry not trusted to answer fast. The
        # events beyond the bound are shown as not proven (``unproven``), never as checked,
        # and keep the trail from verifying; each row's Check proves its event.
        covered = [e for e in events if e.seq < chains[e.chain].covered][-prove:] if prove else []
        await asyncio.gather(
            trail.prove(client, token, covered, keys, now=now), trail._hold_to_seen(client, token)
        )
        return trail

    async def _hold_to_seen(self, client: RegistryClient, token: str) -> None:
        """Check each chain's latest checkpoint against the one remembered (``check_seen``),
        and note those to remember."""

        async def one(chain: str, check: ChainCheck) -> None:
            remembered = self.seen.get(chain)
            sizes = seen_consistency_needed(remembered, check.checkpoint)
            answer: object = None
            if sizes is not None:
                try:
                    answer = await client.audit_consistency(token, chain, *sizes)
                except RegistryError as exc:
                    check.problems.append(
                        f"{chain}: no consistency proof from the checkpoint verified on an"
                        f" earlier visit to the latest: {exc.message}"
                    )
                    return
            problem = check_seen(chain, remembered, check.checkpoint, answer)
            if problem is not None:
                check.problems.append(problem)
            elif check.checkpoint is not None:
                self.to_remember[chain] = (check.checkpoint.size, check.checkpoint.root)

        await asyncio.gather(*(one(chain, check) for chain, check in self.chains.items()))

    @property
    def keys(self) -> AuditKeys:
        return _audit_keys(self.audit_keys)[0]

    async def prove(
        self,
        client: RegistryClient,
        token: str,
        events: Sequence[AuditEvent],
        keys: KeySet | None = None,
        *,
        now: float | None = None,
    ) -> None:
        """Fetch and check inclusion proofs for ``events`` (a few requests at a time), each
        tied to its chain's latest checkpoint (a consistency proof, when the registry proved
        it against another)."""
        keys = keys if keys is not None else self.keys
        now = time.time() if now is None else now
        limit = asyncio.Semaphore(8)
        # One request per pair of sizes: most proofs lead to the same checkpoint.
        consistency: dict[tuple[str, int, int], asyncio.Task[dict[str, Any]]] = {}

        async def one(event: AuditEvent) -> None:
            check = self.chains.get(event.chain)
            latest = check.checkpoint if check is not None else None
            async with limit:
                try:
                    proof = await client.audit_proof(token, event.chain, event.seq)
                except RegistryError as exc:
                    result = InclusionCheck(event.chain, event.seq, False, exc.message)
                else:
                    result = check_inclusion(event, proof, keys, latest=latest, now=now)
                sizes = consistency_needed(result, latest)
                if sizes is not None and latest is not None:
                    key = (event.chain, *sizes)
                    if key not in consistency:
                        consistency[key] = asyncio.ensure_future(
                            client.audit_consistency(token, *key)
                        )
                    try:
                        answer = await consistency[key]
                    except RegistryError as exc:
                        result = replace(
                            result,
                            ok=False,
                            detail=f"no consistency proof to the latest checkpoint: {exc.message}",
                        )
                    else:
                        result = check_consistency(result, latest, answer)
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

    @property
    def unproven(self) -> list[tuple[str, int]]:
        """Shown events the latest checkpoint covers whose inclusion was not checked (past
        the bound on proofs per visit): not verified, so the trail is not ``complete``."""
        return [
            (e.chain, e.seq)
            for e in self.events
            if e.seq < self.chains[e.chain].covered and (e.chain, e.seq) not in self.inclusion
        ]

    @property
    def complete(self) -> bool:
        """No problem found, the whole history read, and every shown event the latest
        checkpoint covers proven."""
        return self.ok and not self.unproven and self.unread is None

    def export(self, *, now: float) -> dict[str, Any]:
        """Everything shown, as one JSON document anyone can re-check offline."""
        return {
            "format": "agentauth.audit-export.v1",
            "agent_id": self.agent_id,
            "exported_at": int(now),
            "events": self.documents,
            "checkpoints": [
                c
                for c in self.checkpoints
                if isinstance(c, Mapping) and str(c.get("chain")) in self.chains
            ],
            "audit_keys": self.audit_keys,
            "verification": {
                "ok": self.complete,
                "problems": self.all_problems,
                "events_not_proven": [f"{chain}:{seq}" for chain, seq in self.unproven],
                "links_checked": self.links_checked,
                "events_proven_included": self.proven,
                "events_awaiting_checkpoint": self.awaiting_checkpoint,
                # Events the registry holds and this export lacks: "older", "newer" or None.
                "events_not_read": self.unread,
                "read_error": None if self.read_error is None else self.read_error.message,
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
