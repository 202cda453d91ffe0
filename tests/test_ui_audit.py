"""The approval page's audit checks, in memory: a chain, a signed checkpoint, proofs.

The registry is played by documents built with ``agentauth.protocol`` (and by an
``httpx.MockTransport`` for ``AuditTrail.fetch``); each test makes it lie in one way.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from nicegui import Client
from nicegui.elements.mixins.text_element import TextElement
from nicegui.page import page
from starlette.requests import Request

from agentauth.protocol import (
    AuditEvent,
    AuditKey,
    AuditKeys,
    Checkpoint,
    KeySet,
    PrivateKey,
    PublicKey,
    b64url_encode,
    consistency_proof,
    inclusion_proof,
    merkle_root,
    sign_checkpoint,
)
from agentauth.ui import (
    AuditTrail,
    RegistryClient,
    SessionStore,
    UISettings,
    check_chains,
    check_checkpoints,
    check_inclusion,
    check_seen,
    parse_events,
)
from agentauth.ui._audit import seen_consistency_needed
from agentauth.ui._pages import Pages

CHAIN = "registry-0"
AGENT = "agt_1"
MINE = (0, 1, 3, 4)  # the agent's events; 2 and 5 are another agent's


def build_chain(size: int = 6, *, start_ms: int = 1_000) -> list[AuditEvent]:
    """``size`` events of one chain, dated from ``start_ms`` on (about 1 s after 1970 unless
    told: fine for the pure checks; a fetched trail is checked against the clock)."""
    events = [
        AuditEvent.first(
            chain=CHAIN, time_ms=start_ms, event="agent.registered", actor="a", subject="s"
        )
    ]
    for i in range(1, size):
        events.append(
            events[-1].following(
                time_ms=start_ms + i,
                event="grant.approved",
                actor="a",
                subject=f"s{i}",
                data={"i": i},
            )
        )
    return events


@pytest.fixture
def signer() -> PrivateKey:
    return PrivateKey.generate("ES256", kid="reg-1")


@pytest.fixture
def keys(signer: PrivateKey) -> KeySet:
    return KeySet([PublicKey.from_jwk(signer.public_jwk())])


def signed_checkpoint(
    events: list[AuditEvent], signer: PrivateKey, chain: str = CHAIN, *, time: int = 2_000
) -> str:
    root = merkle_root([e.entry_hash() for e in events])
    checkpoint = Checkpoint(chain=chain, size=len(events), root=b64url_encode(root), time=time)
    return sign_checkpoint(checkpoint, signer)


def recent_chain() -> list[AuditEvent]:
    """A chain written seconds ago: no checkpoint is overdue for it yet."""
    return build_chain(start_ms=int(time.time() * 1000) - 10_000)


def dated_after(events: list[AuditEvent]) -> int:
    """A checkpoint time just after the newest of ``events``, as the registry signs one."""
    return max(e.time_ms for e in events) // 1000 + 1


def proof_for(events: list[AuditEvent], seq: int, signed: str) -> dict[str, Any]:
    leaves = [e.entry_hash() for e in events]
    return {
        "event": events[seq].canonical_bytes().decode(),
        "leaf_hash": b64url_encode(leaves[seq]),
        "index": seq,
        "tree_size": len(events),
        "checkpoint": signed,
        "proof": [b64url_encode(h) for h in inclusion_proof(leaves, seq)],
    }


def listed(events: list[AuditEvent]) -> list[dict[str, Any]]:
    """Events as the registry lists them: the parsed canonical JSON."""
    return [json.loads(e.canonical_bytes()) for e in events]


def listing(
    request: httpx.Request, documents: list[Any], *, link: str | None = None
) -> httpx.Response:
    """``GET /v1/audit/events`` as the registry answers it: ``documents`` (oldest first)
    newest first with ``order=desc``, ``limit`` an answer from the ``cursor`` on, with a
    ``Link`` to the next page (``link``, if given, as its target)."""
    params = request.url.params
    ordered = documents[::-1] if params.get("order") == "desc" else documents
    start = int(params.get("cursor", "0"))
    end = start + int(params.get("limit", "5000"))
    headers = {}
    if end < len(ordered):
        query = httpx.QueryParams({**dict(params), "cursor": str(end)})
        headers["Link"] = f'<{link or ""}?{query}>; rel="next"'
    return httpx.Response(200, json=ordered[start:end], headers=headers)


def test_links_between_neighbours_and_genesis_are_checked() -> None:
    events = build_chain()
    mine = [events[i] for i in MINE]
    parsed, problems = parse_events(listed(mine))
    assert problems == [] and parsed == mine
    check = check_chains(parsed)[CHAIN]
    assert (check.events, check.links_checked, check.problems) == (4, 3, [])


def test_a_rewritten_event_breaks_its_successors_link() -> None:
    events = build_chain()
    mine = [events[i] for i in MINE]
    forged = mine[2].model_copy(update={"data": {"i": 999}})  # seq 3, rewritten in place
    check = check_chains([mine[0], mine[1], forged, mine[3]])[CHAIN]
    assert check.problems == [f"{CHAIN}: event 4 does not link to event 3"]


def test_malformed_or_duplicate_events_are_reported() -> None:
    events = build_chain()
    documents = listed(events[:2])
    documents.append({**documents[1], "format": "something else"})
    parsed, problems = parse_events(documents)
    assert len(parsed) == 2 and problems == ["listed event #3 is not a well-formed audit event"]
    twin = events[1].model_copy(update={"subject": "other"})
    assert (
        "two different events claim seq 1"
        in check_chains([events[0], events[1], twin])[CHAIN].problems[0]
    )


def test_checkpoints_verify_against_the_jwks_only(signer: PrivateKey, keys: KeySet) -> None:
    events = build_chain()
    checks = check_chains([events[i] for i in MINE])
    good = {"chain": CHAIN, "size": 6, "signed": signed_checkpoint(events, signer)}
    check_checkpoints(checks, [good], keys)
    assert checks[CHAIN].checkpoint is not None and checks[CHAIN].covered == 6
    assert checks[CHAIN].checkpoint_kid == "reg-1" and checks[CHAIN].problems == []

    impostor = PrivateKey.generate("ES256", kid="reg-1")
    checks = check_chains([events[i] for i in MINE])
    check_checkpoints(checks, [{**good, "signed": signed_checkpoint(events, impostor)}], keys)
    assert checks[CHAIN].checkpoint is None
    assert "latest checkpoint does not verify" in checks[CHAIN].problems[0]

    checks = check_chains([events[i] for i in MINE])
    other_chain = signed_checkpoint(events, signer, chain="registry-1")
    check_checkpoints(checks, [{**good, "signed": other_chain}], keys)
    assert "another chain or size" in checks[CHAIN].problems[0]


def test_inclusion_proofs(signer: PrivateKey, keys: KeySet) -> None:
    events = build_chain()
    signed = signed_checkpoint(events, signer)
    for seq in MINE:
        result = check_inclusion(events[seq], proof_for(events, seq, signed), keys)
        assert result.ok is True, result.detail
        assert result.tree_size == 6 and result.kid == "reg-1"
    # A wrong sibling hash: the path does not reach the signed root.
    bad = proof_for(events, 3, signed)
    bad["proof"][0] = b64url_encode(b"\x01" * 32)
    assert check_inclusion(events[3], bad, keys).ok is False
    # The registry proves another event than the one it listed.
    assert check_inclusion(events[3], proof_for(events, 2, signed), keys).ok is False
    # A checkpoint signed by another key.
    forged = proof_for(events, 3, signed_checkpoint(events, PrivateKey.generate("ES256")))
    assert check_inclusion(events[3], forged, keys).ok is False
    # Not yet checkpointed: neither proven nor failed.
    pending = {"event": events[5].canonical_bytes().decode(), "checkpoint": None, "proof": None}
    assert check_inclusion(events[5], pending, keys).ok is None
    # The listed copy was altered after the fact.
    altered = events[3].model_copy(update={"actor": "someone else"})
    assert check_inclusion(altered, proof_for(events, 3, signed), keys).ok is False


def mock_registry(
    events: list[AuditEvent], signer: PrivateKey, *, covered: int, lie_at: int | None = None
) -> httpx.MockTransport:
    signed = signed_checkpoint(events[:covered], signer, time=dated_after(events[:covered]))

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer ses_test"
        path = request.url.path
        if path == "/registry/v1/audit/events":
            assert request.url.params["agent_id"] == AGENT
            return listing(request, listed([events[i] for i in MINE]))
        if path == "/registry/v1/audit/checkpoints":
            return httpx.Response(200, json=[{"chain": CHAIN, "size": covered, "signed": signed}])
        if path.startswith("/registry/v1/audit/events/"):
            seq = int(path.split("/")[-2])
            if seq >= covered:
                body = events[seq].canonical_bytes().decode()
                return httpx.Response(200, json={"event": body, "checkpoint": None, "proof": None})
            proven = proof_for(events[:covered], lie_at if seq == lie_at else seq, signed)
            if seq == lie_at:
                proven["event"] = (
                    events[seq].model_copy(update={"data": {"x": 1}}).canonical_bytes().decode()
                )
            return httpx.Response(200, json=proven)
        return httpx.Response(404, json={"error": "not_found", "error_description": path})

    return httpx.MockTransport(handler)


def with_audit_keys(transport: httpx.MockTransport, *signers: PrivateKey) -> httpx.MockTransport:
    """The registry's audit key list (``signers``, each signing from time 0 on) added."""
    audit_keys = AuditKeys(AuditKey(PublicKey.from_jwk(s.public_jwk())) for s in signers)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/.well-known/agentauth-audit-keys.json"):
            return httpx.Response(200, json=audit_keys.to_document())
        return transport.handle_request(request)

    return httpx.MockTransport(handler)


