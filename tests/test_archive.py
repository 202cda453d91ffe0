"""The audit archiver: export sealed segments, resume after crashes, verify offline.

Every export is compared byte for byte with a clean export of the same database: a resumed
archive must hold exactly the same objects (nothing lost, nothing twice). S3 is moto's
server; the directory store is a tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from audit_rotation import QUIET, keys_on_chains, rotated_registry
from registry_inprocess import registry_on_new_database

from agentauth import archive
from agentauth.archive import (
    ArchiveIntegrityError,
    ArchiveStore,
    ArchiveUnavailable,
    DirectoryStore,
    Manifest,
    S3Store,
    export,
    verify_archive,
)
from agentauth.archive._export import chain_names
from agentauth.protocol import (
    AuditKeys,
    Checkpoint,
    KeySet,
    PrivateKey,
    PublicKey,
    b64url_encode,
    canonical_json,
    sign_checkpoint,
    verify_chain,
)
from agentauth.protocol._audit import AuditEvent

CHAINS = 3
ROUNDS = 3  # checkpointed rounds: every chain gets three sealed segments
PER_ROUND = 30
UNSEALED = 6  # events appended after the last checkpoint


# --- a populated registry database ----------------------------------------------------------------


@dataclass
class AuditedDb:
    url: str
    registry: Any

    async def append(self, count: int, *, round_: int) -> None:
        for i in range(count):
            async with self.registry.pool.acquire() as conn, conn.transaction():
                await self.registry.audit.append(
                    conn,
                    event="test.event",
                    actor="test",
                    subject=f"s{i}",
                    key=f"agent-{i}",
                    data={"round": round_, "i": i},
                )

    async def checkpoint(self) -> None:
        await self.registry.checkpoint_all()

    async def execute(self, sql: str, *args: object) -> Any:
        conn = await asyncpg.connect(self.url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()


@asynccontextmanager
async def audited_database(
    database_url: str, redis_url: str, data_dir: Path
) -> AsyncIterator[AuditedDb]:
    async with registry_on_new_database(
        database_url, redis_url, data_dir, prefix="archive", audit_chains=CHAINS
    ) as (registry, url):
        db = AuditedDb(url, registry)
        for round_ in range(ROUNDS):
            await db.append(PER_ROUND, round_=round_)
            await db.checkpoint()
        await db.append(UNSEALED, round_=ROUNDS)
        yield db


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def audited(
    database_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AuditedDb]:
    """Shared and never changed: tests that alter the database make their own."""
    async with audited_database(database_url, redis_url, tmp_path_factory.mktemp("reg")) as db:
        yield db


@pytest_asyncio.fixture(loop_scope="session")
async def fresh(database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[AuditedDb]:
    async with audited_database(database_url, redis_url, tmp_path / "reg") as db:
        yield db


# --- stores ---------------------------------------------------------------------------------------


class Crash(Exception):
    """Stands for the process dying between two writes."""


class CountingStore:
    """Records every put; raises ``Crash`` instead of the put numbered ``crash_at``."""

    def __init__(self, inner: ArchiveStore, *, crash_at: int | None = None) -> None:
        self.inner = inner
        self.crash_at = crash_at
        self.puts: list[str] = []

    def get(self, key: str) -> bytes | None:
        return self.inner.get(key)

    def put(self, key: str, data: bytes) -> None:
        if self.crash_at is not None and len(self.puts) == self.crash_at:
            raise Crash(key)
        self.inner.put(key, data)
        self.puts.append(key)

    def list(self, prefix: str = "") -> Sequence[str]:
        return self.inner.list(prefix)


def snapshot(store: ArchiveStore) -> dict[str, bytes]:
    contents = {}
    for key in store.list():
        data = store.get(key)
        assert data is not None
        contents[key] = data
    return contents


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def clean(audited: AuditedDb, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """What one uninterrupted export of ``audited`` writes."""
    store = DirectoryStore(tmp_path_factory.mktemp("clean"))
    await export(audited.url, store)
    return snapshot(store)


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


# Dummy credentials: moto accepts any, and nothing here may reach real AWS.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def bucket(moto_url: str) -> Iterator[Callable[[str], S3Store]]:
    """A factory of S3 stores under fresh prefixes of one moto bucket."""
    import boto3

    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    admin = session.client("s3", endpoint_url=moto_url)
    admin.create_bucket(Bucket="audit-archive")
    stores: list[S3Store] = []

    def make(prefix: str) -> S3Store:
        store = S3Store.connect(
            bucket="audit-archive", prefix=prefix, endpoint_url=moto_url, session=session
        )
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()
    admin.close()


def run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentauth.archive", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


def copy_of(contents: dict[str, bytes], root: Path) -> DirectoryStore:
    store = DirectoryStore(root)
    for key, data in contents.items():
        store.put(key, data)
    return store


def segments(contents: dict[str, bytes]) -> dict[str, list[Manifest]]:
    """The manifests of an archive snapshot, per chain, in order."""
    chains: dict[str, list[Manifest]] = {}
    for key in sorted(contents):
        if key.endswith(".manifest.json"):
            manifest = Manifest.decode(contents[key])
            chains.setdefault(manifest.chain, []).append(manifest)
    return chains


def events_key(manifest: Manifest) -> str:
    return f"{manifest.chain}/{manifest.to_size:012d}.jsonl"


def manifest_key(manifest: Manifest) -> str:
    return f"{manifest.chain}/{manifest.to_size:012d}.manifest.json"


async def database_keys(db: AuditedDb) -> KeySet:
    rows = await db.execute("SELECT public_jwk FROM signing_keys")
    jwks = [r["public_jwk"] for r in rows]
    return KeySet(PublicKey.from_jwk(j, alg=j.get("alg")) for j in map(_json, jwks))


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def failure(store: ArchiveStore, **kw: Any) -> ArchiveIntegrityError:
    with pytest.raises(ArchiveIntegrityError) as caught:
        verify_archive(store, **kw)
    return caught.value


# --- export, then offline verification ------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio
async def test_export_writes_every_sealed_segment_and_verifies(
    audited: AuditedDb, clean: dict[str, bytes], tmp_path: Path
) -> None:
    store = CountingStore(DirectoryStore(tmp_path))
    report = await export(audited.url, store)

    heads = {r["chain"]: r["size"] for r in await audited.execute("SELECT * FROM audit_heads")}
    checkpoints = await audited.execute(
        "SELECT chain, size, root FROM audit_checkpoints ORDER BY chain, size"
    )
    assert len(heads) == CHAINS and len(checkpoints) == CHAINS * ROUNDS  # every chain used
    assert [(s.chain, s.to_size) for s in report.exported] == [
        (r["chain"], r["size"]) for r in checkpoints
    ]
    assert sum(report.unsealed.values()) == UNSEALED
    assert all(report.tips[c] + report.unsealed[c] == heads[c] for c in heads)
    # The keys first (the one key, then the audit key list), then each segment's events,
    # then its manifest.
    assert store.puts[0].startswith("keys/") and store.puts[0].endswith(".jwk.json")
    assert store.puts[1] == "keys/audit-keys.json"
    pairs = zip(store.puts[2::2], store.puts[3::2], strict=True)
    assert all(m == e.replace(".jsonl", ".manifest.json") for e, m in pairs)
    assert snapshot(store) == clean  # same database, same bytes

    verified = verify_archive(store)
    assert not verified.keys_pinned and verified.incomplete == ()
    latest = {r["chain"]: r for r in checkpoints}  # ordered by size: the last one wins
    assert {(c.chain, c.segments, c.size, c.root) for c in verified.chains} == {
        (chain, ROUNDS, row["size"], b64url_encode(bytes(row["root"])))
        for chain, row in latest.items()
    }
    assert verify_archive(store, keys=await database_keys(audited)).keys_pinned

    # The events object holds the database's canonical bytes, verbatim.
    first = report.exported[0]
    rows = await audited.execute(
        "SELECT body FROM audit_events WHERE chain = $1 AND seq < $2 ORDER BY seq",
        first.chain,
        first.to_size,
    )
    expected = b"".join(r["body"].encode() + b"\n" for r in rows)
    assert (tmp_path / f"{first.chain}/{first.to_size:012d}.jsonl").read_bytes() == expected

    # Nothing newly sealed: a second run writes nothing at all.
    again = CountingStore(DirectoryStore(tmp_path))
    assert (await export(audited.url, again)).exported == ()
    assert again.puts == []


# --- crashes --------------------------------------------------------------------------------------


def _orphans(contents: dict[str, bytes]) -> set[str]:
    """Events objects whose manifest was never written."""
    sealed = {k.replace(".manifest.json", ".jsonl") for k in contents if k.endswith(".json")}
    return {k for k in contents if k.endswith(".jsonl")} - sealed


async def crash_then_resume(
    url: str, clean: dict[str, bytes], make: Callable[[int], ArchiveStore], at: Sequence[int]
) -> None:
    """For each of these writes of a clean export: die just before it, resume, compare."""
    for crash_at in at:
        target = make(crash_at)
        with pytest.raises(Crash):
            await export(url, CountingStore(target, crash_at=crash_at))
        before = snapshot(target)
        assert len(before) == crash_at
        orphans = _orphans(before)
        assert len(orphans) <= 1  # at most one incomplete segment
        if any(k.endswith(".manifest.json") for k in before):
            assert set(verify_archive(target).incomplete) == orphans

        resumed = CountingStore(target)
        await export(url, resumed)
        assert snapshot(target) == clean, f"crash before write {crash_at}"
        # Exactly the missing objects are written, and the incomplete segment again: no
        # complete object is touched.
        assert sorted(resumed.puts) == sorted(set(clean) - set(before) | orphans)
        verify_archive(target)


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio
async def test_directory_crash_before_every_write_then_resume(
    audited: AuditedDb, clean: dict[str, bytes], tmp_path: Path
) -> None:
    every = range(len(clean))
    await crash_then_resume(audited.url, clean, lambda n: DirectoryStore(tmp_path / str(n)), every)


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio
async def test_s3_crash_then_resume_and_verify_offline(
    audited: AuditedDb,
    clean: dict[str, bytes],
    bucket: Callable[[str], S3Store],
    moto_url: str,
) -> None:
    run = secrets.token_hex(4)
    # A clean export to S3 is the directory's, byte for byte.
    straight = bucket(f"{run}/clean")
    await export(audited.url, straight)
    assert snapshot(straight) == clean

    # Before the keys, before the audit key list, before a manifest, before an events object,
    # before the last write (the directory test above dies before every one).
    points = [0, 1, 3, 4, len(clean) - 1]
    await crash_then_resume(audited.url, clean, lambda n: bucket(f"{run}/crash-{n}"), points)

    # Offline verification of the bucket, as `agentauth audit verify --archive` does it.
    location = f"s3://audit-archive/{run}/crash-3"
    good = run_module("verify", "--archive", location, "--s3-endpoint", moto_url, env=AWS_ENV)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "archive verifies" in good.stdout and f"{ROUNDS} segment(s)" in good.stdout
    # The endpoint may also come from boto3's own environment variable.
    env = {**AWS_ENV, "AWS_ENDPOINT_URL_S3": moto_url}
    assert run_module("verify", "--archive", location, env=env).returncode == 0


KILL_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from pathlib import Path
    from agentauth.archive import DirectoryStore, export

    url, root, kill_at = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])

    class Dying(DirectoryStore):
        puts = 0

        def put(self, key, data):
            if Dying.puts == kill_at:
                # Die half way through writing this object, as a power cut would.
                target = root / key
                target.parent.mkdir(parents=True, exist_ok=True)
                torn = target.parent / f".{target.name}.dead.tmp"
                torn.write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            super().put(key, data)
            Dying.puts += 1

    asyncio.run(export(url, Dying(root)))
    """
)


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.parametrize("kill_at", [4, 5], ids=["writing-events", "writing-manifest"])
def test_job_killed_mid_write_is_resumed_by_the_next_run(
    audited: AuditedDb, clean: dict[str, bytes], tmp_path: Path, kill_at: int
) -> None:
    killed = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, audited.url, str(tmp_path), str(kill_at)],
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    torn = list(tmp_path.rglob(".*.dead.tmp"))
    assert len(torn) == 1  # the torn write is a hidden temporary, never an object
    assert len(DirectoryStore(tmp_path).list()) == kill_at

    resumed = run_module("export", "--archive", str(tmp_path), "--database-url", audited.url)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert snapshot(DirectoryStore(tmp_path)) == clean
    # Two key objects, then (events, manifest) pairs: the segments sealed before the kill are
    # not written again.
    assert f"exported {len(segments(clean)) * ROUNDS - (kill_at - 2) // 2} segment(s)" in (
        resumed.stdout
    )
    checked = run_module("verify", "--archive", str(tmp_path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- tampering, gaps, forgeries -------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.redis
def test_one_changed_byte_fails_naming_its_chain_and_segment(
    clean: dict[str, bytes], tmp_path: Path
) -> None:
    store = copy_of(clean, tmp_path)
    chain, manifests = sorted(segments(clean).items())[1]
    target = manifests[1]  # the middle segment of the middle chain
    events = clean[events_key(target)]
    # One byte of the segment's last event (no later event links to it within the segment).
    *earlier, last_line, end = events.split(b"\n")
    changed = b"\n".join([*earlier, last_line.replace(b'"round":1', b'"round":7'), end])
    assert len(changed) == len(events) and changed != events
    store.put(events_key(target), changed)

    caught = failure(store)
    assert [(p.chain, p.from_size, p.to_size, p.reason) for p in caught.problems] == [
        (chain, target.from_size, target.to_size, "digest")
    ]
    assert f"{chain} segment {target.from_size}..{target.to_size}" in str(caught)

    # The digest is not what protects the events (anyone can rewrite a manifest): the
    # signed checkpoint is.
    digest = b64url_encode(hashlib.sha256(changed).digest())
    rewritten = Manifest(**{**target.model_dump(), "events_sha256": digest})
    store.put(manifest_key(target), rewritten.encode())
    (problem,) = failure(store).problems
    assert (problem.chain, problem.to_size, problem.reason) == (chain, target.to_size, "root")

    cli = run_module("verify", "--archive", str(tmp_path))
    assert cli.returncode == 1
    assert f"error: {chain} segment {target.from_size}..{target.to_size}" in cli.stderr
    assert f"{chain}: {ROUNDS} segment(s)" in cli.stdout and "FAILED" in cli.stdout


@pytest.mark.postgres
@pytest.mark.redis
def test_a_missing_segment_is_a_gap(clean: dict[str, bytes], tmp_path: Path) -> None:
    chain, manifests = sorted(segments(clean).items())[0]
    first, middle, last = manifests
    gapped = {k: v for k, v in clean.items() if k not in {events_key(middle), manifest_key(middle)}}
    (problem,) = failure(copy_of(gapped, tmp_path / "middle")).problems
    assert (problem.chain, problem.from_size, problem.to_size) == (
        chain,
        last.from_size,
        last.to_size,
    )
    assert problem.reason == "gap"
    assert f"events {first.to_size}..{middle.to_size} are missing" in problem.description

    # Without its first segment a chain no longer starts at genesis.
    headless = {k: v for k, v in clean.items() if k not in {events_key(first), manifest_key(first)}}
    (problem,) = failure(copy_of(headless, tmp_path / "first")).problems
    assert (problem.chain, problem.to_size, problem.reason) == (chain, middle.to_size, "gap")

    # A manifest lost, its events kept: the events are not a segment, and the gap shows.
    unsealed = {k: v for k, v in clean.items() if k != manifest_key(middle)}
    problems = failure(copy_of(unsealed, tmp_path / "manifest")).problems
    assert {(p.to_size, p.reason) for p in problems} == {
        (middle.to_size, "gap"),
        (last.to_size, "gap"),
    }


def forge_newest_segment(clean: dict[str, bytes], store: ArchiveStore) -> tuple[str, Manifest]:
    """Someone who can write the bucket rewrites the first chain's newest event, recomputes
    the tree, and signs a checkpoint with a key of their own, added to the archive's keys."""
    chain, manifests = sorted(segments(clean).items())[0]
    last = manifests[-1]
    events = [AuditEvent.from_canonical(line) for line in clean[events_key(last)].splitlines()]
    events[-1] = AuditEvent(**{**events[-1].model_dump(), "actor": "nobody"})
    blob = b"".join(e.canonical_bytes() + b"\n" for e in events)
    head = verify_chain(events, chain=chain, start=last.start())
    attacker = PrivateKey.generate(kid="attacker")
    forged = sign_checkpoint(
        Checkpoint(
            chain=chain, size=last.to_size, root=b64url_encode(head.root), time=int(time.time())
        ),
        attacker,
    )
    manifest = Manifest(
        **{
            **last.model_dump(),
            "events_sha256": b64url_encode(hashlib.sha256(blob).digest()),
            "last_hash": b64url_encode(head.head),
            "to_frontier": [b64url_encode(h) for h in head.frontier.state()],
            "checkpoint": forged,
        }
    )
    store.put(events_key(last), blob)
    store.put(manifest_key(last), manifest.encode())
    store.put("keys/attacker.jwk.json", canonical_json(attacker.public_jwk()))
    return chain, last


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_resigned_forgery_fails_only_against_pinned_keys(
    audited: AuditedDb, clean: dict[str, bytes], tmp_path: Path
) -> None:
    store = copy_of(clean, tmp_path)
    chain, last = forge_newest_segment(clean, store)
    verify_archive(store)  # self-consistent: the archive's own keys cannot tell
    (problem,) = failure(store, keys=await database_keys(audited)).problems
    assert (problem.chain, problem.to_size) == (chain, last.to_size)

    jwks = tmp_path.parent / "registry-jwks.json"
    jwks.write_text(json.dumps((await database_keys(audited)).to_jwks()))
    cli = run_module("verify", "--archive", str(tmp_path), "--jwks", str(jwks))
    assert cli.returncode == 1 and f"{chain} segment" in cli.stderr


@pytest.mark.postgres
@pytest.mark.redis
def test_the_witness_catches_an_archive_cut_back_gone_or_rewritten(
    clean: dict[str, bytes], tmp_path: Path
) -> None:
    """Nothing in an archive points back at its newest segment, so a chain cut short at its
    end, removed whole, or rewritten there with a key of the archive's own, still verifies
    alone. The witness remembers each chain's size and root from an earlier run."""
    witness = tmp_path / "witness.json"
    # A chain whose first export was interrupted: not archived yet, so not remembered.
    copy_of({**clean, "registry-9/000000000005.jsonl": b""}, tmp_path / "clean")
    cli = [sys.executable, "-m", "agentauth.cli", "audit", "verify"]
    first = subprocess.run(  # `agentauth audit verify --archive` hands the witness on
        [*cli, "--archive", str(tmp_path / "clean"), "--witness", str(witness)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert first.returncode == 0, first.stdout + first.stderr
    assert stat.S_IMODE(witness.stat().st_mode) == 0o600
    report = verify_archive(DirectoryStore(tmp_path / "clean"))
    assert report.incomplete == ("registry-9/000000000005.jsonl",)
    remembered = {c.chain: {"size": c.size, "root": c.root} for c in report.chains if c.segments}
    assert "registry-9" not in remembered and len(remembered) == CHAINS
    assert json.loads(witness.read_text()) == {
        "format": "agentauth.audit-witness.v1",
        "of": "archive",
        "chains": remembered,
    }
    before = witness.read_bytes()

    (cut, manifests), _, (gone, _) = sorted(segments(clean).items())
    newest = manifests[-1]
    shrunk = {
        k: v
        for k, v in clean.items()
        if k not in {events_key(newest), manifest_key(newest)} and not k.startswith(f"{gone}/")
    }
    verify_archive(copy_of(shrunk, tmp_path / "shrunk"))  # alone, it cannot tell
    out = run_module("verify", "--archive", str(tmp_path / "shrunk"), "--witness", str(witness))
    assert out.returncode == 1
    assert (
        f"error: {cut}: the witness recorded {newest.to_size} event(s) with root"
        f" {remembered[cut]['root']}, and only {newest.from_size} verify now"
    ) in out.stderr
    assert (
        f"error: {gone}: the witness recorded {remembered[gone]['size']} event(s),"
        " and the chain is gone"
    ) in out.stderr
    assert witness.read_bytes() == before

    forged = copy_of(clean, tmp_path / "forged")
    chain, last = forge_newest_segment(clean, forged)
    verify_archive(forged)
    out = run_module("verify", "--archive", str(tmp_path / "forged"), "--witness", str(witness))
    assert out.returncode == 1
    assert (
        f"error: {chain}: the witness recorded {last.to_size} event(s) with root"
        f" {remembered[chain]['root']}, and the root there is now"
    ) in out.stderr
    assert witness.read_bytes() == before


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio
async def test_after_a_rotation_the_archive_verifies_with_the_published_audit_key_list(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with rotated_registry(database_url, redis_url, tmp_path / "reg") as rotated:
        store = DirectoryStore(tmp_path / "archive")
        await export(rotated.url, store)
        published = await rotated.audit_keys()
        # The archive keeps a copy of the list, byte for byte the registry's.
        assert store.get("keys/audit-keys.json") == canonical_json(published)
        audit_keys = AuditKeys.from_document(published)
        assert set(audit_keys) == {rotated.old_kid, rotated.new_kid}
        report = verify_archive(store, keys=audit_keys)
        assert report.keys_pinned and {c.chain for c in report.chains} == {
            "registry-0",
            "registry-1",
            "registry-2",
        }
        key_file = tmp_path / "audit-keys.json"
        key_file.write_text(json.dumps(published))
        cli = run_module(
            "verify", "--archive", str(tmp_path / "archive"), "--audit-keys", str(key_file)
        )
        assert cli.returncode == 0, cli.stdout + cli.stderr
        assert "the given audit key list, each inside its key's signing window" in cli.stdout

        # What pinning the JWKS did before: it no longer holds the old key, so every segment
        # that key sealed fails, and so does the first after the rotation (its start is the
        # old key's checkpoint).
        jwks = await rotated.jwks()
        assert [k["kid"] for k in jwks["keys"]] == [rotated.new_kid]
        problems = failure(store, keys=KeySet.from_jwks(jwks)).problems
        assert {p.chain for p in problems} == {"registry-0", "registry-1", "registry-2"}
        assert all(p.reason == "unknown_kid" for p in problems)
        jwks_file = tmp_path / "jwks.json"
        jwks_file.write_text(json.dumps(jwks))
        cli = run_module("verify", "--archive", str(tmp_path / "archive"), "--jwks", str(jwks_file))
        assert cli.returncode == 1 and "the signing key is unknown" in cli.stderr

        # The old key, long retired, signs the quiet chain again, dated now: the exporter
        # refuses that segment (the database's windows), and an archive holding it fails.
        await rotated.append(keys_on_chains(rotated.registry, {QUIET}, 2))
        await rotated.seal_with_old_key(QUIET, at=int(time.time()))
        with pytest.raises(ArchiveIntegrityError) as caught:
            await export(rotated.url, store)
        (problem,) = caught.value.problems
        assert (problem.chain, problem.reason) == (QUIET, "key_window")
        verify_archive(store, keys=audit_keys)  # what was archived before still verifies


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio
async def test_the_archived_audit_key_list_only_grows(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with rotated_registry(database_url, redis_url, tmp_path / "reg") as rotated:
        published = await rotated.audit_keys()
        old, new = published["keys"]
        stale = {**published, "keys": [{**old, "retires_at": None}]}  # before the rotation
        newer = {**published, "keys": [old, new, {**new, "kid": "later"}]}
        changed = {**published, "keys": [{**old, "activates_at": old["activates_at"] - 1}, new]}
        for archived, expected in (
            (stale, published),  # the database's list extends it: brought up to date
            (newer, newer),  # it extends the database's (an exporter that read first): kept
        ):
            store = DirectoryStore(tmp_path / secrets.token_hex(4))
            store.put("keys/audit-keys.json", canonical_json(archived))
            await export(rotated.url, store)
            assert store.get("keys/audit-keys.json") == canonical_json(expected)
        # A window that changed is neither: signing_keys was altered.
        store = DirectoryStore(tmp_path / "changed")
        store.put("keys/audit-keys.json", canonical_json(changed))
        with pytest.raises(ArchiveIntegrityError) as caught:
            await export(rotated.url, store)
        assert caught.value.problems[0].reason == "key_conflict"
        assert store.list() == ["keys/audit-keys.json"]  # nothing written


def test_an_empty_or_keyless_archive_never_verifies(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path)
    assert failure(store).problems[0].reason == "no_keys"
    keys = KeySet([PublicKey.from_jwk(PrivateKey.generate(kid="k").public_jwk())])
    assert failure(store, keys=keys).problems[0].reason == "empty"
    store.put("registry-0/000000000010.jsonl", b"")  # an interrupted export seals nothing
    assert failure(store, keys=keys).problems[0].reason == "empty"
    cli = run_module("verify", "--archive", str(tmp_path))
    assert cli.returncode == 1 and "holds no keys" in cli.stderr
    # A mistyped path never verifies either; it is a store not read (2), not a bad archive.
    cli = run_module("verify", "--archive", str(tmp_path / "typo"))
    assert cli.returncode == 2 and "no archive directory at" in cli.stderr


@pytest.mark.postgres
@pytest.mark.redis
def test_odd_event_bytes_are_listed_and_the_other_chains_still_checked(
    clean: dict[str, bytes], tmp_path: Path
) -> None:
    # What a bucket writer can store (the digest fixed each time): bytes the protocol
    # refuses in ways other than a broken link must be listed problems, not stop the run.
    store = copy_of(clean, tmp_path)
    odd: dict[int, Callable[[bytes, int], bytes]] = {
        0: lambda line, seq: line.replace(b'"seq":%d,' % seq, b'"seq":9007199254740993,'),
        1: lambda line, _: line.replace(b'},"event":', b',"z":' + b"[" * 600 + b"]" * 600 + b"},"),
    }
    expected = set()
    for index, change in odd.items():
        chain, manifests = sorted(segments(clean).items())[index]
        target = manifests[1]
        first, rest = clean[events_key(target)].split(b"\n", 1)
        blob = change(first, target.from_size) + b"\n" + rest
        digest = b64url_encode(hashlib.sha256(blob).digest())
        store.put(events_key(target), blob)
        store.put(
            manifest_key(target),
            Manifest(**{**target.model_dump(), "events_sha256": digest}).encode(),
        )
        expected.add((chain, target.from_size, target.to_size, "malformed"))

    caught = failure(store)
    assert {(p.chain, p.from_size, p.to_size, p.reason) for p in caught.problems} == expected
    report = caught.report
    assert isinstance(report, archive.ArchiveReport) and len(report.chains) == CHAINS
    cli = run_module("verify", "--archive", str(tmp_path))
    assert cli.returncode == 1 and "Traceback" not in cli.stderr
    assert all(f"error: {chain} segment {a}..{b}" in cli.stderr for chain, a, b, _ in expected)


# --- the database side ----------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio
async def test_export_refuses_a_tampered_database_and_goes_on(
    fresh: AuditedDb, tmp_path: Path
) -> None:
    rows = await fresh.execute(
        "SELECT chain, size FROM audit_checkpoints ORDER BY chain, size LIMIT 2"
    )
    chain, first_end, second_end = rows[0]["chain"], rows[0]["size"], rows[1]["size"]
    await fresh.execute(
        'UPDATE audit_events SET body = replace(body, \'"actor":"test"\', \'"actor":"else"\')'
        " WHERE chain = $1 AND seq = $2",
        chain,
        first_end + 1,
    )
    store = DirectoryStore(tmp_path)
    with pytest.raises(ArchiveIntegrityError) as caught:
        await export(fresh.url, store)
    (problem,) = caught.value.problems
    assert (problem.chain, problem.from_size, problem.to_size) == (chain, first_end, second_end)
    assert f"event {first_end + 2} does not link" in problem.description
    report = caught.value.report
    assert isinstance(report, archive.ExportReport)
    assert report.tips[chain] == first_end  # nothing of the bad segment is written
    assert all(tip > 0 for tip in report.tips.values())
    assert not any(k.startswith(f"{chain}/{second_end:012d}") for k in store.list())
    verify_archive(store)  # what was written is sound


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio
async def test_the_registry_does_not_sign_a_rewrite_behind_a_deleted_checkpoint(
    fresh: AuditedDb, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = DirectoryStore(tmp_path)
    await export(fresh.url, store)
    await fresh.append(PER_ROUND, round_=ROUNDS)
    await fresh.checkpoint()  # signed, not archived yet
    chain, size = (await fresh.execute("SELECT chain, size FROM audit_heads ORDER BY chain"))[0]
    # An insider without the registry key rewrites the chain's newest event (nothing links
    # to it yet), fixes its hash and the head, and deletes the checkpoint that covers it.
    for statement in [
        'UPDATE audit_events SET body = replace(body, \'"actor":"test"\', \'"actor":"else"\')'
        " WHERE chain = $1 AND seq = $2 - 1",
        "UPDATE audit_events SET entry_hash = sha256('\\x00'::bytea || convert_to(body, 'UTF8'))"
        " WHERE chain = $1 AND seq = $2 - 1",
        "UPDATE audit_heads SET head = (SELECT entry_hash FROM audit_events"
        " WHERE chain = $1 AND seq = $2 - 1) WHERE chain = $1",
        "DELETE FROM audit_checkpoints WHERE chain = $1 AND size = $2",
    ]:
        await fresh.execute(statement, chain, size)
    await fresh.append(PER_ROUND, round_=ROUNDS + 1)

    with caplog.at_level(logging.ERROR, logger="agentauth.registry"):
        made = await fresh.registry.checkpoint_all()
    assert f"audit chain {chain} not checkpointed: the checkpoint at {size} is gone" in caplog.text
    heads = await fresh.execute("SELECT chain FROM audit_heads WHERE chain <> $1", chain)
    assert sorted(m["chain"] for m in made) == sorted(r["chain"] for r in heads)  # the others
    report = await export(fresh.url, store)
    assert report.exported and chain not in {s.chain for s in report.exported}
    verify_archive(store, keys=await database_keys(fresh))


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio
async def test_incremental_exports_equal_one_export(fresh: AuditedDb, tmp_path: Path) -> None:
    store = CountingStore(DirectoryStore(tmp_path / "incremental"))
    await export(fresh.url, store)
    for round_ in range(ROUNDS, ROUNDS + 2):
        await fresh.append(PER_ROUND, round_=round_)
        await fresh.checkpoint()
        done = set(store.list())
        store.puts.clear()
        report = await export(fresh.url, store)
        assert report.exported and not done & set(store.puts)  # only new objects
        assert all(s.from_size > 0 for s in report.exported)
    once = DirectoryStore(tmp_path / "once")
    await export(fresh.url, once)
    assert snapshot(store) == snapshot(once)

    # Coarser segments: cut at the first checkpoint at least 40 events past the last cut.
    coarse = DirectoryStore(tmp_path / "coarse")
    report = await export(fresh.url, coarse, min_events=40)
    assert all(s.to_size - s.from_size >= 40 for s in report.exported)
    assert len(report.exported) < len(segments(snapshot(once))) * (ROUNDS + 2)
    verify_archive(coarse)
    assert (await export(fresh.url, coarse, min_events=40)).exported == ()
    # Boundaries only ever fall on signed checkpoints, so the granularity can change between
    # runs: a finer run picks up where the coarse one stopped.
    finer = await export(fresh.url, coarse)
    assert finer.exported and all(s.to_size - s.from_size < 40 for s in finer.exported)
    assert verify_archive(coarse).events == sum(finer.tips.values())


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_run_cut_coarser_after_a_crash_leaves_an_archive_that_verifies(
    audited: AuditedDb, clean: dict[str, bytes], tmp_path: Path
) -> None:
    """A run dies between a segment's events and its manifest; the next cuts with a larger
    --min-events (allowed between runs) and seals a segment over that events object, which
    no run rewrites or removes. It is left over, not a gap: before, every later verify
    failed with "events object without a manifest", as if the archive were tampered with."""
    store = DirectoryStore(tmp_path)
    with pytest.raises(Crash):
        await export(audited.url, CountingStore(store, crash_at=3))  # before the 1st manifest
    (leftover,) = _orphans(snapshot(store))
    chain = leftover.partition("/")[0]
    first = segments(clean)[chain][0]
    await export(audited.url, store, min_events=first.to_size + 1)
    manifests = segments(snapshot(store))[chain]
    assert manifests[0].from_size < first.to_size < manifests[0].to_size  # sealed over it

    report = verify_archive(store)
    assert report.superseded == (leftover,)
    assert report.incomplete == ()
    assert verify_archive(store, keys=await database_keys(audited)).superseded == (leftover,)
    cli = run_module("verify", "--archive", str(tmp_path))
    assert cli.returncode == 0, cli.stderr
    assert f"{leftover}: superseded" in cli.stdout


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio
async def test_export_into_another_registrys_archive_is_refused(
    audited: AuditedDb, tmp_path: Path
) -> None:
    store = DirectoryStore(tmp_path)
    (kid,) = await database_keys(audited)
    impostor = PrivateKey.generate(kid=kid)
    store.put(f"keys/{kid}.jwk.json", canonical_json(impostor.public_jwk()))
    with pytest.raises(ArchiveIntegrityError) as caught:
        await export(audited.url, store)
    assert caught.value.problems[0].reason == "key_conflict"
    assert store.list() == [f"keys/{kid}.jwk.json"]

    with pytest.raises(ArchiveIntegrityError) as unknown:
        await export(audited.url, DirectoryStore(tmp_path / "x"), chains=["no-such-chain"])
    assert unknown.value.problems[0].reason == "unknown_chain"


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_chain_whose_head_row_was_deleted_is_archived_and_named(
    fresh: AuditedDb, tmp_path: Path
) -> None:
    """The export listed chains from ``audit_heads`` alone: an insider who dropped the
    foreign keys and deleted a chain's head row kept that chain out of every archive, and
    the export said nothing. Now its sealed segments are archived and the run fails,
    naming it; the other chains are exported as before."""
    for row in await fresh.execute(
        "SELECT conrelid::regclass::text AS tbl, conname FROM pg_constraint"
        " WHERE confrelid = 'audit_heads'::regclass"
    ):
        await fresh.execute(f'ALTER TABLE {row["tbl"]} DROP CONSTRAINT "{row["conname"]}"')
    (hidden,) = await fresh.execute("SELECT chain FROM audit_heads ORDER BY chain LIMIT 1")
    chain = hidden["chain"]
    sealed = {
        r["chain"]: r["size"]
        for r in await fresh.execute(
            "SELECT chain, max(size) AS size FROM audit_checkpoints GROUP BY chain"
        )
    }
    heads = {r["chain"]: r["size"] for r in await fresh.execute("SELECT * FROM audit_heads")}
    assert len(sealed) == CHAINS and all(sealed.values())
    await fresh.execute("DELETE FROM audit_heads WHERE chain = $1", chain)

    assert chain in await chain_names(fresh.url)
    store = DirectoryStore(tmp_path / "archive")
    with pytest.raises(ArchiveIntegrityError) as caught:
        await export(fresh.url, store)
    assert [(p.chain, p.reason) for p in caught.value.problems] == [(chain, "no_head")]
    report = caught.value.report
    assert report is not None
    assert report.tips == sealed  # every sealed event, of the headless chain too
    assert report.unsealed == {
        other: heads[other] - sealed[other] for other in sealed if other != chain
    }
    assert {c.chain: c.size for c in verify_archive(store).chains} == sealed
    # Asked about by name, it is the same problem, not "no such chain".
    with pytest.raises(ArchiveIntegrityError) as named:
        await export(fresh.url, DirectoryStore(tmp_path / "named"), chains=[chain])
    assert [p.reason for p in named.value.problems] == ["no_head"]


# --- Ray ------------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.postgres
@pytest.mark.redis
def test_ray_job_exports_one_task_per_chain(
    audited: AuditedDb, clean: dict[str, bytes], tmp_path: Path
) -> None:
    # A private local cluster: never one another test (or person) started on this machine.
    env = {"RAY_ADDRESS": "local"}
    args = ["export", "--archive", str(tmp_path), "--database-url", audited.url, "--ray"]
    job = run_module(*args, env=env)
    assert job.returncode == 0, job.stdout + job.stderr
    assert snapshot(DirectoryStore(tmp_path)) == clean
    manifests = [k for k in clean if k.endswith(".manifest.json")]
    assert f"exported {len(manifests)} segment(s)" in job.stdout


# --- the stores themselves ----------------------------------------------------------------------


def test_directory_store_is_atomic_and_stays_inside_its_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = DirectoryStore(tmp_path)
    store.put("a/b.txt", b"old")

    def power_cut(*_: object, **__: object) -> None:  # replace(src, dst, *, dir fds)
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as patched:
        patched.setattr(os, "replace", power_cut)
        with pytest.raises(ArchiveUnavailable, match="write failed"):
            store.put("a/b.txt", b"new")
    assert store.get("a/b.txt") == b"old"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.txt"]  # no temporary left

    (tmp_path / "a" / ".b.txt.1234.tmp").write_bytes(b"torn")
    assert store.list() == ["a/b.txt"] and store.list("b") == [] and store.get("a/c") is None
    for key in ["../x", "/etc/passwd", "a/../b", ".hidden", "a//b", "a/", "", "a\\b"]:
        with pytest.raises(ValueError, match="not an archive key"):
            store.get(key)
    assert DirectoryStore(tmp_path / "absent").list() == []


def test_directory_store_follows_no_symbolic_link_below_its_root(tmp_path: Path) -> None:
    """Links planted in the archive (a chain directory pointing elsewhere, an object
    pointing at a system file) neither redirect a write nor serve a read: refused, named."""
    root, outside = tmp_path / "archive", tmp_path / "outside"
    (root / "keys").mkdir(parents=True)
    outside.mkdir()
    secret = outside / "secret"
    secret.write_bytes(b"not the archive's")
    (root / "verifier-0").symlink_to(outside)
    (root / "keys" / "k.jwk.json").symlink_to(secret)
    (root / "keys" / "d").symlink_to(outside)
    store = DirectoryStore(root)

    for act in (
        lambda: store.put("verifier-0/000000000001", b"event"),
        lambda: store.get("verifier-0/secret"),
        lambda: store.put("keys/d/x", b"event"),
        lambda: store.get("keys/d/secret"),
    ):
        with pytest.raises(ArchiveUnavailable, match="is a symbolic link") as caught:
            act()
        assert str(root) in str(caught.value)
    for act in (lambda: store.get("keys/k.jwk.json"), lambda: store.put("keys/k.jwk.json", b"")):
        with pytest.raises(ArchiveUnavailable, match=r"keys/k\.jwk\.json is a symbolic link"):
            act()
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert secret.read_bytes() == b"not the archive's"
    assert (root / "keys" / "k.jwk.json").is_symlink()  # not replaced either

    os.mkfifo(root / "keys" / "pipe")  # would block an open without O_NONBLOCK
    with pytest.raises(ArchiveUnavailable, match="not a regular file"):
        store.get("keys/pipe")
    # The root itself may be a link (the operator's choice); real keys below it work.
    linked_root = tmp_path / "linked"
    linked_root.symlink_to(root)
    DirectoryStore(linked_root).put("verifier-1/000000000001", b"event")
    assert store.get("verifier-1/000000000001") == b"event"


def test_s3_store_failures_are_archive_unavailable() -> None:
    import boto3

    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    store = S3Store.connect(bucket="b", endpoint_url=refused_url(), session=session, timeout=1.0)
    with pytest.raises(ArchiveUnavailable, match="S3 get in bucket b failed"):
        store.get("x")
    store.close()


def refused_url() -> str:
    """An address nothing listens on: connections are refused at once."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_public_surface_is_exact() -> None:
    public = {n for n in vars(archive) if not n.startswith("_")}
    modules = {n for n in public if type(vars(archive)[n]).__name__ == "module"}
    assert set(archive.__all__) == public - modules
    # Offline verification needs neither the database driver nor Ray.
    code = (
        "import sys, agentauth.archive; "
        "print(','.join(m for m in ('asyncpg', 'ray', 'boto3') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_an_object_name_the_store_refuses_fails_verification_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bucket can hold names this verifier will not read (``keys/../evil.jwk.json``): the
    store refuses them, and verification fails with that said, not with a traceback."""
    from agentauth.archive import _cli

    class Bucket(DirectoryStore):
        def list(self, prefix: str) -> list[str]:
            return [f"{prefix}../evil.jwk.json"] if prefix.startswith("keys") else []

    monkeypatch.setattr(_cli, "open_store", lambda location, **_: Bucket(tmp_path))
    assert _cli.verify_command("s3://bucket/archive") == 1
    assert "will not read" in capsys.readouterr().out


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio
async def test_a_segment_sealed_by_a_backdated_checkpoint_fails(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with rotated_registry(database_url, redis_url, tmp_path / "reg") as rotated:
        audit_keys = AuditKeys.from_document(await rotated.audit_keys())
        store = DirectoryStore(tmp_path / "archive")
        # The old key leaked: it seals new events of the quiet chain under a date inside its
        # window. The signature and the window check out; the date cannot: the exporter
        # refuses the segment, and an archive holding it fails.
        await rotated.append(keys_on_chains(rotated.registry, {QUIET}, 2))
        await rotated.backdate_with_old_key(QUIET)
        with pytest.raises(ArchiveIntegrityError) as caught:
            await export(rotated.url, store)
        (problem,) = caught.value.problems
        assert (problem.chain, problem.reason) == (QUIET, "dated")
        assert "before an event it covers" in problem.description
        verify_archive(store, keys=audit_keys)  # what was archived before still verifies


def test_a_segment_sealed_by_a_checkpoint_dated_in_the_future_fails(tmp_path: Path) -> None:
    """As in `agentauth audit verify` and on the approval page, a checkpoint dated past the
    verifier's clock (by more than CHECKPOINT_SKEW) cannot be true: the registry dates one
    when it signs it. Before, the archive let it through."""
    key = PrivateKey.generate(kid="registry-key")
    keys = KeySet([PublicKey.from_jwk(key.public_jwk())])
    now = int(time.time())
    first = AuditEvent.first(
        chain="registry-0", time_ms=now * 1000, event="test.event", actor="t", subject="s"
    )
    events = [
        first,
        first.following(time_ms=now * 1000, event="test.event", actor="t", subject="s"),
    ]
    head = verify_chain(events, chain="registry-0")
    blob = b"".join(e.canonical_bytes() + b"\n" for e in events)

    def archive_sealed_at(when: int) -> DirectoryStore:
        checkpoint = Checkpoint(
            chain="registry-0", size=2, root=b64url_encode(head.root), time=when
        )
        manifest = Manifest(
            chain="registry-0",
            from_size=0,
            to_size=2,
            events_sha256=b64url_encode(hashlib.sha256(blob).digest()),
            first_prev=b64url_encode(b"\0" * 32),
            last_hash=b64url_encode(head.head),
            from_frontier=(),
            to_frontier=tuple(b64url_encode(h) for h in head.frontier.state()),
            checkpoint=sign_checkpoint(checkpoint, key),
            prev_checkpoint=None,
        )
        store = DirectoryStore(tmp_path / str(when))
        store.put(events_key(manifest), blob)
        store.put(manifest_key(manifest), manifest.encode())
        return store

    assert verify_archive(archive_sealed_at(now + 30), keys=keys).events == 2  # within skew
    (problem,) = failure(archive_sealed_at(now + 86_400), keys=keys).problems
    assert (problem.chain, problem.to_size, problem.reason) == ("registry-0", 2, "dated")
    assert "in the future" in problem.description
