"""``agentauth audit verify`` walks every chain and checkpoint, and catches tampering.

The insider here can write the database but holds no registry key. Pinned to the audit key
list the registry publishes, the command catches every rewrite; left to the keys in the
database, it shows only that the database agrees with itself.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from audit_rotation import AUDIT_KEYS_PATH, QUIET, keys_on_chains, published, rotated_registry
from registry_inprocess import registry_on_new_database

from agentauth.protocol import (
    GENESIS_HASH,
    AuditEvent,
    Checkpoint,
    MerkleFrontier,
    PrivateKey,
    b64url_encode,
    sign_checkpoint,
)

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@dataclass
class Audited:
    url: str
    #: The registry's audit key list, as /.well-known/agentauth-audit-keys.json served it.
    keys_file: Path
    registry: Any

    async def execute(self, sql: str, *args: object) -> Any:
        conn = await asyncpg.connect(self.url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()


@pytest_asyncio.fixture(loop_scope="session")
async def audited_db(database_url: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Audited]:
    async with registry_on_new_database(
        database_url, redis_url, tmp_path, prefix="audit", audit_chains=3
    ) as (registry, url):
        for round_ in range(2):
            for i in range(40):
                async with registry.pool.acquire() as conn, conn.transaction():
                    await registry.audit.append(
                        conn,
                        event="test.event",
                        actor="test",
                        subject=f"s{i}",
                        key=f"agent-{i % 7}",
                        data={"round": round_},
                    )
            await registry.checkpoint_all()
        keys_file = tmp_path / "audit-keys.json"
        keys_file.write_text(json.dumps(await published(registry, AUDIT_KEYS_PATH)))
        yield Audited(url, keys_file, registry)


def run_verify(url: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "agentauth.cli", "audit", "verify", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def verdicts(out: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """Each chain's verdict, from its summary line."""
    lines = [line.strip() for line in out.stdout.splitlines() if line.startswith("  registry-")]
    return {line.split(":", 1)[0]: line.rsplit(": ", 1)[1] for line in lines}


async def latest_checkpoints(db: Audited) -> dict[str, dict[str, Any]]:
    """Each chain's latest checkpoint, as a witness file records it."""
    rows = await db.execute(
        "SELECT DISTINCT ON (chain) chain, size, root FROM audit_checkpoints"
        " ORDER BY chain, size DESC"
    )
    return {r["chain"]: {"size": r["size"], "root": b64url_encode(bytes(r["root"]))} for r in rows}


async def drop_head_foreign_keys(db: Audited) -> None:
    """What an insider does first to delete a head row and keep what hangs off it."""
    for row in await db.execute(
        "SELECT conrelid::regclass::text AS tbl, conname FROM pg_constraint"
        " WHERE confrelid = 'audit_heads'::regclass"
    ):
        await db.execute(f'ALTER TABLE {row["tbl"]} DROP CONSTRAINT "{row["conname"]}"')


async def rewrite_chain(db: Audited, chain: str, seq: int) -> None:
    """Change event ``seq`` and re-link every later one, as an insider would."""
    rows = await db.execute(
        "SELECT seq, body FROM audit_events WHERE chain = $1 ORDER BY seq", chain
    )
    previous = GENESIS_HASH
    for row in rows:
        fields = AuditEvent.from_canonical(row["body"]).model_dump()
        if row["seq"] == seq:
            fields["actor"] = "human:mallory"
        fields["prev"] = b64url_encode(previous)
        event = AuditEvent(**fields)
        previous = event.entry_hash()
        await db.execute(
            "UPDATE audit_events SET body = $3, entry_hash = $4 WHERE chain = $1 AND seq = $2",
            chain,
            row["seq"],
            event.canonical_bytes().decode(),
            previous,
        )
    await db.execute("UPDATE audit_heads SET head = $2 WHERE chain = $1", chain, previous)


async def resign_checkpoints(db: Audited, chain: str, key: PrivateKey) -> None:
    """Sign the chain's checkpoints again, over its events as they now are, with ``key``."""
    leaves = [
        bytes(r["entry_hash"])
        for r in await db.execute(
            "SELECT entry_hash FROM audit_events WHERE chain = $1 ORDER BY seq", chain
        )
    ]
    for row in await db.execute("SELECT size, time FROM audit_checkpoints WHERE chain = $1", chain):
        frontier = MerkleFrontier()
        for leaf in leaves[: row["size"]]:
            frontier.append(leaf)
        root = b64url_encode(frontier.root())
        signed = sign_checkpoint(
            Checkpoint(chain=chain, size=row["size"], root=root, time=row["time"]), key
        )
        await db.execute(
            "UPDATE audit_checkpoints SET signed = $3 WHERE chain = $1 AND size = $2",
            chain,
            row["size"],
            signed,
        )


