"""The SDK client's HTTP transport for a streamable-HTTP upstream: one quiet resend on a fresh connection.

The SDK's session of a streamable-HTTP upstream carries no calls (the relay does, ``relay.py``): only the
handshake or ``server/discover``, discovery's lists, and the change watcher's ``resources/subscribe``,
``resources/unsubscribe`` and ``subscriptions/listen`` (``upstream_watch.py``). A POST of those that meets
a pooled connection the upstream had closed while it sat idle gets no answer at all, and the SDK's
transport does not survive that: the failure ends its task group, so the whole session (and the watcher's
subscriptions on it) is lost, and the watcher, which never connects, waits for a call to open a new one.

So, as the relay does for calls that are safe to send twice, a request that failed before any answer on
a connection taken from the pool is sent once more, on a connection of its own; a new connection that fails
so is never tried again. Whether the connection was new is what httpcore's trace tells (a TCP connect
during this request). Every request on this client is safe to send twice; a ``tools/call`` never is, so
one that ever came this way would fail as before rather than risk running twice.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx2
import orjson

log = logging.getLogger(__name__)

# What a request written to a pooled connection meets when the peer had closed it: no answer at all.
_UNANSWERED = (httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.WriteError)
_NEVER_TWICE = frozenset({"tools/call"})  # may have run: sent once, whatever happens


class _Connects:
    """Per request: whether httpcore opened a connection for it (told by the trace extension)."""

    __slots__ = ("_outer", "opened")

    def __init__(self, outer: Any) -> None:
        self.opened = False
        self._outer = outer  # a trace the caller set itself, still told everything

    async def __call__(self, name: str, info: dict[str, Any]) -> None:
        if name == "connection.connect_tcp.started":
            self.opened = True
        if self._outer is not None:
            await self._outer(name, info)


class FreshRetry(httpx2.AsyncBaseTransport):
    """``pooled`` for every request; ``fresh`` (keeping no connection) for the one resend."""

    def __init__(self, pooled: httpx2.AsyncBaseTransport, fresh: httpx2.AsyncBaseTransport) -> None:
        self._pooled = pooled
        self._fresh = fresh
        self.resent = 0  # requests sent again after a stale pooled connection (tests read it)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        connects = _Connects(request.extensions.get("trace"))
        request.extensions["trace"] = connects
        try:
            return await self._pooled.handle_async_request(request)
        except _UNANSWERED as exc:
            if connects.opened or not _resendable(request):
                raise
            self.resent += 1
            log.debug(
                "a pooled connection to %s was stale (%s); sent again", request.url.host, type(exc).__name__
            )
        request.extensions["trace"] = connects._outer  # pyright: ignore[reportPrivateUsage]
        return await self._fresh.handle_async_request(request)

    async def aclose(self) -> None:
        try:
            await self._pooled.aclose()
        finally:
            await self._fresh.aclose()


def _resendable(request: httpx2.Request) -> bool:
    """A body that can be read again (not a stream already consumed), of no request that may have run."""
    if request.method != "POST":
        return request.method in ("GET", "DELETE")
    if not isinstance(request.stream, httpx2.ByteStream):
        return False
    try:
        message: Any = orjson.loads(request.content)
    except (orjson.JSONDecodeError, httpx2.RequestNotRead):
        return False
    return not (isinstance(message, dict) and message.get("method") in _NEVER_TWICE)  # pyright: ignore[reportUnknownMemberType]