@pytest.mark.asyncio
async def test_a_trail_fetched_from_an_honest_registry_verifies(signer: PrivateKey) -> None:
    events = recent_chain()  # event 4, under no checkpoint yet, is seconds old: not overdue
    client = RegistryClient(
        "https://registry.example/registry",
        transport=with_audit_keys(mock_registry(events, signer, covered=4), signer),
    )
    try:
        trail = await AuditTrail.fetch(client, "ses_test", AGENT)
    finally:
        await client.aclose()
    assert trail.ok, trail.all_problems
    assert (trail.proven, trail.awaiting_checkpoint, trail.links_checked) == (3, 1, 3)
    exported = trail.export(now=3_000)
    assert exported["verification"]["ok"] is True
    assert exported["events"] == listed([events[i] for i in MINE])
    assert exported["verification"]["chains"][CHAIN]["checkpoint_kid"] == "reg-1"
    assert [k["kid"] for k in exported["audit_keys"]["keys"]] == ["reg-1"]


@pytest.mark.asyncio
async def test_a_registry_that_lies_about_one_event_is_caught(signer: PrivateKey) -> None:
    events = build_chain()
    client = RegistryClient(
        "https://registry.example/registry",
        transport=with_audit_keys(mock_registry(events, signer, covered=6, lie_at=3), signer),
    )
    try:
        trail = await AuditTrail.fetch(client, "ses_test", AGENT)
    finally:
        await client.aclose()
    assert not trail.ok
    assert trail.all_problems == [f"{CHAIN}:3 the registry's copy differs from the list"]
    assert trail.export(now=3_000)["verification"]["ok"] is False


def test_a_checkpoint_by_a_retired_key_verifies_inside_its_window_only() -> None:
    """After a rotation the JWKS drops the old key, but a quiet chain's latest checkpoint is
    still the old key's: the audit key list keeps that key, with the window it signed in."""
    old, new = PrivateKey.generate("ES256", kid="reg-1"), PrivateKey.generate("ES256", kid="reg-2")
    audit_keys = AuditKeys(
        [
            AuditKey(PublicKey.from_jwk(old.public_jwk()), activates_at=1_000, retires_at=3_000),
            AuditKey(PublicKey.from_jwk(new.public_jwk()), activates_at=2_500),
        ]
    )
    jwks = KeySet([PublicKey.from_jwk(new.public_jwk())])  # what /.well-known/jwks.json holds
    events = build_chain()
    quiet = {"chain": CHAIN, "size": 6, "signed": signed_checkpoint(events, old, time=2_000)}

    checks = check_chains([events[i] for i in MINE])
    check_checkpoints(checks, [quiet], jwks)
    assert checks[CHAIN].problems == [
        f"{CHAIN}: the latest checkpoint does not verify (unknown_kid)"
    ]  # what the page said before it used the audit key list
    checks = check_chains([events[i] for i in MINE])
    check_checkpoints(checks, [quiet], audit_keys)
    assert checks[CHAIN].problems == [] and checks[CHAIN].checkpoint_kid == "reg-1"
    assert check_inclusion(events[3], proof_for(events, 3, quiet["signed"]), audit_keys).ok

    # The old key signing after it retired (a key that leaked later, say) is refused.
    late = signed_checkpoint(events, old, time=3_000)
    checks = check_chains([events[i] for i in MINE])
    check_checkpoints(checks, [{**quiet, "signed": late}], audit_keys)
    assert checks[CHAIN].problems == [
        f"{CHAIN}: the latest checkpoint does not verify (key_window)"
    ]
    result = check_inclusion(events[3], proof_for(events, 3, late), audit_keys)
    assert (result.ok, result.detail) == (False, "does not verify (key_window)")
    # So is the new key signing before it activated.
    early = signed_checkpoint(events, new, time=2_499)
    assert check_inclusion(events[3], proof_for(events, 3, early), audit_keys).ok is False


