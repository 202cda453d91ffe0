"""Multi-node test: lose a Ray node under verification load; nothing may fail open.

    python cluster/multinode/run.py

Starts, on this machine and for this test alone:
  * an embedded PostgreSQL (Unix socket) and a redis-server on a free loopback port;
  * a Ray head node (``ray start --head``, 2 CPUs, custom resource ``head``) and a second
    node (``ray start --address ...``, 2 CPUs, custom resource ``node2``), each with its own
    ``--temp-dir`` and on its own loopback address (127.0.0.2 and 127.0.0.3: Ray 2.60
    rewrites ``--node-ip-address 127.0.0.1`` to the machine's routable address, see
    ``ray._private.services.resolve_ip_for_localhost``; the rest of 127.0.0.0/8 is left alone
    and is still loopback, and it gives the two nodes distinct addresses as real nodes have);
  * Serve with the HAProxy ingress on the head only, the registry (1 replica, pinned to the
    head) and the verifier (4 replicas, ``max_replicas_per_node=2``: two on each node);
  * the 4 state shards, two placed on each node (soft node affinity, so Ray may restart
    them elsewhere; see ``_create_shards``).

Then it drives verification traffic (fresh DPoP proofs, replays mixed in), kills the second
node abruptly (SIGKILL to its raylet and every process under it, and its log monitor: what
a crashed machine looks like; ``ray stop`` would stop every Ray on this machine) and keeps
the traffic on until every fresh proof is allowed again for a while.

Fail-open: a replayed proof allowed (above all the proofs allowed before the crash by the
shards that died with the node, replayed at their new incarnations); an allow without its
committed audit row. Recovery time: from the kill to the last failed (denied or errored)
fresh proof. Exit status 1 on any fail-open, no recovery within the bound, or a placement
that did not spread over both nodes. Everything it started is stopped, also on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from chaos._stack import RedisServer, free_port, serve_environment  # noqa: E402
from chaos._traffic import (  # noqa: E402
    Outcome,
    Traffic,
    audit_rows_missing,
    make_subjects,
    post,
    summarize,
)

HYPOTHESIS = (
    "Killing the second node (2 of 4 verifier replicas, 2 of 4 shards) under load lets "
    "nothing fail open: HAProxy keeps routing to the head's replicas; agents on the head's "
    "shards keep being allowed; agents on the lost shards are denied (state_timeout / "
    "state_unavailable, shard_restarted) until the GCS declares the node dead and Ray "
    "restarts their shards on the head, which refuse every proof the lost incarnations may "
    "have seen; every allow has its audit row; the error rate is back to zero within 60 s."
)
HEAD_IP, NODE2_IP = "127.0.0.2", "127.0.0.3"
SHARDS = 4
VERIFIER_REPLICAS = 4
BASELINE_S = 5.0
# A node crash is noticed by the GCS health checks (a few seconds), then actors restart
# and shards refuse old proofs for 10 s more: 60 s is generous and still bounded.
RECOVERY_BOUND_S = 60.0
CLEAN_FOR_S = 5.0  # "recovered" means this long with every fresh proof allowed
RAY_START_TIMEOUT_S = 90


class Cluster:
    """The two ``ray start`` nodes of this test and everything they spawn."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.gcs_port = free_port()
        self.head_dir = workdir / "head"
        self.node2_dir = workdir / "node2"

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.gcs_port}"

    def _ray_start(self, *args: str) -> None:
        ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
        # Our own command line: the ray CLI next to this interpreter, fixed arguments.
        done = subprocess.run(  # noqa: S603
            [ray, "start", "--disable-usage-stats", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=RAY_START_TIMEOUT_S,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"ray start {args[:2]} failed:\n{done.stdout}\n{done.stderr}")

    def start(self) -> None:
        # Every port a second Ray on this machine would also default to is picked free:
        # the GCS, the Ray client server (10001), the dashboard (8265) and its agents.
        self._ray_start(
            "--head",
            f"--node-ip-address={HEAD_IP}",
            f"--port={self.gcs_port}",
            "--num-cpus=2",
            "--resources=" + json.dumps({"head": 4}),
            f"--temp-dir={self.head_dir}",
            "--include-dashboard=false",
            f"--dashboard-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        )
        self._ray_start(
            f"--address={self.address}",
            f"--node-ip-address={NODE2_IP}",
            "--num-cpus=2",
            "--resources=" + json.dumps({"node2": 4}),
            f"--temp-dir={self.node2_dir}",
            f"--dashboard-agent-listen-port={free_port()}",
        )

    def _processes(self, directory: Path) -> list[psutil.Process]:
        """Processes whose command line names ``directory``, and all their descendants.

        Workers rewrite their command line (``ray::IDLE``), so they are found as children
        of their raylet; the raylet, GCS, monitors and agents name the temp dir.
        """
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(psutil.Error):
                if str(directory) in " ".join(proc.info["cmdline"] or ()):
                    found[proc.pid] = proc
                    for child in proc.children(recursive=True):
                        found[child.pid] = child
        found.pop(os.getpid(), None)
        return list(found.values())

    def kill_node2(self) -> int:
        """SIGKILL every process of the second node at once: a crashed machine."""
        victims = self._processes(self.node2_dir)
        for proc in victims:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        return len(victims)

    def stop(self) -> None:
        """Kill what this test's nodes started (never another Ray on this machine)."""
        for _ in range(3):  # a dying raylet may still spawn a worker: sweep again
            victims = self._processes(self.head_dir) + self._processes(self.node2_dir)
            if not victims:
                return
            for proc in victims:
                with contextlib.suppress(psutil.Error):
                    proc.terminate()
            _, alive = psutil.wait_procs(victims, timeout=5)
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(alive, timeout=5)


def _node_of_actors(prefix: str) -> dict[str, str]:
    """Live actors whose name starts with ``prefix`` -> node id.

    From the GCS actor table (``ray._private.state``): the public state API needs the
    dashboard, which this test does not start.
    """
    import ray._private.state  # noqa: PLC0415 - private module, only here

    return {
        info["Name"]: info["Address"]["NodeID"]
        for info in ray._private.state.actors().values()
        if info.get("Name", "").startswith(prefix) and info["State"] == "ALIVE"
    }


def _create_shards(database_url: str, nodes: list[str]) -> None:
    """The shard actors, created before the verifier so their placement is known.

    Same name, namespace and options as ``agentauth.deployments.verifier.shard_handles``
    (which then finds them with ``get_if_exists``), plus a soft affinity: shard i starts on
    node i % 2 and may be restarted on a surviving node. Soft affinity is only a preference
    (here it was ignored for about half the actors), so a shard that starts elsewhere is
    killed and created again, before it has decided anything: a hard affinity would pin it
    to the dead node and it could never restart.
    """
    import ray  # noqa: PLC0415
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: PLC0415

    from agentauth.actors import StateShard  # noqa: PLC0415
    from agentauth.deployments.verifier import shard_options  # noqa: PLC0415

    actor = ray.remote(StateShard)
    for i in range(SHARDS):
        options, wanted = shard_options(i), nodes[i % 2]
        name = options["name"]
        for _ in range(10):
            handle = actor.options(
                **options,
                scheduling_strategy=NodeAffinitySchedulingStrategy(wanted, soft=True),
            ).remote(index=i, database_url=database_url)
            ray.get(handle.ping.remote(), timeout=60)
            if _node_of_actors(name).get(name) == wanted:
                break
            ray.kill(handle, no_restart=True)
            deadline = time.monotonic() + 10  # the name is free once the actor is dead
            while name in _node_of_actors(name) and time.monotonic() < deadline:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"{name} would not start on node {wanted}")


def _deploy(port: int, database_url: str, redis_url: str, data_dir: Path) -> Any:
    from ray import serve  # noqa: PLC0415

    from agentauth.deployments.registry import RegistryDeployment  # noqa: PLC0415
    from agentauth.deployments.verifier import VerifierDeployment  # noqa: PLC0415
    from agentauth.registry import RegistrySettings  # noqa: PLC0415
    from agentauth.verifier import VerifierSettings  # noqa: PLC0415

    # HAProxy on the head only: a proxy per node would need a port per node on one machine.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    settings = RegistrySettings(
        database_url=database_url,
        redis_url=redis_url,
        data_dir=data_dir,
        issuer=f"http://127.0.0.1:{port}/registry",
        admin_token=secrets.token_urlsafe(32),
    )
    # The deployments' own options, plus placement: the registry stays on the head (this
    # test is about verification), the verifier spreads two replicas per node.
    registry = RegistryDeployment.options(  # type: ignore[attr-defined]
        num_replicas=1, ray_actor_options={"num_cpus": 0, "resources": {"head": 0.1}}
    ).bind(settings.model_dump(mode="json"))
    serve.run(registry, name="registry", route_prefix="/registry")
    verifier_settings = VerifierSettings(
        database_url=database_url,
        redis_url=redis_url,
        issuer=settings.issuer,
        shards=SHARDS,
        # Generous for two shared cores (the default 40 ms assumes a quiet machine); a
        # dead shard is still a fast deny (state_unavailable), not a wait.
        shard_timeout=1.0,
    )
    verifier = VerifierDeployment.options(  # type: ignore[attr-defined]
        num_replicas=VERIFIER_REPLICAS, max_replicas_per_node=2
    ).bind(verifier_settings.model_dump(mode="json"))
    serve.run(verifier, name="verifier", route_prefix="/verifier")
    return settings


