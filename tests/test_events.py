"""``wait_event`` and ``wait_within``: timed waits that never swallow a cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from agentauth._events import wait_event, wait_within


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


@pytest.mark.asyncio
async def test_a_cancellation_in_the_turn_the_awaited_call_ends_is_not_lost() -> None:
    """As above, for a call awaited with a timeout: ``asyncio.wait_for`` returned its result
    and dropped the cancellation; ``wait_within`` raises it."""
    answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    turns = 0

    async def loop() -> None:
        nonlocal turns
        while True:
            await wait_within(answer, 10.0)
            turns += 1
            await asyncio.sleep(0.01)

    task = asyncio.ensure_future(loop())
    await asyncio.sleep(0.01)
    answer.set_result(1)
    task.cancel()
    await asyncio.wait((task,), timeout=2.0)
    assert task.cancelled()
    assert turns == 0


@pytest.mark.asyncio
async def test_it_returns_the_result_or_times_out() -> None:
    assert await wait_within(asyncio.sleep(0, "done"), 1.0) == "done"
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        await wait_within(asyncio.sleep(5.0), 0.05)
    assert time.monotonic() - began < 1.0


@pytest.mark.asyncio
async def test_stop_tasks_returns_once_they_have_ended() -> None:
    """Cancelled and left, a loop's last turn (its finally, a statement it had begun) ran
    after the caller had closed what it used; stopped so, it has ended first."""
    from agentauth._events import stop_tasks

    ended: list[str] = []

    async def loop(name: str) -> None:
        try:
            while True:
                await asyncio.sleep(0.01)
        finally:
            await asyncio.sleep(0.05)  # its clean-up takes a moment
            ended.append(name)

    tasks = [asyncio.ensure_future(loop(n)) for n in ("a", "b")]
    await asyncio.sleep(0.02)
    await stop_tasks([*tasks, None])
    assert sorted(ended) == ["a", "b"] and all(t.done() for t in tasks)
