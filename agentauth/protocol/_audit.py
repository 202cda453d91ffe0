"""Audit events: canonical encoding, the hash chain, and signed Merkle checkpoints.

Each event names its chain, its sequence number and the hash of the event before it, and
its own hash is the RFC 6962 leaf hash of its canonical bytes. So one hash serves twice:
it links the chain (a changed, dropped or reordered event breaks every later link) and it
is the Merkle leaf, so a signed checkpoint (chain, size, root) commits to the whole prefix
and an inclusion proof shows one event is in it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from ._encoding import b64url_decode, b64url_encode, canonical_json, strict_json_loads
from ._errors import IntegrityError, InvalidRequest
from ._jws import check_signature, parse_compact, sign_compact
from ._keys import KeySet, Signer
from ._merkle import MerkleFrontier, leaf_hash
from ._types import Identifier

__all__ = [
    "AUDIT_FORMAT",
    "CHECKPOINT_SKEW",
    "CHECKPOINT_TYP",
    "GENESIS_HASH",
    "MAX_UNSEALED_AGE",
    "AuditEvent",
    "ChainHead",
    "Checkpoint",
    "check_checkpoint_dated",
    "sign_checkpoint",
    "verify_chain",
    "verify_checkpoint",
]

AUDIT_FORMAT = "agentauth.audit.v1"
CHECKPOINT_TYP = "agentauth-checkpoint+jwt"
#: The ``prev`` of the first event of every chain.
GENESIS_HASH = b"\x00" * 32
_B64_SHA256 = r"^[A-Za-z0-9_-]{43}$"


def _canonical_b64(value: str) -> str:
    # The pattern alone lets the 43rd character carry set spare bits, which b64url_decode
    # refuses later: refused here, a hash has one spelling and a stored event or checkpoint
    # that spells it otherwise is malformed (an IntegrityError), not a crash further on.
    try:
        b64url_decode(value)
    except InvalidRequest:
        raise ValueError("not canonical base64url") from None
    return value


_Hash = Annotated[str, Field(pattern=_B64_SHA256), AfterValidator(_canonical_b64)]
_EVENT_NAME = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$"
# The longest actor or subject an event may name. Writers that build names from ids they
# did not check (the shard's "agent:<id>", the registry's "passkey:<id>") bound them by it,
# or they would chain events no reader of the chain accepts.
AUDIT_NAME_MAX_LENGTH = 256


class AuditEvent(BaseModel):
    """One audit event. ``data`` holds JSON without floats (amounts are strings)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chain: Identifier
    seq: int = Field(ge=0)
    prev: _Hash = Field(description="entry hash of event seq-1")
    time_ms: int = Field(ge=0, description="Unix time in milliseconds.")
    event: str = Field(max_length=64, pattern=_EVENT_NAME, description="e.g. grant.approved")
    actor: str = Field(
        max_length=AUDIT_NAME_MAX_LENGTH, description="Who caused it: agent:..., human:..."
    )
    subject: str = Field(
        max_length=AUDIT_NAME_MAX_LENGTH, description="What it is about: grant:..., ..."
    )
    data: dict[str, Any] = Field(default_factory=dict)

    @field_validator("data")
    @classmethod
    def _canonical_data(cls, data: dict[str, Any]) -> dict[str, Any]:
        canonical_json(data)  # raises ValueError (floats, huge ints, lone surrogates)
        return data

    @classmethod
    def first(cls, **fields: Any) -> AuditEvent:
        return cls(seq=0, prev=b64url_encode(GENESIS_HASH), **fields)

    def following(self, **fields: Any) -> AuditEvent:
        """The next event of this chain, linked to this one."""
        return AuditEvent(chain=self.chain, seq=self.seq + 1, prev=self.entry_hash_b64(), **fields)

    @classmethod
    def from_canonical(cls, body: bytes | str) -> AuditEvent:
        """Parse an event from its stored canonical bytes; refuse any other encoding of it.

        Requiring the exact canonical bytes back means what is stored is what is hashed:
        no reformatting of a stored event can go unnoticed.
        """
        raw = body.encode("utf-8") if isinstance(body, str) else body
        try:
            document = strict_json_loads(raw)
            if not isinstance(document, dict) or document.pop("format", None) != AUDIT_FORMAT:
                raise IntegrityError("not an audit event", reason="malformed")
            event = cls.model_validate(document)
            # Inside the try: a valid model can still have no canonical form (an integer
            # past 2**53), and stored bytes that cannot be events are an integrity problem.
            canonical = event.canonical_bytes()
        except (InvalidRequest, ValidationError):
            raise IntegrityError("malformed audit event", reason="malformed") from None
        if canonical != raw:
            raise IntegrityError("audit event is not in canonical form", reason="malformed")
        return event

    def canonical_bytes(self) -> bytes:
        try:
            return canonical_json({"format": AUDIT_FORMAT, **self.model_dump(mode="json")})
        except ValueError as exc:
            raise InvalidRequest(f"audit data is not canonical JSON: {exc}") from None

    def entry_hash(self) -> bytes:
        """Chain link and Merkle leaf hash: SHA-256(0x00 || canonical bytes)."""
        return leaf_hash(self.canonical_bytes())

    def entry_hash_b64(self) -> str:
        return b64url_encode(self.entry_hash())


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The state after a verified run of events: where the chain stands and its tree."""

    size: int
    head: bytes
    frontier: MerkleFrontier

    @property
    def root(self) -> bytes:
        return self.frontier.root()


def verify_chain(
    events: Iterable[AuditEvent],
    *,
    chain: str,
    start: ChainHead | None = None,
) -> ChainHead:
    """Walk events in order, checking chain name, contiguous seq and every prev link.

    ``start`` resumes from an earlier head (for incremental or segmented verification).
    Raises ``IntegrityError`` naming the first bad event.
    """
    size = start.size if start else 0
    head = start.head if start else GENESIS_HASH
    frontier = (
        MerkleFrontier.from_state(start.size, start.frontier.state())
        if start
        else (MerkleFrontier())
    )
    for event in events:
        if event.chain != chain:
            raise IntegrityError(f"event {event.seq} belongs to another chain", reason="fork")
        if event.seq != size:
            raise IntegrityError(f"expected seq {size}, found {event.seq}", reason="gap")
        try:
            linked = b64url_decode(event.prev) == head
            entry = event.entry_hash()
        except InvalidRequest:
            raise IntegrityError(f"event {event.seq} is malformed", reason="malformed") from None
        if not linked:
            raise IntegrityError(f"event {event.seq} does not link to its parent", reason="fork")
        head = entry
        frontier.append(head)
        size += 1
    return ChainHead(size=size, head=head, frontier=frontier)


class Checkpoint(BaseModel):
    """A signed statement: chain ``chain`` had ``size`` events with Merkle root ``root``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chain: Identifier
    size: int = Field(ge=0)
    root: _Hash
    time: int = Field(ge=0, description="Unix time of signing, seconds.")

    def root_bytes(self) -> bytes:
        return b64url_decode(self.root)


