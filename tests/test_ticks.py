"""The background loops' clock: ticks until stopped, and slower duties counted in ticks."""

from __future__ import annotations

import anyio

from arbiter.ticks import Every, ticks


def test_a_duty_is_due_once_its_period_has_passed_in_ticks() -> None:
    every = Every(60.0, 25.0)
    assert [every.due() for _ in range(6)] == [False, False, True, False, False, True]
    assert all(Every(1.0, 5.0).due() for _ in range(3))  # a period shorter than a tick: every tick


async def test_ticks_end_as_soon_as_stopping_is_set() -> None:
    stopping = anyio.Event()
    seen = 0

    async def stop() -> None:
        stopping.set()

    with anyio.fail_after(10):  # an hour-long interval: only the stop can end the wait
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop)
            async for _ in ticks(3600.0, stopping):
                seen += 1
    assert seen == 0