async def _drive(port: int, settings: Any, cluster: Cluster, nodes: list[str]) -> bool:
    from registry_world import World  # noqa: PLC0415 - tests/ is on sys.path via chaos

    base = f"http://127.0.0.1:{port}"
    ok = True
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=32)) as client:
        world = World(client=client, base=f"{base}/registry", admin_token=settings.admin_token)
        subjects = await make_subjects(world, SHARDS, SHARDS)
        for _ in range(16):  # agents hash to shards: add agents until each shard has one
            if len({s.shard for s in subjects}) == SHARDS:
                break
            subjects += await make_subjects(world, 1, SHARDS)
        shard_nodes = _node_of_actors("agentauth-shard-")
        lost_shards = {
            int(name.rsplit("-", 1)[1]) for name, node in shard_nodes.items() if node == nodes[1]
        }
        on_lost = {i for i, s in enumerate(subjects) if s.shard in lost_shards}
        print(f"agents: {len(subjects)}, shards of the agents: {sorted(s.shard for s in subjects)}")
        print(f"shards on node2 (die with it): {sorted(lost_shards)}")

        # Warm-up, not counted: the first requests through a fresh HAProxy to fresh replicas
        # may meet a 502 (seen once: HAProxy answers it as a plain 500) before the fault.
        warm = [await post(client, f"{base}/verifier", s, s.body()) for s in subjects * 5]
        print(f"warm-up: {sum(o.allowed for o in warm)} of {len(warm)} allowed")
        traffic = Traffic(client, f"{base}/verifier", subjects).start()
        await asyncio.sleep(BASELINE_S)
        killed_at = time.monotonic()
        killed = cluster.kill_node2()
        print(f"killed node2: {killed} processes (SIGKILL)", flush=True)

        recovered_at = None
        while time.monotonic() - killed_at < RECOVERY_BOUND_S + CLEAN_FOR_S:
            await asyncio.sleep(0.5)
            last = max(
                (o.done for o in _failures_after(traffic.outcomes, killed_at)), default=killed_at
            )
            fresh_since = [o for o in traffic.outcomes if not o.replay and o.sent > last]
            if time.monotonic() - last >= CLEAN_FOR_S and fresh_since:
                recovered_at = last
                break
        node_dead_after = _node_dead_after(nodes[1], killed_at)
        # The proofs the dead shards allowed before the crash, replayed at their successors.
        before = [
            (o, b)
            for o, b in traffic.allowed_bodies()
            if o.subject in on_lost and o.done <= killed_at
        ]
        limit = asyncio.Semaphore(4)  # like the traffic: no burst of shard timeouts

        async def replay(o: Outcome, body: dict[str, Any]) -> Outcome:
            async with limit:
                return await post(client, f"{base}/verifier", subjects[o.subject], body)

        replays = await asyncio.gather(*(replay(o, body) for o, body in before))
        outcomes = await traffic.stop()
        conn = await _connect(settings.database_url)
        try:
            missing = await audit_rows_missing(conn, [*outcomes, *replays])
        finally:
            await conn.close()

    counts = summarize(outcomes)
    fail_opens = {
        "replayed proof allowed": sum(1 for o in outcomes if o.replay and o.allowed),
        "pre-crash proof allowed again by a restarted shard": sum(r.allowed for r in replays),
        "allow without its audit row": len(missing),
    }
    print("\n== multi-node: lose node2 under load ==")
    print(f"requests: {len(outcomes)} (+{len(replays)} replays of pre-crash proofs)")
    for kind in ("allow", "deny", "error"):
        if counts[kind]:
            detail = ", ".join(f"{k} {v}" for k, v in counts[kind].most_common())
            print(f"  {kind:<5} {sum(counts[kind].values()):>5}  ({detail})")
    print(f"replays of pre-crash proofs: {Counter(r.reason for r in replays)}")
    print("fail-opens (must be 0):")
    for what, count in fail_opens.items():
        print(f"  {count:>3}  {what}")
    ok &= sum(fail_opens.values()) == 0
    for o in outcomes:
        if o.decision is None:
            print(
                f"error {o.reason} ({'replay' if o.replay else 'fresh proof'}) sent"
                f" {o.sent - killed_at:+.2f} s from the kill: {o.detail!r}"
            )
    during = _failures_after(outcomes, killed_at)
    by_node = Counter("node2 shard" if o.subject in on_lost else "head shard" for o in during)
    print(f"failed fresh proofs after the kill: {len(during)} ({dict(by_node)})")
    for reason, count in Counter(o.reason for o in during).most_common():
        times = [o.sent - killed_at for o in during if o.reason == reason]
        print(f"  {reason}: {count}, sent {min(times):.1f}-{max(times):.1f} s after the kill")
    if node_dead_after is not None:
        print(f"GCS marked node2 dead {node_dead_after:.1f} s after the kill (as seen by polling)")
    # "Verification goes on": agents whose shard survived keep being allowed meanwhile.
    end = recovered_at if recovered_at is not None else killed_at + RECOVERY_BOUND_S
    survivors = [
        o
        for o in outcomes
        if o.subject not in on_lost and not o.replay and killed_at <= o.sent and o.done <= end
    ]
    went_on = any(o.allowed for o in survivors)
    print(
        f"agents on surviving shards until recovery: {sum(o.allowed for o in survivors)}"
        f" allowed of {len(survivors)}"
    )
    ok &= went_on
    if recovered_at is None:
        print(f"recovery: NOT within {RECOVERY_BOUND_S:g} s")
        ok = False
    else:
        print(
            f"recovery (kill -> last failed fresh proof, then {CLEAN_FOR_S:g} s clean):"
            f" {recovered_at - killed_at:.2f} s (bound {RECOVERY_BOUND_S:g} s)"
        )
    return ok