@pytest.mark.asyncio
async def test_audit_verify_passes_then_catches_a_changed_event(audited_db: Audited) -> None:
    good = run_verify(audited_db.url, "--audit-keys", audited_db.keys_file)
    assert good.returncode == 0, good.stdout + good.stderr
    assert "audit log verifies" in good.stdout and "[####" in good.stderr  # progress shown
    assert verdicts(good) == {"registry-0": "ok", "registry-1": "ok", "registry-2": "ok"}
    heads = await audited_db.execute("SELECT chain, size FROM audit_heads")
    roots = await audited_db.execute(
        "SELECT DISTINCT ON (chain) chain, size, root FROM audit_checkpoints"
        " ORDER BY chain, size DESC"
    )
    sizes = {r["chain"]: r["size"] for r in heads}
    for r in roots:  # size and root per chain, to compare with checkpoints kept elsewhere
        assert (
            f"{r['chain']}: size {sizes[r['chain']]}, root {b64url_encode(bytes(r['root']))};"
            f" 2 checkpoint(s), the latest at {r['size']}; 0 event(s) not covered: ok"
        ) in good.stdout
    row = (await audited_db.execute("SELECT chain, seq, body FROM audit_events WHERE seq = 3"))[0]
    await audited_db.execute(
        "UPDATE audit_events SET body = $3 WHERE chain = $1 AND seq = $2",
        row["chain"],
        row["seq"],
        row["body"].replace('"round":0', '"round":1'),
    )
    bad = run_verify(audited_db.url, "--audit-keys", audited_db.keys_file)
    assert bad.returncode == 1
    assert f"error: {row['chain']}: event 4 does not link" in bad.stderr
    assert verdicts(bad)[row["chain"]] == "FAILED"


@pytest.mark.asyncio
async def test_checkpoints_resigned_with_a_key_added_to_the_database_fail_when_pinned(
    audited_db: Audited,
) -> None:
    chain = "registry-1"
    await rewrite_chain(audited_db, chain, 3)
    insider = PrivateKey.generate(kid="insider")
    jwk = {**insider.public_jwk(), "kid": "insider"}
    # Retired long ago, so the registry neither publishes it nor signs with it.
    await audited_db.execute(
        "INSERT INTO signing_keys (kid, alg, public_jwk, backend, created_at, activates_at,"
        " retires_at) VALUES ('insider', 'ES256', $1, 'local:none', 0, 0, 1)",
        json.dumps(jwk),
    )
    await resign_checkpoints(audited_db, chain, insider)
    # Against the database's keys, the checkpoints fall outside the key's window...
    unpinned = run_verify(audited_db.url)
    assert unpinned.returncode == 1
    assert "outside the signing window of key insider" in unpinned.stderr
    # ...but the database is the insider's to write: with a window to match, it agrees with
    # itself, which is all it can show (and says so).
    await audited_db.execute("UPDATE signing_keys SET retires_at = NULL WHERE kid = 'insider'")
    unpinned = run_verify(audited_db.url)
    assert unpinned.returncode == 0, unpinned.stdout + unpinned.stderr
    assert "not pinned" in unpinned.stdout
    # The registry's published list knows no such key.
    pinned = run_verify(audited_db.url, "--audit-keys", audited_db.keys_file)
    assert pinned.returncode == 1
    assert f"error: {chain}: checkpoint at" in pinned.stderr
    assert "the signing key is unknown" in pinned.stderr
    assert verdicts(pinned) == {"registry-0": "ok", "registry-1": "FAILED", "registry-2": "ok"}