#: How far apart the clocks that date events (each shard's, each registry replica's) and the
#: one that dates a checkpoint may be. NTP keeps a sound deployment's clocks within a second;
#: a minute leaves room for a bad day, and is all a checkpoint can be backdated by: a key's
#: signing window only means something if a checkpoint cannot claim an earlier date than the
#: events it covers (a retired key that leaked could otherwise sign new history under an
#: old date inside its window).
CHECKPOINT_SKEW = 60

#: How old, in seconds, the oldest event under no checkpoint may be before a verifier
#: (``agentauth audit verify``, the approval page) fails its chain. The registry signs every
#: chain that grew each ``checkpoint_every_seconds`` (10 s), so five minutes is some thirty
#: missed rounds: the chain's checkpoints were deleted (or withheld), or the registry has not
#: been signing (the audit lag alert). Either way those events are unprotected. A new chain's
#: first checkpoint is normally seconds away, so it passes.
MAX_UNSEALED_AGE = 300.0


def check_checkpoint_dated(
    checkpoint: Checkpoint,
    *,
    newest_event_ms: int | None,
    previous: Checkpoint | None = None,
    now: float | None = None,
    skew: int = CHECKPOINT_SKEW,
) -> None:
    """Check that ``checkpoint``'s date can be true: not before the newest event it covers
    (``newest_event_ms``, None for an empty tree), not before the chain's previous
    checkpoint, and, when ``now`` is given, not in the future. Each allows ``skew`` seconds.
    Raises ``IntegrityError`` (reason ``dated``)."""
    if newest_event_ms is not None and checkpoint.time + skew < newest_event_ms / 1000:
        raise IntegrityError(
            f"it is dated {checkpoint.time}, before an event it covers"
            f" ({newest_event_ms // 1000}): backdated",
            reason="dated",
        )
    if previous is not None and checkpoint.time + skew < previous.time:
        raise IntegrityError(
            f"it is dated {checkpoint.time}, before the checkpoint at {previous.size}"
            f" ({previous.time})",
            reason="dated",
        )
    if now is not None and checkpoint.time > now + skew:
        raise IntegrityError(f"it is dated {checkpoint.time}, in the future", reason="dated")


def sign_checkpoint(checkpoint: Checkpoint, signer: Signer) -> str:
    header = {"alg": signer.alg, "kid": signer.kid, "typ": CHECKPOINT_TYP}
    return sign_compact(header, checkpoint.model_dump(mode="json"), signer)


def verify_checkpoint(signed: object, *, keys: KeySet) -> Checkpoint:
    """Check a signed checkpoint against the registry's key set (its JWKS)."""
    try:
        parsed = parse_compact(signed, max_bytes=4096)
    except InvalidRequest as exc:
        raise IntegrityError(exc.description, reason="malformed") from None
    check_signature(parsed, keys, typ=CHECKPOINT_TYP, error=IntegrityError)
    try:
        return Checkpoint.model_validate(parsed.claims)
    except ValidationError:
        raise IntegrityError("malformed checkpoint", reason="malformed") from None
