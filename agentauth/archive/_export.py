"""Export sealed audit segments from PostgreSQL into an archive store, resumably.

Per chain: find the archive's last manifest, check that the database signed the same
checkpoint at that size, then for every later checkpoint boundary read the events, check
them exactly as ``verify_archive`` will (chain links, signed roots at both ends, continuity
with the previous segment), and write the events object, then its manifest. The manifest
is the commit point: a run that dies leaves at most one events object without a manifest,
which the next run rewrites with the same bytes under the same key.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

from pydantic import ValidationError

from ..protocol import (
    GENESIS_HASH,
    AuditEvent,
    AuditKey,
    AuditKeys,
    ChainHead,
    IntegrityError,
    InvalidRequest,
    MerkleFrontier,
    PublicKey,
    b64url_decode,
    b64url_encode,
    canonical_json,
    strict_json_loads,
    verify_chain,
)
from ._errors import ArchiveIntegrityError, ArchiveProblem
from ._segments import (
    AUDIT_KEYS,
    KEYS_DIR,
    Manifest,
    check_continuity,
    decode_key,
    encode_events,
    encode_key,
    events_key,
    key_key,
    manifest_key,
    parse_key,
    verify_segment,
)
from ._stores import ArchiveStore

if TYPE_CHECKING:
    from ..store import Conn

__all__ = ["ExportReport", "SegmentInfo", "chain_names", "database_audit_keys", "export"]

log = logging.getLogger("agentauth.archive")

#: Events fetched per query: bounds one round trip's memory, not the segment's.
_BATCH = 5000


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    chain: str
    from_size: int
    to_size: int


@dataclass(frozen=True, slots=True)
class ExportReport:
    #: Segments written by this run, in the order written.
    exported: tuple[SegmentInfo, ...]
    #: Per chain, the size the archive now reaches.
    tips: Mapping[str, int] = field(default_factory=dict)
    #: Per chain, events in the database past that size: not sealed yet (no checkpoint, or
    #: fewer than ``min_events`` since the tip), archived by a later run.
    unsealed: Mapping[str, int] = field(default_factory=dict)


async def export(
    database_url: str,
    store: ArchiveStore,
    *,
    chains: Collection[str] | None = None,
    min_events: int = 1,
) -> ExportReport:
    """Archive every sealed segment not archived yet, for every chain (or ``chains``).

    A segment ends at the first signed checkpoint at least ``min_events`` events past the
    previous boundary; with the default every checkpoint is a boundary. Boundaries depend
    only on the checkpoints and on where the archive ends, so every run, interrupted or not,
    cuts the same segments and writes the same bytes.

    Safe to run again at any time and from several processes at once (they write identical
    objects). Raises ``ArchiveIntegrityError`` after every chain was tried if any failed a
    check (its ``report`` says what was exported), and ``ArchiveUnavailable`` if the store
    fails.
    """
    if min_events < 1:
        raise ValueError("min_events must be at least 1")
    import asyncpg  # noqa: PLC0415 - offline verification must not need the driver

    from ..store import STORED_CHAINS  # noqa: PLC0415 - nor the store (it imports the driver)

    conn = await asyncpg.connect(database_url)
    try:
        publisher = _KeyPublisher(store)
        stored = {r["chain"]: r["headless"] for r in await conn.fetch(STORED_CHAINS)}
        names = set(stored)
        wanted = sorted(names if chains is None else set(chains) & names)
        problems: list[ArchiveProblem] = [
            ArchiveProblem(name, None, None, "unknown_chain", "no such chain in the database")
            for name in sorted(set(chains or ()) - names)
        ]
        exported: list[SegmentInfo] = []
        tips: dict[str, int] = {}
        for chain in wanted:
            tips[chain] = await _export_chain(
                conn,
                store,
                chain,
                publisher=publisher,
                min_events=min_events,
                problems=problems,
                exported=exported,
            )
        # Read after the checkpoints were: a chain only grows, so no count is negative.
        heads = {
            r["chain"]: r["size"] for r in await conn.fetch("SELECT chain, size FROM audit_heads")
        }
    finally:
        await conn.close()
    # A chain whose head row is gone (an insider deleting it to hide the chain) still has
    # its sealed segments archived above, and the run fails naming it: no head, no count of
    # what is unsealed.
    problems += [
        ArchiveProblem(
            chain,
            None,
            None,
            "no_head",
            "events, checkpoints or tree nodes are stored for it, but audit_heads holds no row",
        )
        for chain in wanted
        if stored[chain] or chain not in heads
    ]
    report = ExportReport(
        exported=tuple(exported),
        tips=tips,
        unsealed={chain: heads[chain] - tip for chain, tip in tips.items() if chain in heads},
    )
    if problems:
        raise ArchiveIntegrityError(problems, report=report)
    return report


async def database_audit_keys(conn: Conn) -> AuditKeys:
    """Every key in ``signing_keys`` with its signing window: the registry's audit key list,
    as the database holds it (so only as trustworthy as the database)."""
    keys = []
    for row in await conn.fetch(
        "SELECT kid, alg, public_jwk, activates_at, retires_at FROM signing_keys"
    ):
        jwk = row["public_jwk"]
        try:
            jwk = json.loads(jwk) if isinstance(jwk, str) else jwk
        except ValueError:
            jwk = None
        if not isinstance(jwk, dict):
            # jsonb holds any JSON: a row that is no key object is the database's fault, said
            # as such (the CLI prints it), not a TypeError's traceback.
            raise IntegrityError(
                f"signing key {row['kid']}: its public_jwk is not a JSON object",
                reason="malformed",
            )
        key = PublicKey.from_jwk({**jwk, "kid": row["kid"]}, alg=row["alg"])
        keys.append(AuditKey(key, row["activates_at"], row["retires_at"]))
    return AuditKeys(keys)


class _KeyPublisher:
    """Stores each public key once, before any checkpoint it signs; refuses a kid clash.

    Also keeps the archive's copy of the audit key list (``keys/audit-keys.json``) current.
    It is rewritten only with a list that extends it (new keys, a retirement set), and a
    database whose list does not extend it and is not an earlier state of it is refused.
    """

    def __init__(self, store: ArchiveStore) -> None:
        self._store = store
        self._published: set[str] | None = None
        self._listed: AuditKeys | None = None
        self._written: AuditKeys | None = None

    async def sync(self, conn: Conn) -> AuditKeys:
        """The database's keys with their windows, checked against the archive's; nothing
        is written (``publish`` does that, once a chain has something to commit).

        Called after a chain's checkpoints are read: a key's row exists before anything is
        signed with it, so every checkpoint read so far is signed by a key read here.
        """
        keys = await database_audit_keys(conn)
        await asyncio.to_thread(self._check_archive, keys)
        return keys

    async def publish(self, keys: AuditKeys) -> None:
        """Store what the archive lacks of ``keys``; the same list again writes nothing."""
        if keys is not self._written:
            await asyncio.to_thread(self._publish, keys)
            self._written = keys

    def _check_archive(self, keys: AuditKeys) -> set[str]:
        """Refuse ``keys`` if the archive's disagree; returns the key objects it holds."""
        if self._published is None:  # first sync: check what the archive already holds
            self._published = set(self._store.list(f"{KEYS_DIR}/"))
            for kid, key in keys.items():
                if key_key(kid) in self._published:
                    self._check(kid, key)
            self._listed = self._archived_list()
        listed = self._listed
        if listed is not None and not keys.extends(listed) and not listed.extends(keys):
            self._conflict(
                "the archive's audit key list is not an earlier state of the database's:"
                " a key or a signing window in signing_keys was changed"
            )
        return self._published

    def _publish(self, keys: AuditKeys) -> None:
        # Checked here too, so nothing unchecked is written whatever the callers do; after
        # the first sync it costs no store read.
        published = self._check_archive(keys)
        for kid, key in keys.items():
            name = key_key(kid)
            if name not in published:
                self._store.put(name, encode_key(key))
                published.add(name)
        listed = self._listed
        document = keys.to_document()
        # An exporter that read the database before a rotation finds a list that extends
        # its own, and leaves it alone.
        if listed is None or (keys.extends(listed) and document != listed.to_document()):
            self._store.put(AUDIT_KEYS, canonical_json(document))
            self._listed = keys

    def _archived_list(self) -> AuditKeys | None:
        raw = self._store.get(AUDIT_KEYS)
        if raw is None:
            return None
        try:
            return AuditKeys.from_document(strict_json_loads(raw))
        except InvalidRequest:
            self._conflict(f"the archive's {AUDIT_KEYS} is malformed")

    def _check(self, kid: str, key: PublicKey) -> None:
        try:
            archived = decode_key(self._store.get(key_key(kid)) or b"", kid=kid)
        except IntegrityError:
            archived = None
        if archived is None or archived.thumbprint != key.thumbprint:
            self._conflict(
                f"the archive's key {kid} is not the database's: another registry's archive?"
            )

    @staticmethod
    def _conflict(description: str) -> NoReturn:
        raise ArchiveIntegrityError([ArchiveProblem(None, None, None, "key_conflict", description)])


