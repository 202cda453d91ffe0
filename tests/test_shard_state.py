"""The pure core of a shard: check-and-reserve without Ray or a database."""

from __future__ import annotations

import gc
import math
import sys
from decimal import Decimal

from agentauth.actors import Check, ShardState
from agentauth.actors._state import usage_from_events, usage_to_json
from agentauth.protocol import Action, Envelope, RateLimit, UsageState

NOW = 1_800_000_000.0
READ = Action(kind="read", resource="r")


def check(jti: str = "j1", *, iat: float = NOW, grant: str = "g1", **kw: object) -> Check:
    fields: dict[str, object] = {
        "agent_id": "a1",
        "provider_id": "p1",
        "grant_id": grant,
        "jkt": "k1",
        "jti": jti,
        "iat": iat,
        "action": READ,
        "envelope": Envelope(),
    }
    fields.update(kw)
    return Check(**fields)  # type: ignore[arg-type]


def test_a_proof_is_single_use_even_when_denied() -> None:
    state = ShardState(started_at=NOW)
    limited = Envelope(rate_limits=(RateLimit(max_count=1, window_seconds=30),))
    assert state.decide(check(envelope=limited), NOW).allowed
    assert state.decide(check(envelope=limited), NOW).reason == "replay_detected"
    assert state.decide(check("j2", envelope=limited), NOW).reason == "rate_limited"
    # Denied, yet spent: the same proof is refused once the window has room again.
    assert state.decide(check("j2", envelope=limited), NOW + 31).reason == "replay_detected"
    assert state.decide(check("j3", iat=NOW + 31, envelope=limited), NOW + 31).allowed


def test_a_proof_outside_its_age_by_the_shards_own_clock_is_refused() -> None:
    """The verifier checks a proof's age on its clock, the shard keeps the jti window on its
    own: with the two apart by more than the skew, a proof could outlive its jti entry (a
    replay) or pass a restarted shard's floor. So the shard checks the age too."""
    state = ShardState(started_at=NOW)
    age, skew = state.policy.max_age, state.policy.future_skew
    assert state.decide(check("old", iat=NOW - age - 1), NOW).reason == (
        "invalid_dpop_proof:iat_too_old"
    )
    assert state.decide(check("ahead", iat=NOW + skew + 1), NOW).reason == (
        "invalid_dpop_proof:iat_in_future"
    )
    assert state.decide(check("edge-old", iat=NOW - age), NOW).allowed
    assert state.decide(check("edge-ahead", iat=NOW + skew), NOW).allowed


def test_a_restarted_shard_refuses_proofs_its_predecessor_may_have_seen() -> None:
    state = ShardState(started_at=NOW, replay_floor=NOW - 5)
    assert state.decide(check("old", iat=NOW - 30), NOW).reason == "shard_restarted"
    assert state.decide(check("edge", iat=NOW - 5), NOW).reason == "shard_restarted"
    assert state.decide(check("new", iat=NOW - 4.999), NOW).allowed
    fresh = ShardState(started_at=NOW)  # a brand-new shard has no predecessor
    assert fresh.decide(check("any", iat=NOW - 30), NOW).allowed


def test_the_newest_reserved_proof_is_tracked_and_only_reserved_ones_count() -> None:
    """What a commit records as the chain's replay mark: the newest iat this incarnation
    reserved. A proof refused before its reservation (dated too far ahead, too old, under
    the floor, or denied by the verifier) must not move it: one dated ahead would otherwise
    make the next incarnation refuse every agent of the shard until that time."""
    state = ShardState(started_at=NOW, replay_floor=NOW - 20)
    skew = state.policy.future_skew
    assert state.newest_reserved == 0.0
    assert state.decide(check("a", iat=NOW - 3), NOW).allowed
    assert state.newest_reserved == NOW - 3
    refused = [
        check("ahead", iat=NOW + skew + 5),
        check("old", iat=NOW - 3600),
        check("floor", iat=NOW - 25),
        check("verifier", iat=NOW + 1, deny="provider_mismatch"),
    ]
    assert not any(state.decide(c, NOW).allowed for c in refused)
    assert state.newest_reserved == NOW - 3
    # Reserved though denied (a replay of it is refused all the same): it counts.
    limited = Envelope(rate_limits=(RateLimit(max_count=1, window_seconds=30),))
    assert state.decide(check("b", iat=NOW - 1, envelope=limited), NOW).allowed
    assert state.decide(check("c", iat=NOW + 2, envelope=limited), NOW).reason == "rate_limited"
    assert state.newest_reserved == NOW + 2
    # An older proof arriving later leaves it where it is.
    assert state.decide(check("d", iat=NOW - 10), NOW).allowed
    assert state.newest_reserved == NOW + 2


