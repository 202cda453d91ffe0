"""Offline verification of an archive: the store and (optionally) pinned keys, no database."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from .._witness import Seen, compare, vanished
from ..protocol import (
    EMPTY_ROOT,
    IntegrityError,
    InvalidRequest,
    KeySet,
    b64url_decode,
    b64url_encode,
)
from ._errors import ArchiveIntegrityError, ArchiveProblem
from ._segments import (
    KEYS_DIR,
    Manifest,
    check_continuity,
    decode_key,
    events_key,
    manifest_key,
    parse_key,
    verify_segment,
)
from ._stores import ArchiveStore

__all__ = ["ArchiveReport", "ChainSummary", "load_keys", "verify_archive"]


@dataclass(frozen=True, slots=True)
class ChainSummary:
    """How far one chain's archive reaches: compare ``size``/``root`` with the registry's
    latest checkpoints to see that nothing was cut off the end."""

    chain: str
    segments: int
    size: int
    root: str
    checkpoint: str | None


@dataclass(frozen=True, slots=True)
class ArchiveReport:
    chains: tuple[ChainSummary, ...]
    #: Events objects past a chain's last manifest: an export was interrupted there and the
    #: next one rewrites them. Not part of the archive yet, and not a failure.
    incomplete: tuple[str, ...]
    #: True when the keys came from the caller, False when from the archive's own ``keys/``.
    keys_pinned: bool
    #: Events objects without a manifest strictly inside a sealed segment: an interrupted
    #: export wrote them, and a later one, cutting with a larger ``min_events``, sealed a
    #: segment over them. Not part of the archive, never rewritten, and not a failure.
    superseded: tuple[str, ...] = ()

    @property
    def events(self) -> int:
        return sum(c.size for c in self.chains)

    def seen(self) -> dict[str, Seen]:
        """Each archived chain's verified size and root, for the witness file. A chain with
        no segment yet (only an interrupted export's events) is not archived: left out."""
        return {c.chain: Seen(c.size, b64url_decode(c.root)) for c in self.chains if c.segments}


def load_keys(store: ArchiveStore) -> KeySet:
    """The public keys stored in the archive (``keys/<kid>.jwk.json``)."""
    keys = []
    for key in store.list(f"{KEYS_DIR}/"):
        raw = store.get(key) if key.endswith(".jwk.json") else None
        if raw is not None:
            kid = key.removeprefix(f"{KEYS_DIR}/").removesuffix(".jwk.json")
            keys.append(decode_key(raw, kid=kid))
    if not keys:
        raise IntegrityError("the archive holds no keys", reason="no_keys")
    return KeySet(keys)


def verify_archive(
    store: ArchiveStore,
    *,
    keys: KeySet | None = None,
    witness: Mapping[str, Seen] | None = None,
    now: float | None = None,
) -> ArchiveReport:
    """Check every chain of the archive, segment by segment, from genesis.

    Each segment must match its digest and both of its signed checkpoints (signatures by
    ``keys``; default: the keys stored in the archive, which only proves the archive is
    self-consistent: pin the registry's JWKS to prove it is the registry's), and pick up
    exactly where the previous one ended; no checkpoint may be dated after ``now`` (default:
    this machine's clock) by more than ``CHECKPOINT_SKEW``. Returns a report, or raises
    ``ArchiveIntegrityError`` listing every problem, each naming its chain and segment.
    An archive with no segments raises: an empty answer never passes. ``witness`` is what
    earlier clean runs saw (``ArchiveReport.seen``): a segment must still end at each
    remembered size, with the remembered root, and no chain may have shrunk or vanished.
    """
    pinned = keys is not None
    now = time.time() if now is None else now
    if keys is None:
        try:
            keys = load_keys(store)
        except IntegrityError as exc:
            problem = ArchiveProblem(None, None, None, exc.reason or "malformed", exc.description)
            raise ArchiveIntegrityError([problem]) from None

    objects: dict[str, dict[int, set[str]]] = defaultdict(lambda: defaultdict(set))
    for key in store.list():
        parsed = parse_key(key)
        if parsed is not None:
            chain, size, kind = parsed
            objects[chain][size].add(kind)
    if not any("manifest" in kinds for sizes in objects.values() for kinds in sizes.values()):
        empty = ArchiveProblem(None, None, None, "empty", "the archive holds no segments")
        raise ArchiveIntegrityError([empty])

    problems: list[ArchiveProblem] = []
    summaries: list[ChainSummary] = []
    incomplete: list[str] = []
    superseded: list[str] = []
    witness = witness or {}
    for chain in sorted(objects):
        summary, orphans, leftovers = _verify_chain(
            store, chain, objects[chain], keys, problems, now=now, seen=witness.get(chain)
        )
        summaries.append(summary)
        incomplete.extend(orphans)
        superseded.extend(leftovers)
    problems += (
        ArchiveProblem(chain, None, None, "witness", text)
        for chain, text in vanished(witness, set(objects)).items()
    )
    report = ArchiveReport(
        chains=tuple(summaries),
        incomplete=tuple(incomplete),
        keys_pinned=pinned,
        superseded=tuple(superseded),
    )
    if problems:
        raise ArchiveIntegrityError(problems, report=report)
    return report


def _verify_chain(
    store: ArchiveStore,
    chain: str,
    sizes: dict[int, set[str]],
    keys: KeySet,
    problems: list[ArchiveProblem],
    *,
    now: float,
    seen: Seen | None = None,
) -> tuple[ChainSummary, list[str], list[str]]:
    sealed = [size for size in sorted(sizes) if "manifest" in sizes[size]]
    tip = sealed[-1] if sealed else 0
    orphans: list[str] = []
    unsealed: list[int] = []  # inside the sealed part: judged once the manifests are read
    for size in sorted(sizes):
        if "manifest" not in sizes[size]:
            if size > tip:
                orphans.append(events_key(chain, size))
            else:
                unsealed.append(size)

    spans: list[tuple[int, int]] = []
    previous: Manifest | None = None
    root, head_size, segments = EMPTY_ROOT, 0, 0
    # Segments are written once and never re-cut, so a remembered size stays a boundary.
    roots = {0: EMPTY_ROOT}  # the verified root at each segment's end
    for size in sealed:
        try:
            raw = store.get(manifest_key(chain, size))
            if raw is None:
                raise IntegrityError("manifest vanished during verification", reason="gap")
            manifest = Manifest.decode(raw)
        except IntegrityError as exc:
            problems.append(_problem(chain, None, size, exc))
            continue  # continuity is then checked against the last readable manifest
        if manifest.chain != chain or manifest.to_size != size:
            problems.append(
                ArchiveProblem(
                    chain, None, size, "misplaced", "manifest is stored under another name"
                )
            )
            continue
        spans.append((manifest.from_size, manifest.to_size))
        try:
            check_continuity(previous, manifest)
        except IntegrityError as exc:
            problems.append(_problem(chain, manifest.from_size, size, exc))
        # Every manifest carries its own starting state, so each segment is still checked
        # on its own after a gap.
        try:
            events = store.get(events_key(chain, size))
            if events is None:
                raise IntegrityError("events object is missing", reason="gap")
            head = verify_segment(manifest, events, keys=keys, now=now)
        except (IntegrityError, InvalidRequest) as exc:
            # Bytes the protocol refuses in any way are this segment's problem, so the other
            # segments and chains are still checked and listed (a store outage, which is
            # not about the bytes, still ends the run).
            problems.append(_problem(chain, manifest.from_size, size, exc))
        else:
            root, head_size = head.root, head.size
            roots[head.size] = head.root
        segments += 1
        previous = manifest
    wrong = compare(seen, size=head_size, root=roots.get(seen.size) if seen else None)
    if wrong:
        problems.append(ArchiveProblem(chain, None, None, "witness", wrong))
    # A segment's end with no manifest is a segment missing (the next one's start shows the
    # gap too). An end strictly inside a sealed segment was never a boundary of this
    # archive: a run that cut with a smaller min_events died before sealing it there.
    leftovers: list[str] = []
    for size in unsealed:
        if any(start < size < end for start, end in spans):
            leftovers.append(events_key(chain, size))
        else:
            problems.append(
                ArchiveProblem(chain, None, size, "gap", "events object without a manifest")
            )
    summary = ChainSummary(
        chain=chain,
        segments=segments,
        size=head_size,
        root=b64url_encode(root),
        checkpoint=previous.checkpoint if previous else None,
    )
    return summary, orphans, leftovers


def _problem(
    chain: str, from_size: int | None, to_size: int, exc: IntegrityError | InvalidRequest
) -> ArchiveProblem:
    return ArchiveProblem(chain, from_size, to_size, exc.reason or "integrity", exc.description)
