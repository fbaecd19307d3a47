"""Reading a ``text/event-stream`` body: the event types and data of its events, as they arrive.

The WHATWG rules the relay needs: lines end in CRLF, LF or CR; ``:`` starts a comment; ``data`` lines
join with LF; a blank line ends an event; a field without a colon has an empty value; one leading space
after the colon is dropped. ``id`` and ``retry`` are read and ignored (2026-07-28 streams are not
resumable, and a relayed request is never resumed). aiohttp has no event-stream reader of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass


class EventTooLarge(ValueError):
    """One event is larger than the reader accepts."""


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    data: str


async def events(chunks: AsyncIterable[bytes], max_event_bytes: int) -> AsyncIterator[Event]:
    """The events of a stream delivered as ``chunks`` (any split); a final event needs its blank line."""
    buffer = b""
    kind = ""
    data: list[str] = []
    size = 0
    async for chunk in chunks:
        buffer += chunk
        while True:
            line, ending = _next_line(buffer)
            if ending == 0:
                break
            buffer = buffer[ending:]
            if not line:
                if data:
                    yield Event(kind or "message", "\n".join(data))
                kind, data, size = "", [], 0
                continue
            size += len(line)
            if size > max_event_bytes:
                raise EventTooLarge(f"an event exceeds {max_event_bytes} bytes")
            name, _, value = line.partition(b":")
            if not name:
                continue  # a comment (keep-alive pings)
            text = value[1:] if value.startswith(b" ") else value
            if name == b"data":
                data.append(text.decode("utf-8", errors="replace"))
            elif name == b"event":
                kind = text.decode("utf-8", errors="replace")
        if len(buffer) > max_event_bytes:
            raise EventTooLarge(f"an event exceeds {max_event_bytes} bytes")


def _next_line(buffer: bytes) -> tuple[bytes, int]:
    """The first complete line of ``buffer`` and where the next starts, or ``(b"", 0)`` if none is."""
    lf = buffer.find(b"\n")
    cr = buffer.find(b"\r")
    if cr != -1 and (lf == -1 or cr < lf):
        if cr + 1 == len(buffer):
            return b"", 0  # a CR at the end may be the first half of a CRLF: wait for more
        return buffer[:cr], cr + (2 if buffer[cr + 1 : cr + 2] == b"\n" else 1)
    if lf != -1:
        return buffer[:lf], lf + 1
    return b"", 0