def test_verifier_denials_are_recorded_not_decided() -> None:
    state = ShardState(started_at=NOW)
    outcome = state.decide(check(deny="invalid_token:expired"), NOW)
    assert (outcome.allowed, outcome.reason) == (False, "invalid_token:expired")
    assert not state.jtis


def test_a_time_window_opens_exactly_at_its_start() -> None:
    """The shard decides on whole milliseconds, but the edge it applies is exact: the
    millisecond before 09:00 is outside, and so is any instant before it (as offline)."""
    opens = 1_717_405_200.0  # Monday 2024-06-03 09:00 UTC
    window = {"days": ["mon"], "start": "09:00", "end": "17:00"}
    env = Envelope.model_validate({"time_windows": [window]})
    state = ShardState(started_at=opens - 60)
    for jti, now, allowed in [
        ("ms", opens - 0.001, False),
        ("float", math.nextafter(opens, 0), False),
        ("start", opens, True),
    ]:
        outcome = state.decide(check(jti, iat=now, envelope=env), now)
        assert outcome.allowed is allowed, jti
        assert outcome.reason == ("ok" if allowed else "outside_time_window")


def test_step_up_reference_is_single_use_and_must_be_valid() -> None:
    state = ShardState(started_at=NOW)
    tx = Action(kind="transact", resource="p", amount="90", currency="USD")
    env = Envelope.model_validate({"step_up_threshold": {"amount": "50", "currency": "USD"}})
    assert state.decide(check("a", action=tx, envelope=env), NOW).reason == "step_up_required"
    bad = check("b", action=tx, envelope=env, step_up_ref="r1", step_up_valid=False)
    assert state.decide(bad, NOW).reason == "step_up_invalid"
    good = check("c", action=tx, envelope=env, step_up_ref="r1", step_up_valid=True)
    assert state.decide(good, NOW).allowed
    again = check("d", action=tx, envelope=env, step_up_ref="r1", step_up_valid=True)
    assert state.decide(again, NOW).reason == "step_up_invalid"


def test_spent_step_up_references_are_forgotten_with_their_proofs_and_counted() -> None:
    """A spent reference is kept while the proof that spent it could verify, and forgotten
    with it (past that, the shard's lookup in verifier_step_up_uses refuses it; see
    test_shard_restore.py). While kept, it counts in the memory report."""
    tx = Action(kind="transact", resource="p", amount="90", currency="USD")
    policy = ShardState(started_at=NOW).policy
    window = policy.max_age + policy.future_skew

    def decided(*, refs: bool) -> ShardState:
        state = ShardState(started_at=NOW)
        for i in range(200):
            ref = {"step_up_ref": f"sur_{i:040d}", "step_up_valid": True} if refs else {}
            assert state.decide(check(f"j{i}", grant=f"g{i}", action=tx, **ref), NOW).allowed
        return state

    state, plain = decided(refs=True), decided(refs=False)
    held = sum(sys.getsizeof(ref) for ref in state.used_refs)
    assert state.memory_bytes() - plain.memory_bytes() >= held
    # Pruned while the proofs can still verify: still spent.
    late = NOW + window - 1
    state.prune(late, idle_grants_after=600)
    reuse = check("again", iat=late, action=tx, step_up_ref=f"sur_{0:040d}", step_up_valid=True)
    assert state.decide(reuse, late).reason == "step_up_invalid"
    state.prune(NOW + window + 1, idle_grants_after=600)
    assert not state.used_refs


def test_usage_survives_through_its_durable_form() -> None:
    state = ShardState(started_at=NOW)
    env = Envelope.model_validate(
        {"spend_limits": [{"amount": "100", "currency": "USD", "period": "day"}]}
    )
    tx = Action(kind="transact", resource="p", amount="60", currency="USD")
    outcome = state.decide(check("a", action=tx, envelope=env), NOW)
    assert outcome.allowed and outcome.usage is not None
    restored = ShardState(started_at=NOW + 1)
    restored.restore("g1", usage_from_events(usage_to_json(outcome.usage), [NOW]), NOW + 1)
    assert restored.decide(check("b", action=tx, envelope=env), NOW + 1).reason == (
        "cumulative_limit_exceeded"
    )
    small = Action(kind="transact", resource="p", amount="40", currency="USD")
    assert restored.decide(check("c", action=small, envelope=env), NOW + 1).allowed
    usage = restored.usage("g1")
    assert usage is not None and usage.spend[0][1] == Decimal(100)


