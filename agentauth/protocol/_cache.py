"""The bounded caches the token and proof checks keep: plain dicts, oldest entry first."""

from __future__ import annotations

from typing import TypeVar

V = TypeVar("V")


def remember(cache: dict[str, V], key: str, value: V, size: int) -> None:
    """Insert into a cache of at most ``size`` entries, dropping the oldest (none if 0).

    Insertion order, not use: a hit does not move an entry, so a hit costs one dict lookup
    and nothing else on the verification path; a busy key that ages out is simply checked
    and inserted again."""
    if size:
        if len(cache) >= size:
            del cache[next(iter(cache))]
        cache[key] = value
