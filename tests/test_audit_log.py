"""The registry's checkpointer signs only what it has checked, never the database's word.

Each test drives ``AuditLog`` against a database of its own and plays an insider who can
write every table but holds no registry key: rewritten events, deleted or replaced
checkpoint rows and a doctored frontier must get an ``IntegrityError`` and no signature,
while honest growth, a restarted process and a second replica keep checkpointing.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from conftest import migrated_connection

from agentauth.keys import LocalFileSigner
from agentauth.protocol import (
    AuditEvent,
    AuditKey,
    AuditKeys,
    Checkpoint,
    IntegrityError,
    KeySet,
    MerkleFrontier,
    PrivateKey,
    PublicKey,
    b64url_encode,
    check_checkpoint_dated,
    consistency_proof,
    leaf_hash,
    merkle_root,
    sign_checkpoint,
    verify_checkpoint,
    verify_consistency,
)
from agentauth.registry._audit_log import AuditLog, sign_document

pytestmark = [pytest.mark.postgres]

CHAIN = "registry-0"  # AuditLog(chains=1) puts every event here


@pytest_asyncio.fixture(loop_scope="session")
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A database of the test's own: these tests leave chains no verifier would accept."""
    async with migrated_connection(database_url, "auditlog") as connection:
        yield connection


@pytest.fixture
def signer(tmp_path: Path) -> LocalFileSigner:
    return LocalFileSigner.load_or_create(tmp_path / "registry.pem")


@pytest.fixture
def keys(signer: LocalFileSigner) -> KeySet:
    return KeySet([signer.public_key()])


async def append(log: AuditLog, conn: asyncpg.Connection, count: int) -> None:
    for i in range(count):
        async with conn.transaction():
            await log.append(
                conn, event="test.event", actor="test", subject=f"s{i}", key="k", data={"i": i}
            )


