"""Which audit records are safe (stored or spooled), and the requests waiting until theirs is.

Records are numbered in the order they are queued, and they are stored or spooled in that order, so
record n is safe once ``n`` records have been: one counter answers for all of them.
"""

from __future__ import annotations

import asyncio


class Confirmations:
    __slots__ = ("_numbered", "_safe", "_waiters")

    def __init__(self) -> None:
        self._numbered = 0  # records queued so far
        self._safe = 0  # records stored or spooled so far
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    @property
    def waiting(self) -> bool:
        """Whether a request waits for its record."""
        return bool(self._waiters)

    def number(self) -> int:
        """The next queued record's number."""
        self._numbered += 1
        return self._numbered

    def safe(self, number: int) -> bool:
        return self._safe >= number

    def wait_for(self, number: int) -> tuple[asyncio.Future[None], bool]:
        """A future done once record ``number`` is safe, and whether no one else was waiting."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((number, waiter))
        return waiter, len(self._waiters) == 1

    def stored(self, count: int) -> None:
        """The next ``count`` records are stored or spooled: release those waiting for them."""
        self._safe += count
        if self._waiters:
            self._release(everyone=False)

    def release_all(self) -> None:
        """Answer everyone waiting now (nothing will be stored soon)."""
        self._release(everyone=True)

    def _release(self, *, everyone: bool) -> None:
        waiting: list[tuple[int, asyncio.Future[None]]] = []
        for number, waiter in self._waiters:
            if everyone or number <= self._safe:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                waiting.append((number, waiter))
        self._waiters = waiting
