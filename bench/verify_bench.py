"""Verification throughput and latency: the Serve verifier, the same code under bare uvicorn,
and a hand-written PyJWT reference, in one run.

    python bench/verify_bench.py [--quick]

Needs, besides the server extra: ``pip install pyjwt matplotlib`` (the reference verifier
and the plot), Debian's ``wrk``, PostgreSQL and Redis on 127.0.0.1.

Columns:
  (a) serve      registry + verifier apps on one Ray Serve instance behind its HAProxy
                 ingress (route prefixes /registry and /verifier; 1 verifier replica and 1 shard
                 unless AGENTAUTH_BENCH_REPLICAS / AGENTAUTH_BENCH_SHARDS say otherwise);
  (b) uvicorn    the same verification code (``create_app(await Verifier.open(...))``, the
                 same shard actors) in one bare uvicorn worker: the floor for Python here;
  (c) reference  FastAPI + PyJWT + Redis ``SET NX`` in one uvicorn worker
                 (``bench/reference_verifier.py``), the way a provider would write it alone.

Load is replayed by wrk from pre-generated request bodies (a Lua script, so the generator
costs little): every body carries a DPoP proof used exactly once. Warm: a few tokens, reused
(the token's signature check is cached). Cold: every request carries a token never seen
before, of a grant never seen before (signature, claims, grant cache-aside and the shard's
grant state all miss). Unpaced runs give the maximum throughput; paced runs (wrk's
``delay()`` hook) give latency at a given offered load. Results: a table on stdout,
docs/verifier-bench.md and docs/images/verify-latency.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import itertools
import json
import math
import os
import re
import resource
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from _stack import BASE_DB, free_port, fresh_database, start_serve
from _stack import REDIS as SHARED_REDIS

from agentauth.deployments import SERVING_ENV

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DOC = ROOT / "docs" / "verifier-bench.md"
PLOT = ROOT / "docs" / "images" / "verify-latency.png"
NOTES_MARKER = "<!-- observations below this line are kept when the benchmark rewrites the file -->"

# The layout of (a) and the shards (b) shares; see the doc for why these defaults.
# One replica and one shard by default: on two cores shared with HAProxy, PostgreSQL, Redis,
# Ray and wrk, a second replica and a second shard add processes competing for the same
# cores and halve each link's batching; they lowered (a)'s maximum here (docs/verifier-bench.md).
SHARDS = int(os.environ.get("AGENTAUTH_BENCH_SHARDS", "1"))
REPLICAS = int(os.environ.get("AGENTAUTH_BENCH_REPLICAS", "1"))
COLUMNS = ("serve", "uvicorn", "reference")
LABELS = {
    "serve": f"(a) Serve verifier, {REPLICAS} replica{'s' if REPLICAS > 1 else ''}, HAProxy",
    "uvicorn": "(b) same code, 1 bare uvicorn worker",
    "reference": "(c) reference FastAPI+PyJWT+Redis",
}
SHORT = {"serve": "(a) Serve", "uvicorn": "(b) uvicorn", "reference": "(c) reference"}

# What the provider saw and asks about: a read the grant's capability covers.
METHOD = "GET"
API_URL = "https://api.bench.example/v1/calendar/events"
ACTION = {"kind": "read", "resource": "calendar/events"}
CAPABILITY = {"kind": "read", "resource": "calendar/*"}
# Large enough that no run can deny: warm load spreads over 8 grants (>= 8,000 req/s in
# total), and the shard remembers at most 1,000 times per grant for it.
ENVELOPE = {"rate_limits": [{"max_count": 1000, "window_seconds": 1}]}
# A Redis database of our own unless one is given: tests on this machine flush database 0,
# and the registry then refuses every proof issued in the next seconds (its replay-cache
# epoch moves to "now").
REDIS = (
    SHARED_REDIS
    if "AGENTAUTH_BENCH_REDIS_URL" in os.environ
    else SHARED_REDIS.rsplit("/", 1)[0] + "/9"
)
OUTSIDE = "outside this benchmark"
PINGS = "redis PINGs/s"
WARM_AGENTS = 8
AGENTS_PER_SHARD = max(1, WARM_AGENTS // SHARDS)

# --- wrk -------------------------------------------------------------------------------

# One Lua state per wrk thread (we use one thread). Bodies are read once; request() hands
# out the next, so each proof is sent once. ``sent`` beyond the pool means proofs were
# reused (the verifier then rightly denies replays): such a run is marked invalid.
LUA = r"""
__PACING__
local bodies = {}
local i = 0
local headers = {["Content-Type"] = "application/json"}
pool = 0
sent = 0
bad = 0
reasons = {}
late = 0      -- paced runs: requests sent more than 1 ms after their slot
late_max = 0  -- the latest of them, ms

function init(args)
  for line in io.lines(args[1]) do pool = pool + 1; bodies[pool] = line end
  if args[2] ~= "-" then headers["Authorization"] = args[2] end
end

function request()
  sent = sent + 1
  i = i + 1
  if i > pool then i = 1 end
  return wrk.format("POST", nil, headers, bodies[i])
end

function response(status, hdrs, body)
  if not string.find(body, '"decision":"allow"', 1, true) then
    bad = bad + 1
    local why = string.match(body, '"reason":"([^"]*)"') or ("http_" .. status)
    reasons[why] = (reasons[why] or 0) + 1
  end
end

