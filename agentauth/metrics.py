"""Prometheus metrics through Ray's metrics system (names get Ray's ``ray_`` prefix).

Inside Ray (Serve replicas, actors, a driver after ``ray.init``) these are real Ray
metrics, scraped from each node's metrics agent; elsewhere (a verifier embedded in a test
or a plain script) they are no-ops, so the service code records unconditionally.

    agentauth_decisions_total{decision, reason}
    agentauth_verify_latency_seconds            histogram
    agentauth_grant_lookup_seconds              histogram: one grant-status lookup (Redis,
                                                then PostgreSQL for the misses)
    agentauth_shard_queue_seconds{shard}        histogram: how long a batch's oldest check
                                                waited in the replica before its call left
    agentauth_shard_call_seconds{shard}         histogram: one batch's round trip to its
                                                shard (decide and audit commit included)
    agentauth_audit_commit_seconds{shard}       histogram: one group commit of audit rows
    agentauth_cache_hits_total{cache} / agentauth_cache_misses_total{cache}
    agentauth_shard_queue_depth                 gauge
    agentauth_shard_overruns_total{shard, acknowledged}
                                                shard calls past shard_timeout;
                                                acknowledged "false": the shard was not running
    agentauth_audit_lag_seconds                 gauge: age of the oldest event not yet
                                                covered by a signed checkpoint
    agentauth_tokens_issued_total
    agentauth_fail_closed_total{dependency}
    agentauth_anonymous_refused_total{reason}   anonymous starts refused: rate_limited,
                                                too_many_challenges, limits_unavailable
    agentauth_anonymous_fallback_total          anonymous starts decided by a replica's
                                                own memory (Redis unreachable)
    agentauth_step_up_waits_refused_total{bound}
                                                step-up long polls refused 429: bound
                                                "caller" or "replica"

Every label value is one of a set fixed by the code (reasons, shard indexes, dependency
names), never a caller's text. In case one ever is not, each metric keeps at most 1,024
label sets, and values past that (or longer than 64 characters) are recorded as ``other``,
said once in the log: no caller can grow the series a scrape returns without bound.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

__all__ = ["CounterBuffer", "increment", "metric", "observe", "set_gauge"]

log = logging.getLogger("agentauth.metrics")

_LATENCY_BOUNDS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0]
_SPECS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "decisions": ("counter", "agentauth_decisions_total", ("decision", "reason")),
    "verify_latency": ("histogram", "agentauth_verify_latency_seconds", ()),
    # The stages of a verification's wait, so a slow p99 can be traced to its dependency.
    "grant_lookup": ("histogram", "agentauth_grant_lookup_seconds", ()),
    "shard_queue": ("histogram", "agentauth_shard_queue_seconds", ("shard",)),
    "shard_call": ("histogram", "agentauth_shard_call_seconds", ("shard",)),
    "audit_commit": ("histogram", "agentauth_audit_commit_seconds", ("shard",)),
    "cache_hits": ("counter", "agentauth_cache_hits_total", ("cache",)),
    "cache_misses": ("counter", "agentauth_cache_misses_total", ("cache",)),
    "shard_queue_depth": ("gauge", "agentauth_shard_queue_depth", ()),
    # Shard calls past shard_timeout; acknowledged "false": the shard was not running.
    "shard_overruns": ("counter", "agentauth_shard_overruns_total", ("shard", "acknowledged")),
    "audit_lag": ("gauge", "agentauth_audit_lag_seconds", ()),
    "tokens_issued": ("counter", "agentauth_tokens_issued_total", ()),
    "fail_closed": ("counter", "agentauth_fail_closed_total", ("dependency",)),
    "anonymous_refused": ("counter", "agentauth_anonymous_refused_total", ("reason",)),
    "anonymous_fallback": ("counter", "agentauth_anonymous_fallback_total", ()),
    "step_up_waits_refused": ("counter", "agentauth_step_up_waits_refused_total", ("bound",)),
}
_made: dict[str, Any] = {}

# Label sets per metric at most: far above the largest legitimate count (256 shards times
# two acknowledged values; about 60 decision reasons), and a bound on what a scrape holds.
_MAX_SERIES = 1024
# A label value longer than this is no value the code sets.
_MAX_VALUE = 64
_OTHER = "other"
_series: dict[str, set[tuple[tuple[str, str], ...]]] = {}
_overflowed: set[str] = set()  # metrics whose overflow has been logged


class _NoOp:
    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        return None

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        return None

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        return None


def metric(name: str) -> Any:
    """The named metric (see the module docstring), real under Ray, a no-op otherwise."""
    if name in _made:
        return _made[name]
    kind, full, tags = _SPECS[name]
    try:
        import ray  # noqa: PLC0415 - the base install has no Ray; metrics are optional there
        from ray.util import metrics  # noqa: PLC0415

        if not ray.is_initialized():
            return _NoOp()  # not cached: Ray may be initialized later in this process
        if kind == "counter":
            made: Any = metrics.Counter(full, description=full, tag_keys=tags)
        elif kind == "gauge":
            made = metrics.Gauge(full, description=full, tag_keys=tags)
        else:
            made = metrics.Histogram(
                full, description=full, boundaries=_LATENCY_BOUNDS, tag_keys=tags
            )
    except ImportError:
        made = _NoOp()
    _made[name] = made
    return made


_failing: set[str] = set()


def _safely(name: str, record: Callable[[Any], None]) -> None:
    """Metrics decide nothing: callers record around work whose outcome is a decision (a
    shard call, a commit, a lookup), and a failing metrics backend must not turn into a
    deny, an error or a dead background task there. A failure is logged once per metric
    and the observation dropped."""
    try:
        record(metric(name))
    except Exception:
        if name not in _failing:
            _failing.add(name)
            log.warning("metric %s could not be recorded; dropping its observations", name)


def _bounded(name: str, tags: dict[str, str] | None) -> dict[str, str] | None:
    """``tags``, or every value ``other`` when they would be a label set past the
    metric's ``_MAX_SERIES`` or carry a value no code sets."""
    if not tags:
        return tags
    key = tuple(tags.items())
    seen = _series.setdefault(name, set())
    if key in seen:
        return tags
    if len(seen) < _MAX_SERIES and all(len(v) <= _MAX_VALUE for v in tags.values()):
        seen.add(key)
        return tags
    if name not in _overflowed:
        _overflowed.add(name)
        log.warning(
            "metric %s: labels beyond its %d label sets, or longer than %d characters, are"
            " recorded as %r (a bug: label values must come from a fixed set)",
            name,
            _MAX_SERIES,
            _MAX_VALUE,
            _OTHER,
        )
    return dict.fromkeys(tags, _OTHER)