def test_odd_bytes_in_an_event_are_reported_and_the_other_chains_checked() -> None:
    events = build_chain()
    # prev of event 0 with spare bits set: the right length, yet no hash's spelling. The
    # event model refuses it, so it is reported as listed, and the other chain is checked.
    document = {**listed(events[:1])[0], "prev": "A" * 42 + "B"}
    other = AuditEvent.first(chain="registry-1", time_ms=1, event="a.b", actor="a", subject="s")
    parsed, problems = parse_events([document, *listed([other])])
    assert problems == ["listed event #1 is not a well-formed audit event"] and len(parsed) == 1
    checks = check_chains(parsed)
    assert checks["registry-1"].problems == [] and checks["registry-1"].links_checked == 1


@pytest.mark.asyncio
async def test_a_malformed_audit_key_list_is_a_problem_not_a_crash(signer: PrivateKey) -> None:
    events = build_chain()
    transport = mock_registry(events, signer, covered=4)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/.well-known/agentauth-audit-keys.json"):
            return httpx.Response(200, json={"format": "agentauth.audit-keys.v1", "keys": [1]})
        return transport.handle_request(request)

    client = RegistryClient(
        "https://registry.example/registry", transport=httpx.MockTransport(handler)
    )
    try:
        trail = await AuditTrail.fetch(client, "ses_test", AGENT)
    finally:
        await client.aclose()
    assert "the registry's audit key list is malformed" in trail.all_problems
    assert f"{CHAIN}: the latest checkpoint does not verify (unknown_kid)" in trail.all_problems


def test_a_checkpoint_dated_before_the_events_it_covers_is_a_problem(
    signer: PrivateKey, keys: KeySet
) -> None:
    def latest(events: list[AuditEvent], time: int) -> list[dict[str, Any]]:
        return [{"chain": CHAIN, "size": 6, "signed": signed_checkpoint(events, signer, time=time)}]

    # Events dated about 1 s: a checkpoint dated 0 is within the clocks' skew...
    events = build_chain()
    checks = check_chains([events[i] for i in MINE])
    check_checkpoints(checks, latest(events, 0), keys)
    assert checks[CHAIN].problems == [] and checks[CHAIN].covered == 6
    # ...one over events written an hour later is backdated.
    later = build_chain(start_ms=3_601_000)
    checks = check_chains([later[i] for i in MINE])
    check_checkpoints(checks, latest(later, 0), keys)
    assert checks[CHAIN].checkpoint is None
    assert "before an event it covers" in checks[CHAIN].problems[0]
    # And one dated in the future.
    checks = check_chains([events[i] for i in MINE])
    check_checkpoints(checks, latest(events, 10_000), keys, now=5_000)
    assert "in the future" in checks[CHAIN].problems[0]


def audit_keys_of(*signers: PrivateKey) -> AuditKeys:
    return AuditKeys(AuditKey(PublicKey.from_jwk(s.public_jwk())) for s in signers)


def rewritten(events: list[AuditEvent], seq: int) -> list[AuditEvent]:
    """``events`` with event ``seq`` changed and every later one re-linked, as a registry
    (or an insider) rewriting history would: the chain's own links all check out."""
    out = events[:seq]
    out.append(events[seq].model_copy(update={"data": {"amount": "999999"}}))
    for event in events[seq + 1 :]:
        out.append(event.model_copy(update={"prev": out[-1].entry_hash_b64()}))
    return out


def registry_serving(
    shown: list[AuditEvent],
    checkpoints: Any,
    proofs: Callable[[int], Any],
    audit_keys: AuditKeys,
    consistency: Callable[[int, int], Any] | None = None,
) -> httpx.MockTransport:
    """A registry answering each audit route with what the test hands it: ``shown`` as the
    agent's events (in pages, as ``listing``), ``checkpoints`` as the latest ones,
    ``proofs(seq)`` as an event's proof, ``consistency(first, second)`` as the consistency
    proof (404 when None)."""

    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/.well-known/agentauth-audit-keys.json"):
            return httpx.Response(200, json=audit_keys.to_document())
        if path == "/registry/v1/audit/events":
            return listing(request, listed(shown))
        if path == "/registry/v1/audit/checkpoints":
            return httpx.Response(200, json=checkpoints)
        if path.startswith("/registry/v1/audit/events/"):
            return httpx.Response(200, json=proofs(int(path.split("/")[-2])))
        if path == "/registry/v1/audit/consistency" and consistency is not None:
            params = request.url.params
            assert params["chain"] == CHAIN
            return httpx.Response(
                200, json=consistency(int(params["first"]), int(params["second"]))
            )
        return httpx.Response(404, json={"error": "not_found", "error_description": path})

    return httpx.MockTransport(handler)


def sealed_registry(
    signer: PrivateKey, shown: Callable[[list[AuditEvent]], list[AuditEvent]] | None = None
) -> httpx.MockTransport:
    """A registry serving a recent chain, sealed by one checkpoint of ``signer``'s dated after
    its events, with honest proofs: ``shown`` picks the events it lists (the agent's own)."""
    events = recent_chain()
    latest = signed_checkpoint(events, signer, time=dated_after(events))
    return registry_serving(
        shown(events) if shown else [events[i] for i in MINE],
        [{"chain": CHAIN, "size": 6, "signed": latest}],
        lambda seq: proof_for(events, seq, latest),
        audit_keys_of(signer),
    )


def edited_amount(events: list[AuditEvent]) -> list[AuditEvent]:
    """Three events listed, the first with its amount edited after it was sealed."""
    return [events[1].model_copy(update={"data": {"amount": "999999"}}), events[3], events[5]]


