"""``python -m agentauth.archive export|verify``: the archiver as a (Ray) job, and its check.

    python -m agentauth.archive export --archive DIR|s3://BUCKET/PREFIX [--database-url URL]
        [--chain C ...] [--min-events N] [--s3-endpoint URL] [--ray]
    python -m agentauth.archive verify --archive DIR|s3://BUCKET/PREFIX [--audit-keys FILE]
        [--witness FILE] [--s3-endpoint URL]

Submit the export to a cluster with ``ray job submit -- python -m agentauth.archive export
--ray ...``: with ``--ray`` each chain is exported by its own Ray task, which Ray retries if
its worker dies (safe: an export resumes where it stopped and rewrites nothing complete).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .._witness import WitnessError, advance, load, save
from ..protocol import AuditKeys, InvalidRequest, strict_json_loads
from ._errors import ArchiveIntegrityError, ArchiveProblem, ArchiveUnavailable
from ._export import ExportReport, SegmentInfo, chain_names, export
from ._stores import DirectoryStore, open_store
from ._verify import ArchiveReport, verify_archive

__all__ = ["main", "verify_command"]

#: Attempts per chain when a Ray worker dies or the store fails mid-export; each attempt
#: resumes from the archive, so retrying is always safe.
RAY_MAX_RETRIES = 3


def verify_command(
    location: str,
    *,
    keys_file: str | os.PathLike[str] | None = None,
    endpoint_url: str | None = None,
    witness_file: str | os.PathLike[str] | None = None,
) -> int:
    """Verify the archive at ``location`` and print the outcome; the process exit status.

    ``keys_file`` holds the keys to trust: the registry's audit key list
    (``/.well-known/agentauth-audit-keys.json``, every key it ever signed with and when),
    or a plain JWKS (no signing windows, and missing the keys retired since). Without it
    the archive's own keys are used, which proves only self-consistency. ``witness_file``
    remembers each chain's size and root across runs (``agentauth._witness``): checked
    first, then advanced after a run with no problem.
    """
    try:
        keys = (
            AuditKeys.from_document(strict_json_loads(Path(keys_file).read_bytes()))
            if keys_file
            else None
        )
    except (OSError, InvalidRequest) as exc:
        print(f"error: cannot read the keys in {keys_file}: {exc}", file=sys.stderr)
        return 2
    witness_path = Path(witness_file) if witness_file else None
    witness = None
    if witness_path:
        try:
            witness = load(witness_path, of="archive")
        except WitnessError as exc:  # never overwritten: it is what the next run trusts
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if witness is None:
            print(f"  witness: none at {witness_path} yet, so nothing earlier to compare with")
    try:
        store = open_store(location, endpoint_url=endpoint_url)
    except ValueError as exc:  # s3:// without a bucket; an endpoint URL boto3 refuses
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if isinstance(store, DirectoryStore) and not store.root.is_dir():
        # Its listing would be empty (an export creates the directory), and an empty
        # archive fails as tampered with (1); a mistyped path is a store not read (2).
        print(f"error: no archive directory at {store.root}", file=sys.stderr)
        return 2
    report: ArchiveReport | None
    problems: Sequence[ArchiveProblem] = ()
    try:
        report = verify_archive(store, keys=keys, witness=witness)
    except ArchiveIntegrityError as exc:
        problems = exc.problems
        report = exc.report if isinstance(exc.report, ArchiveReport) else None
    except ArchiveUnavailable as exc:
        print(f"error: {exc.description}", file=sys.stderr)
        return 2
    except ValueError as exc:  # an object whose name the store refuses to read: not ours
        print(f"error: the archive holds an object this verifier will not read: {exc}")
        return 1
    finally:
        store.close()
    failed = {p.chain for p in problems}
    for chain in report.chains if report else ():
        verdict = "FAILED" if chain.chain in failed else "ok"
        print(
            f"  {chain.chain}: {chain.segments} segment(s) up to size {chain.size},"
            f" root {chain.root}: {verdict}"
        )
    for key in report.incomplete if report else ():
        print(f"  {key}: incomplete (an interrupted export; the next one rewrites it)")
    for key in report.superseded if report else ():
        print(f"  {key}: superseded (an interrupted export's; a later segment covers it)")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print(f"archive verification failed: {len(problems)} problem(s)")
        return 1
    if witness_path and report:
        try:
            save(witness_path, advance(witness or {}, report.seen()), of="archive")
        except WitnessError as exc:
            print(f"error: the archive verifies, but {exc}", file=sys.stderr)
            return 2
        print(f"  witness: {witness_path} records each chain's verified size and root")
    if keys is None:
        trust = "the archive's own keys"
    elif keys.windowed:
        trust = "the given audit key list, each inside its key's signing window"
    else:
        trust = "the given JWKS; no signing windows known"
    print(f"archive verifies (signatures checked against {trust})")
    return 0


def _print_export(report: ExportReport, problems: Sequence[ArchiveProblem]) -> int:
    for segment in report.exported:
        print(f"  archived {segment.chain} {segment.from_size}..{segment.to_size}")
    for chain, tip in sorted(report.tips.items()):
        print(f"  {chain}: archive reaches {tip} ({report.unsealed[chain]} not sealed yet)")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    print(f"exported {len(report.exported)} segment(s)")
    return 1 if problems else 0


async def _export_once(
    url: str, location: str, endpoint_url: str | None, chains: list[str] | None, min_events: int
) -> tuple[ExportReport, tuple[ArchiveProblem, ...]]:
    store = open_store(location, endpoint_url=endpoint_url)
    try:
        return await export(url, store, chains=chains, min_events=min_events), ()
    except ArchiveIntegrityError as exc:
        report = exc.report if isinstance(exc.report, ExportReport) else ExportReport(())
        return report, exc.problems
    finally:
        store.close()


def _export_task(
    url: str, location: str, endpoint_url: str | None, chains: list[str] | None, min_events: int
) -> tuple[ExportReport, tuple[ArchiveProblem, ...]]:
    """One export, in this process or as a Ray task; integrity problems come back as data."""
    return asyncio.run(_export_once(url, location, endpoint_url, chains, min_events))


def _export_with_ray(
    url: str, location: str, endpoint_url: str | None, chains: list[str] | None, min_events: int
) -> tuple[ExportReport, tuple[ArchiveProblem, ...]]:
    """One Ray task per chain; the driver only fans out and gathers."""
    import ray  # noqa: PLC0415 - the plain export and verification never need Ray

    # RAY_ADDRESS (set by `ray job submit`) names the cluster; without it, a local one.
    ray.init(log_to_driver=False, configure_logging=False)
    try:
        # Any failure but a found integrity problem (returned, not raised) is worth a retry:
        # the store or the database was unreachable, or the worker died.
        task = ray.remote(max_retries=RAY_MAX_RETRIES, retry_exceptions=True)(_export_task)
        names = chains or asyncio.run(chain_names(url))
        results: list[tuple[ExportReport, tuple[ArchiveProblem, ...]]] = ray.get(
            [task.remote(url, location, endpoint_url, [name], min_events) for name in names]
        )
    finally:
        ray.shutdown()
    exported: list[SegmentInfo] = []
    tips: dict[str, int] = {}
    unsealed: dict[str, int] = {}
    problems: list[ArchiveProblem] = []
    for report, found in results:
        exported.extend(report.exported)
        tips.update(report.tips)
        unsealed.update(report.unsealed)
        problems.extend(found)
    return ExportReport(tuple(exported), tips, unsealed), tuple(problems)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agentauth.archive",
        description="Archive the audit log's sealed segments, or verify an archive offline.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("export", "archive every sealed audit segment not archived yet"),
        ("verify", "check an archive offline (no database)"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument(
            "--archive", required=True, metavar="DIR|s3://BUCKET/PREFIX", help="where it lives"
        )
        command.add_argument(
            "--s3-endpoint",
            metavar="URL",
            help="an S3-compatible endpoint (default: AWS, or $AWS_ENDPOINT_URL_S3)",
        )
    exporter = commands.choices["export"]
    exporter.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        metavar="URL",
        help="the registry's PostgreSQL (default: $DATABASE_URL). Prefer the variable: a"
        " password given here shows in every local user's process list",
    )
    exporter.add_argument(
        "--chain", action="append", metavar="C", help="only this chain (repeatable)"
    )
    exporter.add_argument(
        "--min-events",
        type=int,
        metavar="N",
        default=1,
        help="cut segments at the first checkpoint this many events past the last cut",
    )
    exporter.add_argument(
        "--ray", action="store_true", help="export each chain in its own (retried) Ray task"
    )
    commands.choices["verify"].add_argument(
        "--audit-keys",
        "--jwks",
        dest="keys_file",
        metavar="FILE",
        help="the registry's audit key list (or a JWKS) to trust (default: the archive's keys)",
    )
    commands.choices["verify"].add_argument(
        "--witness",
        metavar="FILE",
        help="remember across runs: fail if a chain no longer reaches the size and root FILE"
        " holds for it, or is gone; after a run with no problem, record the new ones"
        " (created 0600, replaced atomically). Not the file used for the database",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "verify":
        return verify_command(
            args.archive,
            keys_file=args.keys_file,
            endpoint_url=args.s3_endpoint,
            witness_file=args.witness,
        )
    if not args.database_url:
        print("error: give --database-url or set DATABASE_URL", file=sys.stderr)
        return 2
    from ..store import checked_url  # noqa: PLC0415 - as the export, it needs the driver

    try:
        checked_url(args.database_url)
    except ValueError as exc:
        print(f"error: the database URL is {exc}", file=sys.stderr)
        return 2
    run = _export_with_ray if args.ray else _export_task
    try:
        report, problems = run(
            args.database_url, args.archive, args.s3_endpoint, args.chain, args.min_events
        )
    except ArchiveUnavailable as exc:
        print(f"error: {exc.description}", file=sys.stderr)
        return 2
    except OSError as exc:  # the database refused or could not be reached
        print(f"error: the database is unreachable ({exc})", file=sys.stderr)
        return 2
    return _print_export(report, problems)
