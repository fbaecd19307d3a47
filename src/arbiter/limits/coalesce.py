"""Concurrent admissions share one Redis round trip.

Most of what a Redis admission costs this process is the client's own work per command (taking a
pooled connection, packing the command, parsing the reply, giving the connection back: about 200 µs
of CPU), not Redis. So while one round trip is in flight, the admissions that arrive queue up, and
when it is back they go out together as one command; each caller gets its own result. A caller alone
sends at once, on its own task: one call at a time waits for nothing more than before. Under load
a batch holds whatever arrived during the previous round trip, up to ``max_batch``.

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

    def __init__(self, send: Callable[[list[P]], Awaitable[Sequence[R]]], max_batch: int) -> None:
        self._send = send
        self._max_batch = max_batch
        self._queue: deque[tuple[P, asyncio.Future[R]]] = deque()
        self._busy = False  # a round trip is in flight; invariant: items queued implies busy
        self._drainer: asyncio.Task[None] | None = None

    async def submit(self, item: P) -> R:
        if self._busy:
            waiter: asyncio.Future[R] = asyncio.get_running_loop().create_future()
            self._queue.append((item, waiter))
            return await waiter
        self._busy = True
        try:
            return (await self._send([item]))[0]
        finally:
            self._busy = False
            if self._queue:
                self._start_drain()

    def _start_drain(self) -> None:
        self._busy = True
        self._drainer = asyncio.get_running_loop().create_task(self._drain())

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
            self._busy = False
            self._drainer = None
            while self._queue:  # only when the drain itself was cancelled (shutdown)
                self._queue.popleft()[1].cancel()

    async def aclose(self) -> None:
        """Stop sending: queued callers are cancelled. For shutdown and tests."""
        if self._drainer is not None:
            self._drainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drainer