@pytest.mark.asyncio
async def test_a_chain_without_checkpoints_fails_once_its_events_are_old(
    audited_db: Audited,
) -> None:
    chain = "registry-2"
    await rewrite_chain(audited_db, chain, 3)
    await audited_db.execute("DELETE FROM audit_checkpoints WHERE chain = $1", chain)
    size = (await audited_db.execute("SELECT size FROM audit_heads WHERE chain = $1", chain))[0]
    # Its first checkpoint could still be due: the events are seconds old. Reported, not failed.
    fresh = run_verify(audited_db.url, "--audit-keys", audited_db.keys_file)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert f"0 checkpoint(s), none reached; {size['size']} event(s) not covered: ok" in (
        fresh.stdout
    )
    # Older than the bound (here: any age), they fail: checkpoints were removed.
    old = run_verify(audited_db.url, "--audit-keys", audited_db.keys_file, "--max-unsealed-age", 0)
    assert old.returncode == 1
    assert f"error: {chain}: no checkpoint covers any of its events" in old.stderr
    assert verdicts(old) == {"registry-0": "ok", "registry-1": "ok", "registry-2": "FAILED"}


@pytest.mark.asyncio
async def test_events_cut_from_the_end_fail_against_the_checkpoint_that_covered_them(
    audited_db: Audited,
) -> None:
    chain = "registry-0"
    (last,) = await audited_db.execute(
        "SELECT max(size) AS size FROM audit_checkpoints WHERE chain = $1", chain
    )
    keep = last["size"] - 3
    await audited_db.execute("DELETE FROM audit_events WHERE chain = $1 AND seq >= $2", chain, keep)
    (head,) = await audited_db.execute(
        "SELECT entry_hash FROM audit_events WHERE chain = $1 AND seq = $2", chain, keep - 1
    )
    await audited_db.execute(
        "UPDATE audit_heads SET size = $2, head = $3 WHERE chain = $1",
        chain,
        keep,
        head["entry_hash"],
    )
    out = run_verify(audited_db.url, "--audit-keys", audited_db.keys_file)
    assert out.returncode == 1
    assert (
        f"error: {chain}: checkpoint at {last['size']}: it lies past the chain's end"
        f" ({keep} events): events were removed"
    ) in out.stderr
    assert verdicts(out)[chain] == "FAILED"

    # A signed checkpoint stored under another size than it names is refused too.
    other = "registry-1"
    rows = await audited_db.execute(
        "SELECT size, signed FROM audit_checkpoints WHERE chain = $1 ORDER BY size", other
    )
    await audited_db.execute(
        "UPDATE audit_checkpoints SET signed = $3 WHERE chain = $1 AND size = $2",
        other,
        rows[1]["size"],
        rows[0]["signed"],
    )
    out = run_verify(audited_db.url, "--audit-keys", audited_db.keys_file)
    assert (
        f"error: {other}: checkpoint at {rows[1]['size']}: it is signed for {other}"
        f" at {rows[0]['size']}"
    ) in out.stderr


@pytest.mark.asyncio
async def test_events_stored_past_a_lowered_head_fail(audited_db: Audited) -> None:
    """The head's size says how far to walk; the insider can write it too. Rewriting what the
    latest checkpoint covers, deleting that checkpoint and lowering the head to the one
    before leaves a chain that verifies up to the head, and the rewrite stored past it."""
    chain = "registry-2"
    (sizes,) = await audited_db.execute(
        "SELECT min(size) AS earlier, max(size) AS latest FROM audit_checkpoints WHERE chain = $1",
        chain,
    )
    earlier, latest = sizes["earlier"], sizes["latest"]
    await rewrite_chain(audited_db, chain, earlier + 1)
    await audited_db.execute(
        "DELETE FROM audit_checkpoints WHERE chain = $1 AND size = $2", chain, latest
    )
    await audited_db.execute("UPDATE audit_heads SET size = $2 WHERE chain = $1", chain, earlier)
    # Even with no allowance for unsealed events, nothing up to the head is wrong.
    out = run_verify(audited_db.url, "--audit-keys", audited_db.keys_file, "--max-unsealed-age", 0)
    assert out.returncode == 1, out.stdout + out.stderr
    assert (
        f"error: {chain}: {latest - earlier} event(s) stored at or past the head's size"
        f" ({earlier}): the head was moved back over them"
    ) in out.stderr
    assert verdicts(out) == {"registry-0": "ok", "registry-1": "ok", "registry-2": "FAILED"}


