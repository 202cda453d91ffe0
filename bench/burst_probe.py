"""Which processes take the CPU in bursts while (a), the Serve verifier, serves a steady load.

Exploratory, next to verify_bench.py (whose stack it starts): the latency goals at half
load are missed by short windows in which the whole machine is slow, and two processes
were seen to burn a core for hundreds of milliseconds every 10 s: Ray's dashboard agent
(it turns each histogram observation the workers export into one record() call, every
``metrics_report_interval_ms``) and the registry's checkpointer. This runs (a) warm, paced
open loop, while sampling every process's CPU time every 50 ms, and reports per process
group its mean load and its largest 100 ms window (a core is 100 ms in such a window).

    python bench/burst_probe.py [--rate 500] [--runs 3] [--metrics-interval-ms 1000]

``--metrics-interval-ms`` starts Ray with that ``metrics_report_interval_ms`` (Ray's default
is 10,000): the same work for the agent, in smaller pieces more often. Otherwise the
environment decides (the serving configuration's, or the caller's).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

SAMPLE = 0.05  # seconds between samples
WINDOW = 2  # samples a window spans: 100 ms


def group_of(proc: psutil.Process) -> str | None:
    try:
        text = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return None
    for needle, group in (
        ("ServeReplica:verifier", "verifier replica"),
        ("ServeReplica:registry", "registry replica"),
        ("StateShard", "shard actor"),
        # The agent that receives every process's metrics (and replays histograms).
        ("ray::DashboardAgent", "ray::DashboardAgent"),
        ("haproxy", "haproxy"),
        ("redis-server", "redis"),
        ("gcs_server", "gcs"),
        ("raylet", "raylet"),
        ("wrk", "wrk"),
    ):
        if needle in text:
            return group
    if text.startswith("postgres"):
        return "postgres"
    # Anything else by its title: Ray names its workers' processes after what they run.
    return "other: " + text.split()[0].rsplit("/", 1)[-1][:40]


class Sampler:
    """Per group, CPU seconds in each SAMPLE interval of a run (a background thread)."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.series: dict[str, list[float]] = {}

    def _procs(self) -> list[psutil.Process]:
        return [p for p in psutil.process_iter() if p.pid != psutil.Process().pid]

    def _read(self, procs: list[psutil.Process]) -> dict[int, tuple[str, float]]:
        seen = {}
        for proc in procs:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            group = self._groups.get(proc.pid)
            if group is None:
                group = self._groups[proc.pid] = group_of(proc) or "other"
            seen[proc.pid] = (group, times.user + times.system)
        return seen

    def _loop(self) -> None:
        procs = self._procs()
        last = self._read(procs)
        refresh = time.monotonic() + 1.0
        while not self._stop.wait(SAMPLE):
            if time.monotonic() > refresh:  # wrk and new workers come and go
                procs = self._procs()
                refresh = time.monotonic() + 1.0
            now = self._read(procs)
            step: dict[str, float] = {}
            for pid, (group, cpu) in now.items():
                if pid in last:
                    step[group] = step.get(group, 0.0) + cpu - last[pid][1]
            for group in set(step) | set(self.series):
                self.series.setdefault(group, []).append(step.get(group, 0.0))
            last = now

    def start(self) -> None:
        self._groups: dict[int, str] = {}
        self.series = {}
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, tuple[float, float]]:
        """Per group: (mean cores, largest CPU ms in one 100 ms window)."""
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        out = {}
        for group, steps in self.series.items():
            if not steps:
                continue
            windows = [sum(steps[i : i + WINDOW]) for i in range(max(1, len(steps) - WINDOW + 1))]
            out[group] = (sum(steps) / (len(steps) * SAMPLE), max(windows) * 1000)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--metrics-interval-ms", type=int, default=0)
    args = parser.parse_args()

    if args.metrics_interval_ms:
        # A Ray system config read from the environment when Ray starts (as the serving
        # configuration's RAY_worker_niceness is).
        os.environ["RAY_metrics_report_interval_ms"] = str(args.metrics_interval_ms)  # noqa: SIM112

    import verify_bench as vb

    loop = asyncio.new_event_loop()
    workdir = Path(tempfile.mkdtemp(prefix="burst-probe-"))
    stack = None
    try:
        stack = vb.start_stack(loop, workdir, {})
        world = loop.run_until_complete(vb.build_world(stack.base, stack.admin))
        bench = vb.Bench(vb.FULL, stack, world)
        started = max(s["started_at"] for s in vb.shard_stats())
        time.sleep(max(0.0, started + 11 - time.time()))
        vb.start_column(bench, "serve", workdir)
        bench.run("serve", "warmup", world.warm, rate=None, seconds=3, count=20_000, record=False)
        sampler = Sampler()
        p99s = []
        for i in range(args.runs):
            sampler.start()
            count = int(args.rate * args.seconds * 1.1) + 300
            r = bench.run(
                "serve", "warm", world.warm, rate=args.rate, seconds=args.seconds, count=count
            )
            groups = sampler.stop()
            p99s.append(r.p99)
            print(
                f"run {i + 1}: p50 {r.p50:.2f} ms, p99 {r.p99:.2f} ms, p99.9 {r.p999:.2f} ms,"
                f" sent late {r.late}"
            )
            for group, (cores, burst) in sorted(groups.items(), key=lambda g: -g[1][1]):
                if cores < 0.005:
                    continue  # idle all run: kernel threads, other people's daemons
                print(f"    {group:18} {cores:5.2f} cores, largest 100 ms window {burst:5.1f} ms")
        print(f"p99 median {statistics.median(p99s):.2f} ms over {args.runs} runs")
    finally:
        vb.stop_stack(stack)
        if stack is not None:
            vb.drop_database(loop, stack.db_url)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
