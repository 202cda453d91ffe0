"""The approval page's audit checks, in memory: a chain, a signed checkpoint, proofs.

The registry is played by documents built with ``agentauth.protocol`` (and by an
``httpx.MockTransport`` for ``AuditTrail.fetch``); each test makes it lie in one way.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from agentauth.protocol import (
    AuditEvent,
    AuditKey,
    AuditKeys,
    Checkpoint,
    KeySet,
    PrivateKey,
    PublicKey,
    b64url_encode,
    inclusion_proof,
    merkle_root,
    sign_checkpoint,
)
from agentauth.ui import (
    AuditTrail,
    RegistryClient,
    check_chains,
    check_checkpoints,
    check_inclusion,
    parse_events,
)

CHAIN = "registry-0"
AGENT = "agt_1"
MINE = (0, 1, 3, 4)  # the agent's events; 2 and 5 are another agent's


def build_chain(size: int = 6, *, start_ms: int = 1_000) -> list[AuditEvent]:
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
    signed = signed_checkpoint(events[:covered], signer)

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer ses_test"
        path = request.url.path
        if path == "/registry/v1/audit/events":
            assert request.url.params["agent_id"] == AGENT
            return httpx.Response(200, json=listed([events[i] for i in MINE]))
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
    events = build_chain()
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