async def fetched(transport: httpx.MockTransport) -> AuditTrail:
    client = RegistryClient("https://registry.example/registry", transport=transport)
    try:
        return await AuditTrail.fetch(client, "ses_test", AGENT)
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_a_covered_event_the_registry_calls_not_yet_checkpointed_is_a_problem(
    signer: PrivateKey,
) -> None:
    """The latest checkpoint covers all six events. Asked for the proof of event 4, which it
    lists rewritten, the registry says no checkpoint covers it yet: the page would show it
    as awaiting one, and the trail as verifying, had it not compared seq with the size."""
    events = recent_chain()
    latest = signed_checkpoint(events, signer, time=dated_after(events))
    forged = rewritten(events, 4)

    def proofs(seq: int) -> dict[str, Any]:
        if seq == 4:
            return {"event": forged[4].canonical_bytes().decode(), "checkpoint": None}
        return proof_for(events, seq, latest)

    trail = await fetched(
        registry_serving(
            [forged[i] for i in MINE],
            [{"chain": CHAIN, "size": 6, "signed": latest}],
            proofs,
            audit_keys_of(signer),
        )
    )
    assert trail.chains[CHAIN].covered == 6
    assert not trail.ok
    assert trail.all_problems == [
        f"{CHAIN}:4 no proof, yet the latest checkpoint (size 6) covers it"
    ]


def test_an_inclusion_proof_against_a_backdated_checkpoint_fails() -> None:
    """A retired key that leaked can sign a checkpoint dated inside its old window. Over
    events written long after, that date is a lie: the checkpoint an inclusion proof leads
    to is dated against the event, as the latest one is against the events it covers."""
    old, new = PrivateKey.generate("ES256", kid="reg-1"), PrivateKey.generate("ES256", kid="reg-2")
    audit_keys = AuditKeys(
        [
            AuditKey(PublicKey.from_jwk(old.public_jwk()), activates_at=0, retires_at=3_000),
            AuditKey(PublicKey.from_jwk(new.public_jwk()), activates_at=2_500),
        ]
    )
    forged = rewritten(recent_chain(), 3)
    backdated = signed_checkpoint(forged, old, time=2_000)  # inside reg-1's window
    result = check_inclusion(forged[3], proof_for(forged, 3, backdated), audit_keys)
    assert result.ok is False
    assert "before an event it covers" in result.detail and "backdated" in result.detail
    # The same proof, dated after the event it covers, verifies (the key window allowing).
    honest = signed_checkpoint(forged, new, time=dated_after(forged))
    assert check_inclusion(forged[3], proof_for(forged, 3, honest), audit_keys).ok is True


@pytest.mark.asyncio
async def test_a_proof_against_another_root_for_the_latest_size_is_a_fork(
    signer: PrivateKey,
) -> None:
    """The latest checkpoint (size 6, root A) verifies; every inclusion proof leads to
    another checkpoint of the chain at size 6, root B, over rewritten events, by the same
    key. Two roots for one size are two histories: no event is proven against B."""
    events = recent_chain()
    at = dated_after(events)
    latest = signed_checkpoint(events, signer, time=at)
    forged = rewritten(events, 3)
    fork = signed_checkpoint(forged, signer, time=at)
    trail = await fetched(
        registry_serving(
            [forged[i] for i in MINE],
            [{"chain": CHAIN, "size": 6, "signed": latest}],
            lambda seq: proof_for(forged, seq, fork),
            audit_keys_of(signer),
        )
    )
    assert trail.proven == 0 and not trail.ok
    assert (
        f"{CHAIN}:3 a fork: its checkpoint and the latest both have size 6, with other roots"
        in (trail.all_problems)
    )


@pytest.mark.asyncio
async def test_a_proof_against_a_newer_checkpoint_must_be_consistent_with_the_latest(
    signer: PrivateKey,
) -> None:
    """The registry proves each event against its latest checkpoint, which may be newer than
    the one the page listed (one signed in between). The page ties it to the listed one with
    the registry's consistency proof: a newer checkpoint over a rewritten history has none."""
    events = recent_chain()
    hashes = [e.entry_hash() for e in events]
    listed_latest = signed_checkpoint(events[:4], signer, time=dated_after(events[:4]))
    checkpoints = [{"chain": CHAIN, "size": 4, "signed": listed_latest}]
    newer = signed_checkpoint(events, signer, time=dated_after(events))
    asked: list[tuple[int, int]] = []

    def honest(first: int, second: int) -> dict[str, Any]:
        asked.append((first, second))
        return {"chain": CHAIN, "proof": [b64url_encode(h) for h in consistency_proof(hashes, 4)]}

    # Honest: the newer checkpoint extends the listed one.
    trail = await fetched(
        registry_serving(
            [events[i] for i in MINE],
            checkpoints,
            lambda seq: proof_for(events, seq, newer),
            audit_keys_of(signer),
            honest,
        )
    )
    assert trail.ok, trail.all_problems
    assert trail.proven == 3 and asked == [(4, 6)]  # one request for the pair of sizes
    assert "consistent with the latest checkpoint (size 4)" in trail.inclusion[(CHAIN, 3)].detail

    # Lying: the newer checkpoint is over a rewritten event 1. The best the registry can
    # answer is a consistency proof of its rewritten tree, which the listed root refutes.
    forged = rewritten(events, 1)
    forged_hashes = [e.entry_hash() for e in forged]
    rewrite = signed_checkpoint(forged, signer, time=dated_after(forged))
    trail = await fetched(
        registry_serving(
            [forged[i] for i in MINE],
            checkpoints,
            lambda seq: proof_for(forged, seq, rewrite),
            audit_keys_of(signer),
            lambda first, second: {
                "proof": [b64url_encode(h) for h in consistency_proof(forged_hashes, 4)]
            },
        )
    )
    assert trail.proven == 0 and not trail.ok
    assert (
        f"{CHAIN}:3 its checkpoint (size 6) is not consistent with the latest (size 4):"
        " root_mismatch" in trail.all_problems
    ), trail.all_problems
    # And a registry with no consistency proof to give proves nothing either.
    trail = await fetched(
        registry_serving(
            [forged[i] for i in MINE],
            checkpoints,
            lambda seq: proof_for(forged, seq, rewrite),
            audit_keys_of(signer),
        )
    )
    assert trail.proven == 0 and not trail.ok


