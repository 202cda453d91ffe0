"""The registry's audit log in PostgreSQL: appends inside the caller's transaction.

Events spread over ``chains`` hash chains by subject, so concurrent transactions about
different agents do not queue on one lock; each chain is strictly serialized by its
``audit_heads`` row (SELECT ... FOR UPDATE), which is what rules out forks and gaps.

The checkpointer signs with the registry's key, so it takes nothing on the database's word
(anyone who can write the tables could otherwise have a rewritten history signed): the
last stored checkpoint must carry its signed root and extend the last tree this process
signed or checked, and each new event is hashed from its body and linked to the one before.

Proofs are served from ``audit_nodes``, the hashes of the chain's complete subtrees of
``2**NODE_LEVEL`` leaves and up that the checkpointer stores with each checkpoint, plus at
most one such block of leaf hashes and the checkpoint's frontier: O(log n) rows a proof,
where reading every leaf hash of a long chain took tens of megabytes. Those rows are a
cache for proofs only: the checkpointer never reads them, and a wrong one yields a proof
that fails against the signed checkpoint, which is what clients check.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from ..keys import AsyncSigner
from ..protocol import (
    CHECKPOINT_TYP,
    GENESIS_HASH,
    AuditEvent,
    AuditKeys,
    ChainHead,
    Checkpoint,
    IntegrityError,
    InvalidRequest,
    KeySet,
    MerkleFrontier,
    NotFound,
    b64url_decode,
    b64url_encode,
    canonical_json,
    check_checkpoint_dated,
    leaf_hash,
    merkle_root,
    strict_json_loads,
)
from ..protocol._jws import attach_signature, signing_input
from ..protocol._merkle import consistency_proof_ranges, inclusion_proof_ranges
from ..store import Conn

__all__ = ["AuditLog"]

#: Subtrees of 2**8 = 256 leaves and up are stored. Any proof then reads at most one block
#: of 256 leaf hashes (the levels below all lie in the block of the leaf proved, or of the
#: old tree's last leaf) and one row per level above; the table holds about one row per 128
#: events, 1/128 of the leaf hashes' bytes. Lower would read fewer leaves a proof for more
#: rows and more writes per checkpoint.
NODE_LEVEL = 8

#: A chain's stored subtree: (level, idx) covers leaves [idx * 2**level, (idx + 1) * 2**level).
Node = tuple[int, int]


@dataclass(frozen=True, slots=True)
class _Ahead:
    """Events checked ahead of a chain's next checkpoint: ``tree`` is ``base`` (the trusted
    tree, by identity) plus them; ``nodes`` the subtrees they complete; ``newest`` the
    second the last of them falls in."""

    base: ChainHead
    tree: ChainHead
    nodes: list[tuple[Node, bytes]]
    newest: int


class AuditLog:
    def __init__(self, *, prefix: str = "registry", chains: int = 8) -> None:
        self.prefix = prefix
        self.chains = [f"{prefix}-{i}" for i in range(chains)]
        # Per chain, the latest tree this process signed or checked. The next checkpoint
        # must extend it, so rows deleted or rewritten behind the registry's back cannot
        # roll it back; it lives here, out of reach of the database it vouches for.
        self._trusted: dict[str, ChainHead] = {}
        # Per chain, events verified ahead of the next checkpoint (verify_ahead), on top of
        # the trusted tree they extend.
        self._ahead: dict[str, _Ahead] = {}
        # Chains whose latest checkpoint this process made: the only ones it checks ahead.
        self._signed_last: set[str] = set()

    def chain_for(self, key: str) -> str:
        """The chain that holds events about ``key`` (an agent id, usually)."""
        digest = hashlib.sha256(key.encode()).digest()
        return self.chains[int.from_bytes(digest[:4], "big") % len(self.chains)]

    async def ensure_chains(self, conn: Conn) -> None:
        await conn.executemany(
            "INSERT INTO audit_heads (chain, size, head) VALUES ($1, 0, $2) "
            "ON CONFLICT (chain) DO NOTHING",
            [(chain, GENESIS_HASH) for chain in self.chains],
        )

    async def append(
        self,
        conn: Conn,
        *,
        event: str,
        actor: str,
        subject: str,
        key: str,
        agent_id: str | None = None,
        grant_id: str | None = None,
        data: dict[str, Any] | None = None,
        time_ms: int | None = None,
    ) -> tuple[str, int]:
        """Append one event in the caller's open transaction; returns (chain, seq)."""
        chain = self.chain_for(key)
        head = await conn.fetchrow(
            "SELECT size, head FROM audit_heads WHERE chain = $1 FOR UPDATE", chain
        )
        if head is None:
            raise RuntimeError(f"audit chain {chain} is not initialized")
        record = AuditEvent(
            chain=chain,
            seq=head["size"],
            prev=b64url_encode(bytes(head["head"])),
            time_ms=time_ms if time_ms is not None else int(time.time() * 1000),
            event=event,
            actor=actor,
            subject=subject,
            data=data or {},
        )
        body = record.canonical_bytes()
        entry = record.entry_hash()
        # Event row and chain head in one statement: one round trip inside the lock.
        await conn.execute(
            "WITH event AS (INSERT INTO audit_events (chain, seq, entry_hash, body, event,"
            " agent_id, grant_id, time_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8))"
            " UPDATE audit_heads SET size = $2 + 1, head = $3 WHERE chain = $1",
            chain,
            record.seq,
            entry,
            body.decode("utf-8"),
            event,
            agent_id,
            grant_id,
            record.time_ms,
        )
        return chain, record.seq

    async def checkpoint(
        self, conn: Conn, chain: str, signer: AsyncSigner, *, keys: KeySet, now: int
    ) -> dict[str, Any] | None:
        """Sign a checkpoint of ``chain`` at its current size, if it grew since the last one.

        ``keys`` are the registry's verification keys, retired ones included: the latest
        stored checkpoint must be signed by one of them unless this process already knows
        its tree. With ``AuditKeys`` (the registry's audit key list) its date must lie in
        its key's signing window, and so must the new checkpoint's in ``signer``'s. Raises
        ``IntegrityError`` and signs nothing when the stored checkpoint or the new events
        do not check out. A transaction-level advisory lock per chain lets only one replica
        checkpoint a chain at a time.
        """
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", "ckpt:" + chain)
            head = await conn.fetchrow("SELECT size FROM audit_heads WHERE chain = $1", chain)
            last = await conn.fetchrow(
                "SELECT size, root, frontier, signed, time FROM audit_checkpoints"
                " WHERE chain = $1 ORDER BY size DESC LIMIT 1",
                chain,
            )
            size = head["size"] if head else 0
            tree = await self._base(conn, chain, last, keys)
            if size < tree.size:
                raise IntegrityError(
                    f"the chain holds {size} events, its checkpoint {tree.size}", reason="gap"
                )
            made = None
            if size > tree.size:
                # The date before is the signed one: the time column is the database's
                # word, and a date moved ahead there would be signed into this checkpoint
                # and every later one, all refused by verifiers as dated in the future.
                before = _signed_time(last, chain, tree, keys) if last else 0
                ahead = self._ahead.pop(chain, None)
                if ahead is None or ahead.base is not tree or ahead.tree.size > size:
                    # Nothing verified ahead of this tree (another replica signed since,
                    # this process just started, the chain shrank): all of it here.
                    ahead = _Ahead(base=tree, tree=tree, nodes=[], newest=0)
                rows = await self._events(conn, chain, ahead.tree.size, size)
                tree, nodes = _extend(ahead.tree, rows, chain=chain, size=size)
                nodes = ahead.nodes + nodes
                newest = _newest_second(rows[-1]["body"]) if rows else ahead.newest
                # Dated no earlier than what it covers or the checkpoint before it, which
                # every verifier requires (check_checkpoint_dated): a shard's clock a little
                # ahead of this replica's must not make an honest checkpoint look backdated.
                dated = max(now, newest, before)
                # Never sign what every verifier (and this checkpointer, once restarted)
                # refuses: a date outside the signing key's window, which a shard's clock far
                # ahead or a key retiring under a long round can give. The chain waits
                # (audit lag) for a round whose key covers the date.
                window = keys.entry(signer.kid) if isinstance(keys, AuditKeys) else None
                if isinstance(keys, AuditKeys) and (window is None or not window.signs_at(dated)):
                    raise IntegrityError(
                        f"a checkpoint dated {dated} is outside the signing window of key"
                        f" {signer.kid}",
                        reason="key_window",
                    )
                checkpoint = _signable(chain, size, tree.root, dated)
                signed = await sign_document(checkpoint, signer)
                await conn.execute(
                    "INSERT INTO audit_checkpoints (chain, size, root, frontier, signed, time)"
                    " VALUES ($1, $2, $3, $4, $5, $6)",
                    chain,
                    size,
                    tree.root,
                    tree.frontier.state(),
                    signed,
                    dated,
                )
                # Every subtree the new events complete, hashed above from their bodies (the
                # rows are never read back to sign). A row already there is overwritten: a
                # checkpoint deleted and made again, or one a proof backfilled from stored
                # leaf hashes, which this tree is the signed word on.
                await _store_nodes(conn, chain, nodes, replace=True)
                made = {"chain": chain, "size": size, "root": checkpoint.root, "signed": signed}
        # Only once committed: a tree remembered but never stored would refuse every later
        # checkpoint as a rollback.
        known = self._trusted.get(chain)
        if made is not None:
            self._signed_last.add(chain)
        elif known is None or tree.size > known.size:
            # The latest checkpoint is another replica's (or predates this process).
            self._signed_last.discard(chain)
        if known is None or tree.size >= known.size:
            self._trusted[chain] = tree
        return made

    async def verify_ahead(self, conn: Conn, chain: str, size: int, *, limit: int) -> int:
        """Check up to ``limit`` of the events a chain of ``size`` holds beyond the trusted
        tree, so that the next checkpoint of it has only the rest to check. Returns how
        many were checked.

        Checking an event (its body parsed, linked and hashed) costs 15-30 microseconds on
        a slow machine, and a checkpoint checks everything since the last one: at a thousand
        decisions a second, 10,000 events in one stretch of 160 ms or more every 10 s
        (bench/checkpoint_bench.py), which on two cores stalls every request in flight.
        Called between checkpoints, this takes the same work in slices of ``limit``.

        Only an optimisation: events are checked exactly as the checkpoint checks them,
        but outside its lock, so the result is used only if the checkpoint starts from
        the very tree it extends. A problem found here is left for the checkpoint to find
        and report. An event rewritten after it was checked here is signed as it was when
        checked, which the stored row then disagrees with, as with a row rewritten just
        after its checkpoint: the verifiers and the export see that.

        Only for a chain whose latest checkpoint this process made: with several registry
        replicas, the one whose loop comes round first signs the chain round after round,
        and the others' checks ahead would be thrown away (their next checkpoint starts
        from its tree), doubling the work instead of spreading it.
        """
        base = self._trusted.get(chain)
        if base is None or chain not in self._signed_last:
            return 0  # nothing trusted yet, or another replica signs this chain
        ahead = self._ahead.get(chain)
        if ahead is None or ahead.base is not base:
            ahead = _Ahead(base=base, tree=base, nodes=[], newest=0)
        end = min(size, ahead.tree.size + limit)
        if end <= ahead.tree.size:
            return 0
        rows = await self._events(conn, chain, ahead.tree.size, end)
        try:
            tree, nodes = _extend(ahead.tree, rows, chain=chain, size=end)
        except IntegrityError:
            self._ahead.pop(chain, None)
            return 0
        # Another caller may have moved on while this one read (a checkpoint, another
        # slice): keep this only if it still extends what it started from.
        if self._trusted.get(chain) is base and self._ahead.get(chain, ahead) is ahead:
            self._ahead[chain] = _Ahead(
                base=base,
                tree=tree,
                nodes=ahead.nodes + nodes,
                newest=_newest_second(rows[-1]["body"]),
            )
        return len(rows)

    async def _events(self, conn: Conn, chain: str, start: int, end: int) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await conn.fetch(
            "SELECT seq, body, entry_hash FROM audit_events"
            " WHERE chain = $1 AND seq >= $2 AND seq < $3 ORDER BY seq",
            chain,
            start,
            end,
        )
        return rows

    async def _base(
        self, conn: Conn, chain: str, last: asyncpg.Record | None, keys: KeySet
    ) -> ChainHead:
        """The tree the next checkpoint extends: the latest stored checkpoint's, once it is
        shown to be the registry's and to extend what this process signed or checked."""
        known = self._trusted.get(chain)
        if last is None:
            if known is not None and known.size > 0:
                raise IntegrityError(f"the checkpoint at {known.size} is gone", reason="gap")
            return ChainHead(size=0, head=GENESIS_HASH, frontier=MerkleFrontier())
        size = last["size"]
        frontier = _stored_frontier(last)
        if known is not None and size < known.size:
            raise IntegrityError(f"the checkpoint at {known.size} is gone", reason="gap")
        if known is not None and size == known.size:
            if frontier.root() != known.root:
                raise IntegrityError(f"the checkpoint at {size} was replaced", reason="root")
            return known
        # Its key's signing window too, as every verifier checks it: a retired key that
        # leaked must not get a checkpoint it signs under a later date extended (and so
        # vouched for) by the current key. Keys without windows (a plain JWKS) skip it.
        signed = AuditKeys.from_key_set(keys).verify(last["signed"])
        if signed.chain != chain or signed.size != size or signed.root_bytes() != frontier.root():
            raise IntegrityError(
                f"the checkpoint at {size} is not the one its signature covers", reason="root"
            )
        if known is None and size == 0:
            # A signed empty tree: nothing to read, and the first event links to genesis.
            return ChainHead(size=0, head=GENESIS_HASH, frontier=frontier)
        if known is None:
            # Nothing remembered yet (this process just started): the signature is all
            # there is to go on. The last leaf, which the next event must link to, is
            # checked against the frontier's smallest subtree: size & -size hashes read.
            width = size & -size
            leaves = await self._stored_leaves(conn, chain, size - width, size)
            if _root_of(leaves) != frontier.state()[-1]:
                raise IntegrityError(f"events before {size} disagree with it", reason="root")
            await _check_dated(conn, signed, leaves[-1])
            return ChainHead(size=size, head=leaves[-1], frontier=frontier)
        # Another replica signed since: its tree must be this one's plus the leaves between,
        # whose stored hashes the matching root then vouches for.
        leaves = await self._stored_leaves(conn, chain, known.size, size)
        extended = MerkleFrontier.from_state(known.size, known.frontier.state())
        for leaf in leaves:
            extended.append(leaf)
        if extended.root() != frontier.root():
            raise IntegrityError(
                f"the checkpoint at {size} does not extend the one at {known.size}",
                reason="fork",
            )
        await _check_dated(conn, signed, leaves[-1])
        return ChainHead(size=size, head=leaves[-1], frontier=extended)

    async def _stored_leaves(self, conn: Conn, chain: str, start: int, end: int) -> list[bytes]:
        rows = await conn.fetch(
            "SELECT entry_hash FROM audit_events WHERE chain = $1 AND seq >= $2 AND seq < $3"
            " ORDER BY seq",
            chain,
            start,
            end,
        )
        leaves = [bytes(r["entry_hash"]) for r in rows]
        if len(leaves) != end - start or any(len(leaf) != 32 for leaf in leaves):
            raise IntegrityError(
                f"stored hashes of events {start}..{end} are missing or malformed", reason="gap"
            )
        return leaves

    async def inclusion(self, conn: Conn, chain: str, seq: int) -> dict[str, Any] | None:
        """The event, the latest checkpoint covering it, and its inclusion proof."""
        event = await conn.fetchrow(
            "SELECT body, entry_hash FROM audit_events WHERE chain = $1 AND seq = $2", chain, seq
        )
        if event is None:
            return None
        ckpt = await conn.fetchrow(
            "SELECT size, root, frontier, signed FROM audit_checkpoints"
            " WHERE chain = $1 AND size > $2 ORDER BY size DESC LIMIT 1",
            chain,
            seq,
        )
        if ckpt is None:
            return {"event": event["body"], "checkpoint": None, "proof": None}
        proof = await self._proof(
            conn, chain, _stored_frontier(ckpt), inclusion_proof_ranges(seq, ckpt["size"])
        )
        return {
            "event": event["body"],
            "leaf_hash": b64url_encode(bytes(event["entry_hash"])),
            "index": seq,
            "tree_size": ckpt["size"],
            "checkpoint": ckpt["signed"],
            "proof": [b64url_encode(h) for h in proof],
        }

    async def consistency(self, conn: Conn, chain: str, first: int, second: int) -> list[str]:
        """The consistency proof from size ``first`` to the checkpoint at ``second``."""
        ckpt = await conn.fetchrow(
            "SELECT size, root, frontier FROM audit_checkpoints WHERE chain = $1 AND size = $2",
            chain,
            second,
        )
        if ckpt is None:
            raise NotFound(f"no checkpoint of {chain} at {second}")
        ranges = consistency_proof_ranges(first, second)
        return [
            b64url_encode(h) for h in await self._proof(conn, chain, _stored_frontier(ckpt), ranges)
        ]

    async def _proof(
        self, conn: Conn, chain: str, frontier: MerkleFrontier, ranges: list[tuple[int, int]]
    ) -> list[bytes]:
        """The hashes of ``ranges`` (a proof's, at the frontier's size), in order.

        A range that is a perfect subtree of NODE_LEVEL or more is one ``audit_nodes`` row.
        A smaller one is hashed from leaf hashes, all read in one query: they are siblings
        on the path to one leaf (the proved one, or the old tree's last), so they lie in
        that leaf's block of 2**NODE_LEVEL. One that runs to the end of the tree is the
        frontier's subtrees from its start on (RFC 6962 splits both the same way), which
        also covers the tree's last, incomplete block without reading it.
        """
        last = frontier.size & -frontier.size  # the width of the frontier's last subtree

        def edge(start: int, end: int) -> bool:
            # Runs to the end from where a subtree of the frontier begins: any width but a
            # power of two, and the frontier's last subtree itself. That one is perfect, but
            # may lie in another block than the leaf proved (at 1,024 + 8 leaves, leaf 0's
            # path ends with leaves [1024, 1032)): read from the leaves, it took every leaf
            # hash between the two, O(n) rows.
            width = end - start
            return bool(width & (width - 1)) or (end == frontier.size and width == last)

        wanted: set[Node] = set()
        small: list[tuple[int, int]] = []
        for start, end in ranges:
            width = end - start
            if not edge(start, end):
                level = width.bit_length() - 1
                if level >= NODE_LEVEL:
                    wanted.add((level, start >> level))
                else:
                    small.append((start, end))
        nodes = await self._nodes(conn, chain, wanted)
        low = min((start for start, _ in small), default=0)
        high = max((end for _, end in small), default=0)
        leaves = await self._stored_leaves(conn, chain, low, high) if small else []
        proof = []
        for start, end in ranges:
            width = end - start
            if edge(start, end):
                proof.append(frontier.root_from(start))
            elif width >> NODE_LEVEL:
                level = width.bit_length() - 1
                proof.append(nodes[level, start >> level])
            else:
                proof.append(merkle_root(leaves[start - low : end - low]))
        return proof

    async def _nodes(self, conn: Conn, chain: str, wanted: set[Node]) -> dict[Node, bytes]:
        """The stored hashes of the ``wanted`` subtrees, backfilling any that are missing."""
        if not wanted:
            return {}
        order = sorted(wanted)
        # One primary key lookup per wanted row (LATERAL), never a scan of the chain's rows.
        rows = await conn.fetch(
            "SELECT w.level, w.idx, n.hash FROM unnest($2::smallint[], $3::bigint[])"
            " AS w (level, idx) CROSS JOIN LATERAL (SELECT hash FROM audit_nodes"
            " WHERE chain = $1 AND level = w.level AND idx = w.idx) AS n",
            chain,
            [level for level, _ in order],
            [idx for _, idx in order],
        )
        found = {(r["level"], r["idx"]): bytes(r["hash"]) for r in rows}
        for level, idx in order:
            if (level, idx) not in found:
                found.update(await self._backfill(conn, chain, level, idx))
        return found

    async def _backfill(self, conn: Conn, chain: str, level: int, idx: int) -> dict[Node, bytes]:
        """Subtree ``(level, idx)`` and the stored-size subtrees inside it, hashed from the
        stored leaf hashes and stored.

        Rows are missing for chains checkpointed before ``audit_nodes`` existed (or rows
        deleted since). Backfilled rather than read from the leaves on every request, which
        would leave old chains O(n) a proof for good: the first proof that needs a subtree
        reads its leaves once. No lock is needed: a row's value follows from the stored
        leaves, and DO NOTHING never replaces one (the checkpointer's, from event bodies,
        wins). Like every row it is only a cache: proofs made from it are checked against
        the signed checkpoint.
        """
        first = idx << level
        leaves = await self._stored_leaves(conn, chain, first, first + (1 << level))
        tree = MerkleFrontier()
        made: list[tuple[Node, bytes]] = []
        for leaf in leaves:
            # first is a multiple of every subtree width inside, so a subtree completed
            # here ends where the global tree does.
            made += _completed_nodes(tree.append(leaf), first + tree.size)
        await _store_nodes(conn, chain, made, replace=False)
        return dict(made)


