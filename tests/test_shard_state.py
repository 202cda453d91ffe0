"""The pure core of a shard: check-and-reserve without Ray or a database."""

from __future__ import annotations

from decimal import Decimal

from agentauth.actors import Check, ShardState
from agentauth.actors._state import usage_from_events, usage_to_json
from agentauth.protocol import Action, Envelope, RateLimit

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
    skew = state.policy.future_skew
    assert state.decide(check("old", iat=NOW - 30), NOW).reason == "shard_restarted"
    assert state.decide(check("edge", iat=NOW - 5 + skew), NOW).reason == "shard_restarted"
    assert state.decide(check("new", iat=NOW - 5 + skew + 1), NOW).allowed
    fresh = ShardState(started_at=NOW)  # a brand-new shard has no predecessor
    assert fresh.decide(check("any", iat=NOW - 30), NOW).allowed


def test_verifier_denials_are_recorded_not_decided() -> None:
    state = ShardState(started_at=NOW)
    outcome = state.decide(check(deny="invalid_token:expired"), NOW)
    assert (outcome.allowed, outcome.reason) == (False, "invalid_token:expired")
    assert not state.jtis


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
    assert restored.grants["g1"].usage.spend[0][1] == Decimal(100)


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