def test_old_events_no_checkpoint_covers_are_a_problem(signer: PrivateKey, keys: KeySet) -> None:
    """As ``agentauth audit verify`` does: the registry signs every chain that grew each 10 s,
    so events under no checkpoint for more than MAX_UNSEALED_AGE (300 s) mean its
    checkpoints were withheld or deleted, or it is not signing. Young ones are awaiting one."""
    events = build_chain()  # written at about 1 s
    mine = [events[i] for i in MINE]
    checks = check_chains(mine)
    check_checkpoints(checks, [], keys, now=1 + 299)
    assert checks[CHAIN].problems == []
    checks = check_chains(mine)
    check_checkpoints(checks, [], keys, now=1 + 301)
    assert checks[CHAIN].problems == [
        f"{CHAIN}: no checkpoint covers the listed events from 0 on, the oldest written 301 s"
        " ago (more than 300 s): checkpoints were withheld or removed, or the registry is not"
        " signing"
    ]
    # The latest checkpoint covers 0..3; event 4 is left waiting.
    latest = {"chain": CHAIN, "size": 4, "signed": signed_checkpoint(events[:4], signer, time=2)}
    checks = check_chains(mine)
    check_checkpoints(checks, [latest], keys, now=1 + 301)
    assert checks[CHAIN].covered == 4
    assert (
        checks[CHAIN]
        .problems[0]
        .startswith(f"{CHAIN}: no checkpoint covers the listed events from 4 on")
    )


@pytest.mark.asyncio
async def test_a_trail_whose_checkpoints_are_withheld_does_not_verify(
    signer: PrivateKey,
) -> None:
    """The page fetches the trail of events written an hour ago, rewritten; the registry
    lists no checkpoint and says none covers them yet."""
    forged = rewritten(build_chain(start_ms=int(time.time() * 1000) - 3_600_000), 1)
    trail = await fetched(
        registry_serving(
            [forged[i] for i in MINE],
            [],
            lambda seq: {"event": forged[seq].canonical_bytes().decode(), "checkpoint": None},
            audit_keys_of(signer),
        )
    )
    assert not trail.ok
    assert "checkpoints were withheld or removed" in trail.all_problems[0]


@pytest.mark.asyncio
@pytest.mark.parametrize("odd", ["checkpoint-entry", "proof"])
async def test_odd_checkpoint_lists_and_proofs_are_problems_not_crashes(
    signer: PrivateKey, odd: str
) -> None:
    """A checkpoint list entry that is no JSON object, or a proof that is a JSON list,
    used to raise AttributeError, and the audit page failed to render."""
    events = recent_chain()
    latest = signed_checkpoint(events, signer, time=dated_after(events))
    checkpoints: list[Any] = [{"chain": CHAIN, "size": 6, "signed": latest}]
    proofs: Callable[[int], Any] = lambda seq: proof_for(events, seq, latest)  # noqa: E731
    if odd == "checkpoint-entry":
        checkpoints.append(latest)  # the bare JWS, not {"chain", "size", "signed"}
        expected = "the registry's checkpoint list is malformed"
    else:
        proofs = lambda seq: [proof_for(events, seq, latest)]  # noqa: E731
        expected = f"{CHAIN}:0 malformed proof"
    trail = await fetched(
        registry_serving([events[i] for i in MINE], checkpoints, proofs, audit_keys_of(signer))
    )
    assert not trail.ok and expected in trail.all_problems
    assert trail.export(now=time.time())["verification"]["ok"] is False