def _boundaries(start: int, sizes: list[int], min_events: int) -> Iterator[tuple[int, int]]:
    """``[from, to)`` of each sealed segment after ``start``, greedily, in order."""
    for size in sizes:
        if size - start >= min_events:
            yield start, size
            start = size


async def _export_chain(
    conn: Conn,
    store: ArchiveStore,
    chain: str,
    *,
    publisher: _KeyPublisher,
    min_events: int,
    problems: list[ArchiveProblem],
    exported: list[SegmentInfo],
) -> int:
    """Export one chain's sealed segments; returns the size its archive reaches."""
    segment: tuple[int | None, int | None] = (None, None)
    previous: Manifest | None = None
    try:
        listing = await asyncio.to_thread(store.list, f"{chain}/")
        sealed = [
            parsed[1]
            for parsed in map(parse_key, listing)
            if parsed and parsed[0] == chain and parsed[2] == "manifest"
        ]
        if sealed:
            tip = max(sealed)
            segment = (None, tip)
            raw = await asyncio.to_thread(store.get, manifest_key(chain, tip))
            previous = Manifest.decode(raw or b"")
            if previous.chain != chain or previous.to_size != tip:
                raise IntegrityError("manifest is stored under another name", reason="misplaced")
        start = previous.to_size if previous else 0
        checkpoints = {
            r["size"]: r["signed"]
            for r in await conn.fetch(
                "SELECT size, signed FROM audit_checkpoints WHERE chain = $1 AND size >= $2"
                " ORDER BY size",
                chain,
                start,
            )
        }
        keys = await publisher.sync(conn)
        if previous is not None and checkpoints.get(start) != previous.checkpoint:
            raise IntegrityError(
                "the archive's last segment is not sealed by this database's checkpoint",
                reason="foreign",
            )
        # Keys are published only once the chain is not refused: with its first segment
        # that passed every check, or at the end when it had nothing new. A chain refused
        # before that (foreign, a bad first segment) leaves the archive as it found it.
        for from_size, to_size in _boundaries(start, sorted(checkpoints), min_events):
            segment = (from_size, to_size)
            bodies = await _bodies(conn, chain, from_size, to_size)
            blob = encode_events(bodies)
            manifest = _seal(
                chain,
                previous,
                bodies,
                blob,
                checkpoint=checkpoints[to_size],
                prev_checkpoint=checkpoints[from_size] if from_size else None,
            )
            # The same checks offline verification makes, before anything is written.
            check_continuity(previous, manifest)
            verify_segment(manifest, blob, keys=keys, now=time.time())
            await publisher.publish(keys)
            await asyncio.to_thread(store.put, events_key(chain, to_size), blob)
            await asyncio.to_thread(store.put, manifest_key(chain, to_size), manifest.encode())
            exported.append(SegmentInfo(chain, from_size, to_size))
            log.info("archived %s %d..%d", chain, from_size, to_size)
            previous = manifest
        await publisher.publish(keys)
    except ArchiveIntegrityError:
        raise  # about the whole archive (its keys), not this chain: stop
    except (IntegrityError, InvalidRequest, ValidationError) as exc:
        reason = getattr(exc, "reason", None) or "malformed"
        description = getattr(exc, "description", None) or "malformed audit data"
        problems.append(ArchiveProblem(chain, segment[0], segment[1], reason, description))
    return previous.to_size if previous else 0


