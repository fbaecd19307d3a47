"""Concurrent admissions share one Redis round trip.

Most of what a Redis admission costs this process is the client's own work per command (taking a
pooled connection, packing the command, parsing the reply, giving the connection back: about 150 µs
of CPU), not Redis. So while one round trip is in flight, the admissions that arrive queue up, and
when it is back they go out together as one command; each caller gets its own result. A caller alone
sends at once, on its own task: one call at a time waits for nothing more than before. Under load
a batch holds whatever arrived during the previous round trip, up to ``max_batch``; when a full batch
is already waiting (a slow Redis), it goes at once alongside, up to ``max_lanes`` round trips in flight.

A caller that gives up (its deadline, a cancelled request) before its item is sent takes it out of
the queue; once sent, the item runs, as a single round trip would have. When a round trip fails,
every caller in it gets the error. After ``aclose`` nothing is sent: waiting and new callers get
``ConnectionError`` (to the failover backend, Redis is unreachable).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")


class _Entry(Generic[P, R]):
    __slots__ = ("item", "waiter")  # compared by identity: a caller that gives up removes its own

    def __init__(self, item: P, waiter: asyncio.Future[R]) -> None:
        self.item = item
        self.waiter = waiter


class Coalescer(Generic[P, R]):
    """``await submit(item)`` is ``(await send([item]))[0]``, with concurrent items sent together."""

    def __init__(
        self, send: Callable[[list[P]], Awaitable[Sequence[R]]], max_batch: int, max_lanes: int = 4
    ) -> None:
        self._send = send
        self._max_batch = max_batch
        self._max_lanes = max_lanes
        self._queue: deque[_Entry[P, R]] = deque()
        self._lanes = 0  # round trips in flight; invariant: items queued implies at least one
        self._drainers: dict[asyncio.Task[None], list[_Entry[P, R]]] = {}  # each with what it claimed
        self._closed = False

    async def submit(self, item: P) -> R:
        if self._closed:
            raise ConnectionError("the limits backend is closed")
        if not self._lanes:
            self._lanes += 1
            try:
                return (await self._sent([item]))[0]
            finally:
                self._lanes -= 1
                if self._queue and not self._lanes:
                    self._start_drain()
        entry = _Entry(item, asyncio.get_running_loop().create_future())
        self._queue.append(entry)
        if len(self._queue) >= self._max_batch and self._lanes < self._max_lanes:
            self._start_drain()  # a full batch waiting: a slow Redis does not hold everyone behind one
        try:
            return await entry.waiter
        except asyncio.CancelledError:
            # Not found: already taken into a batch, so it is sent, as a lone round trip would have been.
            with contextlib.suppress(ValueError):
                self._queue.remove(entry)
            raise

    def _take(self) -> list[_Entry[P, R]]:
        batch: list[_Entry[P, R]] = []
        while self._queue and len(batch) < self._max_batch:
            entry = self._queue.popleft()
            if not entry.waiter.done():
                batch.append(entry)
        return batch

    def _start_drain(self) -> None:
        """A new lane: it takes its first batch now, so the queue shows only what no lane has claimed."""
        if self._closed:
            return
        self._lanes += 1
        claimed = self._take()
        drainer = asyncio.get_running_loop().create_task(self._drain(claimed))
        self._drainers[drainer] = claimed
        drainer.add_done_callback(self._forget)

    def _forget(self, drainer: asyncio.Task[None]) -> None:
        self._drainers.pop(drainer, None)

    async def _drain(self, claimed: list[_Entry[P, R]]) -> None:
        """Send what this lane claimed, then claim more, until the queue is empty. ``claimed`` is
        updated in place: ``aclose`` fails whatever a cancelled lane still held."""
        try:
            while claimed and not self._closed:
                claimed[:] = [entry for entry in claimed if not entry.waiter.done()]
                if claimed:
                    await self._round_trip(claimed)
                claimed[:] = self._take()
        finally:
            self._lanes -= 1
            _fail(claimed, ConnectionError("the limits backend is closed"))  # only when cut short

    async def _sent(self, items: list[P]) -> Sequence[R]:
        """``send``'s results, one per item: a reply of another length is an error (which the failover
        backend counts as Redis misbehaving), never a short index or a caller left unanswered."""
        results, n = await self._send(items), len(items)
        if len(results) != n:
            raise RuntimeError(f"{len(results)} results for {n} item{'' if n == 1 else 's'}")
        return results

    async def _round_trip(self, batch: list[_Entry[P, R]]) -> None:
        try:
            results = await self._sent([entry.item for entry in batch])
        except Exception as exc:  # noqa: BLE001 - not handled here: each caller gets it
            _fail(batch, exc)
            return
        for entry, result in zip(batch, results, strict=True):
            if not entry.waiter.done():
                entry.waiter.set_result(result)

    async def aclose(self) -> None:
        """Send nothing more: callers still queued, or in a round trip cut short, get ConnectionError."""
        self._closed = True
        queued = list(self._queue)
        self._queue.clear()
        _fail(queued, ConnectionError("the limits backend is closed"))
        drainers = dict(self._drainers)
        for drainer in drainers:
            drainer.cancel()
        if drainers:
            await asyncio.wait(drainers)
        for claimed in drainers.values():  # a lane cancelled before it ran never reached its finally
            _fail(claimed, ConnectionError("the limits backend is closed"))


def _fail(entries: Sequence[_Entry[P, R]], exc: BaseException) -> None:
    for entry in entries:
        if not entry.waiter.done():
            entry.waiter.set_exception(exc)