def observe(name: str, value: float, tags: dict[str, str] | None = None) -> None:
    """One observation of the named histogram (never raises)."""
    _safely(name, lambda m: m.observe(value, _bounded(name, tags)))


def set_gauge(name: str, value: float, tags: dict[str, str] | None = None) -> None:
    """Set the named gauge (never raises)."""
    _safely(name, lambda m: m.set(value, _bounded(name, tags)))


def increment(name: str, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
    """Add to the named counter now (never raises); on hot paths, ``CounterBuffer``."""
    _safely(name, lambda m: m.inc(value, _bounded(name, tags)))


class CounterBuffer:
    """Counter increments summed in memory, handed to Ray by ``flush``.

    A Ray counter's ``inc`` costs tens of microseconds (tag checks, a lock, a record), a
    few percent of a verification when done several times per request; summing here and
    flushing once a second keeps the hot path to a dict update.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def inc(self, name: str, tags: dict[str, str] | None = None, value: float = 1.0) -> None:
        if value <= 0:
            return  # Ray counters refuse anything but positive increments
        key = (name, tuple(tags.items()) if tags else ())
        self._counts[key] = self._counts.get(key, 0.0) + value

    def flush(self) -> None:
        counts, self._counts = self._counts, {}
        for (name, tags), value in counts.items():
            increment(name, value, dict(tags) if tags else None)
