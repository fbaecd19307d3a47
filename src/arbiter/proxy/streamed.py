"""A 2026-07-28 answer that turns into an event stream once the upstream streams something for the call.

The direct path (``front.py``) answers JSON. When the upstream sends a message for the call before its
result (progress, a log message), the answer becomes ``text/event-stream`` at that moment: the message is
written as an event at once, more may follow, and the response ends with the JSON-RPC response as the last
event. A call for which nothing is streamed is answered in JSON as before, so the common call pays for one
small object and nothing else. Only an agent whose ``Accept`` admits ``text/event-stream`` gets a
``StreamedAnswer``; for others nothing can be streamed and the messages are dropped.

A 2026-07-28 agent has no back channel: a request the upstream puts to it is answered with an error (the
base class says so); ``input_required`` results (MRTR) are how that era asks. A handshake-era agent's answer
(``handshake_front.py``) is streamed the same way, and the upstream's requests are put to the agent through
``ask``, on its session.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
from starlette.types import Send

from arbiter.proxy.call_channel import MAX_REQUESTS, CallChannel
from arbiter.proxy.pipeline import CallContext
from arbiter.proxy.relay import encode

_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),  # proxies in front of Arbiter must not hold events back
]


Ask = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class StreamedAnswer(CallChannel):
    """The answer to one request on a direct path, streamed once there is something to stream."""

    __slots__ = ("_ask_agent", "_closed", "_headers", "_lock", "_send_asgi", "started")

    def __init__(
        self,
        ctx: CallContext,
        send: Send,
        *,
        ask: Ask | None = None,
        relay_requests: bool = False,
        max_requests: int = MAX_REQUESTS,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """``ask(method, message)`` puts an upstream's request to the agent (handshake era only); ``headers``
        are added to the event stream's (the handshake era's session id)."""
        super().__init__(ctx, relay_requests=relay_requests, max_requests=max_requests)
        self._ask_agent = ask
        self._headers = [*_HEADERS, *headers] if headers else _HEADERS
        self._send_asgi = send
        self.started = False  # the response is an event stream (its status and headers are sent)
        self._closed = False
        # Made by the first message, before its first await: messages come from other tasks too (an SDK
        # progress callback), and the response's pieces must not interleave with its end.
        self._lock: anyio.Lock | None = None

    async def _send(self, message: dict[str, Any]) -> None:
        if self._closed:  # a late message (another task's progress) after the response: nowhere to go
            return
        lock = self._lock
        if lock is None:
            lock = self._lock = anyio.Lock()
        async with lock:
            if self._closed:
                return
            if not self.started:
                self.started = True
                await self._send_asgi(
                    {"type": "http.response.start", "status": 200, "headers": self._headers}
                )
            await self._send_asgi({"type": "http.response.body", "body": _event(message), "more_body": True})

    def _can_ask(self) -> bool:
        return self._ask_agent is not None

    async def _ask(self, method: str, message: dict[str, Any]) -> dict[str, Any]:
        assert self._ask_agent is not None  # _can_ask said so
        return await self._ask_agent(method, message)

    async def finish(self, message: dict[str, Any]) -> bool:
        """End the stream with the JSON-RPC response ``message`` if it was started; False: nothing was
        streamed, and the caller answers in JSON. Either way no message is sent after this."""
        self._closed = True
        lock = self._lock
        if lock is None:  # no message ever came (each makes the lock before awaiting anything)
            return False
        async with lock:
            if not self.started:
                return False
            await self._send_asgi({"type": "http.response.body", "body": _event(message), "more_body": False})
        return True


def _event(message: dict[str, Any]) -> bytes:
    return b"event: message\ndata: " + encode(message) + b"\n\n"
