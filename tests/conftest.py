"""Shared fixtures: real PostgreSQL, Redis and one Ray Serve cluster per test session.

PostgreSQL and Redis come from AGENTAUTH_TEST_DATABASE_URL / AGENTAUTH_TEST_REDIS_URL
(``.ci/run`` sets them to the servers on 127.0.0.1); without them the embedded servers
start instead: one code path either way. Each session gets a fresh database.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import pytest_asyncio


def _free_port() -> int:
    """A port free now, for a server a test starts later, below the kernel's ephemeral range:
    a port the kernel handed out (bind to 0) is in that range, and until the server binds
    it any outgoing connection on the machine may be given it as its local port (HAProxy
    once failed to start, "Address already in use", on such a port)."""
    low = _ephemeral_low()
    while True:
        port = secrets.randbelow(low - 20_000) + 20_000
        with socket.socket() as sock:
            try:
                # All interfaces: HAProxy binds its metrics port on 0.0.0.0.
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default
    return max(low, 21_000)


def sample_provider() -> Any:
    """examples/calendar_provider.py, the README's sample provider, loaded as a module."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "examples" / "calendar_provider.py"
    spec = importlib.util.spec_from_file_location("calendar_provider", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def with_database(url: str, name: str) -> str:
    """The same server URL naming another database (works for socket URLs too)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@asynccontextmanager
async def new_database(database_url: str, prefix: str) -> AsyncIterator[str]:
    """A new, empty database named ``prefix_<random>`` on the server of ``database_url``;
    yields its URL and drops it after (its open sessions too)."""
    import asyncpg

    name = f"{prefix}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield with_database(database_url, name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@asynccontextmanager
async def migrated_connection(database_url: str, prefix: str) -> AsyncIterator[Any]:
    """A connection to a new database (see new_database) with the schema in place."""
    import asyncpg

    from agentauth.store import migrate

    async with new_database(database_url, prefix) as url:
        connection = await asyncpg.connect(url)
        try:
            await migrate(connection)
            yield connection
        finally:
            await connection.close()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import asyncpg

    base = os.environ.get("AGENTAUTH_TEST_DATABASE_URL")
    embedded = None
    if not base:
        from agentauth.store import EmbeddedPostgres

        embedded = EmbeddedPostgres(tmp_path_factory.mktemp("pg"))
        base = embedded.url
    name = f"agentauth_test_{secrets.token_hex(6)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(base)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    try:
        yield with_database(base, name)
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        if embedded:
            embedded.stop()


@pytest.fixture(scope="session")
def migrated_database_url(database_url: str) -> str:
    """The session's database with the schema in place, for tests that use no registry
    (the registry migrates the same database the same way when it starts)."""
    import asyncpg

    from agentauth.store import migrate

    async def run() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(run())
    return database_url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("AGENTAUTH_TEST_REDIS_URL")
    if url:
        yield url
        return
    from agentauth.store import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def serve_port() -> Iterator[int]:
    """One Ray cluster with Serve (HAProxy ingress) for the whole session."""
    # As agentauth up: HAProxy ingress, throughput settings, workers at normal priority.
    from agentauth.deployments import apply_serving_env

    apply_serving_env()
    # HAProxy falls back to a fixed proxy port (8500) for every route: on a machine shared
    # with another Serve instance, that one would answer our requests. Ports of our own.
    for name in (
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
        "RAY_SERVE_HAPROXY_STATS_PORT",
        "RAY_SERVE_HAPROXY_METRICS_PORT",
    ):
        os.environ.setdefault(name, str(_free_port()))
    import ray
    from ray import serve

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield port
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("agentauth-data")


# --- the registry on Serve, shared by the registry, verifier and SDK tests -----------------


@pytest.fixture(scope="session")
def registry_settings(database_url: str, redis_url: str, serve_port: int, data_dir: Path) -> Any:
    import secrets as _secrets

    from agentauth.registry import RegistrySettings

    return RegistrySettings(
        database_url=database_url,
        redis_url=redis_url,
        data_dir=data_dir / "registry",
        issuer=f"http://127.0.0.1:{serve_port}/registry",
        admin_token=_secrets.token_urlsafe(32),
        checkpoint_every_seconds=2.0,
        # Swept every second, and nothing a test counts expires within a session: the sweep's
        # test expires its own rows.
        sweep_every_seconds=1.0,
        challenge_ttl=3600,
        key_publish_ahead=3,
        token_lifetime=120,
        # Every test's client is one address: the limits' own tests run in process.
        anonymous_client_limit=1_000_000,
        anonymous_global_limit=1_000_000,
        max_anonymous_challenges=1_000_000,
        # Challenges live an hour here and a test's human may begin many ceremonies; the
        # bound's own test runs in process (tests/test_registry_limits.py).
        max_human_challenges=100_000,
        # The audit chain's load test files 125 pending requests per agent; the bound's own
        # tests run in process (tests/test_registry_dpop.py).
        max_pending_grant_requests=200,
    )


@pytest.fixture(scope="session")
def registry_base(registry_settings: Any) -> str:
    from ray import serve

    from agentauth.deployments.registry import build_registry_app

    # Two replicas: every concurrency test crosses processes, as in production.
    app = build_registry_app(registry_settings, replicas=2)
    serve.run(app, name="registry", route_prefix="/registry")
    _wait_out_replay_epoch(registry_settings.redis_url)
    return str(registry_settings.issuer)


def _wait_out_replay_epoch(redis_url: str) -> None:
    """A registry whose Redis began afresh refuses proofs issued up to its replay cache's
    start plus the allowed clock skew and the clock difference tolerated between replicas
    and Redis (fail closed: it cannot know what it saw before).
    Wait that out once, so a test run that starts with a token request does not fail."""
    import redis

    from agentauth.protocol import DPoPPolicy
    from agentauth.registry._service import _CLOCK_TOLERANCE

    client = redis.Redis.from_url(redis_url)
    try:
        epoch = client.get("agentauth:jti-epoch")
    finally:
        client.close()
    if epoch is not None:
        margin = DPoPPolicy().future_skew + _CLOCK_TOLERANCE
        time.sleep(max(0.0, int(epoch) + margin + 1 - time.time()))


@pytest_asyncio.fixture(loop_scope="session")
async def world(registry_base: str, registry_settings: Any) -> AsyncIterator[Any]:
    import httpx
    from registry_world import World

    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        yield World(client=client, base=registry_base, admin_token=registry_settings.admin_token)


@pytest_asyncio.fixture(loop_scope="session")
async def db(database_url: str, registry_base: str) -> AsyncIterator[Any]:
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


def verifier_settings(registry_settings: Any, **changes: Any) -> Any:
    """Settings of a verifier over the session's registry: 2 shards, and a shard timeout
    generous on a shared 2-core test machine (the benchmark measures the real bound)."""
    from agentauth.verifier import VerifierSettings

    fields: dict[str, Any] = {
        "database_url": registry_settings.database_url,
        "redis_url": registry_settings.redis_url,
        "issuer": registry_settings.issuer,
        "shards": 2,
        "shard_timeout": 2.0,
    }
    return VerifierSettings(**(fields | changes))


@pytest.fixture(scope="session")
def verifier_base(registry_base: str, registry_settings: Any, serve_port: int) -> str:
    """The verifier on the same Serve instance, 2 replicas, 2 shards."""
    from ray import serve

    from agentauth.deployments.verifier import build_verifier_app

    app = build_verifier_app(verifier_settings(registry_settings), replicas=2)
    serve.run(app, name="verifier", route_prefix="/verifier")
    return f"http://127.0.0.1:{serve_port}/verifier"