local threads = {}
function setup(thread) threads[#threads + 1] = thread end

function done(summary, latency, requests)
  local b, s, p, l, lm = 0, 0, 0, 0, 0
  local why = {}
  for _, t in ipairs(threads) do
    b = b + t:get("bad"); s = s + t:get("sent"); p = p + t:get("pool")
    l = l + t:get("late"); lm = math.max(lm, t:get("late_max"))
    for k, v in pairs(t:get("reasons")) do why[k] = (why[k] or 0) + v end
  end
  local e = summary.errors
  io.write(string.format(
    "RESULT %d %d %d %d %d %d %d %d %d %d %.1f %.1f %.1f %.1f %.1f %d %.1f\n",
    summary.requests, summary.duration, b, s, p, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, l, lm))
  for k, v in pairs(why) do io.write(string.format("REASON %s %d\n", k, v)) end
end
"""

# Paced open loop: request k is due at start + k * 1000/rate ms, whatever the answers to
# the ones before it do. Before each request a connection takes the next slot and sleeps
# until it; a slot already past (every connection was waiting on an answer) is sent at
# once, so the schedule catches up as an open-loop client would. Such a late send would
# hide the time it waited from its measured latency (coordinated omission), so each is
# counted with how late it went; the runs use enough connections (PACED_WINDOW) that
# there are none below saturation. wrk sleeps in whole milliseconds, rounding down: a
# request may leave up to 1 ms early, never late for that reason.
PACING = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } vb_timespec;
int clock_gettime(int clk_id, vb_timespec *tp);
]]
local ts = ffi.new("vb_timespec")
local period = 1000 / __RATE__
local slot = nil
function delay()
  ffi.C.clock_gettime(1, ts)
  local now = tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
  if slot == nil then slot = now end
  local wait = slot - now
  slot = slot + period
  if wait < -1 then
    late = late + 1
    if -wait > late_max then late_max = -wait end
  end
  if wait < 0 then wait = 0 end
  return wait
end
"""

# Seconds of answers a paced run can have outstanding before a slot finds no connection
# free: its connections are rate * PACED_WINDOW (at least the unpaced runs' count, at most
# the verifier replica's max_ongoing_requests, 256).
PACED_WINDOW = 0.1
PACED_MAX_CONNECTIONS = 256


def paced_connections(rate: float, least: int) -> int:
    return max(least, min(PACED_MAX_CONNECTIONS, math.ceil(rate * PACED_WINDOW)))


@dataclass
class Run:
    column: str
    mode: str  # warm | cold | warmup
    offered: float | None  # None: unpaced
    seconds: float
    rps: float
    p50: float
    p90: float
    p99: float
    p999: float
    max_ms: float
    requests: int
    bad: int
    errors: int
    overrun: int
    reasons: dict[str, int]
    connections: int
    late: int  # paced: requests sent over 1 ms after their slot (none: open loop held)
    late_max: float  # ms
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def not_allowed(self) -> int:
        """Non-allow answers, HTTP/socket errors and proofs sent twice."""
        return self.bad + self.errors + self.overrun

    @property
    def valid(self) -> bool:
        return self.requests > 0 and self.not_allowed == 0

    @property
    def late_note(self) -> str:
        if not self.late:
            return ""
        return f"{self.late} sent late (up to {self.late_max:.0f} ms): latencies are a lower bound"

    @property
    def load(self) -> str:
        return "max" if self.offered is None else f"{self.offered:.0f}/s"

    def line(self) -> str:
        flag = "" if self.valid else "  INVALID"
        why = f" {self.reasons}" if self.reasons else ""
        why += (
            f" [other load {self.cpu.get(OUTSIDE, 0.0):.2f} cores,"
            f" {self.cpu.get(PINGS, 0.0):,.0f} Redis PINGs/s]"
        )
        return (
            f"{SHORT[self.column]:<14} {self.mode:<6} {self.load:>8} {self.rps:8.0f} req/s"
            f"  p50 {self.p50:6.2f}  p99 {self.p99:7.2f}  p99.9 {self.p999:7.2f} ms"
            f"  ({self.requests} req, {self.bad} non-allow, {self.errors} errors,"
            f" {self.overrun} over pool, {self.connections} connections)"
            f"{flag}{'  ' + self.late_note if self.late else ''}{why}"
        )


class CpuMeter:
    """CPU seconds per process group during a run, so bottlenecks have names.

    Counts this run's own processes (the Ray instance we started, our uvicorn workers,
    HAProxy), PostgreSQL backends of our database, Redis (shared with anyone else using it),
    and wrk (reaped child, from RUSAGE_CHILDREN).
    """

    def __init__(self, db_name: str, procs: dict[str, subprocess.Popen[bytes]]) -> None:
        self._db = db_name
        self._procs = procs  # our uvicorn workers by name; they come and go
        self._start: dict[int, tuple[str, float]] = {}
        self._wrk = 0.0
        self._system = 0.0
        self._pings = 0
        self._t = 0.0

    def _group(self, proc: psutil.Process) -> str | None:
        for name, child in self._procs.items():
            if proc.pid == child.pid:
                return f"{name} worker"
        try:
            text = " ".join(proc.cmdline()) or proc.name()
        except psutil.Error:
            return None
        for needle, group in (
            ("ServeReplica:verifier", "serve verifier replicas"),
            ("ServeReplica:registry", "serve registry replica"),
            ("StateShard", "shard actors"),
            ("haproxy", "haproxy"),
            ("redis-server", "redis"),
        ):
            if needle in text:
                return group
        if text.startswith("postgres:") and f" {self._db} " in text:
            return "postgres"
        if proc.pid == os.getpid():
            return "bench driver"
        return "ray/serve other"

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        procs = psutil.Process().children(recursive=True)
        procs += [
            p
            for p in psutil.process_iter(["name"])
            if p.info["name"] in ("postgres", "redis-server")
        ]
        procs.append(psutil.Process())
        seen: dict[int, tuple[str, float]] = {}
        for proc in procs:
            group = self._group(proc)
            if group is None:
                continue
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            seen[proc.pid] = (group, times.user + times.system)
        return seen

    @staticmethod
    def _children_cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()
        return sum(times) - times.idle - getattr(times, "iowait", 0.0)

    @staticmethod
    def _redis_pings() -> int:
        import redis

        client = redis.Redis.from_url(REDIS)
        try:
            stats = client.info("commandstats").get("cmdstat_ping", {})
            return int(stats.get("calls", 0))
        finally:
            client.close()

    def start(self) -> None:
        self._pings = self._redis_pings()
        self._start = self._snapshot()
        self._wrk = self._children_cpu()
        self._system = self._busy()
        self._t = time.monotonic()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self._t
        end = self._snapshot()
        cores: dict[str, float] = {}
        for pid, (group, cpu) in end.items():
            before = self._start.get(pid, (group, 0.0))[1]
            cores[group] = cores.get(group, 0.0) + (cpu - before) / wall
        cores["wrk"] = (self._children_cpu() - self._wrk) / wall
        # Whatever else ran on the machine meanwhile (other users' tests, say): the run's
        # figures are only as clean as this is small.
        busy = (self._busy() - self._system) / wall
        cores[OUTSIDE] = max(0.0, busy - sum(cores.values()))
        # Not CPU: Redis PINGs per second, whole server. The verifier's revocation listener
        # pings on its pub/sub connection; this shows how often.
        cores[PINGS] = (self._redis_pings() - self._pings) / wall
        return {k: v for k, v in sorted(cores.items(), key=lambda kv: -kv[1]) if v >= 0.005}

    def cores(self, cpu: dict[str, float]) -> str:
        return ", ".join(f"{k} {v:.2f}" for k, v in cpu.items() if k != PINGS)


def run_wrk(
    column: str,
    mode: str,
    url: str,
    bodies: Path,
    auth: str | None,
    *,
    rate: float | None,
    seconds: int,
    connections: int,
    meter: CpuMeter | None = None,
) -> Run:
    pacing = PACING.replace("__RATE__", f"{rate:.3f}") if rate else ""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as handle:
        handle.write(LUA.replace("__PACING__", pacing))
    if meter:
        meter.start()
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "--timeout",
            "5s",
            "-s",
            handle.name,
            url,
            "--",
            str(bodies),
            auth or "-",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu = meter.stop() if meter else {}
    os.unlink(handle.name)
    match = re.search(r"^RESULT (.*)$", out, re.M)
    if match is None:
        raise RuntimeError(f"wrk printed no result:\n{out}")
    fields = match.group(1).split()
    requests, duration_us, bad, sent, pool = (int(x) for x in fields[:5])
    errors = sum(int(x) for x in fields[5:10])
    p50, p90, p99, p999, top = (float(x) / 1000.0 for x in fields[10:15])
    late, late_max = int(fields[15]), float(fields[16])
    reasons = {m[0]: int(m[1]) for m in re.findall(r"^REASON (\S+) (\d+)$", out, re.M)}
    return Run(
        column=column,
        mode=mode,
        offered=rate,
        seconds=seconds,
        rps=requests / (duration_us / 1e6),
        p50=p50,
        p90=p90,
        p99=p99,
        p999=p999,
        max_ms=top,
        requests=requests,
        bad=bad,
        errors=errors,
        overrun=max(0, sent - pool),
        reasons=reasons,
        connections=connections,
        late=late,
        late_max=late_max,
        cpu=cpu,
    )


# --- load material -----------------------------------------------------------------------


@dataclass
class Credential:
    token: str
    key: Any  # the agent's PrivateKey, which signs the proofs


def write_bodies(path: Path, creds: Sequence[Credential], count: int) -> Path:
    """``count`` request bodies, each with a fresh proof, cycling over ``creds``.

    Generated right before a run: the verifier accepts a proof for 60 s after its iat.
    """
    from agentauth.protocol import create_dpop_proof

    now = time.time()
    with path.open("w") as handle:
        for k in range(count):
            cred = creds[k % len(creds)]
            proof = create_dpop_proof(
                cred.key, htm=METHOD, htu=API_URL, now=now, access_token=cred.token
            )
            body = {
                "token": cred.token,
                "proof": proof,
                "method": METHOD,
                "url": API_URL,
                "action": ACTION,
            }
            handle.write(json.dumps(body, separators=(",", ":")) + "\n")
    return path


@dataclass
class Owner:
    """A human with one agent: one approval worker (its passkey counter is sequential)."""

    human: Any
    agent: Any


@dataclass
class World:
    provider: Any
    owners: list[Owner]
    warm: list[Credential]


async def build_world(base: str, admin: str) -> World:
    """Through the registry's HTTP API: a provider, agents spread over the shards, and a
    few grants and tokens for the warm runs."""
    from registry_world import World as Driver

    from agentauth.actors import shard_for

    async with httpx.AsyncClient(timeout=60) as client:
        driver = Driver(client=client, base=base, admin_token=admin)
        provider = await driver.provider(("read",))
        per_shard = [0] * SHARDS
        owners: list[Owner] = []
        while len(owners) < SHARDS * AGENTS_PER_SHARD:
            human = await driver.human(f"bench-{len(owners)}")
            # Agents are hashed to shards; keep trying until this one lands where there is
            # room, so the load spreads evenly over the shard actors.
            for _ in range(50):
                agent = await driver.agent(human)
                shard = shard_for(agent.id, SHARDS)
                if per_shard[shard] < AGENTS_PER_SHARD:
                    per_shard[shard] += 1
                    owners.append(Owner(human, agent))
                    break
        warm = []
        for owner in owners:
            request = await driver.request(owner.agent, provider, [CAPABILITY], ENVELOPE)
            grant = await driver.approve(owner.human, request["id"])
            r = await driver.token(owner.agent, grant["id"])
            assert r.status_code == 200, r.text
            warm.append(Credential(r.json()["access_token"], owner.agent.key))
    return World(provider, owners, warm)


async def cold_pool(registry: Any, world: World, count: int) -> list[Credential]:
    """``count`` grants, each approved with its owner's passkey, and one token per grant.

    Straight through the registry's service layer (the code behind its HTTP API) in this
    process: thousands of grants through Serve would take minutes on two cores.
    """
    from agentauth.registry import Agent
    from agentauth.registry._models import ApprovalBeginIn, GrantRequestIn

    body = GrantRequestIn.model_validate(
        {"provider_id": world.provider.id, "capabilities": [CAPABILITY], "envelope": ENVELOPE}
    )
    out: list[Credential] = []

    async def worker(owner: Owner, n: int) -> None:
        agent = Agent(
            owner.agent.id, owner.human.principal_id, owner.agent.key.thumbprint, "active"
        )
        for _ in range(n):
            request = await registry.request_grant(agent, body)
            begun = await registry.approval_begin(
                owner.human.principal_id, request["id"], ApprovalBeginIn()
            )
            credential = owner.human.authenticator.get(begun["options"])
            grant = await registry.approval_finish(
                owner.human.principal_id, request["id"], credential
            )
            token = await registry.issue_token(agent, grant["id"])
            out.append(Credential(token["access_token"], owner.agent.key))

    per = math.ceil(count / len(world.owners))
    await asyncio.gather(*(worker(o, per) for o in world.owners))
    return out


# --- the three columns --------------------------------------------------------------------


@dataclass
class Target:
    column: str
    url: str
    auth: str | None


@dataclass
class Stack:
    port: int
    db_url: str
    db_name: str
    admin: str
    registry_settings: Any
    verifier_settings: Any
    gcs_address: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}/registry"


