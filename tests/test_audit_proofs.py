"""Proofs served from stored subtree hashes: the same bytes as from every leaf, far fewer rows.

``AuditLog.inclusion`` and ``AuditLog.consistency`` build RFC 6962 proofs from the
``audit_nodes`` rows the checkpointer writes, one block of leaf hashes and the checkpoint's
frontier. Each proof here is compared with ``inclusion_proof`` / ``consistency_proof`` over
every leaf and verified against the signed checkpoint; a chain without node rows (checkpointed
before the table existed) backfills them, and a doctored row cannot make a proof that passes.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
from conftest import migrated_connection

from agentauth.keys import LocalFileSigner
from agentauth.protocol import (
    Checkpoint,
    IntegrityError,
    KeySet,
    MerkleFrontier,
    b64url_decode,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    verify_checkpoint,
    verify_consistency,
    verify_inclusion,
)
from agentauth.registry._audit_log import NODE_LEVEL, AuditLog

pytestmark = [pytest.mark.postgres]

CHAIN = "registry-0"  # AuditLog(chains=1) puts every event here
BLOCK = 2**NODE_LEVEL


@pytest_asyncio.fixture(loop_scope="session")
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A database of the test's own, so that row counts and node rows are this test's."""
    async with migrated_connection(database_url, "auditproofs") as connection:
        yield connection


@pytest.fixture
def signer(tmp_path: Path) -> LocalFileSigner:
    return LocalFileSigner.load_or_create(tmp_path / "registry.pem")


@pytest.fixture
def keys(signer: LocalFileSigner) -> KeySet:
    return KeySet([signer.public_key()])


class Chain:
    """One chain grown and checkpointed through ``AuditLog``, with every leaf kept here."""

    def __init__(self, conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet) -> None:
        self.conn, self.signer, self.keys = conn, signer, keys
        self.log = AuditLog(chains=1)
        self.leaves: list[bytes] = []
        self.checkpoints: dict[int, Checkpoint] = {}

    async def grow(self, count: int) -> Checkpoint:
        """``count`` more events in one transaction, then a checkpoint of them."""
        await self.log.ensure_chains(self.conn)
        async with self.conn.transaction():
            for i in range(len(self.leaves), len(self.leaves) + count):
                await self.log.append(
                    self.conn, event="test.event", actor="test", subject=f"s{i}", key="k"
                )
        rows = await self.conn.fetch(
            "SELECT body FROM audit_events WHERE chain = $1 AND seq >= $2 ORDER BY seq",
            CHAIN,
            len(self.leaves),
        )
        self.leaves.extend(leaf_hash(row["body"].encode()) for row in rows)
        made = await self.log.checkpoint(
            self.conn, CHAIN, self.signer, keys=self.keys, now=1_700_000_000
        )
        assert made is not None
        checkpoint = verify_checkpoint(made["signed"], keys=self.keys)
        assert checkpoint.size == len(self.leaves)
        self.checkpoints[checkpoint.size] = checkpoint
        return checkpoint

    async def check_inclusion(self, seq: int, conn: Any = None, *, compare: bool = True) -> None:
        """The database's proof of ``seq`` is the in-memory one and verifies against the
        signed checkpoint (only the latter with ``compare=False``)."""
        result = await self.log.inclusion(conn or self.conn, CHAIN, seq)
        assert result is not None
        size = result["tree_size"]
        proof = [b64url_decode(h) for h in result["proof"]]
        if compare:
            assert proof == inclusion_proof(self.leaves[:size], seq), (size, seq)
        checkpoint = verify_checkpoint(result["checkpoint"], keys=self.keys)
        verify_inclusion(
            leaf_hash=self.leaves[seq],
            index=seq,
            tree_size=size,
            proof=proof,
            root=checkpoint.root_bytes(),
        )

    async def check_consistency(
        self, first: int, second: int, conn: Any = None, *, compare: bool = True
    ) -> None:
        proof = [
            b64url_decode(h)
            for h in await self.log.consistency(conn or self.conn, CHAIN, first, second)
        ]
        if compare:
            assert proof == consistency_proof(self.leaves[:second], first), (first, second)
        verify_consistency(
            old_size=first,
            new_size=second,
            old_root=root_of(self.leaves[:first]),
            new_root=self.checkpoints[second].root_bytes(),
            proof=proof,
        )


def root_of(leaves: Iterable[bytes]) -> bytes:
    tree = MerkleFrontier()
    for leaf in leaves:
        tree.append(leaf)
    return tree.root()