def _stored_frontier(row: asyncpg.Record) -> MerkleFrontier:
    """A checkpoint row's frontier, which must have the row's root."""
    try:
        frontier = MerkleFrontier.from_state(row["size"], [bytes(h) for h in row["frontier"]])
    except (InvalidRequest, TypeError):  # TypeError: a NULL element, which bytea[] allows
        raise IntegrityError(
            f"the stored frontier at {row['size']} is malformed", reason="malformed"
        ) from None
    if frontier.root() != bytes(row["root"]):
        raise IntegrityError(
            f"the stored frontier at {row['size']} disagrees with its root", reason="root"
        )
    return frontier


def _signed_time(row: asyncpg.Record, chain: str, tree: ChainHead, keys: KeySet) -> int:
    """The signed date of the stored checkpoint ``tree`` extends (the latest, ``row``)."""
    signed = AuditKeys.from_key_set(keys).verify(row["signed"])
    if signed.chain != chain or signed.size != tree.size or signed.root_bytes() != tree.root:
        raise IntegrityError(
            f"the checkpoint at {tree.size} is not the one its signature covers", reason="root"
        )
    return signed.time


def _signable(chain: str, size: int, root: bytes, dated: int) -> Checkpoint:
    """The checkpoint to sign, or ``IntegrityError`` if stored rows made it one no JWS can
    carry: a chain name that is no ``Identifier``, or a date past 2**53 (from an event's
    ``time_ms``, which only the verifiers judge). Raised as anything else, it would end the
    round for every chain after this one, not just this chain (``checkpoint_all`` goes on
    past integrity errors only)."""
    try:
        checkpoint = Checkpoint(chain=chain, size=size, root=b64url_encode(root), time=dated)
        canonical_json(checkpoint.model_dump(mode="json"))  # what signing encodes
    except ValueError:  # pydantic's ValidationError is one too
        raise IntegrityError(
            f"a checkpoint of {chain} at {size} dated {dated} cannot be signed",
            reason="malformed",
        ) from None
    return checkpoint


