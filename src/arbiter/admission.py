"""Admission: whether a request is taken at all. Refused with 503 and ``Retry-After``, never reset:

- while draining (SIGTERM received, see ``serving.py``): every request but the probes and ``/metrics``,
  so a load balancer moves clients to other replicas while the ones in flight finish;
- beyond ``mcp.max_in_flight`` requests being answered on ``/mcp``: refused at once instead of queued
  without bound (each would hold memory, a task and maybe an upstream connection).

A refused request's body is read (and dropped) before the answer, up to a bound: a server that answers
and closes while the client is still sending makes the client's kernel see a reset, not the answer.
The cost on the hot path is an attribute read, a comparison and a counter.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import anyio
from starlette.types import Receive, Scope, Send

from arbiter.errors import ArbiterError, Overloaded, ShuttingDown

# Not refused while draining: liveness must hold (or the orchestrator kills the process mid-drain),
# readiness answers 503 itself, and metrics show the drain.
_ALWAYS = frozenset({"/healthz", "/readyz", "/metrics"})
_RETRY_AFTER_S = 1  # another replica (draining), or the same one a moment later (overloaded)
_DISCARD_MAX_BYTES = 1024 * 1024
_DISCARD_TIMEOUT_S = 5.0
_LISTEN = (b"mcp-method", b"subscriptions/listen")  # the header a 2026-07-28 listen request must carry
_MODERN = (b"mcp-protocol-version", b"2026-07-28")

Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


class Admission:
    """The gate in front of every HTTP request (``ArbiterApp``)."""

    __slots__ = ("draining", "in_flight", "listen_streams", "max_in_flight")

    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # /mcp requests being answered now (long-lived GET streams excluded)
        self.draining = False
        # 2026-07-28 subscriptions/listen streams live as long as the agent listens, like a GET stream:
        # not counted (bounded by notifications.max_listeners). Set only when they are served.
        self.listen_streams = False

    def drain(self) -> None:
        """From now on refuse new requests (readyz says so too); those in flight carry on."""
        self.draining = True

    def refuses(self, scope: Scope) -> bool:
        return self.draining and scope["path"] not in _ALWAYS

    async def refuse_draining(self, scope: Scope, receive: Receive, send: Send) -> None:
        exc = ShuttingDown("this Arbiter is shutting down; retry, another replica will answer")
        await _refuse(scope, receive, send, exc, close=True)

    async def serve_mcp(self, app: Asgi, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a /mcp request through ``app`` unless ``max_in_flight`` are being answered already."""
        if scope["method"] == "GET" or (self.listen_streams and _is_listen(scope)):
            # A handshake-era session's event stream: open for the session's life, bounded by
            # mcp.max_sessions, not a request being answered.
            await app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            exc = Overloaded(f"Arbiter is answering {self.max_in_flight} requests already; retry shortly")
            await _refuse(scope, receive, send, exc, close=False)
            return
        self.in_flight += 1
        try:
            await app(scope, receive, send)
        finally:
            self.in_flight -= 1


def _is_listen(scope: Scope) -> bool:
    # At 2026-07-28 the SDK refuses a request whose Mcp-Method header disagrees with its body, so the
    # header cannot smuggle another method past the in-flight limit.
    headers = scope["headers"]
    return _LISTEN in headers and _MODERN in headers


async def _refuse(scope: Scope, receive: Receive, send: Send, exc: ArbiterError, *, close: bool) -> None:
    if scope["path"] == "/mcp":
        error = {"code": exc.jsonrpc_code, "message": exc.message, "data": {"reason": exc.code}}
        payload = json.dumps({"jsonrpc": "2.0", "id": None, "error": error}).encode()
    else:
        payload = json.dumps(exc.to_http_body()).encode()
    complete = await _discard_body(receive)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"retry-after", str(_RETRY_AFTER_S).encode()),
    ]
    if close or not complete:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _discard_body(receive: Receive) -> bool:
    """Read the request body to its end (bounded in size and time); whether it was read whole."""
    read = 0
    with anyio.move_on_after(_DISCARD_TIMEOUT_S):
        while read <= _DISCARD_MAX_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return False  # the client went away
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                return True
    return False
