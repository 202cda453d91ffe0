"""The archive's offline verifier and manifests, on archives built in memory: no database, no Ray.

``tests/test_archive.py`` exports real registries (Ray, PostgreSQL); these tests write the
segments themselves, so a tampered object can be any bytes at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import new_database

from agentauth.archive import (
    ArchiveIntegrityError,
    ArchiveUnavailable,
    DirectoryStore,
    Manifest,
    S3Store,
    export,
    verify_archive,
)
from agentauth.archive._segments import (
    encode_events,
    encode_key,
    events_key,
    key_key,
    manifest_key,
)
from agentauth.archive._stores import MAX_OBJECT_BYTES
from agentauth.protocol import (
    AuditEvent,
    Checkpoint,
    IntegrityError,
    KeySet,
    PrivateKey,
    PublicKey,
    b64url_encode,
    sign_checkpoint,
    verify_chain,
)

NOW = 1_700_000_000
KEY = PrivateKey.generate("ES256", kid="k1")
PUBLIC = PublicKey.from_jwk(KEY.public_jwk(), alg="ES256")


def archive_chain(store: DirectoryStore, chain: str, cuts: tuple[int, ...] = (3, 5)) -> None:
    """Store one chain of ``cuts[-1]`` events as segments ending at each of ``cuts``, each
    sealed by a checkpoint signed with KEY, as the exporter writes them."""
    events = [
        AuditEvent.first(chain=chain, time_ms=NOW * 1000, event="t.e", actor="a", subject="s")
    ]
    while len(events) < cuts[-1]:
        events.append(events[-1].following(time_ms=NOW * 1000, event="t.e", actor="a", subject="s"))
    start, previous = 0, None
    for cut in cuts:
        before, after = (
            verify_chain(events[:start], chain=chain),
            verify_chain(events[:cut], chain=chain),
        )
        signed = sign_checkpoint(
            Checkpoint(chain=chain, size=cut, root=b64url_encode(after.root), time=NOW + 1), KEY
        )
        blob = encode_events([event.canonical_bytes() for event in events[start:cut]])
        manifest = Manifest(
            chain=chain,
            from_size=start,
            to_size=cut,
            events_sha256=b64url_encode(hashlib.sha256(blob).digest()),
            first_prev=b64url_encode(before.head),
            last_hash=b64url_encode(after.head),
            from_frontier=tuple(b64url_encode(h) for h in before.frontier.state()),
            to_frontier=tuple(b64url_encode(h) for h in after.frontier.state()),
            checkpoint=signed,
            prev_checkpoint=previous,
        )
        store.put(events_key(chain, cut), blob)
        store.put(manifest_key(chain, cut), manifest.encode())
        start, previous = cut, signed


@pytest.fixture
def store(tmp_path: Path) -> DirectoryStore:
    store = DirectoryStore(tmp_path / "archive")
    store.put(key_key(KEY.kid), encode_key(PUBLIC))
    archive_chain(store, "registry-0")
    archive_chain(store, "registry-1")
    return store


def test_an_archive_built_here_verifies(store: DirectoryStore) -> None:
    report = verify_archive(store, keys=KeySet([PUBLIC]), now=NOW)
    assert [(c.chain, c.segments, c.size) for c in report.chains] == [
        ("registry-0", 2, 5),
        ("registry-1", 2, 5),
    ]


# A manifest whose sizes are past 2**53 validates as a model but has no canonical form.
HUGE = 2**60
UNENCODABLE = json.dumps(
    {
        "format": "agentauth.archive.v1",
        "chain": "registry-0",
        "from_size": 5,
        "to_size": HUGE,
        "events_sha256": "A" * 43,
        "first_prev": "A" * 43,
        "last_hash": "A" * 43,
        "from_frontier": ["A" * 43, "A" * 43],
        "to_frontier": ["A" * 43],
        "checkpoint": "x",
        "prev_checkpoint": "y",
    },
    sort_keys=True,
    separators=(",", ":"),
).encode()


def test_a_manifest_with_no_canonical_form_is_malformed() -> None:
    with pytest.raises(IntegrityError) as caught:
        Manifest.decode(UNENCODABLE)
    assert caught.value.reason == "malformed"


def test_a_manifest_with_no_canonical_form_fails_its_chain_and_the_others_are_checked(
    store: DirectoryStore,
) -> None:
    # Planted by whoever can write the archive: it must be listed as the problem it is, not
    # stop the run before the other chains are checked and listed.
    store.put(manifest_key("registry-0", HUGE), UNENCODABLE)
    with pytest.raises(ArchiveIntegrityError) as caught:
        verify_archive(store, keys=KeySet([PUBLIC]), now=NOW)
    assert [(p.chain, p.to_size, p.reason) for p in caught.value.problems] == [
        ("registry-0", HUGE, "malformed")
    ]
    report = caught.value.report
    assert report is not None
    assert [(c.chain, c.segments, c.size) for c in report.chains] == [
        ("registry-0", 2, 5),
        ("registry-1", 2, 5),
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize("stored", ["[1]", '"a key"', "null", "3"])
async def test_a_signing_key_row_that_is_no_key_object_is_an_integrity_error(stored: str) -> None:
    """``signing_keys.public_jwk`` is jsonb, which holds any JSON: a row that is no object
    raised a TypeError out of the export and of ``agentauth audit verify``, a traceback."""
    import os
    import secrets

    import asyncpg

    from agentauth.archive._export import database_audit_keys

    url = os.environ.get("AGENTAUTH_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    schema = "t_keys_" + secrets.token_hex(4)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        await conn.execute(f"SET search_path TO {schema}")
        await conn.execute(
            "CREATE TABLE signing_keys (kid text PRIMARY KEY, alg text NOT NULL,"
            " public_jwk jsonb NOT NULL, activates_at bigint NOT NULL, retires_at bigint)"
        )
        await conn.execute(
            "INSERT INTO signing_keys VALUES ('k1', 'ES256', $1::jsonb, 0, NULL)",
            json.dumps(KEY.public_jwk()),
        )
        assert list((await database_audit_keys(conn)).keys()) == ["k1"]  # a good row reads
        await conn.execute(
            "INSERT INTO signing_keys VALUES ('k2', 'ES256', $1::jsonb, 0, NULL)", stored
        )
        with pytest.raises(IntegrityError) as raised:
            await database_audit_keys(conn)
        assert raised.value.reason == "malformed" and "k2" in raised.value.description
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()


@pytest.mark.parametrize("unreadable", ["", "registry-1"], ids=["root", "a chain"])
def test_a_directory_the_listing_cannot_read_is_the_store_unavailable(
    store: DirectoryStore, monkeypatch: pytest.MonkeyPatch, unreadable: str
) -> None:
    """A directory whose listing fails (EACCES, an NFS EIO) was skipped by os.walk without a
    word: its chain, or the whole archive, read as absent, so verify passed without the chain
    (or failed as tampered with) and export began the chain again from genesis."""
    scandir = os.scandir
    refused = os.path.join(store.root, unreadable) if unreadable else str(store.root)

    def failing(path: str) -> object:
        if os.path.normpath(os.fspath(path)) == os.path.normpath(refused):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", failing)
    with pytest.raises(ArchiveUnavailable):
        store.list()
    with pytest.raises(ArchiveUnavailable):
        verify_archive(store, keys=KeySet([PUBLIC]), now=NOW)


def snapshot(store: DirectoryStore) -> dict[str, bytes]:
    return {key: store.get(key) or b"" for key in store.list()}


# The exporting database's key: not the one that signed the archive built above.
OTHER = PrivateKey.generate("ES256", kid="k2")


@asynccontextmanager
async def exporting_database(database_url: str, *, checkpoint_at: int | None) -> AsyncIterator[str]:
    """A new database with the schema, OTHER's signing key and a chain ``registry-0``: its
    head row alone, or with a checkpoint at ``checkpoint_at`` whose events are missing."""
    import asyncpg

    from agentauth.store import migrate

    async with new_database(database_url, "archive_refused") as url:
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
            await conn.execute(
                "INSERT INTO signing_keys VALUES ('k2', 'ES256', $1::jsonb, 'file', 0, 0, NULL)",
                json.dumps(OTHER.public_jwk()),
            )
            await conn.execute(
                "INSERT INTO audit_heads VALUES ('registry-0', $1, $2)",
                checkpoint_at or 0,
                bytes(32),
            )
            if checkpoint_at is not None:
                await conn.execute(
                    "INSERT INTO audit_checkpoints VALUES ('registry-0', $1, $2, '{}', 'x', $3)",
                    checkpoint_at,
                    bytes(32),
                    NOW,
                )
        finally:
            await conn.close()
        yield url


@pytest.mark.postgres
@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("checkpoint_at", "reason"),
    [(None, "foreign"), (3, "gap")],
    ids=["into another deployment's archive", "a first segment refused"],
)
async def test_a_refused_export_writes_nothing_not_even_keys(
    database_url: str,
    store: DirectoryStore,
    tmp_path: Path,
    checkpoint_at: int | None,
    reason: str,
) -> None:
    """The database's public key and audit key list were written before the archive was
    found to be another deployment's (``foreign``), and before the chain's first new
    segment was checked: a refused export left the database's keys in the archive."""
    # The archive built above has registry-0 up to 5; this database has no checkpoint there.
    target = store if checkpoint_at is None else DirectoryStore(tmp_path / "empty")
    before = snapshot(target)
    async with exporting_database(database_url, checkpoint_at=checkpoint_at) as url:
        with pytest.raises(ArchiveIntegrityError) as caught:
            await export(url, target)
    assert [(p.chain, p.reason) for p in caught.value.problems] == [("registry-0", reason)]
    assert snapshot(target) == before


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_chain_with_nothing_to_seal_still_publishes_the_keys(
    database_url: str, tmp_path: Path
) -> None:
    # Keys are written only once a chain is not refused; one with nothing new is not.
    target = DirectoryStore(tmp_path / "archive")
    async with exporting_database(database_url, checkpoint_at=None) as url:
        report = await export(url, target)
    assert report.exported == () and report.tips == {"registry-0": 0}
    assert target.list() == ["keys/audit-keys.json", key_key("k2")]
    assert target.get(key_key("k2")) == encode_key(
        PublicKey.from_jwk(OTHER.public_jwk(), alg="ES256")
    )