def _failures_after(outcomes: list[Outcome], moment: float) -> list[Outcome]:
    """Fresh proofs (not replays) sent after ``moment`` that were not allowed."""
    return [o for o in outcomes if not o.replay and not o.allowed and o.sent >= moment]


_dead_seen: dict[str, float] = {}


def _node_dead_after(node_id: str, since: float) -> float | None:
    seen = _dead_seen.get(node_id)
    return None if seen is None else seen - since


async def _watch_node(node_id: str) -> None:
    """Note when the GCS first reports the node dead (polled every 0.5 s)."""
    import ray  # noqa: PLC0415

    while node_id not in _dead_seen:
        alive = {n["NodeID"]: n["Alive"] for n in await asyncio.to_thread(ray.nodes)}
        if not alive.get(node_id, False):
            _dead_seen[node_id] = time.monotonic()
        await asyncio.sleep(0.5)


async def _connect(url: str) -> Any:
    import asyncpg  # noqa: PLC0415

    return await asyncpg.connect(url, timeout=10)


def _placement(nodes: list[str]) -> bool:
    names = {nodes[0]: "head", nodes[1]: "node2"}
    replicas = _node_of_actors("SERVE_REPLICA::verifier#")
    shards = _node_of_actors("agentauth-shard-")
    per_node = Counter(names.get(n, n) for n in replicas.values())
    shard_nodes = Counter(names.get(n, n) for n in shards.values())
    print(f"verifier replicas per node: {dict(per_node)}; shards per node: {dict(shard_nodes)}")
    return per_node == Counter({"head": 2, "node2": 2}) and shard_nodes == Counter(
        {"head": 2, "node2": 2}
    )


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="mn-", dir="/tmp"))
    # A token of our own for Ray's token authentication: nothing from ~/.ray is used or
    # written, and every process of this cluster (and only those) gets it.
    env = {
        **os.environ,
        **serve_environment(),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    os.environ.update(env)
    cluster = Cluster(workdir, env)
    redis = RedisServer(workdir / "redis")
    pg: Any = None
    ok = False

    def interrupted(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    started = time.monotonic()
    print(f"hypothesis: {HYPOTHESIS}\n", flush=True)
    try:
        from agentauth.store import EmbeddedPostgres  # noqa: PLC0415

        pg = EmbeddedPostgres(workdir / "pg")
        redis.start()
        cluster.start()
        print(f"two Ray nodes up in {time.monotonic() - started:.1f} s (GCS {cluster.address})")
        import ray  # noqa: PLC0415

        ray.init(address=cluster.address, _node_ip_address=HEAD_IP, log_to_driver=False)
        by_ip = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
        nodes = [by_ip[HEAD_IP], by_ip[NODE2_IP]]
        port = free_port()
        _create_shards(pg.url, nodes)
        settings = _deploy(port, pg.url, redis.url, workdir / "data")
        print(f"stack deployed {time.monotonic() - started:.1f} s after start", flush=True)
        placed = _placement(nodes)

        async def run() -> bool:
            watcher = asyncio.create_task(_watch_node(nodes[1]))
            try:
                return await _drive(port, settings, cluster, nodes)
            finally:
                watcher.cancel()

        ok = asyncio.run(run()) and placed
        with contextlib.suppress(Exception):
            _placement(nodes)  # where things run now
    finally:
        with contextlib.suppress(Exception):
            import ray  # noqa: PLC0415

            ray.shutdown()
        cluster.stop()
        redis.kill()
        if pg is not None:
            pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"cleaned up ({time.monotonic() - started:.1f} s in all)")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
