"""The stages a verification waits on are timed: grant lookup, shard call, audit commit.

The verifier runs in-process over the session's real shard actors (the shard-side commit
is timed by an in-process ``StateShard`` with a real PostgreSQL behind it), and
``agentauth.metrics.metric`` is swapped for a recorder: Ray's metrics cannot be read back
here without a Prometheus scrape.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
from conftest import verifier_settings
from registry_world import World
from shard_checks import a_check

from agentauth.protocol import Capability, Envelope, create_dpop_proof

pytestmark = [pytest.mark.ray, pytest.mark.postgres, pytest.mark.redis]
API = "https://api.example/v1/things"


class Recorder:
    """Stands in for ``agentauth.metrics.metric``: remembers every observation."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float, dict[str, str] | None]] = []

    def __call__(self, name: str) -> Any:
        recorder = self

        class _Metric:
            def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
                recorder.seen.append((name, value, tags))

            def set(self, value: float, tags: dict[str, str] | None = None) -> None:
                return None

            def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
                return None

        return _Metric()

    def of(self, name: str) -> list[tuple[float, dict[str, str] | None]]:
        return [(value, tags) for n, value, tags in self.seen if n == name]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    from agentauth import metrics

    rec = Recorder()
    monkeypatch.setattr(metrics, "metric", rec)
    return rec


async def _verify_twice(world: World, registry_settings: Any) -> tuple[Any, list[dict[str, Any]]]:
    """Two verifications of one new grant's token through an in-process verifier."""
    from agentauth.deployments.verifier import shard_handles
    from agentauth.verifier import Verifier, create_app

    _, agent, provider, grant = await world.setup_grant(
        capabilities=[Capability.read("things/*").to_document()]
    )
    token = (await world.token(agent, grant["id"])).json()["access_token"]
    settings = verifier_settings(registry_settings)
    verifier = await Verifier.open(settings, shard_handles(settings))
    answers = []
    try:
        for _ in range(100):  # until its revocation listener has subscribed
            if verifier.revocations.fresh():
                break
            await asyncio.sleep(0.05)
        transport = httpx.ASGITransport(app=create_app(verifier))
        async with httpx.AsyncClient(transport=transport, base_url="http://verifier") as client:
            for _ in range(2):
                proof = create_dpop_proof(
                    agent.key, htm="GET", htu=API, now=time.time(), access_token=token
                )
                body = {
                    "token": token,
                    "proof": proof,
                    "method": "GET",
                    "url": API,
                    "action": {"kind": "read", "resource": "things/1"},
                }
                r = await client.post("/v1/verify", headers=provider.headers, json=body)
                assert r.status_code == 200, r.text
                answers.append(r.json())
    finally:
        await verifier.close()
    return settings, answers


async def _three_checks_on_a_new_shard(database_url: str, index: int) -> list[Any]:
    from agentauth.actors import StateShard

    envelope = Envelope.model_validate({"rate_limits": [{"max_count": 10, "window_seconds": 60}]})
    shard = StateShard(index=index, database_url=database_url)
    try:
        return await shard.check_batch(
            [
                a_check("stage", grant_id=f"grt_stage_{index}", envelope=envelope, token_jti="tok")
                for _ in range(3)
            ]
        )
    finally:
        await shard.close()


@pytest.mark.asyncio
async def test_a_verification_times_its_grant_lookup_and_shard_call(
    world: World, registry_settings: Any, recorder: Recorder
) -> None:
    settings, answers = await _verify_twice(world, registry_settings)
    assert [a["decision"] for a in answers] == ["allow", "allow"], answers
    # The grant was new to this verifier: one lookup; the second request found it in the
    # verifier's memory and looked nothing up.
    lookups = recorder.of("grant_lookup")
    assert len(lookups) == 1
    assert 0 < lookups[0][0] < 2.0 and lookups[0][1] is None
    calls = recorder.of("shard_call")
    assert len(calls) == 2  # one batch per request: they were sent one after the other
    assert all(0 < value < settings.shard_timeout for value, _ in calls)
    # Both went to the agent's one shard, named in the tag.
    shards = {tags["shard"] for _, tags in calls if tags is not None}
    assert len(shards) == 1 and shards <= {str(i) for i in range(settings.shards)}
    assert len(recorder.of("verify_latency")) == 2
    # Each request's own latency covers its shard call.
    assert min(v for v, _ in recorder.of("verify_latency")) >= min(v for v, _ in calls)


@pytest.mark.asyncio
async def test_a_shard_times_each_audit_commit(
    migrated_database_url: str, recorder: Recorder
) -> None:
    results = await _three_checks_on_a_new_shard(migrated_database_url, 703)
    assert [(r.allowed, r.reason) for r in results] == [(True, "ok")] * 3
    commits = recorder.of("audit_commit")
    assert len(commits) == 1  # three decisions, one group commit
    assert 0 < commits[0][0] < 2.0 and commits[0][1] == {"shard": "703"}


@pytest.mark.asyncio
async def test_a_failing_metrics_backend_changes_no_decision(
    world: World,
    registry_settings: Any,
    migrated_database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from agentauth import metrics

    def broken(name: str) -> Any:
        raise RuntimeError("metrics backend down")

    monkeypatch.setattr(metrics, "metric", broken)
    monkeypatch.setattr(metrics, "_failing", set())
    # Every timed stage fails to record: the lookup, the shard calls, the commit.
    _, answers = await _verify_twice(world, registry_settings)
    assert [(a["decision"], a["reason"]) for a in answers] == [("allow", "ok")] * 2
    results = await _three_checks_on_a_new_shard(migrated_database_url, 704)
    assert [(r.allowed, r.reason) for r in results] == [(True, "ok")] * 3
    # Said once per metric, not once per observation (the verifier's buffered counters,
    # flushed on close, fail too).
    warned = [r.getMessage() for r in caplog.records if r.name == "agentauth.metrics"]
    assert len(warned) == len(set(warned))
    assert {
        f"metric {name} could not be recorded; dropping its observations"
        for name in ("grant_lookup", "shard_call", "verify_latency", "audit_commit", "decisions")
    } <= set(warned)
