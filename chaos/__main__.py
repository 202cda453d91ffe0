"""``python -m chaos [experiment ...]``: run the chaos experiments, print a summary table.

Exit status 0 only if every experiment passed: no fail-open, recovery within its bound,
every expectation met.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import signal
import sys
import time
import traceback

import httpx

from . import EXPERIMENTS
from ._report import Result, print_summary
from ._stack import Stack

# Each experiment runs 20-60 s; past this it is stuck, which is a failure of its own.
EXPERIMENT_TIMEOUT_S = 120.0


async def _run_all(stack: Stack, names: list[str]) -> list[Result]:
    from registry_world import World  # noqa: PLC0415 - on sys.path once _stack is imported

    from ._context import Context  # noqa: PLC0415 - imports Ray-dependent modules

    results = []
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        world = World(
            client=client, base=stack.registry_url, admin_token=stack.registry_settings.admin_token
        )
        ctx = Context(stack, client, world)
        await ctx.healthy()
        for name in names:
            module = importlib.import_module(f"chaos.{name}")
            print(f"\n-- running {name} ...", flush=True)
            started = time.monotonic()
            try:
                result = await asyncio.wait_for(module.run(ctx), EXPERIMENT_TIMEOUT_S)
            except Exception as exc:  # one broken experiment must not hide the others
                traceback.print_exc()
                result = Result(name, module.HYPOTHESIS, error=f"{type(exc).__name__}: {exc}")
            await ctx.stop_traffic()
            result.notes.append(f"experiment took {time.monotonic() - started:.1f} s")
            result.print()
            results.append(result)
            # Put back whatever the experiment may have left broken, then prove it works.
            if stack.redis.process is None:
                await asyncio.to_thread(stack.redis.start)
            if stack.pg is None:
                await asyncio.to_thread(stack.start_postgres)
            try:
                took = await ctx.healthy()
                print(f"stack healthy again {took:.1f} s after {name}", flush=True)
            except TimeoutError:
                result.error = "the stack did not become healthy again after it"
                print(f"ERROR: the stack did not become healthy again after {name}", flush=True)
                break  # later experiments would measure the wreckage, not their fault
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.splitlines()[0])
    parser.add_argument(
        "experiments",
        nargs="*",
        metavar="EXPERIMENT",
        help=f"which to run (default: all): {', '.join(EXPERIMENTS)}",
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.experiments if n not in EXPERIMENTS]
    if unknown:
        parser.error(f"unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}")
    names = list(args.experiments) or list(EXPERIMENTS)

    def terminated(*_: object) -> None:
        raise KeyboardInterrupt  # run the finally below: stop what we started

    signal.signal(signal.SIGTERM, terminated)
    stack = Stack()
    try:
        stack.start()
        results = asyncio.run(_run_all(stack, names))
    finally:
        stack.close()
    print_summary(results)
    failed = [r.name for r in results if not r.passed]
    print(
        f"\n{len(results) - len(failed)}/{len(results)} passed"
        + (f"; FAILED: {failed}" if failed else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
