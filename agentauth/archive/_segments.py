"""Archive layout and segments, pure: encodings, the manifest, and the checks on one segment.

A segment is the run of one chain's events between two consecutive archived checkpoints,
``[from_size, to_size)``. Its manifest carries everything needed to check it alone: the
signed checkpoints at both ends, the Merkle frontier at ``from_size`` (trusted only because
its root equals the signed root at ``from_size``), the hash the first event must link to,
and the digest of the events object. Nothing here does I/O or reads the clock.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ..protocol import (
    GENESIS_HASH,
    AuditEvent,
    AuditKeys,
    ChainHead,
    Checkpoint,
    IntegrityError,
    InvalidRequest,
    KeySet,
    MerkleFrontier,
    PublicKey,
    b64url_decode,
    b64url_encode,
    canonical_json,
    check_checkpoint_dated,
    strict_json_loads,
    verify_chain,
)
from ..protocol._types import Identifier

__all__ = [
    "ARCHIVE_FORMAT",
    "AUDIT_KEYS",
    "KEYS_DIR",
    "Manifest",
    "check_continuity",
    "decode_events",
    "decode_key",
    "encode_events",
    "encode_key",
    "events_key",
    "key_key",
    "manifest_key",
    "parse_key",
    "verify_segment",
]

ARCHIVE_FORMAT = "agentauth.archive.v1"
#: Public keys live one object per kid: written once, never rewritten, so concurrent
#: exporters (one Ray task per chain) never race on a read-modify-write of a shared JWKS.
KEYS_DIR = "keys"
#: A copy of the registry's audit key list (every kid with its signing window). It is the
#: one key object that is rewritten, and only ever with a list that extends it.
AUDIT_KEYS = f"{KEYS_DIR}/audit-keys.json"
_B64_SHA256 = r"^[A-Za-z0-9_-]{43}$"
# Twelve digits sort as text up to a trillion events per chain; parsing accepts more.
_SEGMENT_NAME = re.compile(r"^(?P<size>[0-9]{12,19})\.(?P<kind>jsonl|manifest\.json)$")
# One path component of a key: an audit Identifier that cannot climb out of its directory
# or hide from a listing (temporary files in a DirectoryStore start with a dot).
_COMPONENT = re.compile(r"^[A-Za-z0-9_:@-][A-Za-z0-9._:@-]{0,127}$")


def _canonical_b64(value: str) -> str:
    try:
        b64url_decode(value)  # refuses spare bits set: one hash, one spelling
    except InvalidRequest:
        raise ValueError("not canonical base64url") from None
    return value


B64Hash = Annotated[str, Field(pattern=_B64_SHA256), AfterValidator(_canonical_b64)]


def _component(value: str, what: str) -> str:
    if not _COMPONENT.fullmatch(value):
        raise InvalidRequest(f"{what} {value!r} cannot name an archive object")
    return value


def events_key(chain: str, to_size: int) -> str:
    return f"{_component(chain, 'chain')}/{to_size:012d}.jsonl"


def manifest_key(chain: str, to_size: int) -> str:
    return f"{_component(chain, 'chain')}/{to_size:012d}.manifest.json"


def key_key(kid: str) -> str:
    return f"{KEYS_DIR}/{_component(kid, 'kid')}.jwk.json"


def parse_key(key: str) -> tuple[str, int, Literal["events", "manifest"]] | None:
    """``(chain, to_size, kind)`` for a segment object's key; ``None`` for any other key."""
    chain, _, name = key.partition("/")
    match = _SEGMENT_NAME.fullmatch(name)
    if chain == KEYS_DIR or not match or not _COMPONENT.fullmatch(chain):
        return None
    kind: Literal["events", "manifest"] = "events" if match["kind"] == "jsonl" else "manifest"
    return chain, int(match["size"]), kind


# --- objects -------------------------------------------------------------------------------


class Manifest(BaseModel):
    """The sidecar that seals one segment; written after its events, so it marks completion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["agentauth.archive.v1"] = "agentauth.archive.v1"
    chain: Identifier
    from_size: int = Field(ge=0)
    to_size: int = Field(gt=0)
    events_sha256: B64Hash = Field(description="SHA-256 of the events object's bytes")
    first_prev: B64Hash = Field(description="entry hash of event from_size - 1 (genesis: zeros)")
    last_hash: B64Hash = Field(description="entry hash of event to_size - 1")
    from_frontier: tuple[B64Hash, ...] = Field(description="Merkle frontier at from_size")
    to_frontier: tuple[B64Hash, ...] = Field(description="Merkle frontier at to_size")
    checkpoint: str = Field(max_length=4096, description="signed checkpoint at to_size")
    prev_checkpoint: str | None = Field(
        max_length=4096, description="signed checkpoint at from_size; null from genesis"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.from_size >= self.to_size:
            raise ValueError("a segment holds at least one event")
        if len(self.from_frontier) != self.from_size.bit_count():
            raise ValueError("from_frontier does not match from_size")
        if len(self.to_frontier) != self.to_size.bit_count():
            raise ValueError("to_frontier does not match to_size")
        if (self.prev_checkpoint is None) != (self.from_size == 0):
            raise ValueError("prev_checkpoint is null exactly when the segment starts the chain")
        return self

    def encode(self) -> bytes:
        """The manifest's one encoding (RFC 8785), so a re-export writes the same bytes."""
        return canonical_json(self.model_dump(mode="json"))

    @classmethod
    def decode(cls, raw: bytes) -> Manifest:
        try:
            manifest = cls.model_validate(strict_json_loads(raw))
            # Inside the try: a valid model can still have no canonical form (a size past
            # 2**53), and bytes that cannot be a manifest are this segment's problem, not a
            # ValueError that ends the whole verification or export.
            encoded = manifest.encode()
        except (InvalidRequest, ValueError):  # pydantic's ValidationError is a ValueError
            raise IntegrityError("malformed manifest", reason="malformed") from None
        if encoded != raw:
            raise IntegrityError("manifest is not in canonical form", reason="malformed")
        return manifest

    def start(self) -> ChainHead:
        """The chain state this segment continues from, as the manifest claims it."""
        return ChainHead(
            size=self.from_size,
            head=b64url_decode(self.first_prev),
            frontier=MerkleFrontier.from_state(
                self.from_size, [b64url_decode(h) for h in self.from_frontier]
            ),
        )