def serving(transport: httpx.MockTransport, path: str, answer: Any) -> httpx.MockTransport:
    """``transport``, but answering GET ``path`` (its end) with ``answer`` as JSON (bytes
    as they are)."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith(path):
            if isinstance(answer, bytes):
                return httpx.Response(200, content=answer)
            return httpx.Response(200, content=json.dumps(answer).encode())
        return transport.handle_request(request)

    return httpx.MockTransport(handler)


@pytest.mark.asyncio
async def test_a_plain_jwks_served_as_the_audit_key_list_verifies_nothing() -> None:
    """A plain JWKS has no signing windows. Served in place of the audit key list, it let
    the page verify a checkpoint a key signed long after it retired (one that leaked, say)."""
    retired = PrivateKey.generate("ES256", kid="reg-1")
    events = recent_chain()
    late = signed_checkpoint(events, retired, time=dated_after(events))
    honest = registry_serving(
        [events[i] for i in MINE],
        [{"chain": CHAIN, "size": 6, "signed": late}],
        lambda seq: proof_for(events, seq, late),
        AuditKeys([AuditKey(PublicKey.from_jwk(retired.public_jwk()), 0, 1_000)]),
    )
    assert not (await fetched(honest)).ok  # the audit key list refuses it: key_window
    jwks = KeySet([PublicKey.from_jwk(retired.public_jwk())]).to_jwks()
    trail = await fetched(serving(honest, "/.well-known/agentauth-audit-keys.json", jwks))
    assert not trail.ok and trail.proven == 0
    assert trail.chains[CHAIN].checkpoint is None
    assert trail.all_problems[0] == (
        "the registry serves a plain JWKS as its audit key list: keys without signing windows;"
        " no checkpoint is verified with it"
    )
    assert trail.keys.windowed and list(trail.keys) == []  # and none for the Check button


@pytest.mark.asyncio
async def test_covered_events_past_the_proof_bound_are_shown_as_not_proven(
    signer: PrivateKey,
) -> None:
    """A visit proves at most ``prove`` events (the newest). The registry edits an older
    one, with no neighbour shown whose link would catch it: it was shown among the proven,
    and the trail as verifying."""
    transport = sealed_registry(signer, edited_amount)
    client = RegistryClient("https://registry.example/registry", transport=transport)
    try:
        trail = await AuditTrail.fetch(client, "ses_test", AGENT, prove=2)
        assert trail.ok and trail.proven == 2  # nothing wrong found in what was checked...
        assert trail.unproven == [(CHAIN, 1)] and not trail.complete  # ...but not all of it
        exported = trail.export(now=time.time())["verification"]
        assert exported["ok"] is False and exported["events_not_proven"] == [f"{CHAIN}:1"]
        [edited] = [e for e in trail.events if e.seq == 1]
        await trail.prove(client, "ses_test", [edited])  # the row's Check
    finally:
        await client.aclose()
    assert trail.unproven == [] and not trail.ok
    assert trail.all_problems == [f"{CHAIN}:1 the registry's copy differs from the list"]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("route", "answer", "expected"),
    [
        ("/v1/audit/events", {"events": []}, "the registry's event list is malformed (not a list)"),
        ("/v1/audit/events", None, "the registry's event list is malformed (not a list)"),
        ("/v1/audit/events", "[]", "the registry's event list is malformed (not a list)"),
        ("/v1/audit/checkpoints", {}, "the registry's checkpoint list is malformed"),
        ("/v1/audit/checkpoints", None, "the registry's checkpoint list is malformed"),
    ],
)
async def test_event_and_checkpoint_lists_of_the_wrong_shape_are_problems(
    signer: PrivateKey, route: str, answer: Any, expected: str
) -> None:
    """A JSON null for either list raised TypeError, and the page failed to render; a JSON
    object for the checkpoint list was read as an empty list, and the trail verified."""
    honest = sealed_registry(signer)
    trail = await fetched(serving(honest, route, answer))
    assert not trail.ok and expected in trail.all_problems, trail.all_problems
    exported = trail.export(now=time.time())
    assert exported["verification"]["ok"] is False and isinstance(exported["events"], list)


def test_an_event_listed_as_pairs_rather_than_an_object_is_not_taken() -> None:
    """``dict()`` turned a list of [name, value] pairs into the event it spells."""
    document = listed(build_chain(1))[0]
    parsed, problems = parse_events([list(document.items())])
    assert parsed == [] and problems == ["listed event #1 is not a well-formed audit event"]


def checkpoint_of(events: list[AuditEvent], size: int) -> Checkpoint:
    root = merkle_root([e.entry_hash() for e in events[:size]])
    return Checkpoint(chain=CHAIN, size=size, root=b64url_encode(root), time=2_000)


def test_the_latest_checkpoint_must_be_the_one_seen_before_or_extend_it() -> None:
    events = build_chain()
    hashes = [e.entry_hash() for e in events]
    forged = rewritten(events, 1)
    four, six = checkpoint_of(events, 4), checkpoint_of(events, 6)
    seen_four, seen_six = (4, four.root), (6, six.root)
    extends = {"proof": [b64url_encode(h) for h in consistency_proof(hashes, 4)]}

    assert check_seen(CHAIN, None, six) is None  # a first visit has nothing to hold it to
    assert check_seen(CHAIN, seen_six, six) is None
    assert seen_consistency_needed(seen_four, six) == (4, 6)
    assert check_seen(CHAIN, seen_four, six, extends) is None
    # The registry goes back to an older checkpoint (its own, genuine): a rollback.
    rolled = check_seen(CHAIN, seen_six, four)
    assert rolled is not None and rolled.startswith(f"{CHAIN}: rolled back: the latest")
    # Another history of the same size: a fork.
    fork = check_seen(CHAIN, seen_six, checkpoint_of(forged, 6))
    assert fork is not None and f"{CHAIN}: a fork" in fork
    # A larger one over a rewritten history: its own consistency proof fails the old root.
    lying = {
        "proof": [b64url_encode(h) for h in consistency_proof([e.entry_hash() for e in forged], 4)]
    }
    refuted = check_seen(CHAIN, seen_four, checkpoint_of(forged, 6), lying)
    assert refuted is not None and refuted.endswith("root_mismatch")
    for answer in (None, {"proof": "x"}, [extends]):
        malformed = check_seen(CHAIN, seen_four, six, answer)
        assert malformed is not None and malformed.endswith("malformed consistency proof")
    # None verifies now (none listed, or the one listed fails): also no longer the one seen.
    gone = check_seen(CHAIN, seen_four, None)
    assert gone is not None and "no latest checkpoint verifies now" in gone


@pytest.mark.asyncio
async def test_a_fetched_trail_is_held_to_the_checkpoints_seen_before(signer: PrivateKey) -> None:
    events = recent_chain()
    hashes = [e.entry_hash() for e in events]
    four = signed_checkpoint(events[:4], signer, time=dated_after(events[:4]))
    six = signed_checkpoint(events, signer, time=dated_after(events))
    asked: list[tuple[int, int]] = []

    def consistency(first: int, second: int) -> dict[str, Any]:
        asked.append((first, second))
        return {"proof": [b64url_encode(h) for h in consistency_proof(hashes, first)]}

    async def visit(latest: str, size: int, seen: dict[str, Any]) -> AuditTrail:
        client = RegistryClient(
            "https://registry.example/registry",
            transport=registry_serving(
                [events[i] for i in MINE],
                [{"chain": CHAIN, "size": size, "signed": latest}],
                lambda seq: proof_for(events[:size], seq, latest),
                audit_keys_of(signer),
                consistency,
            ),
        )
        try:
            return await AuditTrail.fetch(client, "ses_test", AGENT, seen=seen)
        finally:
            await client.aclose()

    first = await visit(four, 4, {})
    assert first.ok and first.to_remember == {CHAIN: (4, checkpoint_of(events, 4).root)}
    grown = await visit(six, 6, first.to_remember)
    assert grown.ok, grown.all_problems
    assert asked == [(4, 6)] and grown.to_remember == {CHAIN: (6, checkpoint_of(events, 6).root)}
    # Rolled back to the size-4 checkpoint (genuine, and still verifying on its own).
    back = await visit(four, 4, grown.to_remember)
    assert not back.ok and back.to_remember == {}
    assert back.all_problems[0].startswith(f"{CHAIN}: rolled back")


def test_checkpoints_seen_are_kept_per_human_beyond_their_sessions() -> None:
    store = SessionStore(ttl=3600, ticket_ttl=60)
    ticket = store.sign_in("anonymous", principal_id="hum_1", registry_token="tok")
    cookie_id = store.claim(ticket, "anonymous")
    store.remember_checkpoints("hum_1", {}, {CHAIN: (4, "r4")})
    store.sign_out(cookie_id)  # the registry ending the session wipes nothing to hold it to
    assert store.checkpoints_seen("hum_1") == {CHAIN: (4, "r4")}
    assert store.checkpoints_seen("hum_2") == {}
    # Two visits checked against (4, r4) at once: the first to finish moves it on; the other,
    # checked against what is no longer there, leaves it.
    store.remember_checkpoints("hum_1", {CHAIN: (4, "r4")}, {CHAIN: (6, "r6")})
    store.remember_checkpoints("hum_1", {CHAIN: (4, "r4")}, {CHAIN: (6, "fork")})
    assert store.checkpoints_seen("hum_1") == {CHAIN: (6, "r6")}
    seen = store.checkpoints_seen("hum_1")
    seen[CHAIN] = (0, "")  # a copy: the page cannot change it by accident
    assert store.checkpoints_seen("hum_1") == {CHAIN: (6, "r6")}


def test_the_people_remembered_are_bounded_the_longest_unseen_forgotten_first() -> None:
    """The memory was never pruned: every account that ever verified a trail stayed, so
    accounts signed up without end grew the page's process without end."""
    store = SessionStore(ttl=3600, ticket_ttl=60, max_people_remembered=3)
    for person in ("hum_1", "hum_2", "hum_3"):
        store.remember_checkpoints(person, {}, {CHAIN: (4, "r4")})
    # hum_1 comes back: now the most recent, so hum_2 is the one to go.
    store.remember_checkpoints("hum_1", {CHAIN: (4, "r4")}, {CHAIN: (6, "r6")})
    store.remember_checkpoints("hum_4", {}, {CHAIN: (4, "r4")})
    assert store.checkpoints_seen("hum_2") == {}  # forgotten: trusts the latest, as new
    assert store.checkpoints_seen("hum_1") == {CHAIN: (6, "r6")}
    assert store.checkpoints_seen("hum_3") == {CHAIN: (4, "r4")}
    assert store.checkpoints_seen("hum_4") == {CHAIN: (4, "r4")}
    for k in range(100):
        store.remember_checkpoints(f"hum_x{k}", {}, {CHAIN: (4, "r4")})
    assert len(store._checkpoints_seen) == 3