def _root_of(leaves: Sequence[bytes]) -> bytes:
    tree = MerkleFrontier()
    for leaf in leaves:
        tree.append(leaf)
    return tree.root()


def _extend(
    base: ChainHead, rows: Sequence[asyncpg.Record], *, chain: str, size: int
) -> tuple[ChainHead, list[tuple[Node, bytes]]]:
    """``base`` plus the events of ``rows``, each hashed from its stored body (never its
    stored hash) and linked to the one before; they must reach ``size``. With it, the
    subtrees of NODE_LEVEL and up that the new events complete, for ``audit_nodes``."""
    frontier = MerkleFrontier.from_state(base.size, base.frontier.state())
    head, seq = base.head, base.size
    nodes: list[tuple[Node, bytes]] = []
    for row in rows:
        if row["seq"] != seq:
            raise IntegrityError(f"event {seq} is missing", reason="gap")
        body = row["body"].encode("utf-8")
        if not _links(body, chain=chain, seq=seq, prev=head):
            raise IntegrityError(f"event {seq} does not link to its parent", reason="fork")
        entry = leaf_hash(body)
        if bytes(row["entry_hash"]) != entry:
            raise IntegrityError(f"event {seq}'s stored hash is not its body's", reason="hash")
        completed = frontier.append(entry)
        head = entry
        seq += 1
        nodes += _completed_nodes(completed, seq)
    if seq != size:
        raise IntegrityError(f"events {seq}..{size} are missing", reason="gap")
    return ChainHead(size=size, head=head, frontier=frontier), nodes


