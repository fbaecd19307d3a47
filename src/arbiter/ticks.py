"""Background loops' clock: a tick every interval until told to stop, and counters for slower duties."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio


async def ticks(interval_s: float, stopping: anyio.Event) -> AsyncIterator[None]:
    """Yield every ``interval_s`` seconds; return as soon as ``stopping`` is set (also mid-wait)."""
    while not stopping.is_set():
        with anyio.move_on_after(interval_s):
            await stopping.wait()
        if stopping.is_set():
            return
        yield


class Every:
    """A duty done every ``period_s`` of a loop that ticks every ``tick_s``: ``due()`` once per tick."""

    __slots__ = ("_elapsed", "_period", "_tick")

    def __init__(self, period_s: float, tick_s: float) -> None:
        self._period = period_s
        self._tick = tick_s
        self._elapsed = 0.0

    def due(self) -> bool:
        self._elapsed += self._tick
        if self._elapsed < self._period:
            return False
        self._elapsed = 0.0
        return True