class AuditPage:
    """The audit page of one signed-in person, built in memory (no server, no browser),
    over a registry played by ``transport``; one ``visit`` per page load."""

    def __init__(self, *, audit_page_size: int = 5000, **settings: Any) -> None:
        self.audit_page_size = audit_page_size
        self.store = SessionStore(ttl=3600, ticket_ttl=60)
        ticket = self.store.sign_in("anonymous", principal_id="hum_1", registry_token="ses_test")
        cookie_id = self.store.claim(ticket, "anonymous")
        assert cookie_id is not None
        self.cookie_id = cookie_id
        self.settings = UISettings(registry_url="https://registry.example/registry", **settings)

    async def visit(self, transport: httpx.MockTransport) -> list[str]:
        agents = [{"id": AGENT, "name": "bot"}]
        client = RegistryClient(
            "https://registry.example/registry",
            transport=serving(transport, "/v1/agents", agents),
            audit_page_size=self.audit_page_size,
        )
        pages = Pages(settings=self.settings, registry=client, store=self.store)
        built = {"type": "http", "method": "GET", "path": "/audit", "root_path": "", "headers": []}
        built |= {"query_string": b"", "state": {"agentauth_cookie_id": self.cookie_id}}
        browser = Client(page("/audit"), request=Request(built))
        try:
            with browser:
                session = self.store.get(self.cookie_id)
                assert session is not None
                await pages._audit(self.cookie_id, session, AGENT)
        finally:
            await client.aclose()
        return [
            e.text for e in browser.layout.descendants() if isinstance(e, TextElement) and e.text
        ]


@pytest.mark.asyncio
async def test_the_page_catches_a_rollback_between_visits(signer: PrivateKey) -> None:
    """The registry serves its size-6 checkpoint, then on the next visit its older size-4
    one: genuine, so on its own it verifies, with events 4 and 5 young enough to await a
    checkpoint. The page forgot the first visit, and said the trail verifies."""
    events = recent_chain()
    four = signed_checkpoint(events[:4], signer, time=dated_after(events[:4]))
    six = signed_checkpoint(events, signer, time=dated_after(events))

    def registry(latest: str, size: int) -> httpx.MockTransport:
        return registry_serving(
            [events[i] for i in MINE],
            [{"chain": CHAIN, "size": size, "signed": latest}],
            lambda seq: proof_for(events[:size], seq, latest),
            audit_keys_of(signer),
        )

    audit = AuditPage()
    assert "✓ The audit trail verifies" in await audit.visit(registry(six, 6))
    texts = await audit.visit(registry(four, 4))
    assert "✗ The audit trail does not verify" in texts
    assert any(t.startswith(f"✗ {CHAIN}: rolled back") for t in texts), texts
    # The page still holds the registry to size 6: a reload does not make the rollback good.
    assert "✗ The audit trail does not verify" in await audit.visit(registry(four, 4))
    assert "✓ The audit trail verifies" in await audit.visit(registry(six, 6))


@pytest.mark.asyncio
async def test_the_page_marks_events_it_did_not_prove(signer: PrivateKey) -> None:
    texts = await AuditPage(max_inclusion_checks=2).visit(sealed_registry(signer, edited_amount))
    assert "✓ The audit trail verifies" not in texts
    assert "The audit trail is only partly checked: 1 event not proven" in texts
    assert texts.count("✓ proven") == 2 and texts.count("not proven") == 1


@pytest.mark.asyncio
@pytest.mark.parametrize("route", ["/v1/audit/events", "/v1/audit/checkpoints", "/proof"])
async def test_an_answer_that_is_not_json_is_a_problem_shown(
    signer: PrivateKey, route: str
) -> None:
    """A 200 whose body is not JSON raised JSONDecodeError, and the page failed to render."""
    honest = sealed_registry(signer)
    texts = await AuditPage().visit(serving(honest, route, b"<html>oops</html>"))
    assert "✓ The audit trail verifies" not in texts
    if route == "/proof":  # each event's proof fails, and the trail with them
        assert "✗ The audit trail does not verify" in texts
    else:  # nothing to check the trail with
        assert any(t.startswith("The registry failed to answer") for t in texts), texts


# --- a history longer than one page ------------------------------------------------------------


def long_registry(
    signer: PrivateKey, *, fail: Callable[[httpx.Request], httpx.Response | None] | None = None
) -> tuple[list[AuditEvent], httpx.MockTransport]:
    """A recent chain of 12 events, all the agent's, sealed by one checkpoint; ``fail`` may
    answer a listing request in the registry's place."""
    events = build_chain(12, start_ms=int(time.time() * 1000) - 10_000)
    latest = signed_checkpoint(events, signer, time=dated_after(events))
    honest = registry_serving(
        events,
        [{"chain": CHAIN, "size": len(events), "signed": latest}],
        lambda seq: proof_for(events, seq, latest),
        audit_keys_of(signer),
    )

    def handler(request: httpx.Request) -> httpx.Response:
        if fail is not None and request.url.path == "/registry/v1/audit/events":
            answer = fail(request)
            if answer is not None:
                return answer
        return honest.handle_request(request)

    return events, httpx.MockTransport(handler)


async def fetched_newest(transport: httpx.MockTransport, most: int) -> AuditTrail:
    """The trail of the agent's newest ``most`` events, read 4 at a time."""
    client = RegistryClient(
        "https://registry.example/registry", transport=transport, audit_page_size=4
    )
    try:
        return await AuditTrail.fetch(client, "ses_test", AGENT, most=most)
    finally:
        await client.aclose()