def start_stack(
    loop: asyncio.AbstractEventLoop, workdir: Path, overrides: dict[str, float]
) -> Stack:
    # Another Serve instance on this machine (tests, other benches) already holds HAProxy's
    # default stats and metrics ports; ours must not collide.
    os.environ.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(free_port()))
    os.environ.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(free_port()))
    port = start_serve()
    import ray
    from ray import serve

    from agentauth.deployments.registry import build_registry_app
    from agentauth.registry import RegistrySettings
    from agentauth.verifier import VerifierSettings

    db_url = loop.run_until_complete(fresh_database())
    admin = secrets.token_urlsafe(24)
    base = f"http://127.0.0.1:{port}/registry"
    registry_settings = RegistrySettings(
        database_url=db_url,
        redis_url=REDIS,
        data_dir=workdir / "registry",
        issuer=base,
        admin_token=admin,
        # Long enough that no token expires during the benchmark.
        token_lifetime=1800,
        # One address registers every agent: far more starts than a client's default.
        anonymous_client_limit=1_000_000,
        anonymous_global_limit=1_000_000,
    )
    serve.run(
        build_registry_app(registry_settings, replicas=1),
        name="registry",
        route_prefix="/registry",
    )
    verifier_settings = VerifierSettings(
        database_url=db_url,
        redis_url=REDIS,
        issuer=base,
        shards=SHARDS,
        **overrides,  # type: ignore[arg-type]
    )
    deploy_verifier(verifier_settings)
    return Stack(
        port=port,
        db_url=db_url,
        db_name=db_url.rsplit("/", 1)[1],
        admin=admin,
        registry_settings=registry_settings,
        verifier_settings=verifier_settings,
        # (b) attaches to this Ray instance by address: "auto" would pick whichever Ray
        # instance on the machine started last.
        gcs_address=ray.get_runtime_context().gcs_address,
    )


def deploy_verifier(settings: Any) -> None:
    """(a): the verifier application on the running Serve instance (its shards are
    detached actors: a redeployment finds the same ones)."""
    from ray import serve

    from agentauth.deployments.verifier import build_verifier_app

    serve.run(
        build_verifier_app(settings, replicas=REPLICAS),
        name="verifier",
        route_prefix="/verifier",
    )


def spawn(stack: Stack, name: str, module: str, env: dict[str, str], workdir: Path) -> int:
    port = free_port()
    log = workdir / f"{name}.log"
    stack.logs[name] = log
    stack.procs[name] = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(BENCH),
            "--factory",
            f"{module}:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        env={**os.environ, **env},
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    return port


