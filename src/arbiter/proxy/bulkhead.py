"""A bulkhead per upstream: at most ``limit`` calls in flight, at most ``max_waiting`` more waiting for a
slot (each for at most ``wait_s`` and never past its call's deadline); the rest are refused at once.

A hung upstream then holds ``limit`` tasks and connections, never the workers or memory the other
upstreams need. The free path is a counter: no lock, no checkpoint; only a full bulkhead waits.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque

import anyio

from arbiter.errors import UpstreamUnavailable


class Bulkhead:
    __slots__ = ("_waiters", "in_use", "limit", "max_waiting", "name", "wait_s")

    def __init__(self, name: str, *, limit: int, max_waiting: int, wait_s: float) -> None:
        self.name = name
        self.limit = limit
        self.max_waiting = max_waiting
        self.wait_s = wait_s
        self.in_use = 0
        self._waiters: deque[anyio.Event] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return True
        return False

    async def acquire(self, deadline: float) -> None:
        """Take a slot, waiting until ``deadline`` (``time.monotonic``) or ``wait_s`` at most; refused with
        ``UpstreamUnavailable`` (``bulkhead="full"``) when the wait is full or runs out."""
        if self.try_acquire():
            return
        if len(self._waiters) >= self.max_waiting:
            raise self._refusal()
        granted = anyio.Event()
        self._waiters.append(granted)
        try:
            with anyio.move_on_after(min(self.wait_s, max(0.0, deadline - time.monotonic()))):
                await granted.wait()
        except BaseException:
            self._abandon(granted)  # cancelled (the caller went away): hand a granted slot on
            raise
        if not granted.is_set():
            self._abandon(granted)
            raise self._refusal()

    def release(self) -> None:
        while self._waiters:
            granted = self._waiters.popleft()
            if not granted.is_set():
                granted.set()  # the slot passes to the waiter: in_use stays
                return
        self.in_use -= 1

    def _abandon(self, granted: anyio.Event) -> None:
        if granted.is_set():
            self.release()  # it was ours already
        else:
            with contextlib.suppress(ValueError):  # removed by release meanwhile
                self._waiters.remove(granted)

    def _refusal(self) -> UpstreamUnavailable:
        return UpstreamUnavailable(
            f"upstream {self.name!r} is saturated; try again shortly",  # no counts: they are ours to know
            upstream=self.name,
            retry_after_s=1,
            bulkhead="full",
        )
