"""Per-caller sessions for token-exchange upstreams.

One pooled session per upstream cannot carry several callers' identities: a handshake-era upstream
binds its session to whoever opened it, and the token on it would be one caller's. So a token-exchange
upstream gets one session per caller token, each with the token the authorization server exchanged
for that caller. They are keyed by a hash of the caller's token (a caller who refreshes their token gets
a new session; the old one idles out), bounded in number (least recently used closed first) and closed
after ``idle_s`` unused. A session evicted while requests are running on it closes when they finish.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from pydantic import SecretStr

from arbiter.proxy.relay import UpstreamRequest


class Session(Protocol):
    """What this module needs of a per-caller session. ``UpstreamClient`` is one; it also owns a
    ``CallerSessions``, so naming it here would make the two modules import each other."""

    async def request(
        self,
        request: UpstreamRequest,
        *,
        deadline_s: float | None = ...,
        on_send: Callable[[], None] | None = ...,
    ) -> dict[str, Any]: ...

    async def aclose(self) -> None: ...

    def backoff_left(self) -> float: ...


S = TypeVar("S", bound=Session)


@dataclass
class _Entry(Generic[S]):
    client: S
    used: float
    active: int = 0
    retired: bool = False


class CallerSessions(Generic[S]):
    def __init__(
        self,
        make: Callable[[SecretStr], S],
        *,
        max_sessions: int,
        idle_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._make = make
        self._max = max_sessions
        self._idle = idle_s
        self._clock = clock
        self._entries: OrderedDict[str, _Entry[S]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def backoff_left(self, token: SecretStr) -> float:
        """Seconds until the caller's session may try to connect again after a failed connect."""
        entry = self._entries.get(hashlib.sha256(token.get_secret_value().encode()).hexdigest())
        return entry.client.backoff_left() if entry is not None else 0.0

    def clients(self) -> list[S]:
        """The open per-caller clients, least recently used first."""
        return [e.client for e in self._entries.values()]

    async def request(
        self,
        token: SecretStr,
        request: UpstreamRequest,
        deadline_s: float | None,
        on_send: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        key = hashlib.sha256(token.get_secret_value().encode()).hexdigest()
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(self._make(token), self._clock())
        else:
            self._entries.move_to_end(key)
        entry.active += 1
        try:
            await self._evict(len(self._entries) - self._max)
            return await entry.client.request(request, deadline_s=deadline_s, on_send=on_send)
        finally:
            entry.active -= 1
            entry.used = self._clock()
            if entry.retired and entry.active == 0:
                await entry.client.aclose()

    async def sweep(self) -> None:
        """Close sessions unused for longer than the idle timeout."""
        cutoff = self._clock() - self._idle
        for key, entry in list(self._entries.items()):
            if entry.used < cutoff and entry.active == 0:
                del self._entries[key]
                await entry.client.aclose()

    async def aclose(self) -> None:
        entries, self._entries = list(self._entries.values()), OrderedDict()
        for entry in entries:
            await entry.client.aclose()

    async def _evict(self, count: int) -> None:
        while count > 0 and self._entries:
            _, entry = self._entries.popitem(last=False)
            count -= 1
            if entry.active:
                entry.retired = True  # the last request running on it closes it
            else:
                await entry.client.aclose()