@pytest.mark.asyncio
async def test_a_history_past_the_bound_shows_its_newest_events_checked(
    signer: PrivateKey,
) -> None:
    """12 events in pages of 4, at most 6 read: the newest 6 (two pages, the second cut
    short), their links and proofs checked, and the older ones said to be unread. Until
    2026-11-30 the page read the registry's first page only: its oldest events."""
    events, transport = long_registry(signer)
    trail = await fetched_newest(transport, 6)
    assert [e.seq for e in trail.events] == [6, 7, 8, 9, 10, 11]
    assert trail.ok, trail.all_problems
    assert (trail.links_checked, trail.proven, trail.unproven) == (5, 6, [])
    assert trail.unread == "older" and trail.read_error is None and not trail.complete
    exported = trail.export(now=time.time())
    assert exported["events"] == listed(events[6:])
    assert exported["verification"]["ok"] is False
    assert exported["verification"]["events_not_read"] == "older"


@pytest.mark.asyncio
async def test_a_history_within_the_bound_is_read_whole_across_pages(signer: PrivateKey) -> None:
    """All 12 events through three pages at their Link's cursor, every link checked (also
    across page boundaries): the trail verifies completely. Only the cursor is taken from a
    link, so one naming another host gets neither a request nor the session token."""
    hosts: list[str] = []

    def note(request: httpx.Request) -> None:
        hosts.append(request.url.host)

    events, honest = long_registry(signer)

    def handler(request: httpx.Request) -> httpx.Response:
        note(request)
        if request.url.path == "/registry/v1/audit/events":
            return listing(request, listed(events), link="https://elsewhere.example/x")
        return honest.handle_request(request)

    trail = await fetched_newest(httpx.MockTransport(handler), 100)
    assert [e.seq for e in trail.events] == list(range(12))
    assert trail.complete and trail.unread is None, trail.all_problems
    assert trail.links_checked == 12  # the genesis link and the 11 between neighbours
    assert set(hosts) == {"registry.example"}


def failing_after_the_first_page(answer: httpx.Response) -> Callable[..., httpx.Response | None]:
    return lambda request: answer if "cursor" in request.url.params else None


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            httpx.Response(503, json={"error": "unavailable", "error_description": "down"}),
            "The registry failed to answer. Try again in a moment.",
        ),
        (httpx.Response(200, json={"events": []}), "The registry failed to answer."),
    ],
)
async def test_a_registry_failing_on_a_later_page_leaves_what_was_read_shown(
    signer: PrivateKey, answer: httpx.Response, message: str
) -> None:
    """The second page fails (or is no list): the newest 4 events, read on the first, are
    shown and checked, the page says the older ones could not be read, and renders."""
    _, transport = long_registry(signer, fail=failing_after_the_first_page(answer))
    trail = await fetched_newest(transport, 100)
    assert [e.seq for e in trail.events] == [8, 9, 10, 11]
    assert trail.ok and trail.proven == 4 and trail.unread == "older"
    assert trail.read_error is not None and not trail.complete
    texts = await AuditPage(audit_page_size=4).visit(transport)
    assert "The audit trail is only partly checked: older events not read" in texts
    assert any(
        t.startswith("History: only the newest 4 events of this agent are shown: reading older")
        for t in texts
    ), texts
    notice = next(t for t in texts if t.startswith("Only the newest 4 events could be read"))
    assert message in notice, notice
    assert texts.count("✓ proven") == 4
    assert f"{CHAIN}:11" in texts and f"{CHAIN}:7" not in texts


@pytest.mark.asyncio
async def test_a_link_to_the_next_page_that_is_no_url_leaves_what_was_read_shown(
    signer: PrivateKey,
) -> None:
    """httpx.URL raises InvalidURL, which is no HTTPError, on a ``Link`` target such as
    ``::::``: it went through AuditTrail.fetch and failed the audit page as it was built
    (NiceGUI's error page) instead of being the registry's failure, said."""
    served: list[AuditEvent] = []

    def first_page(request: httpx.Request) -> httpx.Response | None:
        if "cursor" in request.url.params:
            return None
        newest = listed(served)[::-1][:4]
        return httpx.Response(200, json=newest, headers={"Link": '<::::?cursor=4>; rel="next"'})

    events, transport = long_registry(signer, fail=first_page)
    served += events
    trail = await fetched_newest(transport, 100)
    assert [e.seq for e in trail.events] == [8, 9, 10, 11]
    assert trail.ok and trail.unread == "older" and not trail.complete
    assert trail.read_error is not None and trail.read_error.code == "502 invalid_response"
    texts = await AuditPage(audit_page_size=4).visit(transport)
    assert "The audit trail is only partly checked: older events not read" in texts


@pytest.mark.asyncio
async def test_the_page_shows_a_busy_agents_newest_events_and_says_so(signer: PrivateKey) -> None:
    """Until 2026-11-30 the page showed the registry's first page, the oldest events, and
    said nothing of the rest."""
    _, transport = long_registry(signer)
    texts = await AuditPage(max_audit_events=6, audit_page_size=4).visit(transport)
    assert "The audit trail is only partly checked: older events not read" in texts
    assert (
        "History: only the newest 6 events of this agent are shown (the most this page reads);"
        " it has older ones, neither shown nor checked here."
    ) in texts
    assert f"{CHAIN}:11" in texts and f"{CHAIN}:6" in texts and f"{CHAIN}:5" not in texts
    assert texts.count("✓ proven") == 6
    assert not any(t.startswith("Only the newest") for t in texts)  # no failure to report


@pytest.mark.asyncio
async def test_a_registry_that_lists_oldest_first_only_is_not_taken_for_newest(
    signer: PrivateKey,
) -> None:
    """A registry from before order=desc ignores it: its first page holds the oldest
    events, and its Link no order. The page says it shows the oldest, newer ones unread."""
    events, honest = long_registry(signer)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/registry/v1/audit/events":
            params = dict(request.url.params)
            assert params.pop("order") == "desc"
            older = httpx.Request("GET", request.url.copy_with(params=params))
            return listing(older, listed(events))
        return honest.handle_request(request)

    trail = await fetched_newest(httpx.MockTransport(handler), 100)
    assert [e.seq for e in trail.events] == [0, 1, 2, 3] and trail.unread == "newer"
    assert trail.ok and not trail.complete, trail.all_problems
    texts = await AuditPage(audit_page_size=4).visit(httpx.MockTransport(handler))
    assert "The audit trail is only partly checked: newer events not read" in texts
    assert any(t.startswith("History: only the oldest 4 events") for t in texts), texts
