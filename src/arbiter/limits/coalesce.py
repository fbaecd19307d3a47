"""Concurrent admissions share one Redis round trip.

Most of what a Redis admission costs this process is the client's own work per command (taking a
pooled connection, packing the command, parsing the reply, giving the connection back: about 200 µs
of CPU), not Redis. So while one round trip is in flight, the admissions that arrive queue up, and
when it is back they go out together as one command; each caller gets its own result. A caller alone
sends at once, on its own task: one call at a time waits for nothing more than before. Under load
a batch holds whatever arrived during the previous round trip, up to ``max_batch``; when a full batch
is waiting (a slow Redis), another round trip goes alongside, up to ``max_lanes`` in flight.

A caller that gives up (its deadline, a cancelled request) before its item is sent takes it out of
the queue; once sent, the item runs, as a single round trip would have. When a round trip fails,
every caller in it gets the error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

P = TypeVar("P")
R = TypeVar("R")


class Coalescer(Generic[P, R]):
    """``await submit(item)`` is ``(await send([item]))[0]``, with concurrent items sent together."""

    def __init__(
        self, send: Callable[[list[P]], Awaitable[Sequence[R]]], max_batch: int, max_lanes: int = 4
    ) -> None:
        self._send = send
        self._max_batch = max_batch
        self._max_lanes = max_lanes
        self._queue: deque[tuple[P, asyncio.Future[R]]] = deque()
        self._lanes = 0  # round trips in flight; invariant: items queued implies at least one
        self._drainers: set[asyncio.Task[None]] = set()

    async def submit(self, item: P) -> R:
        if self._lanes:
            waiter: asyncio.Future[R] = asyncio.get_running_loop().create_future()
            self._queue.append((item, waiter))
            if len(self._queue) >= self._max_batch and self._lanes < self._max_lanes:
                self._start_drain()  # a full batch waiting: a slow Redis does not serialise everyone
            return await waiter
        self._lanes += 1
        try:
            return (await self._send([item]))[0]
        finally:
            self._lanes -= 1
            if self._queue and not self._lanes:
                self._start_drain()

    def _start_drain(self) -> None:
        self._lanes += 1
        drainer = asyncio.get_running_loop().create_task(self._drain())
        self._drainers.add(drainer)
        drainer.add_done_callback(self._drainers.discard)

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch: list[tuple[P, asyncio.Future[R]]] = []
                while self._queue and len(batch) < self._max_batch:
                    item, waiter = self._queue.popleft()
                    if not waiter.done():  # its caller gave up before it was sent
                        batch.append((item, waiter))
                if not batch:
                    continue
                try:
                    results = await self._send([item for item, _ in batch])
                except Exception as exc:  # noqa: BLE001 - not handled here: each caller gets it
                    for _, waiter in batch:
                        if not waiter.done():
                            waiter.set_exception(exc)
                    continue
                except asyncio.CancelledError:
                    for _, waiter in batch:
                        waiter.cancel()
                    raise
                for (_, waiter), result in zip(batch, results, strict=True):
                    if not waiter.done():
                        waiter.set_result(result)
        finally:
            self._lanes -= 1
            if not self._drainers - {asyncio.current_task()}:  # the last lane, cancelled (shutdown)
                while self._queue:
                    self._queue.popleft()[1].cancel()

    async def aclose(self) -> None:
        """Stop sending: callers still waiting are cancelled. For shutdown and tests."""
        for drainer in list(self._drainers):
            drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drainer