def _completed_nodes(completed: Sequence[bytes], size: int) -> list[tuple[Node, bytes]]:
    """The ``audit_nodes`` rows for the subtrees one leaf completed (``MerkleFrontier.append``
    gives their hashes by level), the tree then holding ``size`` leaves: each ends there."""
    return [
        ((level, (size >> level) - 1), completed[level])
        for level in range(NODE_LEVEL, len(completed))
    ]


async def _store_nodes(
    conn: Conn, chain: str, nodes: Sequence[tuple[Node, bytes]], *, replace: bool
) -> None:
    """Write subtree hashes; ``replace`` overwrites rows already there (the checkpointer,
    hashing from event bodies, is the signed word on them), else they are kept."""
    conflict = "DO UPDATE SET hash = EXCLUDED.hash" if replace else "DO NOTHING"
    await conn.execute(
        # Only one of the two constant clauses above is joined in.
        "INSERT INTO audit_nodes (chain, level, idx, hash)"  # noqa: S608
        " SELECT $1, * FROM unnest($2::smallint[], $3::bigint[], $4::bytea[])"
        f" ON CONFLICT (chain, level, idx) {conflict}",
        chain,
        [level for (level, _), _ in nodes],
        [idx for (_, idx), _ in nodes],
        [node for _, node in nodes],
    )