async def _bodies(conn: Conn, chain: str, from_size: int, to_size: int) -> list[bytes]:
    bodies: list[bytes] = []
    seq = from_size
    while seq < to_size:
        rows = await conn.fetch(
            "SELECT seq, body FROM audit_events WHERE chain = $1 AND seq >= $2 AND seq < $3"
            " ORDER BY seq LIMIT $4",
            chain,
            seq,
            to_size,
            _BATCH,
        )
        if not rows:
            raise IntegrityError(f"event {seq} is missing from the database", reason="gap")
        for row in rows:
            if row["seq"] != seq:
                raise IntegrityError(f"event {seq} is missing from the database", reason="gap")
            bodies.append(row["body"].encode("utf-8"))
            seq += 1
    return bodies


def _seal(
    chain: str,
    previous: Manifest | None,
    bodies: list[bytes],
    blob: bytes,
    *,
    checkpoint: str,
    prev_checkpoint: str | None,
) -> Manifest:
    """The manifest of the segment after ``previous`` holding ``bodies``."""
    start = (
        ChainHead(
            size=previous.to_size,
            head=b64url_decode(previous.last_hash),
            frontier=MerkleFrontier.from_state(
                previous.to_size, [b64url_decode(h) for h in previous.to_frontier]
            ),
        )
        if previous
        else ChainHead(size=0, head=GENESIS_HASH, frontier=MerkleFrontier())
    )
    head = verify_chain(
        (AuditEvent.from_canonical(body) for body in bodies), chain=chain, start=start
    )
    return Manifest(
        chain=chain,
        from_size=start.size,
        to_size=head.size,
        events_sha256=b64url_encode(hashlib.sha256(blob).digest()),
        first_prev=b64url_encode(start.head),
        last_hash=b64url_encode(head.head),
        from_frontier=tuple(b64url_encode(h) for h in start.frontier.state()),
        to_frontier=tuple(b64url_encode(h) for h in head.frontier.state()),
        checkpoint=checkpoint,
        prev_checkpoint=prev_checkpoint,
    )


async def chain_names(database_url: str) -> list[str]:
    """Every audit chain in the database, sorted: those with a head row and those without
    (whose export then fails, naming them)."""
    import asyncpg  # noqa: PLC0415

    from ..store import STORED_CHAINS  # noqa: PLC0415

    conn = await asyncpg.connect(database_url)
    try:
        return [r["chain"] for r in await conn.fetch(STORED_CHAINS)]
    finally:
        await conn.close()