def test_grant_state_leaves_nothing_for_a_full_collection_to_walk() -> None:
    """A shard keeps every active grant's usage; objects the collector tracks would make
    each full collection walk all of them (34 ms for 100,000 grants here, most of the
    verifier's shard timeout). Once collections have seen them, grants add no tracked
    objects, spend limits (strings and Decimals) included."""
    env = Envelope.model_validate(
        {
            "rate_limits": [{"max_count": 10, "window_seconds": 60}],
            "spend_limits": [{"amount": "100", "currency": "USD", "period": "day"}],
        }
    )
    tx = Action(kind="transact", resource="p", amount="1", currency="USD")
    state = ShardState(started_at=NOW)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(2000):
        outcome = state.decide(check(f"j{i}", grant=f"g{i}", action=tx, envelope=env), NOW)
        assert outcome.allowed
    # A collection untracks a tuple whose items are all untracked, so nested ones (a spend
    # pair in the spend tuple in the entry) may take one collection per level.
    for _ in range(3):
        gc.collect()
    assert len(state.grants) == 2000
    assert not any(gc.is_tracked(entry) for entry in state.grants.values())
    # A little slack for whatever else the interpreter made meanwhile; one object per
    # grant would be 2,000 more.
    assert len(gc.get_objects()) - before < 200
    # Deciding again on an untracked entry works as before.
    usage = state.usage("g7")
    assert usage is not None and usage.spend[0][1] == Decimal(1)
    assert state.decide(check("again", grant="g7", action=tx, envelope=env), NOW).allowed
    usage = state.usage("g7")
    assert usage is not None and usage.spend[0][1] == Decimal(2)


def test_prune_bounds_memory() -> None:
    state = ShardState(started_at=NOW)
    for i in range(500):
        state.decide(check(f"j{i}", grant=f"g{i % 50}"), NOW)
    before = state.memory_bytes()
    assert len(state.jtis) == 500 and len(state.grants) == 50
    later = NOW + state.policy.max_age + state.policy.future_skew + 1
    state.prune(later, idle_grants_after=600)
    assert not state.jtis and len(state.grants) == 50
    state.prune(NOW + 601, idle_grants_after=600)
    assert not state.grants
    assert state.memory_bytes() < before


def test_prune_keeps_live_proofs_and_catches_up_on_late_ones() -> None:
    state = ShardState(started_at=NOW)
    window = state.policy.max_age + state.policy.future_skew
    # Arrival order is not expiry order: a proof issued 5 s into the future (within the
    # allowed skew) arrives first, one issued "now" after it.
    assert state.decide(check("ahead", iat=NOW + 5), NOW).allowed
    assert state.decide(check("plain", iat=NOW), NOW).allowed
    # Between the two expiries nothing is dropped early (the later expiry came first, and
    # the queue is in arrival order), and the proof from ahead is refused.
    state.prune(NOW + window + 1, idle_grants_after=600)
    assert len(state.jtis) == 2
    assert not state.decide(check("ahead", iat=NOW + 5), NOW + window + 1).allowed
    # Once the first has expired too, both go.
    state.prune(NOW + window + 6, idle_grants_after=600)
    assert not state.jtis


def test_prune_takes_only_the_expired_front_of_the_window_round_after_round() -> None:
    """The jti window's own order is the expiry queue: each prune drops what expired, in
    arrival order, and keeps everything after it, however many prunes and arrivals
    interleave."""
    state = ShardState(started_at=NOW)
    window = state.policy.max_age + state.policy.future_skew
    live: list[str] = []
    for second in range(0, 200, 10):
        t = NOW + second
        for i in range(5):
            jti = f"j{second}-{i}"
            assert state.decide(check(jti, iat=t), t).allowed
            live.append(jti)
        state.prune(t, idle_grants_after=600)
        # Still in the window: those issued within `window` seconds before t.
        expected = {j for j in live if NOW + int(j[1:].split("-")[0]) + window >= t}
        assert {key.split(":", 1)[1][2:] for key in state.jtis} == expected


def test_prune_evicts_grants_idle_since_their_last_allow_not_since_they_arrived() -> None:
    """Grants are kept in last-use order and evicted off the front: one used again late
    stays however early it first came, the others go once idle long enough."""
    state = ShardState(started_at=NOW)
    window = state.policy.max_age + state.policy.future_skew
    for i, grant in enumerate(("g-old", "g-mid", "g-new")):
        assert state.decide(check(f"first-{grant}", grant=grant, iat=NOW + i), NOW + i).allowed
    # g-old is used again 100 s later: it moves behind the others.
    assert state.decide(check("again", grant="g-old", iat=NOW + 100), NOW + 100).allowed
    assert list(state.grants) == ["g-mid", "g-new", "g-old"]
    state.prune(NOW + 601.5, idle_grants_after=600)  # g-mid idle 600.5 s, g-new 599.5 s
    assert list(state.grants) == ["g-new", "g-old"]
    state.prune(NOW + 650, idle_grants_after=600)
    assert list(state.grants) == ["g-old"]
    state.prune(NOW + 700 + window, idle_grants_after=600)
    assert not state.grants
    # A grant seen again after its eviction is rebuilt (restore) and kept in order too.
    usage = UsageState(recent=(NOW + 700,))
    state.restore("g-old", usage, NOW + 800)
    assert state.usage("g-old") == usage and list(state.grants) == ["g-old"]
