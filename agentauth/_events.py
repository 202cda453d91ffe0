"""Waiting on an ``asyncio.Event`` with a timeout, without losing a cancellation."""

from __future__ import annotations

import asyncio

__all__ = ["wait_event"]


async def wait_event(event: asyncio.Event, timeout: float) -> None:
    """Return once ``event`` is set or ``timeout`` seconds have passed, whichever is first.

    Not ``asyncio.wait_for(event.wait(), timeout)``: on Python 3.11 that returns normally
    when the task is cancelled in the loop turn the event is set in, swallowing the
    cancellation, and a loop built on it (a reconnect, a poll) then runs on for good while
    whoever cancelled it waits (so ``StateShard.close()`` hung, every time).
    """
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((waiter,), timeout=timeout)
    finally:
        waiter.cancel()
