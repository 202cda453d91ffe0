"""The witness file of ``audit verify --witness``: what earlier runs saw, kept off the database.

A database (or an archive) whose history was rewritten below a checkpoint, with the
checkpoints deleted or signed again with a leaked key, can agree with itself. The witness
remembers, per chain, the size and Merkle root of the latest checkpoint a clean run
verified; a later run must recompute the same root at that size from the events, and find
the chain at least that long. One entry per chain is enough: a run that matches the
remembered root at the remembered size has checked that the older history is unchanged,
so the newer size and root replace it.

    {"format": "agentauth.audit-witness.v1", "of": "database",
     "chains": {"registry-0": {"size": 80, "root": "<base64url SHA-256>"}}}

The comparisons are pure; ``load`` and ``save`` are the only I/O.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from .protocol import InvalidRequest, b64url_decode, b64url_encode, strict_json_loads

__all__ = ["Seen", "WitnessError", "advance", "compare", "load", "save", "vanished"]

WITNESS_FORMAT = "agentauth.audit-witness.v1"
#: What a witness file vouches for; a file of one kind is refused for the other, since an
#: archive lags the database and would read as a chain cut short.
Of = Literal["database", "archive"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


class WitnessError(Exception):
    """The witness file cannot be read, is not a witness, or cannot be written."""


@dataclass(frozen=True, slots=True)
class Seen:
    """One chain as a run that found no problem verified it: a size and the root there."""

    size: int
    root: bytes


def compare(seen: Seen | None, *, size: int, root: bytes | None) -> str | None:
    """What is wrong with a chain against what the witness remembers of it, if anything.

    ``size`` is how far the chain verifies now; ``root`` the root recomputed now at
    ``seen.size`` (``None`` if none could be).
    """
    if seen is None:
        return None  # a chain new since the last run
    recorded = f"the witness recorded {seen.size} event(s) with root {b64url_encode(seen.root)}"
    if size < seen.size:
        return f"{recorded}, and only {size} verify now: events were removed or rewritten"
    if root is None:
        return (
            f"{recorded}, and no verified root at {seen.size} is found now:"
            " the history it saw was rewritten"
        )
    if root != seen.root:
        return (
            f"{recorded}, and the root there is now {b64url_encode(root)}:"
            " the history it saw was rewritten"
        )
    return None


def vanished(remembered: Mapping[str, Seen], present: set[str]) -> dict[str, str]:
    """What is wrong with each chain the witness saw that is no longer there at all."""
    return {
        chain: f"the witness recorded {seen.size} event(s), and the chain is gone"
        for chain, seen in sorted(remembered.items())
        if chain not in present
    }


def advance(remembered: Mapping[str, Seen], verified: Mapping[str, Seen]) -> dict[str, Seen]:
    """The witness after a clean run: each chain at the larger of the two sizes.

    A remembered size past the latest checkpoint now (its checkpoint deleted, the events
    intact and matching) is kept: the witness never moves back.
    """
    merged = dict(remembered)
    for chain, seen in verified.items():
        if chain not in merged or seen.size >= merged[chain].size:
            merged[chain] = seen
    return merged


def _root(value: str) -> str:
    try:
        if len(b64url_decode(value)) != 32:
            raise ValueError("not a SHA-256 hash")
    except InvalidRequest:
        raise ValueError("not canonical base64url") from None
    return value


class _Entry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    size: int = Field(ge=0)
    root: Annotated[str, AfterValidator(_root)]


class _Document(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    format: Literal["agentauth.audit-witness.v1"]
    of: Of
    chains: dict[str, _Entry]


def _open_nonblocking(path: str, flags: int) -> int:
    return os.open(path, flags | _NONBLOCK)


def load(path: Path, *, of: Of) -> dict[str, Seen] | None:
    """The witness at ``path``; ``None`` if there is no file yet (the first run).

    Raises ``WitnessError`` for anything else that is not a witness of ``of``: an
    unreadable file or one that is not a regular file, bad JSON, unknown fields, a witness
    of the other kind, or a file others can write (they could rewrite what it remembers):
    writable by group or others, or owned by another user than this one or root.
    """
    try:
        # O_NONBLOCK: a FIFO at the path must not hang the open before the check below; a
        # regular file ignores it.
        with open(path, "rb", opener=_open_nonblocking) as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise WitnessError(f"the witness {path} is not a regular file")
            owner = os.geteuid()
            # Another user who owns it can rewrite it (or chmod it) whatever its mode says;
            # root can anyway, so a root-owned witness is as safe as one of ours.
            if info.st_uid not in (owner, 0):
                raise WitnessError(
                    f"the witness {path} is owned by uid {info.st_uid}, not by this user"
                    f" (uid {owner}) or root, who can rewrite what it remembers;"
                    f" run: chown {owner} {path}"
                )
            if info.st_mode & 0o022:
                raise WitnessError(
                    f"the witness {path} is writable by group or others"
                    f" (mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}"
                )
            raw = handle.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise WitnessError(f"cannot read the witness {path}: {exc}") from None
    try:
        document = _Document.model_validate(strict_json_loads(raw))
    except (InvalidRequest, ValidationError):
        raise WitnessError(f"the witness {path} is corrupt: not a {WITNESS_FORMAT}") from None
    if document.of != of:
        raise WitnessError(f"the witness {path} records an {document.of}, not a {of}")
    return {
        chain: Seen(entry.size, b64url_decode(entry.root))
        for chain, entry in document.chains.items()
    }


def save(path: Path, chains: Mapping[str, Seen], *, of: Of) -> None:
    """Replace the witness at ``path`` atomically: a private temporary file next to it,
    fsynced, renamed over it, and the directory fsynced; a crash leaves the old one or the
    new one. Raises ``WitnessError`` if it cannot be written."""
    document = {
        "format": WITNESS_FORMAT,
        "of": of,
        "chains": {
            chain: {"size": seen.size, "root": b64url_encode(seen.root)}
            for chain, seen in sorted(chains.items())
        },
    }
    data = (json.dumps(document, indent=2) + "\n").encode()
    parent = path.parent
    tmp = parent / f".{path.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), 0o600)  # a umask can only remove bits
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        directory = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash
        finally:
            os.close(directory)
    except OSError as exc:
        raise WitnessError(f"cannot write the witness {path}: {exc}") from None