def encode_events(bodies: Sequence[bytes]) -> bytes:
    """One canonical event per line. Canonical JSON escapes control characters, so no event
    contains a newline."""
    return b"".join(body + b"\n" for body in bodies)


def decode_events(raw: bytes) -> list[AuditEvent]:
    if raw and not raw.endswith(b"\n"):
        raise IntegrityError("events object is truncated", reason="malformed")
    return [AuditEvent.from_canonical(line) for line in raw.split(b"\n")[:-1]]


def encode_key(key: PublicKey) -> bytes:
    return canonical_json(dict(key.jwk, alg=key.alg, use="sig"))


def decode_key(raw: bytes, *, kid: str) -> PublicKey:
    try:
        document = strict_json_loads(raw)
        key = PublicKey.from_jwk(document, alg=document.get("alg"))
    except (InvalidRequest, AttributeError):
        raise IntegrityError(f"key {kid} is malformed", reason="malformed") from None
    if key.jwk.get("kid") != kid:
        raise IntegrityError(f"key object {kid} holds another kid", reason="malformed")
    return key


# --- checks --------------------------------------------------------------------------------


def _signed(signed: str, *, chain: str, size: int, keys: KeySet, what: str) -> Checkpoint:
    # With an audit key list, the checkpoint's time must lie in its key's signing window.
    checkpoint = AuditKeys.from_key_set(keys).verify(signed)
    if checkpoint.chain != chain or checkpoint.size != size:
        raise IntegrityError(
            f"{what} is for {checkpoint.chain} at {checkpoint.size}", reason="checkpoint"
        )
    return checkpoint


def verify_segment(
    manifest: Manifest, events: bytes, *, keys: KeySet, now: float | None = None
) -> ChainHead:
    """Check one segment alone against its signed checkpoints; returns the head at to_size.

    The events object must match its digest, both checkpoints must be signed by ``keys``
    for this chain and these sizes (each inside its key's signing window when ``keys`` is
    an ``AuditKeys`` list), the stored frontier must have the signed root at ``from_size``,
    and the events must extend it, link by link, to the signed root at ``to_size``, whose
    checkpoint must be dated no earlier than they are (nor, given ``now``, in the future).
    Raises ``IntegrityError`` naming the first failure.
    """
    digest = hashlib.sha256(events).digest()
    if not hmac.compare_digest(b64url_encode(digest), manifest.events_sha256):
        raise IntegrityError("events object does not match its manifest", reason="digest")
    chain = manifest.chain
    to_checkpoint = _signed(
        manifest.checkpoint, chain=chain, size=manifest.to_size, keys=keys, what="checkpoint"
    )
    start = manifest.start()
    from_checkpoint = None
    if manifest.prev_checkpoint is None:
        if start.head != GENESIS_HASH:
            raise IntegrityError("the first segment does not start at genesis", reason="fork")
    else:
        from_checkpoint = _signed(
            manifest.prev_checkpoint,
            chain=chain,
            size=manifest.from_size,
            keys=keys,
            what="previous checkpoint",
        )
        if not hmac.compare_digest(start.root, from_checkpoint.root_bytes()):
            raise IntegrityError(
                "stored frontier disagrees with the previous checkpoint", reason="root"
            )
    decoded = decode_events(events)
    head = verify_chain(decoded, chain=chain, start=start)
    if head.size != manifest.to_size:
        raise IntegrityError(f"segment ends at {head.size}, not {manifest.to_size}", reason="gap")
    if not hmac.compare_digest(head.root, to_checkpoint.root_bytes()):
        raise IntegrityError("events disagree with the signed checkpoint", reason="root")
    check_checkpoint_dated(
        to_checkpoint,
        newest_event_ms=decoded[-1].time_ms if decoded else None,
        previous=from_checkpoint,
        now=now,
    )
    if b64url_encode(head.head) != manifest.last_hash or [
        b64url_encode(h) for h in head.frontier.state()
    ] != list(manifest.to_frontier):
        raise IntegrityError("manifest disagrees with its events", reason="malformed")
    return head


def check_continuity(previous: Manifest | None, manifest: Manifest) -> None:
    """Check that ``manifest`` picks up exactly where ``previous`` (same chain) left off."""
    expected = previous.to_size if previous else 0
    if manifest.from_size > expected:
        raise IntegrityError(
            f"events {expected}..{manifest.from_size} are missing from the archive",
            reason="gap",
        )
    if manifest.from_size < expected:
        raise IntegrityError(f"overlaps the segment ending at {expected}", reason="overlap")
    if previous is None:
        return
    if (
        manifest.prev_checkpoint != previous.checkpoint
        or manifest.first_prev != previous.last_hash
        or manifest.from_frontier != previous.to_frontier
    ):
        raise IntegrityError("does not continue the previous segment", reason="fork")
