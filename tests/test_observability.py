"""What AgentAuth writes to logs and metrics: no secret in it, no caller able to grow it
without bound, and an outage said once rather than once per request."""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import socket
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pydantic import ValidationError

from agentauth import metrics
from agentauth._logs import Throttle
from agentauth._web import error_response
from agentauth.keys import SignerUnavailable
from agentauth.protocol import DependencyUnavailable

# What asyncpg and redis-py quote when a password holds an unescaped "/": its first part,
# taken for a port.
PASSWORD = "Pa55word-head/tail"
HEAD = "Pa55word-head"


def _dead_port() -> int:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))
        return int(placeholder.getsockname()[1])


# --- secrets -------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["database_url", "redis_url"])
def test_a_registry_url_with_an_unescaped_password_is_refused_without_quoting_it(
    field: str, tmp_path: Path
) -> None:
    """Left to the drivers, such a URL fails in the replica's constructor with "invalid
    literal for int() with base 10: 'Pa55word-head'" (asyncpg) or "Port could not be cast
    to integer value as ..." (redis-py), and Ray logs that. Refused by the settings, the
    error says what to fix and holds no part of the password."""
    from agentauth.registry import RegistrySettings

    values = {
        "database_url": "postgresql://postgres@127.0.0.1:5432/x",
        "redis_url": "redis://127.0.0.1:6379/0",
    }
    scheme = "postgresql" if field == "database_url" else "redis"
    values[field] = f"{scheme}://agentauth:{PASSWORD}@db.internal:5432/0"
    with pytest.raises(ValidationError) as refused:
        RegistrySettings(
            **values,
            data_dir=tmp_path,
            issuer="http://127.0.0.1:8000/registry",
            admin_token="admin-token-long-enough",
        )
    assert field in str(refused.value) and "percent-encode" in str(refused.value)
    assert HEAD not in str(refused.value) and "tail" not in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://agentauth:1234/rest@db.internal/agentauth",
        "redis://:5678?rest@cache.internal:6379/0",
        "postgresql://agentauth:9#rest@db.internal/agentauth",
    ],
)
def test_a_password_that_starts_with_digits_is_not_taken_for_a_port(url: str) -> None:
    """'1234' parses as a port when the password's '/' ends the authority there; the
    driver would then name 'agentauth:1234' as the host it failed to reach."""
    from agentauth.store import checked_url

    with pytest.raises(ValueError, match="percent-encode") as refused:
        checked_url(url)
    assert not any(piece in str(refused.value) for piece in ("1234", "5678", "rest"))
    for fine in (
        "postgresql://agentauth:p%2F1@db.internal:5432/agentauth?sslmode=require",
        "redis://127.0.0.1:6379/0",
        "postgresql:///agentauth?host=/var/run/postgresql",
    ):
        assert checked_url(fine) == fine


def test_a_verifier_url_with_an_unescaped_password_is_refused_without_quoting_it() -> None:
    from agentauth.verifier import VerifierSettings

    with pytest.raises(ValidationError) as refused:
        VerifierSettings(
            database_url=f"postgresql://agentauth:{PASSWORD}@db.internal/agentauth",
            redis_url="redis://127.0.0.1:6379/0",
            issuer="http://127.0.0.1:8000/registry",
        )
    assert "database_url" in str(refused.value)
    assert HEAD not in str(refused.value) and "tail" not in str(refused.value)


