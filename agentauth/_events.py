"""Timed waits that never lose a cancellation of the task waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

__all__ = ["stop_tasks", "wait_event", "wait_within"]

_T = TypeVar("_T")


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


async def wait_within(aw: Awaitable[_T], timeout: float) -> _T:
    """``asyncio.wait_for(aw, timeout)``, except that the caller's cancellation is raised.

    On Python 3.11, ``wait_for`` returns ``aw``'s result when its caller is cancelled in
    the loop turn ``aw`` ends in, and the cancellation is gone: a loop built on it (a
    listener, a poll, a pinger) ran on after whoever stopped it. Here a cancellation still
    pending once the wait is over is raised, one that an earlier ``wait_for`` of the same
    task swallowed included. The result is dropped then: not for an ``aw`` whose result
    must be released (a connection it opened).
    """
    result = await asyncio.wait_for(aw, timeout)
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
    return result


async def stop_tasks(tasks: Iterable[asyncio.Task[Any] | None], timeout: float = 5.0) -> None:
    """Cancel ``tasks`` and wait, up to ``timeout`` seconds, until they have ended: what
    the caller closes next (a pool, a client) is then no longer in use by them. (Cancelled
    and left, a loop ran its ``finally`` or its next statement against a closed pool.)"""
    live = [task for task in tasks if task is not None and not task.done()]
    for task in live:
        task.cancel()
    if live:
        await asyncio.wait(live, timeout=timeout)