async def _check_dated(conn: Conn, signed: Checkpoint, last_leaf: bytes) -> None:
    """Check, as every verifier does (``check_checkpoint_dated``), that a stored checkpoint
    is dated no earlier than the last event it covers, whose leaf hash ``last_leaf`` its
    signed root vouches for. A retired key that leaked signs only inside its old window, so
    over newer events its checkpoint is backdated: extended here, the current key would
    vouch for what it sealed, and a verifier that checks only the latest checkpoint (the
    approval page) would see nothing wrong."""
    seq = signed.size - 1
    body = await conn.fetchval(
        "SELECT body FROM audit_events WHERE chain = $1 AND seq = $2", signed.chain, seq
    )
    if body is None or leaf_hash(body.encode("utf-8")) != last_leaf:
        raise IntegrityError(f"event {seq}'s body is not the one checkpointed", reason="hash")
    try:
        time_ms = strict_json_loads(body.encode("utf-8")).get("time_ms")
    except (InvalidRequest, AttributeError):
        time_ms = None
    if type(time_ms) is not int:
        raise IntegrityError(f"event {seq} has no time", reason="malformed")
    check_checkpoint_dated(signed, newest_event_ms=time_ms)


def _newest_second(body: str) -> int:
    """The second an event's ``time_ms`` falls in, rounded up (0 if it has none: the event
    itself was checked to link, and its time is the verifiers' to judge)."""
    time_ms = strict_json_loads(body.encode("utf-8")).get("time_ms")
    return -(-time_ms // 1000) if type(time_ms) is int and time_ms >= 0 else 0


def _links(body: bytes, *, chain: str, seq: int, prev: bytes) -> bool:
    """Whether a stored event names this chain, this seq and ``prev`` as its parent.

    Only what the tree's shape depends on is read: 8 us an event (measured on a 379-byte
    verifier decision) against 35 for full validation and re-encoding
    (``AuditEvent.from_canonical``), which at 10,000 audit events a second would take a
    third of a core on the registry's event loop. A body malformed otherwise is still
    refused by every verifier and by the export, signed or not, so signing it hides
    nothing. The strict parser matters: with duplicate members two readers could see two
    parents.
    """
    try:
        document = strict_json_loads(body)
        if not isinstance(document, dict):
            return False
        parent = document.get("prev")
        return (
            document.get("chain") == chain
            and type(document.get("seq")) is int
            and document["seq"] == seq
            and isinstance(parent, str)
            and b64url_decode(parent) == prev
        )
    except InvalidRequest:
        return False


async def sign_document(checkpoint: Checkpoint, signer: AsyncSigner) -> str:
    """Sign a checkpoint as a JWS with one of the registry's (async) key backends."""
    header = {"alg": signer.alg, "kid": signer.kid, "typ": CHECKPOINT_TYP}
    data = signing_input(header, checkpoint.model_dump(mode="json"))
    return attach_signature(data, await signer.sign(data))