class Counting:
    """A connection that counts the rows its queries hand back. Every query of the proof
    path returns what it reads (no aggregates), so this is the rows a proof reads."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.rows = 0

    async def fetch(self, *args: Any) -> list[asyncpg.Record]:
        rows = await self.conn.fetch(*args)
        self.rows += len(rows)
        return rows

    async def fetchrow(self, *args: Any) -> asyncpg.Record | None:
        row = await self.conn.fetchrow(*args)
        self.rows += row is not None
        return row

    async def fetchval(self, *args: Any) -> Any:
        self.rows += 1
        return await self.conn.fetchval(*args)

    async def execute(self, *args: Any) -> str:
        return await self.conn.execute(*args)


def indices(size: int, rng: random.Random, *, many: bool = True) -> set[int]:
    """Both ends, a few at random and (``many``) block edges and powers of two."""
    edges = {0, size - 1, rng.randrange(size), rng.randrange(size)}
    if many:
        edges |= {size // 2, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK - 1, 2 * BLOCK}
        edges |= {2**k + d for k in range(13) for d in (-1, 0)}
    return {i for i in edges if 0 <= i < size}


# --- the same proofs as from every leaf -----------------------------------------------------------


@pytest.mark.asyncio
async def test_proofs_equal_the_in_memory_ones_at_every_size_to_600(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    """A checkpoint at every size from 1 to 600 (so node rows come one checkpoint at a
    time), each proved for a spread of leaves and old sizes at once."""
    chain, rng = Chain(conn, signer, keys), random.Random(6962)
    for size in range(1, 601):
        await chain.grow(1)
        for seq in indices(size, rng, many=False):
            await chain.check_inclusion(seq)
        for first in indices(size, rng, many=False) | {size}:
            if first:
                await chain.check_consistency(first, size)
    # Every complete subtree of NODE_LEVEL and up has its row: 600 // 256 + 600 // 512.
    assert await conn.fetchval("SELECT count(*) FROM audit_nodes") == 3


@pytest.mark.asyncio
async def test_proofs_equal_the_in_memory_ones_after_irregular_growth(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    """Checkpoints far apart and close together, landing on and beside block and power of
    two sizes, to a few thousand events; every pair of checkpoints proved consistent."""
    chain, rng = Chain(conn, signer, keys), random.Random(9162)
    sizes = [1, 3, 255, 256, 257, 511, 512, 513, 1000, 1023, 1024, 1025, 2048, 2049]
    sizes += [3000, 4095, 4096, 4097, 4500]
    for before, size in zip([0, *sizes[:-1]], sizes, strict=True):
        await chain.grow(size - before)
        for seq in indices(size, rng):
            await chain.check_inclusion(seq)
    for second in sizes:
        for first in sizes:
            if first <= second:
                await chain.check_consistency(first, second)


# --- the work a proof does ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_proof_reads_one_block_and_a_row_per_level(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    """At 5,000 events a proof reads at most BLOCK leaf hashes, one node row per level
    above the block, the event and the checkpoint: 2**8 + log2(n) + 2 = 271 rows, where
    reading every leaf took 5,002."""
    chain, rng = Chain(conn, signer, keys), random.Random(5000)
    for step in (1700, 1300, 2000):
        await chain.grow(step)
    size = 5000
    bound = BLOCK + math.ceil(math.log2(size)) + 2
    worst = 0
    for seq in indices(size, rng) | set(range(0, size, 97)):
        counting = Counting(conn)
        await chain.check_inclusion(seq, counting)
        worst = max(worst, counting.rows)
    for first in (1, 255, 256, 257, 1700, 3000, 4999, 5000):
        counting = Counting(conn)
        await chain.check_consistency(first, size, counting)
        worst = max(worst, counting.rows)
    assert 0 < worst <= bound, worst

    # The server agrees on the table that has a row per event: the tuples it fetched from
    # audit_events, by index or by scan, for two proofs. (The view also holds counts of
    # earlier transactions not yet flushed, hence the difference inside one transaction,
    # which defers the flush. audit_nodes is left out: at 35 rows the planner rightly reads
    # its one page whole, where on millions of rows it looks each wanted row up by key.)
    tuples = (
        "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)"
        " FROM pg_stat_xact_user_tables WHERE relname = 'audit_events'"
    )
    async with conn.transaction():
        before = await conn.fetchval(tuples)
        await chain.check_inclusion(2500)
        await chain.check_consistency(3000, size)
        read = await conn.fetchval(tuples) - before
    assert 0 < read <= 2 * (BLOCK + 1), read


@pytest.mark.asyncio
async def test_a_proof_at_a_size_just_past_a_power_of_two_reads_one_block(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    """At 1,032 = 1,024 + 8 events the right edge of the tree is a perfect subtree of 8
    leaves, in another block than the early leaves: taken from the frontier, not read with
    every leaf hash between the leaf proved and the end (1,032 rows for leaf 0)."""
    chain = Chain(conn, signer, keys)
    await chain.grow(1024)
    size = 1032
    await chain.grow(size - 1024)
    bound = BLOCK + math.ceil(math.log2(size)) + 2
    for seq in (0, 1, 255, 256, 700, 1023, 1024, 1031):
        counting = Counting(conn)
        await chain.check_inclusion(seq, counting)
        assert counting.rows <= bound, (seq, counting.rows)
    for first in (1, 3, 256, 1000, 1024, 1030):
        counting = Counting(conn)
        await chain.check_consistency(first, size, counting)
        assert counting.rows <= bound, (first, counting.rows)


# --- chains checkpointed before the table existed -------------------------------------------------


@pytest.mark.asyncio
async def test_a_chain_without_node_rows_gets_right_proofs_and_its_rows_back(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    chain = Chain(conn, signer, keys)
    for step in (700, 1300, 1000):
        await chain.grow(step)
    stored = await conn.fetch("SELECT level, idx, hash FROM audit_nodes ORDER BY level, idx")
    # As after migrating a database whose chains were checkpointed before: no rows at all.
    await conn.execute("DELETE FROM audit_nodes")
    counting = Counting(conn)
    await chain.check_inclusion(1, counting)
    assert counting.rows > 2000  # the first proof reads the leaves the missing rows cover...
    counting = Counting(conn)
    await chain.check_inclusion(2, counting)
    assert counting.rows <= BLOCK + 14  # ...once
    for seq in (0, 255, 256, 1999, 2047, 2048, 2999):
        await chain.check_inclusion(seq)
    for first in (1, 700, 2000, 2048, 2049, 3000):
        await chain.check_consistency(first, 3000)
        await chain.check_consistency(min(first, 2000), 2000)
    # What was backfilled is what the checkpointer had written (none of it made up).
    backfilled = await conn.fetch("SELECT level, idx, hash FROM audit_nodes ORDER BY level, idx")
    assert set(map(tuple, backfilled)) <= set(map(tuple, stored))
    assert len(backfilled) > 0

    # Some rows gone, the chain growing on: old and new proofs alike.
    await conn.execute("DELETE FROM audit_nodes WHERE level = $1 AND idx % 2 = 0", NODE_LEVEL)
    await chain.grow(517)
    for seq in (0, 300, 2999, 3000, 3516):
        await chain.check_inclusion(seq)
    await chain.check_consistency(2000, 3517)


# --- a doctored cache ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_doctored_node_row_makes_a_proof_that_fails(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    chain = Chain(conn, signer, keys)
    await chain.grow(1500)
    await chain.grow(500)
    # Leaf 0's path climbs through the subtree of leaves [256, 512): level 8, idx 1.
    await conn.execute(
        "UPDATE audit_nodes SET hash = sha256(hash) WHERE level = $1 AND idx = 1", NODE_LEVEL
    )
    with pytest.raises(IntegrityError):
        await chain.check_inclusion(0, compare=False)
    with pytest.raises(IntegrityError):
        await chain.check_consistency(256, 2000, compare=False)
    # Leaves whose proofs do not use the row are unaffected.
    await chain.check_inclusion(300)
    await chain.check_inclusion(1999)

    # A doctored frontier (the right edge of the tree) fails the same way.
    await conn.execute(
        "UPDATE audit_checkpoints SET frontier = $1, root = $2 WHERE size = 2000",
        [bytes(32)] * (2000).bit_count(),
        MerkleFrontier.from_state(2000, [bytes(32)] * (2000).bit_count()).root(),
    )
    with pytest.raises(IntegrityError):
        await chain.check_inclusion(300, compare=False)


@pytest.mark.asyncio
async def test_the_checkpointer_signs_from_event_bodies_not_node_rows(
    conn: asyncpg.Connection, signer: LocalFileSigner, keys: KeySet
) -> None:
    chain = Chain(conn, signer, keys)
    await chain.grow(1000)
    await conn.execute("UPDATE audit_nodes SET hash = sha256(hash)")
    checkpoint = await chain.grow(1100)
    assert checkpoint.root_bytes() == root_of(chain.leaves)
    # The rows it wrote for the new events are right: the proof of a leaf among them uses
    # only those and the block and frontier.
    await chain.check_inclusion(2050)
