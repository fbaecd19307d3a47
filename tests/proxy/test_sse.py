"""The event-stream reader: the same events however the stream is cut into chunks."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from arbiter.proxy.sse import Event, EventTooLarge, events

STREAM = (
    b": keep-alive ping\r\n\r\n"
    b'event: message\r\ndata: {"a": 1}\r\n\r\n'
    b"id: 7\nretry: 1000\ndata: first\ndata:second\n\n"
    b"data: cr only\r\revent: custom\rdata\r\r"
    b"data: \xc3\xbc\xe2\x86\x92\r\n\r\n"
    b"data: unterminated"
)
EXPECTED = [
    Event("message", '{"a": 1}'),
    Event("message", "first\nsecond"),
    Event("message", "cr only"),
    Event("custom", ""),
    Event("message", "ü→"),
]


async def _chunks(data: bytes, cuts: list[int]) -> AsyncIterator[bytes]:
    start = 0
    for cut in [*cuts, len(data)]:
        yield data[start:cut]
        start = cut


async def _read(data: bytes, cuts: list[int], limit: int = 1 << 20) -> list[Event]:
    return [event async for event in events(_chunks(data, cuts), limit)]


async def test_events_in_one_chunk() -> None:
    # "data" without a colon is an empty data line: the custom event has empty data, and is dispatched;
    # an event never ended by a blank line is not.
    assert await _read(STREAM, []) == EXPECTED


@pytest.mark.parametrize("cut", range(1, len(STREAM)))
async def test_events_cut_anywhere(cut: int) -> None:
    assert await _read(STREAM, [cut]) == await _read(STREAM, [])


async def test_events_byte_by_byte() -> None:
    assert await _read(STREAM, list(range(1, len(STREAM)))) == await _read(STREAM, [])


async def test_an_oversized_event_is_refused_even_without_line_breaks() -> None:
    with pytest.raises(EventTooLarge):
        await _read(b"data: " + b"x" * 5000, [100, 200, 3000], limit=1000)
    with pytest.raises(EventTooLarge):
        await _read(b"".join(b"data: " + b"x" * 100 + b"\n" for _ in range(20)) + b"\n", [], limit=1000)
