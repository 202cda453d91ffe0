"""The shard data plane's wire format: length-prefixed msgpack frames of plain values.

A Ray actor call costs a verifier replica and a shard more CPU than the check it carries
(~1.5 ms round trip here; most of a shard's CPU went to Ray's call machinery, not to
deciding). So Ray stays the control plane (placement, restart, discovery through
``StateShard.endpoint``) and checks travel over one plain TCP connection per replica and
shard. Only plain values cross it (no pickle): a peer that passed the token handshake can
at worst send checks, never code. Encoding and decoding are pure; ``read_frame`` is the
one helper that touches a stream. When the cluster runs Ray with TLS, so does the link
(``link_tls``).
"""

from __future__ import annotations

import asyncio
import math
import ssl
import struct
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Literal

import msgpack

from ..protocol import Action, Envelope
from ..protocol._audit import AUDIT_NAME_MAX_LENGTH
from ._state import Check

__all__ = [
    "ACKS_ANNOUNCED",
    "ACK_AFTER",
    "MAX_CHECKS",
    "MAX_FRAME",
    "Codec",
    "FrameTooLarge",
    "ack_id",
    "decode_results",
    "encode_ack",
    "encode_results",
    "frame",
    "link_tls",
    "read_frame",
]

_RAY_TLS_FILES = ("RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")