async def checkpoint(
    log: AuditLog, conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> Checkpoint | None:
    made = await log.checkpoint(conn, CHAIN, signer, keys=keys, now=1_700_000_000)
    return None if made is None else verify_checkpoint(made["signed"], keys=keys)


async def signed_then_grown(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet, signed: int, grown: int
) -> AuditLog:
    """A log of one chain: ``signed`` events under a checkpoint, then ``grown`` more."""
    log = AuditLog(chains=1)
    await log.ensure_chains(conn)
    await append(log, conn, signed)
    await checkpoint(log, conn, signer, keys)
    await append(log, conn, grown)
    return log


async def refused(
    log: AuditLog, conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> IntegrityError:
    before = await conn.fetchval("SELECT count(*) FROM audit_checkpoints")
    with pytest.raises(IntegrityError) as caught:
        await log.checkpoint(conn, CHAIN, signer, keys=keys, now=1_700_000_000)
    assert await conn.fetchval("SELECT count(*) FROM audit_checkpoints") == before
    return caught.value


async def rewrite(
    conn: asyncpg.Connection, seq: int, change: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    """What an insider does: change event ``seq``, then re-link every later event (bodies,
    stored hashes and the chain head), so the chain is whole again."""
    rows = await conn.fetch(
        "SELECT seq, body FROM audit_events WHERE chain = $1 AND seq >= $2 ORDER BY seq",
        CHAIN,
        seq,
    )
    prev = None
    for row in rows:
        fields = AuditEvent.from_canonical(row["body"]).model_dump()
        if prev is None:
            fields = change(fields)
        else:
            fields["prev"] = prev
        event = AuditEvent(**fields)
        prev = event.entry_hash_b64()
        await conn.execute(
            "UPDATE audit_events SET body = $3, entry_hash = $4 WHERE chain = $1 AND seq = $2",
            CHAIN,
            row["seq"],
            event.canonical_bytes().decode(),
            event.entry_hash(),
        )
        await conn.execute(
            "UPDATE audit_heads SET head = $2 WHERE chain = $1", CHAIN, event.entry_hash()
        )


def forged(fields: dict[str, Any]) -> dict[str, Any]:
    return {**fields, "actor": "human:mallory", "data": {"forged": True}}


async def stored_tree(conn: asyncpg.Connection) -> MerkleFrontier:
    """The tree of the events as stored now, by their stored entry hashes (what an insider
    who rewrote them would sign)."""
    tree = MerkleFrontier()
    for row in await conn.fetch("SELECT entry_hash FROM audit_events ORDER BY seq"):
        tree.append(bytes(row["entry_hash"]))
    return tree


def retired_beside(signer: LocalFileSigner) -> tuple[PrivateKey, AuditKeys]:
    """A key retired long ago (its window ended at 1,600,000,000), leaked, and the audit
    key list holding it beside the signer's current key."""
    retired = PrivateKey.generate(kid="retired")
    keys = AuditKeys(
        [
            AuditKey(signer.public_key(), 0),
            AuditKey(PublicKey.from_jwk(retired.public_jwk()), 0, 1_600_000_000),
        ]
    )
    return retired, keys


async def tree_of(conn: asyncpg.Connection, size: int) -> bytes:
    """The root of the first ``size`` events, hashed from their bodies."""
    rows = await conn.fetch(
        "SELECT body FROM audit_events WHERE chain = $1 AND seq < $2 ORDER BY seq", CHAIN, size
    )
    tree = MerkleFrontier()
    for row in rows:
        tree.append(AuditEvent.from_canonical(row["body"]).entry_hash())
    return tree.root()


# --- honest runs ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_restarted_processes_and_other_replicas_keep_checkpointing(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    first, second = AuditLog(chains=1), AuditLog(chains=1)
    await first.ensure_chains(conn)
    assert await checkpoint(first, conn, signer, keys) is None  # nothing to sign
    signed = []
    # Replicas take turns. One new to the chain finds the last leaf in the frontier's
    # smallest subtree (1 leaf wide at 5, 16 at 16); one behind extends its own tree by the
    # leaves between (5 to 12, 12 to 32).
    for count, log in [(5, first), (7, second), (4, first), (16, AuditLog(chains=1))]:
        await append(first, conn, count)
        made = await checkpoint(log, conn, signer, keys)
        assert made is not None
        assert made.root_bytes() == await tree_of(conn, made.size)
        signed.append(made)
    assert [c.size for c in signed] == [5, 12, 16, 32]
    assert await checkpoint(second, conn, signer, keys) is None  # adopts 32, signs nothing
    leaves = [
        bytes(r["entry_hash"])
        for r in await conn.fetch("SELECT entry_hash FROM audit_events ORDER BY seq")
    ]
    for old, new in itertools.pairwise(signed):
        verify_consistency(
            old_size=old.size,
            new_size=new.size,
            old_root=old.root_bytes(),
            new_root=new.root_bytes(),
            proof=consistency_proof(leaves[: new.size], old.size),
        )


@pytest.mark.asyncio
async def test_a_checkpoint_is_dated_no_earlier_than_what_it_covers(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    """Verifiers refuse a checkpoint dated before its events or its predecessor (beyond a
    minute's skew): a shard whose clock runs ahead of this replica's must not make an
    honest checkpoint look backdated, nor may a replica whose clock runs behind."""
    log = AuditLog(chains=1)
    await log.ensure_chains(conn)
    now = 1_800_000_000
    async with conn.transaction():
        ahead = (now + 3_600) * 1000 + 1  # a shard an hour ahead
        await log.append(conn, event="t.e", actor="t", subject="s", key="k", time_ms=ahead)
    made = await log.checkpoint(conn, CHAIN, signer, keys=keys, now=now)
    assert made is not None
    first = verify_checkpoint(made["signed"], keys=keys)
    assert first.time == now + 3_601  # the event's second, rounded up
    await append(log, conn, 1)  # dated now (2026 or so), long before either
    made = await log.checkpoint(conn, CHAIN, signer, keys=keys, now=now - 600)
    assert made is not None
    second = verify_checkpoint(made["signed"], keys=keys)
    assert second.time == first.time  # not before the checkpoint before it
    check_checkpoint_dated(second, newest_event_ms=ahead, previous=first)
    stored = await conn.fetch("SELECT time FROM audit_checkpoints ORDER BY size")
    assert [r["time"] for r in stored] == [first.time, second.time]


# --- the insider ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_rewritten_history_behind_deleted_checkpoints_is_not_signed(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    log = AuditLog(chains=1)
    await log.ensure_chains(conn)
    await append(log, conn, 12)
    await checkpoint(log, conn, signer, keys)  # say the archive holds up to here
    await append(log, conn, 12)
    await checkpoint(log, conn, signer, keys)
    # Events past the archive rewritten and re-linked, the checkpoint that covered them
    # deleted, and life goes on: the registry must not sign the rewritten tree.
    await rewrite(conn, 13, forged)
    await conn.execute("DELETE FROM audit_checkpoints WHERE size > 12")
    await append(log, conn, 6)
    problem = await refused(log, conn, signer, keys)
    assert (problem.reason, problem.description) == ("gap", "the checkpoint at 24 is gone")

    # All of the chain's checkpoints deleted: no start from genesis either.
    await conn.execute("DELETE FROM audit_checkpoints")
    assert (await refused(log, conn, signer, keys)).reason == "gap"


@pytest.mark.asyncio
async def test_a_replaced_checkpoint_is_caught_by_the_replica_that_signed_it(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    old, fresh = AuditLog(chains=1), AuditLog(chains=1)
    await old.ensure_chains(conn)
    await append(old, conn, 10)
    await checkpoint(old, conn, signer, keys)
    await append(old, conn, 10)
    await checkpoint(old, conn, signer, keys)
    # The checkpoint at 20 deleted and its events rewritten: a process that never saw it
    # (started since) can only go by the checkpoint at 10, and signs the rewrite...
    await rewrite(conn, 15, forged)
    await conn.execute("DELETE FROM audit_checkpoints WHERE size = 20")
    made = await checkpoint(fresh, conn, signer, keys)
    assert made is not None and made.size == 20
    # ...which the one that signed the original refuses to build on.
    problem = await refused(old, conn, signer, keys)
    assert (problem.reason, problem.description) == ("root", "the checkpoint at 20 was replaced")

    # Same with more events on top: the newer tree does not extend the one it signed.
    await append(old, conn, 5)
    await checkpoint(AuditLog(chains=1), conn, signer, keys)
    problem = await refused(old, conn, signer, keys)
    assert problem.reason == "fork" and "does not extend the one at 20" in problem.description


@pytest.mark.asyncio
async def test_a_doctored_frontier_is_not_extended(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    log = AuditLog(chains=1)
    await log.ensure_chains(conn)
    await append(log, conn, 5)
    await checkpoint(log, conn, signer, keys)
    await conn.execute("UPDATE audit_checkpoints SET frontier = $1", [bytes(32)] * 2)
    await append(log, conn, 3)
    problem = await refused(log, conn, signer, keys)
    assert (problem.reason, problem.description) == (
        "root",
        "the stored frontier at 5 disagrees with its root",
    )
    # With the root column changed to match, the signature still tells.
    zeros = MerkleFrontier.from_state(5, [bytes(32)] * 2).root()
    await conn.execute("UPDATE audit_checkpoints SET root = $1", zeros)
    assert (await refused(AuditLog(chains=1), conn, signer, keys)).reason == "root"


@pytest.mark.asyncio
async def test_a_checkpoint_row_not_signed_by_the_registry_is_not_extended(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    log = AuditLog(chains=1)
    await log.ensure_chains(conn)
    await append(log, conn, 6)
    await checkpoint(log, conn, signer, keys)
    # A row the insider made: a real tree of the chain, signed with a key of their own.
    await rewrite(conn, 2, forged)
    tree = await stored_tree(conn)
    own = sign_checkpoint(
        Checkpoint(chain=CHAIN, size=6, root=b64url_encode(tree.root()), time=0),
        PrivateKey.generate(kid="insider"),
    )
    await conn.execute(
        "UPDATE audit_checkpoints SET root = $1, frontier = $2, signed = $3",
        tree.root(),
        tree.state(),
        own,
    )
    await append(log, conn, 2)
    assert (await refused(AuditLog(chains=1), conn, signer, keys)).reason == "unknown_kid"
    assert (await refused(log, conn, signer, keys)).reason == "root"  # not the one it signed


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (
            "UPDATE audit_events SET body = replace(body, '\"i\":2', '\"i\":9') WHERE seq = 7",
            ("hash", "event 7's stored hash is not its body's"),
        ),
        (
            "UPDATE audit_events SET entry_hash = sha256(entry_hash) WHERE seq = 7",
            ("hash", "event 7's stored hash is not its body's"),
        ),
        ("DELETE FROM audit_events WHERE seq = 7", ("gap", "event 7 is missing")),
        ("DELETE FROM audit_events WHERE seq = 9", ("gap", "events 9..10 are missing")),
        ("UPDATE audit_heads SET size = 4", ("gap", "the chain holds 4 events, its checkpoint 5")),
    ],
    ids=["body", "stored-hash", "deleted", "deleted-last", "head-lowered"],
)
async def test_new_events_are_hashed_from_their_bodies(
    conn: asyncpg.Connection,
    signer: LocalFileSigner,
    keys: KeySet,
    tamper: str,
    expected: tuple[str, str],
) -> None:
    log = await signed_then_grown(conn, signer, keys, 5, 5)
    await conn.execute(tamper)
    problem = await refused(log, conn, signer, keys)
    assert (problem.reason, problem.description) == expected


@pytest.mark.asyncio
@pytest.mark.parametrize("remembered", [True, False], ids=["same-process", "restarted"])
async def test_the_first_new_event_must_link_to_the_checkpointed_one(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet, remembered: bool
) -> None:
    log = await signed_then_grown(conn, signer, keys, 4, 3)
    # Event 4 re-parented (onto genesis) and the rest re-linked after it: a whole chain
    # from event 4 on, but not one that continues the signed tree.
    await rewrite(conn, 4, lambda fields: {**fields, "prev": b64url_encode(bytes(32))})
    problem = await refused(log if remembered else AuditLog(chains=1), conn, signer, keys)
    assert (problem.reason, problem.description) == ("fork", "event 4 does not link to its parent")


# --- events checked ahead of the checkpoint -------------------------------------------------------


async def stored_nodes(conn: asyncpg.Connection) -> dict[tuple[int, int], bytes]:
    rows = await conn.fetch("SELECT level, idx, hash FROM audit_nodes WHERE chain = $1", CHAIN)
    return {(r["level"], r["idx"]): bytes(r["hash"]) for r in rows}


@pytest.mark.asyncio
async def test_events_checked_ahead_are_not_checked_again(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    """verify_ahead does the checkpoint's work on new events in slices, and the checkpoint
    starts where it stopped: an event changed after it was checked (no longer matching its
    stored hash, which the checkpoint would refuse) is signed as it was checked."""
    log = AuditLog(chains=1)
    await log.ensure_chains(conn)
    await append(log, conn, 5)
    assert await log.verify_ahead(conn, CHAIN, 5, limit=100) == 0  # nothing trusted yet
    await checkpoint(log, conn, signer, keys)
    await append(log, conn, 600)
    slices = [await log.verify_ahead(conn, CHAIN, 605, limit=250) for _ in range(4)]
    assert slices == [250, 250, 100, 0]
    honest = await tree_of(conn, 605)
    await conn.execute(
        "UPDATE audit_events SET body = replace(body, '\"i\":7', '\"i\":8')"
        " WHERE chain = $1 AND seq = 12",
        CHAIN,
    )
    assert await tree_of(conn, 605) != honest
    made = await checkpoint(log, conn, signer, keys)
    assert made is not None and (made.size, made.root_bytes()) == (605, honest)
    # The subtrees completed by events checked ahead are stored with the checkpoint.
    leaves = [
        bytes(r["entry_hash"])
        for r in await conn.fetch("SELECT entry_hash FROM audit_events ORDER BY seq")
    ]
    assert await stored_nodes(conn) == {
        (8, 0): merkle_root(leaves[:256]),
        (8, 1): merkle_root(leaves[256:512]),
        (9, 0): merkle_root(leaves[:512]),
    }


@pytest.mark.asyncio
async def test_a_checkpoint_checks_what_was_not_checked_ahead(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    log = await signed_then_grown(conn, signer, keys, 5, 10)
    assert await log.verify_ahead(conn, CHAIN, 15, limit=4) == 4  # events 5..8
    await conn.execute(
        "UPDATE audit_events SET body = replace(body, '\"i\":5', '\"i\":6')"
        " WHERE chain = $1 AND seq = 10",
        CHAIN,
    )
    problem = await refused(log, conn, signer, keys)
    assert (problem.reason, problem.description) == (
        "hash",
        "event 10's stored hash is not its body's",
    )


@pytest.mark.asyncio
async def test_a_problem_found_ahead_is_left_to_the_checkpoint(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    log = await signed_then_grown(conn, signer, keys, 4, 3)
    await rewrite(conn, 4, lambda fields: {**fields, "prev": b64url_encode(bytes(32))})
    assert await log.verify_ahead(conn, CHAIN, 7, limit=100) == 0
    problem = await refused(log, conn, signer, keys)
    assert (problem.reason, problem.description) == ("fork", "event 4 does not link to its parent")


@pytest.mark.asyncio
async def test_only_the_replica_that_signed_last_checks_ahead(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    """Work done ahead of one tree is dropped when the checkpoint starts from another (a
    second replica signed in between, which the first then extends); and a replica whose
    chain another one signs checks nothing ahead, which would be work thrown away."""
    first = await signed_then_grown(conn, signer, keys, 5, 10)
    second = AuditLog(chains=1)
    assert await second.verify_ahead(conn, CHAIN, 15, limit=100) == 0  # trusts nothing yet
    assert await first.verify_ahead(conn, CHAIN, 15, limit=100) == 10
    made = await checkpoint(second, conn, signer, keys)
    assert made is not None and made.size == 15
    await append(first, conn, 3)
    assert await second.verify_ahead(conn, CHAIN, 18, limit=100) == 3  # signed last
    assert await checkpoint(first, conn, signer, keys) is not None  # from second's tree
    assert await checkpoint(second, conn, signer, keys) is None  # adopts first's 18
    await append(first, conn, 4)
    assert await second.verify_ahead(conn, CHAIN, 22, limit=100) == 0  # first signs now
    assert await first.verify_ahead(conn, CHAIN, 22, limit=100) == 4
    made = await checkpoint(first, conn, signer, keys)
    assert made is not None and made.root_bytes() == await tree_of(conn, 22)


@pytest.mark.asyncio
async def test_a_checkpoint_of_events_all_checked_ahead_is_dated_by_them(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    log = AuditLog(chains=1)
    await log.ensure_chains(conn)
    now = 1_800_000_000
    await append(log, conn, 1)
    await log.checkpoint(conn, CHAIN, signer, keys=keys, now=now)
    async with conn.transaction():
        ahead = (now + 3_600) * 1000 + 1  # a shard an hour ahead
        await log.append(conn, event="t.e", actor="t", subject="s", key="k", time_ms=ahead)
    assert await log.verify_ahead(conn, CHAIN, 2, limit=100) == 1
    made = await log.checkpoint(conn, CHAIN, signer, keys=keys, now=now)
    assert made is not None
    assert verify_checkpoint(made["signed"], keys=keys).time == now + 3_601


@pytest.mark.asyncio
async def test_a_checkpoint_dated_outside_its_keys_window_is_not_extended(
    conn: asyncpg.Connection, signer: LocalFileSigner
) -> None:
    # A key retired long ago leaks. The insider rewrites history and signs its tree with
    # that key under a date after the key retired, which every verifier refuses: a process
    # that has just started must refuse it too, not extend it under the current key.
    retired, keys = retired_beside(signer)
    log = AuditLog(chains=1)
    await log.ensure_chains(conn)
    await append(log, conn, 6)
    await checkpoint(log, conn, signer, keys)
    await rewrite(conn, 2, forged)
    tree = await stored_tree(conn)
    leaked = sign_checkpoint(
        Checkpoint(chain=CHAIN, size=6, root=b64url_encode(tree.root()), time=1_700_000_000),
        retired,
    )
    await conn.execute(
        "UPDATE audit_checkpoints SET root = $1, frontier = $2, signed = $3",
        tree.root(),
        tree.state(),
        leaked,
    )
    await append(log, conn, 2)
    assert (await refused(AuditLog(chains=1), conn, signer, keys)).reason == "key_window"


@pytest.mark.asyncio
async def test_no_checkpoint_is_signed_outside_the_signers_window(
    conn: asyncpg.Connection, signer: LocalFileSigner
) -> None:
    # The signer's key retired before the date the checkpoint would carry: every verifier
    # would refuse it, and so would this checkpointer once restarted. Nothing is signed.
    own = signer.public_key()
    keys = AuditKeys([AuditKey(own, 0, 1_600_000_000)])
    log = AuditLog(chains=1)
    await log.ensure_chains(conn)
    await append(log, conn, 3)
    assert (await refused(log, conn, signer, keys)).reason == "key_window"
    # Inside the window it signs as before.
    keys = AuditKeys([AuditKey(own, 0, 1_800_000_000)])
    made = await checkpoint(log, conn, signer, keys)
    assert made is not None and made.size == 3


@pytest.mark.asyncio
async def test_a_signed_empty_checkpoint_is_extended(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    # A signed checkpoint of the empty tree has no last leaf to read: the first event
    # links to genesis. It used to escape as an IndexError, which stopped every chain's
    # checkpoint in the round (checkpoint_all catches IntegrityError only).
    log = AuditLog(chains=1)
    await log.ensure_chains(conn)
    empty = Checkpoint(chain=CHAIN, size=0, root=b64url_encode(MerkleFrontier().root()), time=0)
    await conn.execute(
        "INSERT INTO audit_checkpoints (chain, size, root, frontier, signed, time)"
        " VALUES ($1, 0, $2, $3, $4, 0)",
        CHAIN,
        MerkleFrontier().root(),
        [],
        await sign_document(empty, signer),
    )
    await append(log, conn, 3)
    made = await checkpoint(AuditLog(chains=1), conn, signer, keys)
    assert made is not None and made.root_bytes() == await tree_of(conn, 3)


@pytest.mark.asyncio
async def test_a_checkpoint_backdated_before_its_events_is_not_extended(
    conn: asyncpg.Connection, signer: LocalFileSigner
) -> None:
    # The leaked retired key signs the rewritten history under a date inside its window,
    # before the events it covers (dated now): every verifier refuses it as backdated. A
    # process that has just started, or one that signed an earlier checkpoint, must not
    # extend it under the current key, whose checkpoint the approval page alone checks.
    retired, keys = retired_beside(signer)
    log = AuditLog(chains=1)
    await log.ensure_chains(conn)
    await append(log, conn, 3)
    await checkpoint(log, conn, signer, keys)
    await append(log, conn, 3)
    await rewrite(conn, 4, forged)
    tree = await stored_tree(conn)
    sealed = sign_checkpoint(
        Checkpoint(chain=CHAIN, size=6, root=b64url_encode(tree.root()), time=1_500_000_000),
        retired,
    )
    await conn.execute(
        "INSERT INTO audit_checkpoints (chain, size, root, frontier, signed, time)"
        " VALUES ($1, 6, $2, $3, $4, 1500000000)",
        CHAIN,
        tree.root(),
        tree.state(),
        sealed,
    )
    await append(log, conn, 1)
    assert (await refused(AuditLog(chains=1), conn, signer, keys)).reason == "dated"
    assert (await refused(log, conn, signer, keys)).reason == "dated"


# --- rows of any shape the schema allows --------------------------------------------------------
#
# The registry's round checkpoints every chain and goes on past a chain that fails with an
# IntegrityError; anything else ends the round, leaving every later chain unsigned. So what
# an insider can store must fail as an IntegrityError, whatever its shape.


async def append_raw(conn: asyncpg.Connection, chain: str, **fields: Any) -> None:
    """What an insider writes: an event linked to the chain's head (body, stored hash and
    head all agree), whatever else its fields hold."""
    head = await conn.fetchrow("SELECT size, head FROM audit_heads WHERE chain = $1", chain)
    document = {
        "format": "agentauth.audit.v1",
        "chain": chain,
        "seq": head["size"],
        "prev": b64url_encode(bytes(head["head"])),
        "time_ms": 1_700_000_000_000,
        "event": "t.e",
        "actor": "t",
        "subject": "s",
        "data": {},
        **fields,
    }
    body = json.dumps(document, sort_keys=True, separators=(",", ":"))
    entry = leaf_hash(body.encode())
    await conn.execute(
        "INSERT INTO audit_events (chain, seq, entry_hash, body, event, time_ms)"
        " VALUES ($1, $2, $3, $4, 't.e', 0)",
        chain,
        head["size"],
        entry,
        body,
    )
    await conn.execute(
        "UPDATE audit_heads SET size = size + 1, head = $2 WHERE chain = $1", chain, entry
    )


@pytest.mark.asyncio
async def test_an_event_dated_past_what_a_checkpoint_can_carry_is_an_integrity_error(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    log = AuditLog(chains=1)
    await log.ensure_chains(conn)
    await append(log, conn, 2)
    await append_raw(conn, CHAIN, time_ms=10**19)  # its second is past 2**53
    assert (await refused(log, conn, signer, keys)).reason == "malformed"


@pytest.mark.asyncio
async def test_a_null_in_a_stored_frontier_is_an_integrity_error(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    log = await signed_then_grown(conn, signer, keys, signed=3, grown=1)
    await conn.execute("UPDATE audit_checkpoints SET frontier = ARRAY[NULL, frontier[2]]")
    assert (await refused(log, conn, signer, keys)).reason == "malformed"
    assert (await refused(AuditLog(chains=1), conn, signer, keys)).reason == "malformed"


@pytest.mark.asyncio
async def test_a_chain_no_checkpoint_can_name_is_an_integrity_error(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    chain = "not a chain!"
    await conn.execute(
        "INSERT INTO audit_heads (chain, size, head) VALUES ($1, 0, $2)", chain, bytes(32)
    )
    await append_raw(conn, chain)
    with pytest.raises(IntegrityError) as caught:
        await AuditLog(chains=1).checkpoint(conn, chain, signer, keys=keys, now=1_700_000_000)
    assert caught.value.reason == "malformed"
    assert await conn.fetchval("SELECT count(*) FROM audit_checkpoints") == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("ahead", [365 * 86_400, 2**62], ids=["a year", "past 2**53"])
async def test_the_date_before_comes_from_the_signed_checkpoint_not_the_time_column(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet, ahead: int
) -> None:
    # An insider moves the stored checkpoint's time ahead. Taken on the database's word,
    # that date would be signed into the next checkpoint, and into every one after it
    # (none may predate the one before), all refused by every verifier as dated in the
    # future; past 2**53 it has no canonical form, and signing failed with a ValueError.
    # The signed date is the one to follow.
    for log in (None, AuditLog(chains=1)):  # a process that has just started, and not
        await conn.execute("DELETE FROM audit_checkpoints")
        await conn.execute("DELETE FROM audit_events")
        await conn.execute("DELETE FROM audit_heads")
        grown = await signed_then_grown(conn, signer, keys, signed=3, grown=1)
        signed = verify_checkpoint(
            await conn.fetchval("SELECT signed FROM audit_checkpoints"), keys=keys
        )
        await conn.execute("UPDATE audit_checkpoints SET time = time + $1", ahead)
        made = await checkpoint(log or grown, conn, signer, keys)
        assert made is not None
        assert signed.time <= made.time < signed.time + 86_400
