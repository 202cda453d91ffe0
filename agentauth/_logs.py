"""Warnings that a flood must not repeat: one line per key per period, the rest counted."""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable

__all__ = ["Throttle"]


class Throttle:
    """Says a recurring warning once per ``every`` seconds for each key, and how many it
    held back meanwhile in the next line.

    For what fails per request or per batch while a dependency is down: thousands of lines
    a second would bury the one that says what happened, and fill the disk. Keys must come
    from a fixed set (a shard index, an error code), never from what callers send: each
    one is kept for the life of the process.
    """

    def __init__(self, every: float = 30.0) -> None:
        self.every = every
        self._said_at: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def log(
        self,
        log: logging.Logger,
        key: Hashable,
        msg: str,
        *args: object,
        level: int = logging.WARNING,
        exc_info: bool | BaseException = False,
    ) -> None:
        """``log.log(level, msg, *args)`` unless this key said it less than ``every`` s ago.
        ``exc_info``: as ``log.log`` takes it (True for the exception being handled)."""
        held = self.due(key)
        if held is None:
            return
        if held:
            msg += " (and %d more like it since the last such line)"
            args = (*args, held)
        log.log(level, msg, *args, exc_info=exc_info, stacklevel=2)  # the caller's line

    def due(self, key: Hashable) -> int | None:
        """None while ``key`` is held back (counted); else the lines held back since its
        last, and its period starts again."""
        now = time.monotonic()
        said = self._said_at.get(key)
        if said is not None and now - said < self.every:
            self._held[key] = self._held.get(key, 0) + 1
            return None
        self._said_at[key] = now
        return self._held.pop(key, 0)


def raised_at(exc: BaseException) -> tuple[str, int] | None:
    """The file and line ``exc`` was raised at (the innermost frame of its traceback): one
    of the code's own places, never anything a caller sent, so a key for ``Throttle`` that
    tells one bug from another."""
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_code.co_filename, tb.tb_lineno
