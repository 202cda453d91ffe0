"""Metrics are recorded through Ray's metrics system and are no-ops without Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_metrics_are_no_ops_without_ray() -> None:
    code = (
        "from agentauth.metrics import metric\n"
        "from agentauth.metrics import _SPECS\n"
        "for name in _SPECS:\n"
        "    m = metric(name); m.inc(1.0, {}) if hasattr(m, 'inc') else None\n"
        "import sys; print('ray' in sys.modules and __import__('ray').is_initialized())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_metrics_are_real_ray_metrics_under_ray(serve_port: int) -> None:
    # serve_port: the session's Ray cluster is up in this process.
    from ray.util import metrics

    from agentauth.metrics import metric

    decisions = metric("decisions")
    decisions.inc(1.0, {"decision": "deny", "reason": "rate_limited"})
    latency = metric("verify_latency")
    latency.observe(0.003)
    assert isinstance(decisions, metrics.Counter)
    assert isinstance(latency, metrics.Histogram)
    assert metric("decisions") is decisions  # created once per process


def test_counter_buffer_sums_until_flushed(monkeypatch: pytest.MonkeyPatch) -> None:
    from agentauth import metrics

    recorded: list[tuple[str, float, dict[str, str] | None]] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
            recorded.append((self.name, value, tags))

    monkeypatch.setattr(metrics, "metric", Recorder)
    buffer = metrics.CounterBuffer()
    for _ in range(3):
        buffer.inc("decisions", {"decision": "allow", "reason": "ok"})
    buffer.inc("decisions", {"decision": "deny", "reason": "replay_detected"})
    buffer.inc("tokens_issued", value=2.0)
    buffer.inc("cache_hits", {"cache": "grant_redis"}, 0.0)  # Ray would refuse a 0 increment
    assert recorded == []  # nothing reaches Ray before a flush
    buffer.flush()
    assert sorted(recorded, key=repr) == sorted(
        [
            ("decisions", 3.0, {"decision": "allow", "reason": "ok"}),
            ("decisions", 1.0, {"decision": "deny", "reason": "replay_detected"}),
            ("tokens_issued", 2.0, None),
        ],
        key=repr,
    )
    buffer.flush()
    assert len(recorded) == 3  # a flush empties the buffer