def test_the_directory_store_refuses_an_object_past_its_bound(tmp_path: Path) -> None:
    """Objects were read whole with no bound: anyone who can write the archive could plant
    one that exhausts the reader's memory."""
    store = DirectoryStore(tmp_path, max_object_bytes=16)
    store.put("keys/fits", b"x" * 16)
    assert store.get("keys/fits") == b"x" * 16
    (tmp_path / "keys" / "planted").write_bytes(b"x" * 17)
    with pytest.raises(ArchiveUnavailable, match=r"keys/planted is larger than the 16 bytes"):
        store.get("keys/planted")
    with pytest.raises(ArchiveUnavailable, match="max_object_bytes"):
        store.put("keys/written", b"x" * 17)  # nothing the store would not read back
    assert store.list() == ["keys/fits", "keys/planted"]
    # The default bound, on a sparse file: refused from its size, never read.
    with (tmp_path / "keys" / "huge").open("wb") as huge:
        huge.truncate(MAX_OBJECT_BYTES + 1)
    with pytest.raises(ArchiveUnavailable, match=f"larger than the {MAX_OBJECT_BYTES} bytes"):
        DirectoryStore(tmp_path).get("keys/huge")
    with pytest.raises(ValueError, match="at least 1"):
        DirectoryStore(tmp_path, max_object_bytes=0)


@pytest.fixture(scope="module")
def moto_bucket() -> Iterator[Any]:
    """An S3 client of a moto server (no real AWS) and its one bucket, ``archive``."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    client = session.client("s3", endpoint_url=f"http://{host}:{port}")
    try:
        client.create_bucket(Bucket="archive")
        yield client
    finally:
        client.close()
        server.stop()


def test_the_s3_store_refuses_an_object_past_its_bound(moto_bucket: Any) -> None:
    store = S3Store(bucket="archive", prefix="p", client=moto_bucket, max_object_bytes=16)
    store.put("keys/fits", b"x" * 16)
    assert store.get("keys/fits") == b"x" * 16
    moto_bucket.put_object(Bucket="archive", Key="p/keys/planted", Body=b"x" * 17)
    with pytest.raises(ArchiveUnavailable, match=r"keys/planted is larger than the 16 bytes"):
        store.get("keys/planted")
    with pytest.raises(ArchiveUnavailable, match="max_object_bytes"):
        store.put("keys/written", b"x" * 17)
    assert store.list() == ["keys/fits", "keys/planted"]
    assert store.get("keys/absent") is None