def wait_healthy(stack: Stack, name: str, url: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = stack.procs.get(name)
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited:\n{stack.logs[name].read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{name} did not come up at {url}")


def stop_process(stack: Stack, name: str) -> None:
    proc = stack.procs.pop(name, None)
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()  # uvicorn shuts down on SIGTERM (lifespan shutdown closes the verifier)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_stack(stack: Stack | None) -> None:
    if stack is None:
        return
    for name in list(stack.procs):
        stop_process(stack, name)
    import ray
    from ray import serve

    from agentauth.deployments.verifier import NAMESPACE

    for app in ("verifier", "registry"):
        try:
            serve.delete(app)
        except Exception as exc:  # keep cleaning up the rest
            print(f"could not delete Serve app {app}: {exc}")
    for i in range(SHARDS):
        with contextlib.suppress(ValueError):  # never created, or already gone
            ray.kill(ray.get_actor(f"agentauth-shard-{i}", namespace=NAMESPACE))
    serve.shutdown()
    ray.shutdown()


# --- memory ------------------------------------------------------------------------------


def synthetic_memory(agents: int) -> dict[str, float]:
    """Bytes of shard state per agent, measured with tracemalloc on ``ShardState``.

    ``StateShard.check_batch`` keeps exactly this object per shard; driving it in-process
    (no actor, no audit commit) measures its Python allocations without 100k audit rows.
    Every agent has one grant (a 60/min rate limit) and one live proof jti; a second pass
    over a tenth of them adds one more request each (one more jti and remembered time).
    Strings are made fresh per check, as Ray's deserialization would.
    """
    from agentauth.actors import Check, ShardState
    from agentauth.protocol import Action, Envelope

    envelope = Envelope.model_validate({"rate_limits": [{"max_count": 60, "window_seconds": 60}]})
    action = Action.model_validate(ACTION)
    now = time.time()

    def checks(n: int, t: float) -> list[Check]:
        return [
            Check(
                agent_id=f"agt_{i:022d}",
                provider_id="prov-bench",
                grant_id=f"grt_{i:022d}",
                jkt=f"{i:043d}",
                jti=secrets.token_urlsafe(16),
                iat=t,
                action=action,
                envelope=envelope,
            )
            for i in range(n)
        ]

    # Timing first, without tracemalloc (which slows every allocation).
    timing = ShardState(started_at=now - 120)
    batch = checks(20_000, now)
    started = time.perf_counter()
    for check in batch:
        timing.decide(check, now)
    per_check_us = (time.perf_counter() - started) / len(batch) * 1e6
    del batch, timing
    gc.collect()
    tracemalloc.start()
    state = ShardState(started_at=now - 120)
    base = tracemalloc.get_traced_memory()[0]
    batch = checks(agents, now)
    for check in batch:
        assert state.decide(check, now).allowed
    del batch
    gc.collect()
    first = tracemalloc.get_traced_memory()[0] - base
    estimate_first = state.memory_bytes()
    extra = agents // 10
    batch = checks(extra, now + 1)
    for check in batch:
        assert state.decide(check, now + 1).allowed
    del batch
    gc.collect()
    second = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    # What that state adds to a full collection's pause (a shard's checks wait it out): this
    # process's collection with the state alive, then without it.
    for _ in range(3):  # nested tuples are untracked one level per collection
        gc.collect()
    with_state = _full_collection_ms()
    del state
    gc.collect()
    without = _full_collection_ms()
    return {
        "agents": agents,
        "traced_per_agent": first / agents,
        "getsizeof_per_agent": estimate_first / agents,
        "traced_per_extra_request": (second - first) / extra,
        "decide_us": per_check_us,
        "gc_ms_with_state": with_state,
        "gc_ms_without": without,
    }


def _full_collection_ms() -> float:
    times = []
    for _ in range(5):
        started = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


_GRANT_TURN = itertools.count()


def _bench_checks(n: int, iat: float) -> list[Any]:
    """``n`` allowable checks, round-robin over 64 grants across calls too (so their
    1,000/s rate limits never deny, even at one check per call)."""
    from agentauth.actors import Check
    from agentauth.protocol import Action, Envelope

    envelope = Envelope.model_validate(ENVELOPE)
    action = Action.model_validate(ACTION)
    return [
        Check(
            agent_id="agt_bench",
            provider_id="prov-bench",
            grant_id=f"grt_bench_{next(_GRANT_TURN) % 64}",
            jkt="k" * 43,
            jti=secrets.token_urlsafe(16),
            iat=iat,
            action=action,
            envelope=envelope,
            token_jti="tok",
        )
        for _ in range(n)
    ]


SIZES = (1, 4, 16, 64)


async def shard_batch_cost(database_url: str) -> list[dict[str, float]]:
    """What one ``StateShard.check_batch`` call costs by batch size, in this process.

    No Ray, one call at a time (each its own commit): the actor's own work per call
    (decide, chain, commit the audit rows), to tell the fixed cost of a call (one
    PostgreSQL transaction) from the cost of a check.
    """
    from agentauth.actors import StateShard

    # Its own audit chain, new in the benchmark's fresh database: no replay floor to pass.
    shard = StateShard(index=99, database_url=database_url)
    out = []
    try:
        await shard.check_batch(_bench_checks(64, time.time()))  # connect, restore the grants
        for size in SIZES:
            calls = [_bench_checks(size, time.time()) for _ in range(max(20, 1200 // size))]
            denied = 0
            cpu0, t0 = time.process_time(), time.perf_counter()
            for checks in calls:
                results = await shard.check_batch(checks)
                denied += sum(not r.allowed for r in results)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            n = len(calls) * size
            out.append(
                {
                    "size": size,
                    "ms_per_call": wall / len(calls) * 1000,
                    "cpu_us_per_check": cpu / n * 1e6,
                    "checks_per_s": n / wall,
                    "denied": denied,
                }
            )
    finally:
        await shard.close()
    return out


def hop_cost(loop: asyncio.AbstractEventLoop) -> list[dict[str, Any]]:
    """The same calls to the live shard 0, one at a time, from this process: through a Ray
    actor call (``check_batch.remote``) and through the data-plane link a replica uses
    (``ShardClient``): what each hop adds, on the shard's side and on the caller's."""
    import ray

    from agentauth.actors import ShardClient
    from agentauth.deployments.verifier import NAMESPACE

    handle = ray.get_actor("agentauth-shard-0", namespace=NAMESPACE)
    client = ShardClient([handle], max_batch=max(SIZES), max_wait=0.0, timeout=5.0)
    loop.run_until_complete(client.connect())
    shards = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "StateShard" in " ".join(proc.cmdline()):
                shards.append(proc)

    def shard_cpu() -> float:
        total = 0.0
        for proc in shards:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    async def by_link(checks: list[Any]) -> list[Any]:
        return list(await asyncio.gather(*(client.check(0, c) for c in checks)))

    ray.get(handle.check_batch.remote(_bench_checks(64, time.time())))  # restore the grants
    out: list[dict[str, Any]] = []
    for via in ("Ray call", "link"):
        for size in SIZES:
            calls = [_bench_checks(size, time.time()) for _ in range(max(20, 600 // size))]
            denied = 0
            shard0, me0, t0 = shard_cpu(), time.process_time(), time.perf_counter()
            for checks in calls:
                if via == "link":
                    results = loop.run_until_complete(by_link(checks))
                else:
                    results = ray.get(handle.check_batch.remote(checks))
                denied += sum(not r.allowed for r in results)
            wall = time.perf_counter() - t0
            n = len(calls) * size
            out.append(
                {
                    "via": via,
                    "size": size,
                    "ms_per_call": wall / len(calls) * 1000,
                    "shard_cpu_us_per_check": (shard_cpu() - shard0) / n * 1e6,
                    "caller_cpu_us_per_check": (time.process_time() - me0) / n * 1e6,
                    "checks_per_s": n / wall,
                    "denied": denied,
                }
            )
    client.close()
    return out


def shard_stats() -> list[dict[str, Any]]:
    import ray

    from agentauth.deployments.verifier import NAMESPACE

    handles = [ray.get_actor(f"agentauth-shard-{i}", namespace=NAMESPACE) for i in range(SHARDS)]
    return list(ray.get([h.stats.remote() for h in handles]))


# --- the benchmark -----------------------------------------------------------------------


@dataclass
class Plan:
    seconds: int  # unpaced warm runs
    paced_seconds: int
    cold_seconds: int  # upper bound; shortened so the pool of fresh grants lasts
    warmup_seconds: int
    fractions: tuple[float, ...]  # paced rates, as fractions of the column's own maximum
    cold_pool_cap: int  # grants per column, unless the paced cold runs need more
    connections: int
    memory_agents: int
    rounds: int  # interleaved unpaced warm runs of the three columns, for the ratios
    # The paced runs the latency goals are read from (warm at half of (a)'s maximum, cold at
    # a quarter) run longer: at 1,000/s a 4 s run has 40 requests above its p99, so one
    # stall of tens of ms anywhere on the machine decides it.
    goal_seconds: int


FULL = Plan(5, 4, 4, 2, (0.25, 0.5, 0.75, 0.9), 20_000, 16, 100_000, 3, 12)
QUICK = Plan(3, 3, 3, 1, (0.5,), 6000, 16, 100_000, 1, 3)


class Bench:
    def __init__(self, plan: Plan, stack: Stack, world: World) -> None:
        self.plan = plan
        self.stack = stack
        self.world = world
        self.targets: dict[str, Target] = {}
        self.runs: list[Run] = []
        self.maxima: dict[str, float] = {}
        self.half = 0  # half of (a)'s unpaced warm maximum: where the latency goals are set
        self.used_cold: list[Credential] = []
        # Unpaced warm runs of (a), (b), (c) one after another, repeated: on a shared
        # machine whose speed drifts by tens of percent within minutes, a ratio is only
        # meaningful between runs close in time.
        self.rounds: list[dict[str, Run]] = []
        self.stats: dict[str, Any] = {}
        # Seconds the whole benchmark may wait for a quieter machine before a run.
        self.quiet_budget = 60.0
        self.tmp = Path(tempfile.mkdtemp(prefix="verify-bench-"))
        self.meter = CpuMeter(stack.db_name, stack.procs)

    def settle(self) -> None:
        """Wait until the shard actors are idle (a check that timed out on the verifier side
        is still decided and committed by its shard, and that backlog must not spill into
        the next run), and, within a budget for the whole benchmark, until other people's
        work on the machine has calmed down."""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            self.meter.start()
            time.sleep(0.3)
            cpu = self.meter.stop()
            if cpu.get("shard actors", 0.0) >= 0.05:
                continue
            if cpu.get(OUTSIDE, 0.0) < 0.25 or self.quiet_budget <= 0:
                return
            self.quiet_budget -= 0.3

    def run(
        self,
        column: str,
        mode: str,
        creds: Sequence[Credential],
        *,
        rate: float | None,
        seconds: int,
        count: int,
        record: bool = True,
    ) -> Run:
        target = self.targets[column]
        bodies = write_bodies(self.tmp / "bodies.txt", creds, count)
        self.settle()
        result = run_wrk(
            column,
            mode,
            target.url,
            bodies,
            target.auth,
            rate=rate,
            seconds=seconds,
            connections=(
                paced_connections(rate, self.plan.connections) if rate else self.plan.connections
            ),
            meter=self.meter,
        )
        bodies.unlink()
        print(result.line(), flush=True)
        if rate is None or rate == self.half:
            print(f"{'':17}cores: {self.meter.cores(result.cpu)}", flush=True)
        if record:
            self.runs.append(result)
        return result

    def find(self, column: str, mode: str, offered: float | None) -> Run | None:
        for r in self.runs:
            if r.column == column and r.mode == mode and r.offered == offered:
                return r
        return None

    def best_valid(self, column: str, mode: str = "warm") -> Run | None:
        """The highest paced load served in full: no denial, no request sent late, and
        >= 95% of it achieved."""
        ok = [
            r
            for r in self.runs
            if r.column == column
            and r.mode == mode
            and r.offered
            and r.valid
            and not r.late
            and r.rps >= 0.95 * r.offered
        ]
        return max(ok, key=lambda r: r.rps, default=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (about 3 minutes)")
    parser.add_argument("--no-doc", action="store_true", help="do not rewrite the doc and plot")
    parser.add_argument(
        "--shard-timeout",
        type=float,
        help="VerifierSettings.shard_timeout for (a) and (b) (default: the shipped default)",
    )
    parser.add_argument(
        "--batch-wait",
        type=float,
        help="VerifierSettings.batch_wait for (a) and (b) (default: the shipped default)",
    )
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    overrides = {
        k: v
        for k, v in (("shard_timeout", args.shard_timeout), ("batch_wait", args.batch_wait))
        if v is not None
    }
    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="verify-bench-stack-"))
    loop = asyncio.new_event_loop()
    stack: Stack | None = None
    bench: Bench | None = None
    registry = None
    try:
        stack = start_stack(loop, workdir, overrides)
        from agentauth.registry import Registry

        world = loop.run_until_complete(build_world(stack.base, stack.admin))
        bench = Bench(plan, stack, world)
        # Cold grants are made through the registry's service layer in this process.
        registry = loop.run_until_complete(Registry.open(stack.registry_settings, migrate=False))
        # A shard refuses proofs issued before its start plus the allowed clock skew (it
        # cannot know which jtis a previous incarnation saw): wait that out first.
        started = max(s["started_at"] for s in shard_stats())
        time.sleep(max(0.0, started + 11 - time.time()))
        print(f"stack up in {time.monotonic() - began:.0f} s", flush=True)
        print(
            f"wrk: 1 thread, {plan.connections} connections; warm = {len(world.warm)} tokens"
            " reused, cold = a new grant and token per request; every request a fresh proof",
            flush=True,
        )
        measure(bench, loop, registry, workdir)
        memory = {
            "live": shard_stats(),
            "synthetic": synthetic_memory(plan.memory_agents),
            "batch_cost": loop.run_until_complete(shard_batch_cost(stack.db_url)),
            "hop_cost": hop_cost(loop),
        }
        report(bench, memory, args, overrides, time.monotonic() - began)
    finally:
        if registry is not None:
            loop.run_until_complete(registry.close())
        stop_stack(stack)
        if stack is not None:
            drop_database(loop, stack.db_url)
        shutil.rmtree(workdir, ignore_errors=True)
        if bench is not None:
            shutil.rmtree(bench.tmp, ignore_errors=True)
    print(f"done in {time.monotonic() - began:.0f} s")


def measure(bench: Bench, loop: asyncio.AbstractEventLoop, registry: Any, workdir: Path) -> None:
    """One column at a time, the others stopped: the machine has two cores, and an idle
    verifier process is not idle (see the doc), so a column must not pay for another.
    Then the interleaved rounds of unpaced warm runs that the throughput ratios use."""
    for column in COLUMNS:
        start_column(bench, column, workdir)
        measure_column(bench, loop, registry, column)
        stop_column(bench, column)
    plan, warm = bench.plan, bench.world.warm
    for _ in range(plan.rounds):
        results: dict[str, Run] = {}
        for column in COLUMNS:
            start_column(bench, column, workdir)
            count = int(bench.maxima[column] * 1.6 * plan.seconds) + 2000
            bench.run(
                column,
                "warmup",
                warm,
                rate=None,
                seconds=plan.warmup_seconds,
                count=int(bench.maxima[column] * 1.6 * plan.warmup_seconds) + 1000,
                record=False,
            )
            results[column] = bench.run(
                column, "round", warm, rate=None, seconds=plan.seconds, count=count, record=False
            )
            stop_column(bench, column)
        bench.rounds.append(results)


def start_column(bench: Bench, column: str, workdir: Path) -> None:
    """Bring up one column's verifier. (a) is deployed already for its first measurement."""
    stack, world = bench.stack, bench.world
    auth = world.provider.headers["Authorization"]
    if column == "serve":
        if column in bench.targets:  # a later round: deploy it again
            deploy_verifier(stack.verifier_settings)
        bench.targets[column] = Target(
            column, f"http://127.0.0.1:{stack.port}/verifier/v1/verify", auth
        )
    elif column == "uvicorn":
        env = {
            "RAY_ADDRESS": stack.gcs_address,
            "AGENTAUTH_BENCH_VERIFIER_SETTINGS": stack.verifier_settings.model_dump_json(),
        }
        port = spawn(stack, column, "uvicorn_verifier", env, workdir)
        wait_healthy(stack, column, f"http://127.0.0.1:{port}/healthz")
        bench.targets[column] = Target(column, f"http://127.0.0.1:{port}/v1/verify", auth)
    else:
        env = {
            "AGENTAUTH_REF_JWKS_URL": f"{stack.base}/.well-known/jwks.json",
            "AGENTAUTH_REF_ISSUER": stack.base,
            "AGENTAUTH_REF_AUDIENCE": world.provider.audience,
            "AGENTAUTH_REF_REDIS_URL": REDIS,
        }
        port = spawn(stack, column, "reference_verifier", env, workdir)
        wait_healthy(stack, column, f"http://127.0.0.1:{port}/healthz")
        bench.targets[column] = Target(column, f"http://127.0.0.1:{port}/v1/verify", None)


def stop_column(bench: Bench, column: str) -> None:
    from ray import serve

    if column == "serve":
        serve.delete("verifier")  # the shard actors are detached: they stay for (b)
    else:
        stop_process(bench.stack, column)


def measure_column(
    bench: Bench, loop: asyncio.AbstractEventLoop, registry: Any, column: str
) -> None:
    plan, warm = bench.plan, bench.world.warm
    # Warm-up: connections, pools, first shard calls, caches; also a rough rate that sizes
    # the proof pool of the unpaced run. Not recorded, but a proof sent twice would still be
    # denied and counted in the verifier's own stats: a pool above any rate seen here
    # ((b) has reached 4,500/s).
    r = bench.run(
        column,
        "warmup",
        warm,
        rate=None,
        seconds=plan.warmup_seconds,
        count=8000 * plan.warmup_seconds,
        record=False,
    )
    estimate = max(r.rps, 200.0)
    count = int(estimate * 1.6 * plan.seconds) + 2000
    top = bench.run(column, "warm", warm, rate=None, seconds=plan.seconds, count=count).rps
    bench.maxima[column] = top
    if column == "serve":
        bench.half = round(top / 2)
    half = bench.half

    # Paced: fractions of this column's own maximum, plus half of (a)'s maximum, where the
    # latency goals are set (the same absolute load for every column).
    rates = sorted({round(top * f) for f in plan.fractions} | {half})
    for rate in rates:
        seconds = plan.goal_seconds if rate == half else plan.paced_seconds
        count = int(rate * seconds * 1.1) + 300
        bench.run(column, "warm", warm, rate=rate, seconds=seconds, count=count)

    # Cold: one new grant and token per request, paced at a quarter and at half of (a)'s
    # maximum, then unpaced. A cold request costs more than a warm one, so the warm rates
    # bound how many an unpaced run can use.
    fastest = max(top, estimate)
    cold_rates = [max(1, round(half / 2)), half]
    cold_seconds = [plan.goal_seconds, plan.paced_seconds]
    needs = [
        int(rate * seconds * 1.1) + 200
        for rate, seconds in zip(cold_rates, cold_seconds, strict=True)
    ]
    paced_need = sum(needs)
    if column == "reference":
        # (c) caches nothing: (a)'s and (b)'s tokens are as new to it, reused with fresh
        # proofs if the pool runs short.
        pool = bench.used_cold
        paced, rest = pool[:paced_need], pool[paced_need:] or pool
    else:
        # Other users' load on the machine comes and goes: a margin, so a quieter minute
        # does not run the unpaced cold run out of fresh grants (it would be invalid).
        # The paced runs always get their fill and the unpaced one at least a second's
        # worth (wrk's shortest run), cap or not: a short pool would resend proofs.
        unpaced = int(fastest * 1.5 * plan.cold_seconds)
        least = paced_need + int(fastest * 1.6) + 200
        want = max(least, min(plan.cold_pool_cap, unpaced + paced_need))
        t0 = time.monotonic()
        pool = loop.run_until_complete(cold_pool(registry, bench.world, want))
        took = time.monotonic() - t0
        print(
            f"cold pool for {SHORT[column]}: {len(pool)} grants + tokens in {took:.0f} s"
            f" ({len(pool) / took:.0f}/s, registry service layer in this process)",
            flush=True,
        )
        bench.used_cold.extend(pool)
        paced, rest = pool[:paced_need], pool[paced_need:]
    start = 0
    for rate, seconds, need in zip(cold_rates, cold_seconds, needs, strict=True):
        creds = paced[start : start + need] or paced
        start += need
        bench.run(column, "cold", creds, rate=rate, seconds=seconds, count=len(creds))
    if column == "reference":
        seconds, count = plan.cold_seconds, int(fastest * 1.6 * plan.cold_seconds) + 1000
    else:
        seconds = max(1, min(plan.cold_seconds, int(len(rest) / (fastest * 1.15))))
        count = len(rest)
    bench.run(column, "cold", rest, rate=None, seconds=seconds, count=count)
    bench.stats[column] = verifier_stats(bench, column)


def verifier_stats(bench: Bench, column: str) -> dict[str, Any]:
    """The verifier's own counters (the benchmark provider's decisions, which are all of
    them here, and shard-call batching); one process or replica."""
    if column == "reference":
        return {}
    url = bench.targets[column].url.replace("/v1/verify", "/v1/stats")
    try:
        return dict(httpx.get(url, headers=bench.world.provider.headers, timeout=5).json())
    except (httpx.HTTPError, ValueError) as exc:
        return {"error": str(exc)}


def drop_database(loop: asyncio.AbstractEventLoop, url: str) -> None:
    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(BASE_DB)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
        finally:
            await conn.close()

    try:
        loop.run_until_complete(go())
    except Exception as exc:  # leave it; the name is unique
        print(f"could not drop the benchmark database: {exc}")


# --- report ------------------------------------------------------------------------------


def _fmt_run(r: Run | None) -> str:
    if r is None:
        return "| - | - | - | - | - | - | - |"
    flag = "" if r.valid else " ⚠"
    return (
        f"| {r.rps:,.0f}{flag} | {r.p50:.2f} | {r.p90:.2f} | {r.p99:.2f} | {r.p999:.2f}"
        f" | {r.not_allowed} | {_late_cell(r)} |"
    )


def report(
    bench: Bench,
    memory: dict[str, Any],
    args: argparse.Namespace,
    overrides: dict[str, float],
    elapsed: float,
) -> None:
    half = bench.half
    lines: list[str] = []
    add = lines.append
    add(
        "| column | run | load | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | not allowed"
        " | sent late (max ms) |"
    )
    add("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for column in COLUMNS:
        for mode, offered in (("warm", None), ("cold", None), ("warm", half), ("cold", half)):
            r = bench.find(column, mode, offered)
            load = "max (unpaced)" if offered is None else f"paced {offered}/s"
            add(f"| {LABELS[column]} | {mode} | {load} {_fmt_run(r)}")
        best = bench.best_valid(column)
        if best is not None and best.offered != half:
            add(
                f"| {LABELS[column]} | warm | highest paced load served in full:"
                f" {best.offered:.0f}/s {_fmt_run(best)}"
            )
    table = "\n".join(lines)

    goals = evaluate_goals(bench, half)
    print()
    print(table)
    print()
    for goal in goals:
        print(goal)
    live, synth = memory["live"], memory["synthetic"]
    per_100k = synth["traced_per_agent"] * 100_000
    memory_text = (
        f"- Measured (not extrapolated from getsizeof): {synth['agents']:,} synthetic agents"
        " (one grant with a 60/min rate limit and one live proof jti each) driven through"
        " `ShardState.decide`, the state object `StateShard.check_batch` keeps, in this"
        f" process under tracemalloc: **{synth['traced_per_agent']:.0f} bytes per agent,"
        f" {per_100k / 2**20:.1f} MiB per 100,000 agents** (all shards together; Python"
        " allocations only, not allocator slack or the actor process itself). Each further"
        " request inside the replay window (70 s) adds"
        f" {synth['traced_per_extra_request']:.0f} bytes (one jti entry, one remembered"
        " time). The shard's own `sys.getsizeof` estimate (`memory_bytes()`, what"
        f" `stats.remote()` reports) says {synth['getsizeof_per_agent']:.0f} bytes per agent"
        " for the same state.\n"
        f"- `ShardState.decide` alone costs {synth['decide_us']:.1f} µs per check here (no"
        " Ray, no audit commit).\n"
        f"- A full garbage collection in this process took {synth['gc_ms_with_state']:.1f} ms"
        f" with that state of {synth['agents']:,} agents alive and"
        f" {synth['gc_ms_without']:.1f} ms without it (median of 5): a shard's checks wait"
        " out its collections, and its grants are kept as tuples the collector stops"
        " tracking (docs/verifier.md).\n"
        "- Live shards at the end of the run (`stats.remote()`, getsizeof estimate): "
        + "; ".join(
            f"shard {s['index']}: {s['grants']:,} grants, {s['jtis']:,} jtis,"
            f" {s['memory_bytes'] / 2**20:.1f} MiB, {s['decisions']:,} decisions"
            + (
                f" in {s['commits']:,} commits ({s['decisions'] / s['commits']:.1f} per commit)"
                if s.get("commits")
                else ""
            )
            for s in live
        )
        + "."
    )
    cost_text = "\n".join(
        f"| {c['size']} | {c['ms_per_call']:.2f} | {c['cpu_us_per_check']:.0f}"
        f" | {c['checks_per_s']:,.0f} | {c['denied']} |"
        for c in memory["batch_cost"]
    )
    hop_text = "\n".join(
        f"| {c['via']} | {c['size']} | {c['ms_per_call']:.2f} | {c['shard_cpu_us_per_check']:.0f}"
        f" | {c['caller_cpu_us_per_check']:.0f} | {c['checks_per_s']:,.0f} | {c['denied']} |"
        for c in memory["hop_cost"]
    )
    memory_text += (
        "\n\n## The shard hop by batch size\n\n"
        "One `StateShard.check_batch` call at a time, by checks per call. In this process"
        " without Ray (a new shard on its own audit chain: decide, chain, commit the audit"
        " rows in one transaction per call):\n\n"
        "| checks per call | ms per call | CPU µs per check | checks/s | denied |\n"
        "|---:|---:|---:|---:|---:|\n" + cost_text + "\n\n"
        "The same to the live shard actor 0 from the benchmark process, through a Ray actor"
        " call and through the data-plane link a verifier replica uses (`ShardClient`; CPU"
        " of the shard actor processes and of the caller):\n\n"
        "| via | checks per call | ms per call | shard CPU µs per check | caller CPU µs per"
        " check | checks/s | denied |\n|---|---:|---:|---:|---:|---:|---:|\n" + hop_text
    )
    print()
    print(memory_text)
    for column, stats in bench.stats.items():
        if stats:
            print(f"{SHORT[column]} verifier /v1/stats: {stats}")
    if args.no_doc:
        return
    write_doc(
        bench,
        table=table,
        goals=goals,
        memory_text=memory_text,
        args=args,
        overrides=overrides,
        elapsed=elapsed,
    )
    plot(bench, half)
    print(f"wrote {DOC.relative_to(ROOT)} and {PLOT.relative_to(ROOT)}")


def evaluate_goals(bench: Bench, half: int) -> list[str]:
    def verdict(ok: bool, *runs: Run | None) -> str:
        if any(r is not None and not r.valid for r in runs):
            return (
                "not met (and the run had denials, so it is not a valid figure)"
                if not ok
                else "met on paper only: the runs had denials, so neither is a valid figure"
            )
        late = [r for r in runs if r is not None and r.offered and r.late]
        if late and ok:
            # The waits of requests sent late are missing from their latencies.
            return f"not shown: {late[0].late_note}"
        return "met" if ok else "NOT met"

    a = bench.find("serve", "warm", None)
    b = bench.find("uvicorn", "warm", None)
    c = bench.find("reference", "warm", None)
    a_ok, b_ok, c_ok = (bench.best_valid(col) for col in COLUMNS)
    out = []
    if bench.rounds:
        # The verdict on throughput: the median over rounds of ratios taken between runs
        # minutes apart at most (the machine's speed drifts; see the observations).
        targets = (("uvicorn", 0.5, ">= 50% of (b)'s"), ("reference", 1.0, ">= (c)'s"))
        for other, goal, text in targets:
            ratios = [r["serve"].rps / r[other].rps for r in bench.rounds]
            median = statistics.median(ratios)
            clean = all(run.valid for r in bench.rounds for run in r.values())
            shown = ", ".join(f"{x:.2f}" for x in ratios)
            out.append(
                f"- (a) {text} throughput, interleaved unpaced rounds: (a)/{SHORT[other][:3]}"
                f" = {shown}; median {median:.2f} -> "
                + ("met" if median >= goal else "NOT met")
                + ("" if clean else " (some round had denials: see the rounds table)")
            )
    if a and b:
        out.append(
            f"- (a) >= 50% of (b)'s throughput, first unpaced runs alone: {a.rps:,.0f} vs"
            f" {b.rps:,.0f} req/s"
            f" = {a.rps / b.rps:.0%} -> {verdict(a.rps >= 0.5 * b.rps, a, b)}"
        )
    if a and c:
        out.append(
            f"- (a) >= (c)'s throughput, first unpaced runs alone: {a.rps:,.0f} vs"
            f" {c.rps:,.0f} req/s"
            f" = {a.rps / c.rps:.2f}x -> {verdict(a.rps >= c.rps, a, c)}"
        )
    for column, best in zip(COLUMNS, (a_ok, b_ok, c_ok), strict=True):
        tried = sorted(
            {r.offered for r in bench.runs if r.column == column and r.mode == "warm" and r.offered}
        )
        if best is None and tried:
            rates = ", ".join(f"{x:.0f}" for x in tried)
            out.append(
                f"- {SHORT[column]}: none of the paced loads tried ({rates} req/s) was served"
                " in full (each had denials, sent some late or fell behind)"
            )
    if a_ok and b_ok and c_ok:
        out.append(
            "- the same on the highest paced load each served in full (no denial, none sent"
            f" late, >= 95% achieved): (a) {a_ok.rps:,.0f}, (b) {b_ok.rps:,.0f},"
            f" (c) {c_ok.rps:,.0f} req/s"
            f" -> (a)/(b) = {a_ok.rps / b_ok.rps:.0%}, (a)/(c) = {a_ok.rps / c_ok.rps:.2f}x"
            " (coarse: only the paced grid's rates were tried)"
        )
    wa = bench.find("serve", "warm", half)
    if wa:
        out.append(
            f"- warm p99 < 5 ms at half of (a)'s max ({half}/s offered, {wa.rps:,.0f}/s"
            f" achieved): {wa.p99:.2f} ms -> {verdict(wa.p99 < 5, wa)}"
        )
    ca = bench.find("serve", "cold", half)
    cm = bench.find("serve", "cold", None)
    cq = bench.find("serve", "cold", max(1, round(half / 2)))
    if cq:
        out.append(
            f"- cold p99 < 20 ms at a quarter of (a)'s warm max ({cq.offered:.0f}/s offered,"
            f" {cq.rps:,.0f}/s achieved): {cq.p99:.2f} ms -> {verdict(cq.p99 < 20, cq)}"
        )
    if ca:
        text = (
            f"- cold p99 < 20 ms at the same load ({half}/s): {ca.p99:.2f} ms"
            f" -> {verdict(ca.p99 < 20, ca)}"
        )
        if cm:
            text += (
                f"; unpaced ({cm.rps:,.0f}/s, {bench.plan.connections} connections):"
                f" {cm.p99:.2f} ms -> {verdict(cm.p99 < 20, cm)}"
            )
        out.append(text)
    return out


def code_version() -> str:
    """Which verifier code ran: the tree changes under other people's hands, so the commit
    alone does not say."""
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    files = (
        "agentauth/actors/_client.py",
        "agentauth/actors/_shard.py",
        "agentauth/actors/_state.py",
        "agentauth/verifier/_service.py",
    )
    digests = []
    for name in files:
        path = ROOT / name
        if path.exists():
            digests.append(f"`{name}` {hashlib.sha256(path.read_bytes()).hexdigest()[:10]}")
    return f"commit {head or 'unknown'} plus the working tree; sha256 of " + ", ".join(digests)


RUNS_HEADER = (
    "| column | run | load | connections | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms"
    " | max ms | requests | not allowed | sent late (max ms) | other load (cores) |"
)


def _late_cell(r: Run) -> str:
    if r.offered is None:
        return "-"
    return f"{r.late:,} ({r.late_max:.0f})" if r.late else "0"


def write_doc(
    bench: Bench,
    *,
    table: str,
    goals: list[str],
    memory_text: str,
    args: argparse.Namespace,
    overrides: dict[str, float],
    elapsed: float,
) -> None:
    plan = bench.plan
    settings = bench.stack.verifier_settings
    notes = ""
    if DOC.exists() and NOTES_MARKER in DOC.read_text():
        notes = DOC.read_text().split(NOTES_MARKER, 1)[1].strip()
    all_runs = "\n".join(
        f"| {SHORT[r.column]} | {r.mode} | {r.load} | {r.connections} | {r.rps:,.0f}"
        f" | {r.p50:.2f} | {r.p90:.2f} | {r.p99:.2f} | {r.p999:.2f} | {r.max_ms:.1f}"
        f" | {r.requests:,} | {r.not_allowed}{' ⚠' if not r.valid else ''}"
        f" | {_late_cell(r)} | {r.cpu.get(OUTSIDE, 0.0):.2f} |"
        for r in bench.runs
    )
    cpu_rows = []
    for r in bench.runs:
        if r.offered is None or r.offered == bench.half:
            cpu_rows.append(
                f"| {SHORT[r.column]} | {r.mode} | {r.load} | {r.rps:,.0f}"
                f" | {bench.meter.cores(r.cpu)}"
                f" | {r.cpu.get(PINGS, 0.0):,.0f} |"
            )
    stats_lines = []
    for column, stats in bench.stats.items():
        if "checks" in stats and stats.get("batches"):
            replica = "the replica" if REPLICAS == 1 else f"one of the {REPLICAS} replicas"
            where = replica if column == "serve" else "the process"
            stats_lines.append(
                f"- {SHORT[column]} ({where}): {stats['checks']:,} shard checks in"
                f" {stats['batches']:,} shard calls = {stats['checks'] / stats['batches']:.2f}"
                f" checks per call; decisions {stats.get('decisions')}; requests given up"
                f" with their check out {stats.get('checks_given_up', '-')}, void checks"
                f" {stats.get('void_checks', '-')} (checks = decisions + given up + voids)"
            )
    invalid_parts = []
    for column in COLUMNS:
        bad = [r for r in bench.runs if r.column == column and not r.valid]
        if not bad:
            continue
        why: dict[str, int] = {}
        for r in bad:
            for reason, n in r.reasons.items():
                why[reason] = why.get(reason, 0) + n
            if r.errors:
                why["http/socket errors"] = why.get("http/socket errors", 0) + r.errors
            if r.overrun:
                why["proofs sent twice"] = why.get("proofs sent twice", 0) + r.overrun
        runs = sum(1 for r in bench.runs if r.column == column)
        invalid_parts.append(
            f"{SHORT[column]}: {len(bad)} of {runs} runs ("
            + ", ".join(f"{k} x{v:,}" for k, v in sorted(why.items(), key=lambda kv: -kv[1]))
            + ")"
        )
    invalid_text = (
        'Every run in this table and in "All runs" below answered allow to every request (no'
        " denials, no errors, no reused proof)."
        if not invalid_parts
        else "Runs with non-allow answers: " + "; ".join(invalid_parts) + "."
    )
    round_denials = [
        f"{SHORT[c]} in round {i} ({r[c].not_allowed:,})"
        for i, r in enumerate(bench.rounds, 1)
        for c in COLUMNS
        if not r[c].valid
    ]
    if round_denials:
        invalid_text += " The interleaved rounds had some: " + ", ".join(round_denials) + "."
    rounds_text = ""
    if bench.rounds:
        rows = "\n".join(
            f"| {i} | "
            + " | ".join(
                f"{r[c].rps:,.0f}{'' if r[c].valid else ' ⚠'} (p99 {r[c].p99:.1f})" for c in COLUMNS
            )
            + f" | {r['serve'].rps / r['uvicorn'].rps:.0%}"
            + f" | {r['serve'].rps / r['reference'].rps:.2f}x |"
            for i, r in enumerate(bench.rounds, 1)
        )
        n, secs, warmup = len(bench.rounds), bench.plan.seconds, bench.plan.warmup_seconds
        rounds_text = f"""Throughput, interleaved: after the runs above, {n} rounds of one
unpaced warm run ({secs} s, after {warmup} s of warm-up) per column, (a), (b), (c) in turn,
each brought up alone again. The goals on throughput take the median of these rounds'
ratios: the machine's speed drifts by tens of percent within minutes, so a ratio is only
meaningful between runs close in time.

| round | (a) req/s (p99 ms) | (b) req/s (p99 ms) | (c) req/s (p99 ms) | (a)/(b) | (a)/(c) |
|---:|---:|---:|---:|---:|---:|
{rows}
"""
    code = code_version()
    command = "python bench/verify_bench.py" + (" --quick" if args.quick else "")
    command += "".join(f" --{k.replace('_', '-')} {v}" for k, v in overrides.items())
    text = f"""# Verifier benchmark

Generated by `{command}` ({elapsed / 60:.1f} minutes, {time.strftime("%Y-%m-%d %H:%M")}) on
this machine: {os.cpu_count()} cores shared by everything below (Ray, Serve, HAProxy,
PostgreSQL, Redis, the uvicorn workers and wrk itself). Code measured: {code}.

Needs, besides the server extra: `pip install pyjwt matplotlib` (the reference verifier and
the plot), Debian's `wrk`, PostgreSQL and Redis on 127.0.0.1 (`AGENTAUTH_BENCH_DATABASE_URL`,
`AGENTAUTH_BENCH_REDIS_URL` override them).

## What is measured

Three verifiers answer the same `POST /v1/verify` bodies
(`{{token, proof, method, url, action: {{kind: read, resource: calendar/events}}}}`):

- **{LABELS["serve"]}**: the registry and verifier Serve applications on one Serve instance
  (the serving environment, `{" ".join(f"{k}={v}" for k, v in SERVING_ENV.items())}`; route
  prefixes `/registry` and `/verifier`), {SHARDS} `StateShard` actor{"s" if SHARDS > 1 else ""}
  (`AGENTAUTH_BENCH_REPLICAS`, `AGENTAUTH_BENCH_SHARDS` change the counts). Verifier settings:
  `shard_timeout={settings.shard_timeout}`, `batch_wait={settings.batch_wait}`,
  `max_batch={settings.max_batch}`{
        " (overridden on the command line)" if overrides else " (the shipped defaults)"
    }.
- **{LABELS["uvicorn"]}**: `bench/uvicorn_verifier.py`, the same `Verifier` and
  `create_app`, attached to the same Ray instance and the same shard actors, served by
  uvicorn directly: the floor for this Python code on this box.
- **{LABELS["reference"]}**: `bench/reference_verifier.py`, the verifier a provider would
  write without AgentAuth: PyJWT checks the token (ES256, JWKS fetched at start) and the
  DPoP proof (embedded JWK; htm, htu, iat, ath, cnf.jkt), a capability check, then Redis
  `SET NX` on the proof's jti. No audit, no envelope, no revocation, no caches.

Every AgentAuth allow includes what the reference skips: the shard's replay window and
envelope (a 1,000/s rate limit per grant here), and the decision's audit row committed to
PostgreSQL before the answer.

**Warm**: {len(bench.world.warm)} tokens ({SHARDS * AGENTS_PER_SHARD} agents spread {
        AGENTS_PER_SHARD
    } per shard, one grant each),
reused by every request, each request with a fresh DPoP proof: the token's signature
check is cached. **Cold**: every request carries a token never seen before of a grant never
seen before (one grant per request, each approved with a passkey through the registry's
service layer), so the token signature, claims validation, grant cache-aside (memory, Redis,
PostgreSQL) and the shard's grant state all miss. (c) caches nothing, so its warm and cold
runs differ only by the tokens.

**One column at a time**: (a) runs with the Serve verifier app deployed; it is then deleted
(the detached shard actors stay) and (b)'s uvicorn worker starts; (b) is stopped before (c)
starts. On two cores an idle verifier process is not free (see the observations), so no
column pays for another's. The registry's Serve replica, PostgreSQL and Redis stay up
throughout.

**Load**: wrk, 1 thread, replaying pre-generated bodies from a Lua script (each proof used
once, generated just before its run because proofs expire 60 s after their iat). A Lua
`response()` hook counts answers without `"decision":"allow"` and a `done()` hook reports
p99.9 (`latency:percentile(99.9)`). *Unpaced* runs send as fast as the server answers
(closed loop, {plan.connections} connections, so {plan.connections} requests outstanding):
the maximum throughput. *Paced* runs are **open loop**: request k is due k x 1000/rate ms
after the run's start, whatever happened to the requests before it. wrk's `delay()` hook
gives each connection, when it is free, the next due time of that one schedule to sleep
until; a due time already past (every connection was waiting on an answer) is sent at once,
so the schedule catches up. Such a request leaves late and the time it waited is missing
from its latency (coordinated omission), so each one over 1 ms late is counted ("sent
late"), and paced runs get enough connections that none is: rate x {PACED_WINDOW:g} s of
them (at least {plan.connections}, at most {PACED_MAX_CONNECTIONS}, the verifier replica's
`max_ongoing_requests`), so a run only sends late once more than {PACED_WINDOW * 1000:.0f} ms
of requests are outstanding. A paced run that sent any late has latencies that are a lower
bound, and a latency goal it seems to meet is not counted as met. Runs: {plan.seconds} s
unpaced warm, {plan.paced_seconds} s paced ({plan.goal_seconds} s for the runs the latency
goals are read from: warm at half of (a)'s maximum, cold at a quarter), up to
{plan.cold_seconds} s unpaced cold
(shortened when the pool of fresh grants would run out). Before each run the
benchmark waits for the shard actors to finish any backlog and, for up to 60 s in all, for
other work on the machine to drop below a quarter of a core.

## Results

{table}

"not allowed" counts non-allow answers, HTTP/socket errors and proofs sent twice; a run
with any is marked ⚠ and is not a valid throughput figure. {invalid_text}

{rounds_text}
Goals (measured, not adjusted):

{chr(10).join(goals)}

![p99 latency against offered load](images/verify-latency.png)

All runs, in order:

{RUNS_HEADER}
|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
{all_runs}

CPU during the unpaced runs and those at half of (a)'s maximum, in cores (2 exist), per
process group: `postgres` is the backends of this run's database, `redis` the whole server
(other users count too), "outside this benchmark" whatever else ran on the machine (the
machine's busy time minus everything listed). "other load" in the table above is the same
figure: with other people's tests on the same two cores, a run is only as clean as it is
small. Redis PINGs/s counts the PING commands the whole Redis server received.

| column | run | load | req/s | CPU (cores) | Redis PINGs/s |
|---|---|---|---:|---|---:|
{chr(10).join(cpu_rows)}

Shard-call batching (the verifier's `/v1/stats`):

{chr(10).join(stats_lines) or "- not available"}

## Shard memory

{memory_text}

## Observations

{NOTES_MARKER}

{notes}
"""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def plot(bench: Bench, half: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    colors = {"serve": "tab:blue", "uvicorn": "tab:green", "reference": "tab:red"}
    for column in COLUMNS:
        color = colors[column]
        paced = sorted(
            (r for r in bench.runs if r.column == column and r.mode == "warm" and r.offered),
            key=lambda r: r.offered or 0,
        )
        ax.plot(
            [r.offered for r in paced],
            [r.p99 for r in paced],
            marker="o",
            color=color,
            label=f"{LABELS[column]}: warm, paced",
        )
        cold = [r for r in bench.runs if r.column == column and r.mode == "cold" and r.offered]
        ax.scatter([r.offered for r in cold], [r.p99 for r in cold], marker="x", s=80, color=color)
        top = bench.find(column, "warm", None)
        if top:
            ax.scatter([top.rps], [top.p99], marker="*", s=180, color=color)
        # Saturated (achieved < 95% of offered, or sent late): large hollow circle; had
        # denials: square.
        behind = [r for r in paced if r.rps < 0.95 * (r.offered or 0) or r.late]
        ax.scatter(
            [r.offered for r in behind],
            [r.p99 for r in behind],
            s=200,
            facecolors="none",
            edgecolors=color,
        )
        denied = [r for r in [*paced, *cold] if not r.valid]
        ax.scatter(
            [r.offered for r in denied],
            [r.p99 for r in denied],
            s=110,
            marker="s",
            facecolors="none",
            edgecolors="black",
        )
        if top and not top.valid:
            ax.scatter([top.rps], [top.p99], s=110, marker="s", facecolors="none", edgecolors="k")
    for value, style, text in ((5, "--", "warm goal 5 ms"), (20, ":", "cold goal 20 ms")):
        ax.axhline(value, color="gray", linestyle=style, linewidth=1)
        ax.annotate(
            text,
            (0.005, value),
            xycoords=("axes fraction", "data"),
            color="gray",
            fontsize=8,
            va="bottom",
        )
    ax.axvline(half, color="gray", linestyle="-.", linewidth=0.8)
    ax.annotate(
        f"half of (a)'s max: {half}/s",
        (half, 0.01),
        xycoords=("data", "axes fraction"),
        color="gray",
        fontsize=8,
        rotation=90,
        ha="right",
        va="bottom",
    )
    ax.set_yscale("log")
    ticks = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(left=0)
    ax.set_xlabel("offered load (req/s)")
    ax.set_ylabel("p99 latency (ms, log scale)")
    ax.set_title(
        "POST /v1/verify: p99 against offered load\n(wrk; paced runs open loop, the"
        f" unpaced maxima closed loop with {bench.plan.connections} connections)",
        fontsize=10,
    )
    ax.grid(True, which="major", alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    handles += [
        Line2D([], [], marker="x", color="gray", linestyle="", label="cold, paced"),
        Line2D(
            [],
            [],
            marker="*",
            color="gray",
            markersize=11,
            linestyle="",
            label="unpaced maximum (at its achieved rate)",
        ),
        Line2D(
            [],
            [],
            marker="o",
            markersize=12,
            markerfacecolor="none",
            color="gray",
            linestyle="",
            label="achieved < 95% of offered, or some sent late",
        ),
        Line2D(
            [],
            [],
            marker="s",
            markersize=9,
            markerfacecolor="none",
            color="black",
            linestyle="",
            label="run had non-allow answers (not valid)",
        ),
    ]
    ax.legend(handles=handles, fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT)
    plt.close(fig)


if __name__ == "__main__":
    main()