@pytest.mark.asyncio
async def test_a_chain_whose_head_row_was_deleted_is_still_checked(audited_db: Audited) -> None:
    """Only chains listed in audit_heads were walked: deleting a head row hid the chain."""
    await drop_head_foreign_keys(audited_db)
    chain = "registry-1"
    (latest,) = await audited_db.execute(
        "SELECT max(size) AS size FROM audit_checkpoints WHERE chain = $1", chain
    )
    await audited_db.execute("DELETE FROM audit_heads WHERE chain = $1", chain)
    # A chain of which only a stored subtree hash is left.
    await audited_db.execute(
        "INSERT INTO audit_nodes (chain, level, idx, hash) VALUES ('registry-9', 8, 0, $1)",
        bytes(32),
    )
    out = run_verify(audited_db.url, "--audit-keys", audited_db.keys_file)
    assert out.returncode == 1, out.stdout + out.stderr
    hidden = "events, checkpoints or tree nodes are stored for it, but audit_heads holds no row"
    assert f"error: {chain}: {hidden}" in out.stderr
    assert f"error: registry-9: {hidden}" in out.stderr
    assert len(out.stderr.split("error: ")) - 1 == 2  # the headless chain itself verifies...
    assert f"{chain}: size {latest['size']}, root " in out.stdout
    assert f"2 checkpoint(s), the latest at {latest['size']}; 0 event(s) not covered" in out.stdout
    assert verdicts(out) == {
        "registry-0": "ok",
        "registry-1": "FAILED",
        "registry-2": "ok",
        "registry-9": "FAILED",
    }
    # ...and is checked as any other: events cut from its end fail against its checkpoint.
    await audited_db.execute(
        "DELETE FROM audit_events WHERE chain = $1 AND seq >= $2", chain, latest["size"] - 2
    )
    out = run_verify(audited_db.url, "--audit-keys", audited_db.keys_file)
    assert f"error: {chain}: checkpoint at {latest['size']}: it lies past the chain's end" in (
        out.stderr
    )


@pytest.mark.asyncio
async def test_the_witness_catches_a_rewrite_that_agrees_with_itself(
    audited_db: Audited, tmp_path: Path
) -> None:
    """All checkpoints of a rewritten chain signed again with a key the database trusts (one
    that leaked, or added): the database agrees with itself; the witness remembers."""
    witness = tmp_path / "witness.json"
    first = run_verify(audited_db.url, "--witness", witness)
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"witness: none at {witness} yet" in first.stdout
    assert stat.S_IMODE(witness.stat().st_mode) == 0o600
    remembered = await latest_checkpoints(audited_db)
    assert json.loads(witness.read_text()) == {
        "format": "agentauth.audit-witness.v1",
        "of": "database",
        "chains": remembered,
    }
    again = run_verify(audited_db.url, "--witness", witness)
    assert again.returncode == 0 and "witness: none" not in again.stdout

    chain = "registry-1"
    await rewrite_chain(audited_db, chain, 3)
    insider = PrivateKey.generate(kid="insider")
    await audited_db.execute(
        "INSERT INTO signing_keys (kid, alg, public_jwk, backend, created_at, activates_at)"
        " VALUES ('insider', 'ES256', $1, 'local:none', 0, 0)",
        json.dumps({**insider.public_jwk(), "kid": "insider"}),
    )
    await resign_checkpoints(audited_db, chain, insider)
    assert run_verify(audited_db.url).returncode == 0  # it agrees with itself
    before = witness.read_bytes()
    caught = run_verify(audited_db.url, "--witness", witness)
    assert caught.returncode == 1
    seen = remembered[chain]
    assert (
        f"error: {chain}: the witness recorded {seen['size']} event(s) with root {seen['root']},"
        " and the root there is now "
    ) in caught.stderr
    assert verdicts(caught) == {"registry-0": "ok", "registry-1": "FAILED", "registry-2": "ok"}
    assert witness.read_bytes() == before  # a failed run never moves it


