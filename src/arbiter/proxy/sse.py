"""Reading a ``text/event-stream`` body: the event types and data of its events, as they arrive.

The WHATWG rules the relay needs: lines end in CRLF, LF or CR; ``:`` starts a comment; ``data`` lines
join with LF; a blank line ends an event; a field without a colon has an empty value; one leading space
after the colon is dropped. ``id`` and ``retry`` are read and ignored (2026-07-28 streams are not
resumable, and a relayed request is never resumed). aiohttp has no event-stream reader of its own.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass


class EventTooLarge(ValueError):
    """One event is larger than the reader accepts; ``partial``: the event's data read so far (at most
    the limit), for a caller that keeps the start of an oversized answer."""

    def __init__(self, message: str, partial: bytes | bytearray = b"") -> None:
        super().__init__(message)
        self.partial = partial


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    data: str


async def events(chunks: AsyncIterable[bytes], max_event_bytes: int) -> AsyncIterator[Event]:
    """The events of a stream delivered as ``chunks`` (any split); a final event needs its blank line.

    Linear in the stream's size however it is cut: each byte is scanned for a line ending once, and
    consumed bytes are dropped once per chunk.
    """
    buffer = bytearray()
    scan = 0  # where the search for the next line ending resumes
    kind = ""
    data: list[str] = []
    size = 0
    async for chunk in chunks:
        buffer += chunk
        start = 0
        while (found := _EOL.search(buffer, scan)) is not None:
            if found.group() == b"\r" and found.end() == len(buffer):
                break  # a CR at the end may be the first half of a CRLF: wait for more
            line = bytes(buffer[start : found.start()])
            start = scan = found.end()
            if not line:
                if data:
                    yield Event(kind or "message", "\n".join(data))
                kind, data, size = "", [], 0
                continue
            size += len(line)
            if size > max_event_bytes:
                raise EventTooLarge(f"an event exceeds {max_event_bytes} bytes", _partial(data, line))
            name, _, value = line.partition(b":")
            if not name:
                continue  # a comment (keep-alive pings)
            text = value[1:] if value.startswith(b" ") else value
            if name == b"data":
                data.append(text.decode("utf-8", errors="replace"))
            elif name == b"event":
                kind = text.decode("utf-8", errors="replace")
        del buffer[:start]
        scan = max(len(buffer) - 1, 0) if buffer.endswith(b"\r") else len(buffer)
        if size + len(buffer) > max_event_bytes:
            raise EventTooLarge(f"an event exceeds {max_event_bytes} bytes", _partial(data, buffer))


_EOL = re.compile(rb"\r\n?|\n")


def _partial(data: list[str], line: bytes | bytearray) -> bytes | bytearray:
    # The data lines so far and the (unfinished) line being read, without its "data:" field name. The
    # reader's own buffer is handed over as it is (it is not read again): no copy of a large event.
    if line.startswith(b"data:"):
        if isinstance(line, bytearray):
            del line[: 6 if line.startswith(b"data: ") else 5]
        else:
            line = line[6:] if line.startswith(b"data: ") else line[5:]
    if not data:
        return line
    return "\n".join(data).encode() + b"\n" + line
