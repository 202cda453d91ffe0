"""One private AgentAuth stack for all chaos experiments: PostgreSQL, Redis, Ray, Serve.

Everything listens on loopback and belongs to this process alone: an embedded PostgreSQL
(pgserver, a Unix socket under our work directory), a redis-server on a free port, a fresh
local Ray cluster (``address="local"``: never the machine's other clusters) with its own
temp directory, Serve with the HAProxy ingress on a free port. Experiments break one of these
and must leave the stack as they found it; ``Stack.healthy()`` checks that.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import asyncpg

from agentauth.deployments import SERVING_ENV

# The tests' drivers (World, the software passkey, the fake Vault) live in tests/.
TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# pgserver asks platformdirs for a runtime dir this shell lacks; the fallback is fine.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")

__all__ = ["RedisServer", "Stack", "free_port", "serve_environment", "with_database"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_database(url: str, name: str) -> str:
    """The same server (also a Unix-socket URL) naming another database."""
    from urllib.parse import urlsplit, urlunsplit  # noqa: PLC0415 - tiny, used once

    return urlunsplit(urlsplit(url)._replace(path="/" + name))


class RedisServer:
    """A redis-server of our own on a free loopback port: killed and restarted by experiments.

    No persistence: the verifier treats Redis as a cache, so a restart comes back empty,
    which is the harder case (every cached grant status is gone).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.directory)]
        # Our own binary and arguments: nothing here comes from outside.
        self.process = subprocess.Popen(  # noqa: S603
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL, like a crashed server (no goodbye to the clients)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


def serve_environment() -> dict[str, str]:
    """Serve's settings for a private instance on a machine shared with other instances.

    HAProxy ingress and the throughput settings, as ``agentauth up``. And every port Serve
    would otherwise take from a fixed default moved to a free one: above all the fallback
    proxy (default 127.0.0.1:8500), which HAProxy uses as the backup server of every route.
    With the default, whichever Serve instance bound 8500 first receives the other
    instances' requests whenever their replicas are marked down. Seen here: after a
    PostgreSQL restart our registry's requests were answered by another engineer's registry.
    """
    # Replicas' direct-ingress ports: a window of our own instead of everybody's 30000-31000,
    # so a port a dead replica of ours frees is not taken by another instance's replica
    # while our HAProxy still routes to it.
    base = 20000 + 200 * secrets.randbelow(40)
    return {
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(base),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(base + 100),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(base + 100),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(base + 200),
        **SERVING_ENV,  # as agentauth up runs the stack
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }


def _kill_leftovers(node_id: str) -> None:
    """HAProxy is a child of an actor, not of the raylet: ray.shutdown() can orphan it.

    Its config lives under /tmp/haproxy-serve/<our node id>/, so the node id on its command
    line identifies our own HAProxy; other Serve instances on this machine have other ids.
    """
    import psutil  # noqa: PLC0415 - a Ray dependency, needed only here

    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if node_id and node_id in cmdline:
            with contextlib.suppress(psutil.Error):
                proc.kill()


class Stack:
    """Start with ``Stack.start()``; ``close()`` stops everything it started."""

    def __init__(self, *, verifier_replicas: int = 2, shards: int = 2) -> None:
        # Short path: Ray's Unix sockets live under it and are limited to 107 bytes.
        self.workdir = Path(tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))
        self.verifier_replicas = verifier_replicas
        self.shards = shards
        self.pg: Any = None
        self.database_url = ""
        self.redis = RedisServer(self.workdir / "redis")
        self.port = 0
        self.registry_settings: Any = None
        self.verifier_settings: Any = None
        self._ray_started = False

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> Stack:
        started = time.monotonic()
        self.start_postgres()
        self.redis.start()
        self._start_ray()
        self._deploy()
        print(
            f"stack ready in {time.monotonic() - started:.1f} s: serve :{self.port},"
            f" redis :{self.redis.port}, postgres {self.database_url}",
            flush=True,
        )
        return self

    def _start_ray(self) -> None:
        os.environ.update(serve_environment())
        import ray  # noqa: PLC0415 - Ray loads only once the stack starts
        from ray import serve  # noqa: PLC0415

        # address="local": a new cluster even if another one on this machine is "current".
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            _temp_dir=str(self.workdir / "ray"),
            _node_ip_address="127.0.0.1",
        )
        self._ray_started = True
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})

    def _deploy(self) -> None:
        from ray import serve  # noqa: PLC0415

        from agentauth.deployments.registry import build_registry_app  # noqa: PLC0415
        from agentauth.deployments.verifier import build_verifier_app  # noqa: PLC0415
        from agentauth.registry import RegistrySettings  # noqa: PLC0415
        from agentauth.verifier import VerifierSettings  # noqa: PLC0415

        self.registry_settings = RegistrySettings(
            database_url=self.database_url,
            redis_url=self.redis.url,
            data_dir=self.workdir / "data",
            issuer=f"http://127.0.0.1:{self.port}/registry",
            admin_token=secrets.token_urlsafe(32),
            # One address registers every subject's agent: more starts than a client's default.
            anonymous_client_limit=1_000_000,
            anonymous_global_limit=1_000_000,
        )
        serve.run(
            build_registry_app(self.registry_settings, replicas=1),
            name="registry",
            route_prefix="/registry",
        )
        self.verifier_settings = VerifierSettings(
            database_url=self.database_url,
            redis_url=self.redis.url,
            issuer=self.registry_settings.issuer,
            shards=self.shards,
            # The production settings (shard_timeout 40 ms): the denials a dead dependency
            # causes are timed against the 50 ms bound (see _context.Context.fill).
        )
        serve.run(
            build_verifier_app(self.verifier_settings, replicas=self.verifier_replicas),
            name="verifier",
            route_prefix="/verifier",
        )

    def close(self) -> None:
        try:
            if self._ray_started:
                import ray  # noqa: PLC0415

                node_id = ray.get_runtime_context().get_node_id()
                # serve.shutdown() waits up to 30 s for replicas to drain; the whole cluster
                # goes anyway, so shut Ray down and then reap what Ray does not own.
                ray.shutdown()
                self._ray_started = False
                _kill_leftovers(node_id)
        finally:
            self.redis.kill()
            self.stop_postgres()
            shutil.rmtree(self.workdir, ignore_errors=True)

    # --- the dependencies experiments break ------------------------------------------------

    def start_postgres(self) -> None:
        from agentauth.store import EmbeddedPostgres  # noqa: PLC0415

        self.pg = EmbeddedPostgres(self.workdir / "pg")
        url = str(self.pg.url)
        # The same data directory gives the same socket, so every client's URL stays valid.
        if self.database_url and url != self.database_url:
            raise RuntimeError(f"PostgreSQL came back at another address: {url}")
        self.database_url = url

    def stop_postgres(self) -> None:
        if self.pg is not None:
            self.pg.stop()  # pg_ctl stop (fast mode: clients are disconnected)
            self.pg = None

    # --- URLs and checks -------------------------------------------------------------------

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def registry_url(self) -> str:
        return f"{self.base}/registry"

    @property
    def verifier_url(self) -> str:
        return f"{self.base}/verifier"

    async def db(self) -> asyncpg.Connection:
        return await asyncpg.connect(self.database_url, timeout=5)

    async def wait_until(self, probe: Any, *, timeout: float, interval: float = 0.25) -> float:
        """Poll ``await probe()`` until true; the seconds it took, or raise TimeoutError."""
        started = time.monotonic()
        while True:
            with contextlib.suppress(Exception):
                if await probe():
                    return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"not healthy within {timeout:g} s")
            await asyncio.sleep(interval)

    def replica_states(self, app: str = "verifier", deployment: str = "verifier") -> dict[str, int]:
        from ray import serve  # noqa: PLC0415

        status = serve.status().applications[app].deployments[deployment]
        return {str(k): int(v) for k, v in status.replica_states.items()}