def test_the_archive_export_refuses_such_a_url_without_quoting_it(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A scheduled export's output lands in a job log: asyncpg's ValueError, uncaught,
    printed the password's first part in a traceback."""
    from agentauth.archive._cli import main

    url = f"postgresql://agentauth:{PASSWORD}@127.0.0.1:{_dead_port()}/agentauth"
    assert main(["export", "--database-url", url, "--archive", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "percent-encode" in err
    assert HEAD not in err and "tail" not in err


@pytest.mark.asyncio
@pytest.mark.parametrize("password", ["zq/xv wy", "zq/xv\twy"])
async def test_a_backend_url_password_with_a_space_stays_out_of_the_log(
    password: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client library quotes an address it cannot parse whole ("Failed to parse:
    http://ops:zq/xv wy@..."): the user info was masked only up to an "@" with no
    whitespace before it, so a password holding a space was logged as it was."""
    import hvac

    from agentauth.keys import _base
    from agentauth.keys._base import call_blocking

    monkeypatch.setattr(_base, "_said", Throttle())  # each case's line, not held back
    url = f"http://ops:{password}@127.0.0.1:{_dead_port()}"
    client = hvac.Client(url=url, token="s.token", timeout=1)
    with (
        caplog.at_level(logging.WARNING, logger="agentauth.keys"),
        pytest.raises(SignerUnavailable),
    ):
        await call_blocking(
            "Vault Transit", "open", 2.0, lambda: client.secrets.transit.read_key("k")
        )
    said = "\n".join(r.getMessage() for r in caplog.records if r.name == "agentauth.keys")
    assert "Failed to parse" in said and "//***@127.0.0.1" in said, said
    assert not any(piece in said for piece in ("zq", "xv", "wy", "ops")), said


# --- outages, said once ----------------------------------------------------------------------


def test_a_dependency_outage_is_logged_once_not_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every request fails alike while Redis or PostgreSQL is down; each still gets its
    503, and the log gets one line per kind of failure."""
    log = logging.getLogger("agentauth.test-outage-once")
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(50):
            answer = error_response(DependencyUnavailable("the replay cache is unavailable"), log)
            assert answer.status_code == 503
        for _ in range(50):
            assert error_response(ConnectionRefusedError(), log).status_code == 503
    said = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert said == [
        "request failed: temporarily_unavailable (the replay cache is unavailable)",
        "dependency failure: ConnectionRefusedError",
    ]


def _raise_here(exc: Exception) -> Exception:
    """``exc`` raised and caught at one place, as a handler receives it."""
    try:
        raise exc
    except Exception as caught:
        return caught


def _raise_elsewhere(exc: Exception) -> Exception:
    try:
        raise exc
    except Exception as caught:
        return caught


def test_a_bug_a_request_can_reach_is_not_logged_once_per_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Whoever finds a request that fails unexpectedly can send it again and again: each
    got its 500 and wrote its whole traceback to the log. Each still gets its 500; the
    traceback is written once per period for each place it is raised, with the count of
    those held back in the next line."""
    log = logging.getLogger("agentauth.test-unexpected-once")
    with caplog.at_level(logging.WARNING, logger=log.name):
        for i in range(50):
            answer = error_response(_raise_here(ValueError(f"input {i}")), log)
            assert answer.status_code == 500
            assert json.loads(answer.body)["error_description"] == "internal error"
        # A bug elsewhere is another line, said at once.
        assert error_response(_raise_elsewhere(ValueError("other")), log).status_code == 500
    said = [r for r in caplog.records if r.name == log.name]
    assert [r.getMessage() for r in said] == ["unexpected error", "unexpected error"]
    assert all(r.levelno == logging.ERROR and r.exc_info for r in said)
    assert [str(r.exc_info[1]) for r in said if r.exc_info] == ["input 0", "other"]


@pytest.mark.asyncio
async def test_a_route_that_fails_unexpectedly_is_answered_not_raised_to_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Starlette answers such a failure with the handler's 500, then raises it again for
    the server to log (uvicorn's "Exception in ASGI application", Serve's failed request):
    a traceback per request that no throttle here could hold back."""
    import httpx
    from fastapi import FastAPI

    from agentauth._web import Authentication, install_error_handlers

    log = logging.getLogger("agentauth.test-unexpected-route")
    app = FastAPI()
    install_error_handlers(app, log, authentication=Authentication(realm="t", schemes=("Basic",)))

    @app.get("/boom")
    async def boom() -> None:
        raise ValueError("what the request sent")

    # raise_app_exceptions: what reaches the server is raised here.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=True)
    with caplog.at_level(logging.WARNING, logger=log.name):
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for _ in range(20):
                answer = await client.get("/boom")
                assert answer.status_code == 500
                assert answer.json() == {
                    "error": "server_error",
                    "error_description": "internal error",
                }
    said = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert said == ["unexpected error"]


def test_a_server_side_failure_keeps_its_details_in_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A key backend's description names the key file, its owner or the Vault token's
    file: those reached every client of /v1/token as the 503's error_description."""
    log = logging.getLogger("agentauth.test-details-in-log")
    detail = "/srv/agentauth/keys/k1.pem is owned by uid 1001, not this process's user"
    with caplog.at_level(logging.WARNING, logger=log.name):
        answer = error_response(SignerUnavailable(detail, reason="bad_key_file"), log)
    body = json.loads(answer.body)
    assert (answer.status_code, body) == (
        503,
        {
            "error": "signer_unavailable",
            "error_description": SignerUnavailable.default_description,
            "reason": "bad_key_file",
        },
    )
    assert detail not in answer.body.decode()
    assert any(detail in r.getMessage() for r in caplog.records if r.name == log.name)


def test_a_held_back_warning_is_counted_in_the_next_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("agentauth.test-throttle")
    said = Throttle(every=0.05)
    with caplog.at_level(logging.WARNING, logger=log.name):
        for _ in range(10):
            said.log(log, "down", "shard %s down", 3)
        said.log(log, "other", "shard %s down", 4)  # another key has its own period
        time.sleep(0.06)
        said.log(log, "down", "shard %s down", 3)
    assert [r.getMessage() for r in caplog.records] == [
        "shard 3 down",
        "shard 4 down",
        "shard 3 down (and 9 more like it since the last such line)",
    ]


@pytest.mark.asyncio
async def test_failing_revocation_polls_are_logged_once_not_per_poll(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The revocation watcher polls four times a second; with PostgreSQL unreachable each
    poll fails. One line says so, and what it means for decisions."""
    import asyncpg

    from agentauth.verifier._service import _Revocations

    url = f"postgresql://postgres@127.0.0.1:{_dead_port()}/x"
    pool = await asyncpg.create_pool(url, min_size=0, max_size=1, timeout=0.5)
    settings = cast(Any, SimpleNamespace(revocation_poll=0.01, revocation_max_staleness=1.0))
    revocations = _Revocations(pool, cast(Any, None), settings, also=lambda: asyncio.sleep(0))
    try:
        with caplog.at_level(logging.WARNING, logger="agentauth.verifier"):
            polling = asyncio.ensure_future(revocations._poll_loop())
            await asyncio.sleep(0.5)
            polling.cancel()
            with pytest.raises(asyncio.CancelledError):
                await polling
        said = [r.getMessage() for r in caplog.records if "revocation poll" in r.getMessage()]
        assert len(said) == 1, said
        assert "revocation_state_stale" in said[0]
    finally:
        await pool.close()


# --- metric labels ---------------------------------------------------------------------------


class _Recorder:
    def __init__(self) -> None:
        self.label_sets: set[tuple[tuple[str, str], ...]] = set()

    def _seen(self, tags: dict[str, str] | None) -> None:
        self.label_sets.add(tuple(sorted((tags or {}).items())))

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self._seen(tags)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._seen(tags)

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._seen(tags)


def test_no_caller_can_grow_a_metrics_label_sets_without_bound(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Each label set is a time series every scrape returns and the metrics store keeps.
    Should a label value ever come from a request, a flood of distinct values must end in
    one ``other`` series, not in millions."""
    recorders: dict[str, _Recorder] = {}
    monkeypatch.setattr(metrics, "metric", lambda name: recorders.setdefault(name, _Recorder()))
    monkeypatch.setattr(metrics, "_series", {}, raising=False)
    monkeypatch.setattr(metrics, "_overflowed", set(), raising=False)
    # What the code records stays as it is: 256 shards, both acknowledged values.
    for shard in range(256):
        for acknowledged in ("true", "false"):
            tags = {"shard": str(shard), "acknowledged": acknowledged}
            metrics.increment("shard_overruns", tags=tags)
    buffer = metrics.CounterBuffer()
    with caplog.at_level(logging.WARNING, logger="agentauth.metrics"):
        for i in range(5000):
            buffer.inc("decisions", {"decision": "deny", "reason": f"invalid_request:{i}"})
            metrics.observe("shard_call", 0.001, {"shard": str(i)})
        buffer.flush()
        metrics.increment("anonymous_refused", tags={"reason": "x" * 10_000})
    decisions = recorders["decisions"].label_sets
    assert len(decisions) <= 1025
    assert (("decision", "other"), ("reason", "other")) in decisions
    assert len(recorders["shard_call"].label_sets) <= 1025
    assert recorders["anonymous_refused"].label_sets == {(("reason", "other"),)}
    overruns = recorders["shard_overruns"].label_sets
    assert len(overruns) == 512 and all("other" not in dict(s).values() for s in overruns)
    # Said once per metric, not per value.
    assert len([r for r in caplog.records if "decisions" in r.getMessage()]) == 1


@pytest.mark.asyncio
async def test_a_checkpointer_that_cannot_reach_the_database_says_so_once(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """The checkpointer looks for work every half second; with PostgreSQL down each round
    failed with a traceback: two a second per registry replica for the whole outage."""
    import asyncpg
    import redis.asyncio as aioredis

    from agentauth.registry import Registry, RegistrySettings
    from agentauth.registry._keys import KeyManager

    settings = RegistrySettings(
        database_url=f"postgresql://postgres@127.0.0.1:{_dead_port()}/x",
        redis_url=f"redis://127.0.0.1:{_dead_port()}/0",
        data_dir=tmp_path,
        issuer="http://127.0.0.1:8000/registry",
        admin_token="admin-token-long-enough",
    )
    pool = await asyncpg.create_pool(settings.database_url, min_size=0, max_size=1, timeout=0.5)
    redis = aioredis.Redis.from_url(settings.redis_url)
    registry = Registry(settings=settings, pool=pool, redis=redis, keys=KeyManager(settings, pool))
    try:
        with caplog.at_level(logging.WARNING, logger="agentauth.registry"):
            checkpointing = asyncio.ensure_future(registry._checkpoint_loop())
            await asyncio.sleep(2.7)
            checkpointing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await checkpointing
        said = [r for r in caplog.records if "checkpointing failed" in r.getMessage()]
        assert len(said) == 1, [r.getMessage() for r in said]
        assert said[0].exc_info is not None  # the traceback, once
    finally:
        await pool.close()
        await redis.aclose()


@pytest.mark.asyncio
async def test_revocations_not_published_while_redis_is_down_are_said_once(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Every revocation publishes, even one of something already revoked, so anyone with
    a session could write a warning per request while Redis was down."""
    import asyncpg
    import redis.asyncio as aioredis

    from agentauth.registry import Registry, RegistrySettings
    from agentauth.registry._keys import KeyManager

    settings = RegistrySettings(
        database_url=f"postgresql://postgres@127.0.0.1:{_dead_port()}/x",
        redis_url=f"redis://127.0.0.1:{_dead_port()}/0",
        data_dir=tmp_path,
        issuer="http://127.0.0.1:8000/registry",
        admin_token="admin-token-long-enough",
    )
    pool = await asyncpg.create_pool(settings.database_url, min_size=0, max_size=1, timeout=0.5)
    redis = aioredis.Redis.from_url(settings.redis_url)
    registry = Registry(settings=settings, pool=pool, redis=redis, keys=KeyManager(settings, pool))
    try:
        with caplog.at_level(logging.WARNING, logger="agentauth.registry"):
            for _ in range(20):
                await registry._publish_revocation("grant", "grt_same")
        said = [r.getMessage() for r in caplog.records if "not published" in r.getMessage()]
        assert said == ["revocation grant:grt_same not published; verifiers will reload"]
    finally:
        await pool.close()
        await redis.aclose()


def test_every_metric_the_code_records_is_declared() -> None:
    """A name missing from ``_SPECS`` is no error where it is recorded (``_safely`` drops
    it with one warning): its counter would simply never exist. So every name the code
    passes to ``increment``, ``observe``, ``set_gauge`` or ``CounterBuffer.inc`` is checked
    here against the declared ones."""
    recording = {"increment", "observe", "set_gauge", "inc"}
    used: dict[str, str] = {}
    package = Path(metrics.__file__).parent
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            name = first.value if isinstance(first, ast.Constant) else None
            if called in recording and isinstance(name, str):
                used[name] = f"{path.relative_to(package)}:{node.lineno}"
    assert {"step_up_waits_refused", "anonymous_refused", "decisions"} <= set(used)
    undeclared = {name: where for name, where in used.items() if name not in metrics._SPECS}
    assert not undeclared, f"recorded but not declared in metrics._SPECS: {undeclared}"


# --- health endpoints ----------------------------------------------------------------------


def test_the_runbook_says_what_healthz_does_not_check() -> None:
    """Each ``/healthz`` (registry, verifier, approval page) answers 200 whenever its
    process serves HTTP, whatever PostgreSQL, Redis, the shards or the signer do, though
    each service fails closed on those. An operator who reads a green probe as "serving"
    is misled unless the runbook says what it covers, and where to look instead."""
    runbook = (Path(__file__).parent.parent / "docs" / "runbook.md").read_text()
    section = runbook.partition("## Health endpoints")[2].partition("\n## ")[0]
    assert section, "docs/runbook.md has no 'Health endpoints' section"
    flat = " ".join(section.split())
    for said in (
        "`GET /healthz`",
        "checks no dependency",
        "fail_closed_total",
        "check_health",
    ):
        assert said in flat, said
