"""The benchmark's load generator counts a request as done only when its answer is the right one.

``bench/raw_load.py`` replays a captured request; a proxy that answered the wrong id, an error, another
text, or nothing it can parse must show up as a failed request, whether the answer came as JSON or as an
SSE stream. A loopback aiohttp server plays the proxy, answering as each case says.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from raw_load import Captured, Replay, replay_session  # pyright: ignore[reportMissingImports]

Answer = Callable[[dict[str, Any]], tuple[str, bytes]]


def _result(body: dict[str, Any], text: str | None = None) -> dict[str, Any]:
    echoed = text if text is not None else body["params"]["arguments"]["text"]
    return {"jsonrpc": "2.0", "id": body["id"], "result": {"content": [{"type": "text", "text": echoed}]}}


def _json(message: dict[str, Any]) -> tuple[str, bytes]:
    return "application/json", orjson.dumps(message)


def _sse(*messages: dict[str, Any]) -> tuple[str, bytes]:
    events = b"".join(b"event: message\ndata: " + orjson.dumps(m) + b"\n\n" for m in messages)
    return "text/event-stream", events


CASES: dict[str, tuple[Answer, bool]] = {
    "json": (lambda b: _json(_result(b)), True),
    "sse with a progress message first": (
        lambda b: _sse({"jsonrpc": "2.0", "method": "notifications/progress", "params": {}}, _result(b)),
        True,
    ),
    "json with a lone surrogate elsewhere": (
        lambda b: ("application/json", json.dumps({**_result(b), "note": "\ud800"}).encode()),
        True,
    ),
    "gzip-compressed json": (lambda b: ("application/json", gzip.compress(orjson.dumps(_result(b)))), True),
    "another id": (lambda b: _json({**_result(b), "id": b["id"] + 1}), False),
    "another text": (lambda b: _json(_result(b, "hello")), False),
    "an error": (
        lambda b: _json({"jsonrpc": "2.0", "id": b["id"], "error": {"code": -1, "message": "x"}}),
        False,
    ),
    "a tool error": (
        lambda b: _json({"jsonrpc": "2.0", "id": b["id"], "result": {"isError": True, "content": []}}),
        False,
    ),
    "not json": (lambda b: ("application/json", b"\x1f\x8bnot json"), False),
    "sse without the answer": (lambda b: _sse({"jsonrpc": "2.0", "method": "notifications/message"}), False),
}


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[str, list[Answer], list[dict[str, Any]]]]:
    answers: list[Answer] = []
    seen: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        seen.append(body)
        ctype, raw = answers[0](body)
        response = web.Response(body=raw, content_type=ctype.split(";")[0])
        if raw[:2] == b"\x1f\x8b":
            response.headers["Content-Encoding"] = "gzip"
        return response

    app = web.Application()
    app.router.add_post("/mcp", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]  # the port the OS chose
    try:
        yield f"http://127.0.0.1:{port}/mcp", answers, seen
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("case", list(CASES))
async def test_only_the_right_answer_counts(
    proxy: tuple[str, list[Answer], list[dict[str, Any]]], case: str
) -> None:
    url, answers, seen = proxy
    answer, good = CASES[case]
    answers.append(answer)
    captured = Captured(
        url,
        {"content-type": "application/json", "accept": "application/json, text/event-stream"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {}}},
    )
    async with replay_session(4) as http:
        replay = Replay(captured, http)
        first, second = await replay.once(1), await replay.once(2)
    assert (first is None) is good and (second is None) is good, (first, second)
    # Each replay is the captured request with a fresh id and its own text; ids never repeat.
    assert [b["params"]["arguments"]["text"] for b in seen] == ["hello 1", "hello 2"]
    assert len({b["id"] for b in seen}) == 2 and 2 not in {b["id"] for b in seen}


async def test_a_refused_connection_is_a_failure() -> None:
    captured = Captured("http://127.0.0.1:9/mcp", {}, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    async with replay_session(1) as http:
        why = await Replay(captured, http).once(1)
    assert why is not None and ("ClientConnectorError" in why or "Error" in why)