@pytest.mark.asyncio
async def test_the_witness_catches_chains_cut_back_or_gone(
    audited_db: Audited, tmp_path: Path
) -> None:
    witness = tmp_path / "witness.json"
    assert run_verify(audited_db.url, "--witness", witness).returncode == 0
    remembered = await latest_checkpoints(audited_db)
    before = witness.read_bytes()

    # registry-0 cut back to its earlier checkpoint, the later one deleted, the head lowered:
    # consistent with itself. registry-2 deleted whole.
    cut = "registry-0"
    (sizes,) = await audited_db.execute(
        "SELECT min(size) AS earlier, max(size) AS latest FROM audit_checkpoints WHERE chain = $1",
        cut,
    )
    earlier = sizes["earlier"]
    await audited_db.execute(
        "DELETE FROM audit_checkpoints WHERE chain = $1 AND size > $2", cut, earlier
    )
    await audited_db.execute(
        "DELETE FROM audit_events WHERE chain = $1 AND seq >= $2", cut, earlier
    )
    (last,) = await audited_db.execute(
        "SELECT entry_hash FROM audit_events WHERE chain = $1 AND seq = $2", cut, earlier - 1
    )
    await audited_db.execute(
        "UPDATE audit_heads SET size = $2, head = $3 WHERE chain = $1",
        cut,
        earlier,
        last["entry_hash"],
    )
    for table in ("audit_nodes", "audit_checkpoints", "audit_events", "audit_heads"):
        await audited_db.execute(f"DELETE FROM {table} WHERE chain = 'registry-2'")
    plain = run_verify(audited_db.url, "--audit-keys", audited_db.keys_file)
    assert plain.returncode == 0, plain.stdout + plain.stderr

    caught = run_verify(audited_db.url, "--audit-keys", audited_db.keys_file, "--witness", witness)
    assert caught.returncode == 1
    assert (
        f"error: {cut}: the witness recorded {sizes['latest']} event(s) with root"
        f" {remembered[cut]['root']}, and only {earlier} verify now"
    ) in caught.stderr
    assert (
        f"error: registry-2: the witness recorded {remembered['registry-2']['size']} event(s),"
        " and the chain is gone"
    ) in caught.stderr
    assert witness.read_bytes() == before


@pytest.mark.asyncio
async def test_the_witness_follows_a_growing_log(audited_db: Audited, tmp_path: Path) -> None:
    witness = tmp_path / "witness.json"
    assert run_verify(audited_db.url, "--witness", witness).returncode == 0
    registry = audited_db.registry
    for i in range(5):
        async with registry.pool.acquire() as conn, conn.transaction():
            await registry.audit.append(
                conn, event="test.event", actor="test", subject=f"t{i}", key=f"agent-{i}"
            )
    await registry.checkpoint_all()
    grown = run_verify(audited_db.url, "--witness", witness)
    assert grown.returncode == 0, grown.stdout + grown.stderr
    assert json.loads(witness.read_text())["chains"] == await latest_checkpoints(audited_db)


@pytest.mark.parametrize("archive", [False, True], ids=["database", "archive"])
def test_an_unreadable_witness_is_an_error_and_left_alone(tmp_path: Path, archive: bool) -> None:
    mode = ("--archive", tmp_path / "no-archive") if archive else ()
    witness = tmp_path / "witness.json"
    witness.write_text('{"format": "agentauth.audit-witness.v1", "chains": {}')
    witness.chmod(0o600)
    out = run_verify("postgresql://unused", *mode, "--witness", witness)
    assert out.returncode == 2 and f"error: the witness {witness} is corrupt" in out.stderr
    assert witness.read_text() == '{"format": "agentauth.audit-witness.v1", "chains": {}'
    other = "database" if archive else "archive"
    witness.write_text(
        json.dumps({"format": "agentauth.audit-witness.v1", "of": other, "chains": {}})
    )
    out = run_verify("postgresql://unused", *mode, "--witness", witness)
    assert out.returncode == 2 and f"records an {other}" in out.stderr
    out = run_verify("postgresql://unused", *mode, "--witness", tmp_path)
    assert out.returncode == 2 and f"the witness {tmp_path}" in out.stderr


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("old", "new"),
    [
        # prev of event 0 spelled with spare bits set: parses, yet is no hash's spelling
        ('"prev":"' + "A" * 43 + '"', '"prev":"' + "A" * 42 + 'B"'),
        # a seq beyond the range canonical JSON can carry
        ('"seq":0', '"seq":9007199254740993'),
    ],
    ids=["prev-spare-bits", "seq-too-large"],
)
async def test_odd_bytes_fail_their_chain_and_the_others_are_still_checked(
    audited_db: Audited, old: str, new: str
) -> None:
    (row,) = await audited_db.execute(
        "SELECT body FROM audit_events WHERE chain = 'registry-0' AND seq = 0"
    )
    assert old in row["body"]
    await audited_db.execute(
        "UPDATE audit_events SET body = $1 WHERE chain = 'registry-0' AND seq = 0",
        row["body"].replace(old, new),
    )
    out = run_verify(audited_db.url, "--audit-keys", audited_db.keys_file)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "error: registry-0: " in out.stderr
    assert verdicts(out) == {"registry-0": "FAILED", "registry-1": "ok", "registry-2": "ok"}