def link_tls(side: Literal["server", "client"], env: Mapping[str, str]) -> ssl.SSLContext | None:
    """The link's TLS context, from Ray's own settings: none unless ``RAY_USE_TLS`` is on.

    An operator who turned TLS on for Ray's traffic expects the whole cluster's traffic to
    be encrypted, and an answer on this link is an allow or a deny: so the link then uses
    the same certificate, key and CA as Ray's connections, and both sides must present a
    certificate from that CA (mutual TLS, as Ray's is). Host names are not checked: Ray's
    node certificates need not name the address a shard listens on; a peer still has to
    hold a key the cluster's CA signed, and a replica still has to show the link token.
    Turned on without its files, it refuses to start rather than fall back to plain TCP.
    """
    if env.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):
        return None
    missing = [name for name in _RAY_TLS_FILES if not env.get(name)]
    if missing:
        raise ValueError(f"RAY_USE_TLS is on but {', '.join(missing)} not set")
    cert, key, ca = (env[name] for name in _RAY_TLS_FILES)
    purpose = ssl.Purpose.CLIENT_AUTH if side == "server" else ssl.Purpose.SERVER_AUTH
    context = ssl.create_default_context(purpose, cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    return context


# The most checks one batch may carry: a replica sends at most its max_batch, which
# VerifierSettings holds to this.
MAX_CHECKS = 4096
# Room for MAX_CHECKS of the largest checks a replica sends, with a margin: about 5.3 KB
# each with every envelope list at its MAX_RULES (3.4 KB), the longest resource and filter
# (1.1 KB) and every id at its longest. (At 4 MiB, batches a replica may send were over:
# 1,024 such checks, or 2,048 with 2 KB envelopes. The shard dropped the link on each,
# without a word, and every check on it was denied state_unavailable.) A larger length
# prefix means a broken or hostile peer, and is refused before anything is buffered.
MAX_FRAME = MAX_CHECKS * 8 * 1024
# The largest request id a batch may carry: its ack id (ack_id) is then -2**63, the
# least integer msgpack packs.
_MAX_REQUEST_ID = 2**63 - 2
_LENGTH = struct.Struct(">I")


class FrameTooLarge(ValueError):
    pass


def frame(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader, limit: int = MAX_FRAME) -> bytes:
    """The next frame's payload, at most ``limit`` bytes; IncompleteReadError at end of
    stream."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if length > limit:
        raise FrameTooLarge(f"frame of {length} bytes")
    return await reader.readexactly(length)


# What a link's cache of parsed documents may hold, in characters of their JSON texts (the
# keys). A count alone bounds nothing in bytes: JSON allows any amount of whitespace, so a
# peer holding the token can send a valid envelope padded to nearly MAX_FRAME, and 4,096 of
# those are 128 GiB. Documents as a replica sends them (model_dump_json) are short: an
# envelope with every list at its MAX_RULES is about 3.4 KB, a usual one a few hundred
# bytes, so a cache of those usual ones never comes near this.
_PARSED_TEXT = 4 * 1024 * 1024


class _ParseCache:
    """Parsed documents by their JSON text: a grant's envelope and a provider's usual
    actions arrive over and over. Bounded by count and by the length of the texts held,
    oldest out first; an eviction only costs parsing again."""

    def __init__(
        self, parse: Callable[[str], Any], limit: int = 4096, text_limit: int = _PARSED_TEXT
    ) -> None:
        self._parse = parse
        self._limit = limit
        self._text_limit = text_limit
        self._items: dict[str, Any] = {}
        # The keys, oldest first, and their length all told. (A plain dict for the hits:
        # an OrderedDict's lookup costs a third more, and a dict's own oldest key is slow to
        # find once many have been deleted from its front.)
        self._order: deque[str] = deque()
        self._text = 0

    def __call__(self, text: str) -> Any:
        item = self._items.get(text)
        if item is None:
            item = self._items[text] = self._parse(text)
            self._order.append(text)
            self._text += len(text)
            # A text longer than the whole limit is parsed, and not kept.
            while len(self._order) > self._limit or self._text > self._text_limit:
                oldest = self._order.popleft()
                del self._items[oldest]
                self._text -= len(oldest)
        return item


class _DumpCache:
    """JSON text of documents the sender holds on to (a cached token's envelope), by
    identity; the document itself is kept so its id cannot be reused while cached."""

    def __init__(self, limit: int = 4096) -> None:
        self._limit = limit
        self._items: dict[int, tuple[Any, str]] = {}

    def __call__(self, document: Any) -> str:
        hit = self._items.get(id(document))
        if hit is not None and hit[0] is document:
            return hit[1]
        if len(self._items) >= self._limit:
            self._items.clear()
        text: str = document.model_dump_json()
        self._items[id(document)] = (document, text)
        return text


class Codec:
    """Encodes checks and decodes them, with per-connection caches of parsed documents."""

    def __init__(self) -> None:
        self._envelope_text = _DumpCache()
        self._envelope = _ParseCache(Envelope.model_validate_json)
        self._action = _ParseCache(_action)

    def encode_checks(self, request_id: int, checks: list[Check]) -> bytes:
        rows = [
            (
                c.agent_id,
                c.provider_id,
                c.grant_id,
                c.jkt,
                c.jti,
                c.iat,
                None if c.action is None else c.action.model_dump_json(),
                None if c.envelope is None else self._envelope_text(c.envelope),
                c.step_up_ref,
                c.step_up_valid,
                c.token_jti,
                c.deny,
                c.voids,
            )
            for c in checks
        ]
        return frame(msgpack.packb((request_id, rows)))

    def decode_checks(self, payload: bytes) -> tuple[int, list[Check]]:
        """Raises ValueError (or a pydantic ValidationError, also one) on a bad payload."""
        try:
            request_id, rows = msgpack.unpackb(payload, use_list=False)
        except (TypeError, ValueError):  # not a pair, or not msgpack at all
            raise ValueError("malformed batch") from None
        if not isinstance(request_id, int) or not isinstance(rows, tuple):
            raise ValueError("malformed batch")
        # A replica numbers its calls from 0. An id past _MAX_REQUEST_ID has an ack id
        # msgpack cannot pack: the ack, sent from a timer, raised there instead.
        if not 0 <= request_id <= _MAX_REQUEST_ID:
            raise ValueError("malformed batch: request id out of range")
        # Refused before any check is built: each costs the shard's one event loop tens of
        # microseconds to decode, decide and chain, and 4 MiB held 260,000 of the smallest
        # (18 s of a stalled shard here, every replica's checks denied meanwhile, its
        # commit then past the statement timeout).
        if len(rows) > MAX_CHECKS:
            raise ValueError("malformed batch: too many checks")
        checks = []
        for row in rows:
            # 12 columns: a replica from before ``voids`` existed (mid-upgrade), never voiding.
            if not isinstance(row, tuple) or len(row) not in (12, 13):
                raise ValueError("malformed check")
            action, envelope = row[6], row[7]
            voids = _opt_text(row[12]) if len(row) == 13 else None
            deny = _opt_text(row[11])
            if voids is not None and deny is None:
                raise ValueError("malformed check: a void without the answer given")
            checks.append(
                Check(
                    agent_id=_text(row[0], _MAX_AGENT_ID),
                    provider_id=_text(row[1], _MAX_PROVIDER_ID),
                    grant_id=_opt_text(row[2], _MAX_KEY),
                    jkt=_opt_text(row[3]),
                    jti=_opt_text(row[4]),
                    iat=_number(row[5]),
                    action=None if action is None else self._action(_text(action)),
                    envelope=None if envelope is None else self._envelope(_text(envelope)),
                    step_up_ref=_opt_text(row[8], _MAX_KEY),
                    step_up_valid=row[9] is True,
                    token_jti=_opt_text(row[10]),
                    deny=deny,
                    voids=voids,
                )
            )
        return request_id, checks


# Acknowledgements: how a replica tells a hung shard (a stopped process, a wedged loop)
# from a slow one (a long commit). A shard says once, right after the handshake, that it
# acknowledges (ACKS_ANNOUNCED); then every batch it has read and not answered within
# ACK_AFTER seconds gets an ack (``ack_id`` of its request id). A slow shard acknowledges
# while its commit is awaited; a stopped one cannot. Both are result frames with a
# negative id and no rows: a replica from before acks takes them for answers to calls it
# never made, and drops them.
ACKS_ANNOUNCED = -1
ACK_AFTER = 0.005


def ack_id(request_id: int) -> int:
    """The id an ack for ``request_id`` carries (and, applied again, the request id)."""
    return -2 - request_id


def encode_ack(request_id: int) -> bytes:
    """An ack frame: ``ACKS_ANNOUNCED`` itself, or ``ack_id`` of a request's id."""
    return frame(msgpack.packb((request_id, ())))


def encode_results(request_id: int, results: list[Any]) -> bytes:
    rows = [(r.allowed, r.reason, r.remaining, r.retry_after, r.audit_event) for r in results]
    return frame(msgpack.packb((request_id, rows)))


def decode_results(payload: bytes) -> tuple[int, list[tuple[Any, ...]]]:
    request_id, rows = msgpack.unpackb(payload)
    return int(request_id), [tuple(row) for row in rows]


# The longest agent and provider ids a check may name. The shard's audit event names them as
# its subject ("agent:<id>") and actor ("provider:<id>"), which AuditEvent holds to 256
# characters; events are chained unvalidated, so a longer id was stored all the same, in an
# event no reader of the chain accepts (AuditEvent.from_canonical): the chain could no
# longer be exported or verified. Honest ids are identifiers (128 characters), or
# "provider:<id>" for a denial that has no token to name its agent.
_MAX_AGENT_ID = AUDIT_NAME_MAX_LENGTH - len("agent:")
_MAX_PROVIDER_ID = AUDIT_NAME_MAX_LENGTH - len("provider:")
# The longest grant id and step-up reference a check may carry. The shard stores both in
# indexed columns (audit_events' grant indexes, verifier_step_up_uses' key), whose entries
# PostgreSQL holds to about 2.7 KB: a longer one failed the commit of every check merged
# with it (ProgramLimitExceededError). Honest ones are identifiers (128 characters; the
# verifier takes no longer step-up reference); 256 characters are 1 KiB at most.
_MAX_KEY = 256


def _text(value: Any, longest: int | None = None) -> str:
    if not isinstance(value, str):
        raise ValueError("expected text")
    # PostgreSQL's text holds no U+0000, nor jsonb its \u escape. A check carrying one (as an
    # agent, grant or step-up id) failed the statements of the batch it was merged into,
    # every replica's checks in it denied audit_unavailable; one chained into an event's body
    # failed every later lookup that reads the grant's events as jsonb (the questions about
    # its proofs, its usage series). No honest replica sends one: the verifier refuses it in
    # every request body (_web._storable).
    if "\x00" in value:
        raise ValueError("text may not hold U+0000")
    if longest is not None and len(value) > longest:
        raise ValueError("text too long")
    return value


def _action(text: str) -> Action:
    action = Action.model_validate_json(text)
    # Its one free text (the rest are patterned): see _text.
    if action.filter is not None and "\x00" in action.filter:
        raise ValueError("text may not hold U+0000")
    return action


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("expected a number")
    number = float(value)
    # NaN passes every comparison an age check makes (an iat that is never too old), and
    # no honest replica sends one: the proofs it comes from are strict JSON.
    if not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


def _opt_text(value: Any, longest: int | None = None) -> str | None:
    return None if value is None else _text(value, longest)
