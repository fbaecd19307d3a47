"""Reading a ``POST /mcp`` body: the right media type, a declared length within the limit, the whole body
within a deadline. Anything else is refused before a byte of JSON is parsed.

A body that is refused unread stays on the connection; it would be read as the next request, so those
answers close the connection (``Refusal.close``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import anyio
from mcp_types import INVALID_REQUEST
from starlette.types import Message, Receive

JSON_MEDIA_TYPE = "application/json"


@dataclass(frozen=True)
class Refusal:
    """An HTTP answer to a request refused before the MCP handlers saw it."""

    status: int
    code: int  # the JSON-RPC error code in the answer
    message: str
    reason: str  # the stable reason recorded in the audit log
    close: bool = False  # the connection cannot be reused (an unread body is still on it)


class ClientGone(Exception):
    """The client disconnected before its body arrived: there is no one left to answer."""


def check_headers(headers: Mapping[str, str], limit: int) -> Refusal | None:
    """Media type and declared length, before reading anything."""
    media_type = headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != JSON_MEDIA_TYPE:
        return Refusal(
            415,
            INVALID_REQUEST,
            "Unsupported Media Type: Content-Type must be application/json",
            "unsupported_media_type",
            close=True,
        )
    declared = headers.get("content-length")
    if declared is None:
        return None  # chunked: the limit applies while reading
    if not declared.isdigit() or len(declared) > 19:
        return Refusal(400, INVALID_REQUEST, "Invalid Content-Length header", "invalid_request", close=True)
    if int(declared) > limit:
        return too_large(limit)
    return None


def too_large(limit: int) -> Refusal:
    return Refusal(
        413, INVALID_REQUEST, f"Request body exceeds {limit} bytes", "payload_too_large", close=True
    )


async def read_body(receive: Receive, limit: int, timeout_s: float) -> bytes | Refusal:
    """The whole body, or a refusal when it is over ``limit`` bytes or takes over ``timeout_s`` to arrive.

    Raises ``ClientGone`` when the client disconnects first.
    """
    chunks: list[bytes] = []
    size = 0
    with anyio.move_on_after(timeout_s):
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientGone
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
    return Refusal(
        408,
        INVALID_REQUEST,
        f"Request Timeout: the body did not arrive within {timeout_s:g}s",
        "request_timeout",
        close=True,
    )


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands out an already-read body once, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later reads see the client's disconnect, as the transport expects

    return replay