@pytest.mark.asyncio
async def test_after_a_rotation_the_published_audit_key_list_verifies_every_checkpoint(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with rotated_registry(database_url, redis_url, tmp_path / "reg") as rotated:
        audit_keys, jwks = tmp_path / "audit-keys.json", tmp_path / "jwks.json"
        audit_keys.write_text(json.dumps(await rotated.audit_keys()))
        jwks.write_text(json.dumps(await rotated.jwks()))

        pinned = run_verify(rotated.url, "--audit-keys", audit_keys)
        assert pinned.returncode == 0, pinned.stdout + pinned.stderr
        assert "not pinned" not in pinned.stdout and "no signing windows" not in pinned.stdout
        assert run_verify(rotated.url).returncode == 0
        # The JWKS has dropped the old key: everything it signed looks unknown.
        stale = run_verify(rotated.url, "--jwks", jwks)
        assert stale.returncode == 1 and "the signing key is unknown" in stale.stderr
        # Taken, but said: a JWKS knows no signing windows.
        assert "is a plain JWKS: no signing windows are known" in stale.stdout
        assert verdicts(stale)[QUIET] == "FAILED"

        # The old key, long retired, signs a checkpoint dated now (it leaked, say).
        await rotated.append(keys_on_chains(rotated.registry, {QUIET}, 2))
        await rotated.seal_with_old_key(QUIET, at=int(time.time()))
        for args in (("--audit-keys", audit_keys), ()):
            late = run_verify(rotated.url, *args)
            assert late.returncode == 1
            assert f"outside the signing window of key {rotated.old_kid}" in late.stderr
            assert verdicts(late) == {
                "registry-0": "FAILED",
                "registry-1": "ok",
                "registry-2": "ok",
            }


@pytest.mark.asyncio
async def test_a_retired_key_cannot_backdate_a_checkpoint_into_its_window(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    async with rotated_registry(database_url, redis_url, tmp_path / "reg") as rotated:
        audit_keys = tmp_path / "audit-keys.json"
        audit_keys.write_text(json.dumps(await rotated.audit_keys()))
        # The old key leaked: new events on the quiet chain, sealed by it under an old date
        # inside its window. The signature and the window check out; the date cannot.
        await rotated.append(keys_on_chains(rotated.registry, {QUIET}, 2))
        await rotated.backdate_with_old_key(QUIET)
        late = run_verify(rotated.url, "--audit-keys", audit_keys)
        assert late.returncode == 1
        assert "before an event it covers" in late.stderr and "backdated" in late.stderr
        assert "outside the signing window" not in late.stderr
        assert verdicts(late) == {"registry-0": "FAILED", "registry-1": "ok", "registry-2": "ok"}


def test_unreadable_keys_are_an_error_of_their_own(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"format": "agentauth.audit-keys.v1", "keys": [{}]}')
    for path in (tmp_path / "missing.json", tmp_path / "bad.json"):
        out = run_verify("postgresql://unused", "--audit-keys", path)
        assert out.returncode == 2 and "cannot read the keys" in out.stderr


def test_audit_verify_archive_refuses_an_empty_archive(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agentauth.cli", "audit", "verify", "--archive", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 1 and "holds no keys" in out.stderr


@pytest.mark.asyncio
async def test_a_chain_name_cannot_drive_the_operators_terminal(audited_db: Audited) -> None:
    """Chain names are the insider's to write, and were printed as they were: escape
    sequences in one could erase the lines above and hide all that followed, the
    verdict included, on the terminal of the operator looking for the insider."""
    await drop_head_foreign_keys(audited_db)
    chain = "registry-9\x1b[1A\x1b[2K\x1b[8m\u202e"
    await audited_db.execute(
        "INSERT INTO audit_nodes (chain, level, idx, hash) VALUES ($1, 8, 0, $2)",
        chain,
        bytes(32),
    )
    out = run_verify(audited_db.url, "--audit-keys", audited_db.keys_file)
    assert out.returncode == 1, out.stdout + out.stderr
    for text in (out.stdout, out.stderr):
        assert "\x1b" not in text and "\u202e" not in text
    shown = "registry-9\\x1b[1A\\x1b[2K\\x1b[8m\\u202e"
    assert f"error: {shown}: events, checkpoints or tree nodes are stored" in out.stderr
    assert f"  {shown}: size 0, root " in out.stdout
