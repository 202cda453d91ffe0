"""``wait_event``: a timed wait on an event that never swallows a cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from agentauth._events import wait_event


@pytest.mark.asyncio
async def test_a_cancellation_in_the_turn_the_event_is_set_is_not_lost() -> None:
    """The turn that sets the event also cancels the waiter (a close() right after a
    wake-up): the waiter must end cancelled, not carry on as if its wait had ended."""
    event = asyncio.Event()
    turns = 0

    async def loop() -> None:
        nonlocal turns
        while True:
            await wait_event(event, 10.0)
            event.clear()
            turns += 1

    task = asyncio.ensure_future(loop())
    await asyncio.sleep(0.01)
    event.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2.0)
    assert turns == 0


@pytest.mark.asyncio
async def test_it_returns_when_set_or_when_the_time_is_up() -> None:
    event = asyncio.Event()
    began = time.monotonic()
    await wait_event(event, 0.05)
    assert 0.04 <= time.monotonic() - began < 1.0
    asyncio.get_running_loop().call_later(0.02, event.set)
    began = time.monotonic()
    await wait_event(event, 5.0)
    assert time.monotonic() - began < 1.0
