"""The load generator: an MCP request as an SDK client sends it, replayed over pooled aiohttp connections.

An ``mcp.Client`` costs about as much CPU per call as the proxies measured (2.2 ms against 1.8-2.7 ms on
the 2-core machine, 2026-12-03), so with it as the load generator calls/s measured the client more than
the proxy. Here one SDK session does the era's handshake and one real request; the request's headers
and body are captured from its HTTP client, and the load replays them, a new JSON-RPC id and echo text
each time, checking every answer (JSON or an SSE stream) as the SDK would: the right id, a result, the
text echoed back or a non-empty tools list. The session stays open meanwhile, so a handshake-era
session id stays valid.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx2
import orjson
from mcp import Client

# What the replay sets itself, or what belongs to one request only.
_DROPPED = {"content-length", "host", "accept-encoding", "connection", "user-agent"}


@dataclass(frozen=True)
class Captured:
    url: str
    headers: dict[str, str]
    body: dict[str, Any]


class Capture:
    """An httpx2 request hook that keeps the last ``tools/call`` and the last ``tools/list`` POST (the
    SDK client lists tools on its own too, to validate results against their output schemas)."""

    def __init__(self) -> None:
        self.last: dict[str, Captured] = {}

    async def __call__(self, request: httpx2.Request) -> None:
        if request.method != "POST":
            return
        try:
            body = orjson.loads(request.content)
        except (orjson.JSONDecodeError, httpx2.RequestNotRead):
            return
        method = body.get("method") if isinstance(body, dict) else None  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        if method in ("tools/call", "tools/list"):
            headers = {k.lower(): v for k, v in request.headers.items() if k.lower() not in _DROPPED}
            self.last[method] = Captured(str(request.url), headers, body)  # pyright: ignore[reportArgumentType]


class Replay:
    """Sends the captured request again and again; ``once(i)`` returns the failure as text, or None."""

    def __init__(self, captured: Captured, http: aiohttp.ClientSession) -> None:
        self._captured = captured
        self._http = http
        self._call = captured.body.get("method") == "tools/call"
        # A session's request ids must not repeat (Arbiter runs a repeated one at most once, as a
        # transport's retry): above the SDK's own, and never reused across loads.
        self._ids = itertools.count(1_000_000)

    async def once(self, i: int) -> str | None:
        body = dict(self._captured.body)
        rid = body["id"] = next(self._ids)
        text = f"hello {i}"
        if self._call:
            params = dict(body["params"])
            params["arguments"] = {**params.get("arguments", {}), "text": text}
            body["params"] = params
        try:
            async with self._http.post(
                self._captured.url, data=orjson.dumps(body), headers=self._captured.headers
            ) as resp:
                raw = await resp.read()
                status, ctype = resp.status, resp.headers.get("content-type", "")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {str(exc)[:200]}"
        if status != 200:
            return f"HTTP {status}: {raw[:200]!r}"
        try:
            message = _answer(raw, ctype, rid)
        except ValueError as exc:  # not JSON, or not UTF-8
            return f"unreadable answer ({type(exc).__name__}): {raw[:200]!r}"
        if message is None:
            return f"no answer with id {rid} in {raw[:200]!r}"
        if "error" in message:
            return f"error {str(message['error'])[:200]}"
        result = message.get("result")
        if not isinstance(result, dict):
            return f"no result: {str(message)[:200]}"
        if self._call:
            content = result.get("content") or [{}]  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
            if result.get("isError") or content[0].get("text") != text:  # pyright: ignore[reportUnknownMemberType]
                return f"unexpected result: {str(result)[:200]}"
            return None
        return None if result.get("tools") else "empty tools list"  # pyright: ignore[reportUnknownMemberType]


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # orjson refuses lone UTF-16 surrogates in strings (\\ud800 escapes), which JSON allows and the
        # SDK's parser accepts; ContextForge's tools/list carries some.
        return json.loads(data)


def _answer(raw: bytes, ctype: str, rid: int) -> dict[str, Any] | None:
    """The JSON-RPC answer to ``rid``: the body itself, or the SSE event carrying it."""
    if ctype.startswith("application/json"):
        message = _loads(raw)
        return message if isinstance(message, dict) and message.get("id") == rid else None  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    for line in raw.split(b"\n"):
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if not data:
                continue
            message = _loads(data)
            if isinstance(message, dict) and message.get("id") == rid:  # pyright: ignore[reportUnknownMemberType]
                return message  # pyright: ignore[reportUnknownVariableType]
    return None


@asynccontextmanager
async def replay_session(concurrency: int) -> AsyncGenerator[aiohttp.ClientSession]:
    """Pooled connections with room for every request in flight (no connection churn mid-run)."""
    connector = aiohttp.TCPConnector(limit=concurrency + 8, keepalive_timeout=60.0)
    timeout = aiohttp.ClientTimeout(total=30.0)
    # Compressed answers are decompressed, as the SDK's client does (ContextForge gzips its tools/list).
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        yield http


async def captured_request(client: Client, op: str, tool: str, capture: Capture) -> Captured:
    """Make one real request through the SDK client and return it as sent."""
    if op == "call":
        await client.call_tool(tool, {"text": "hello 0"})
    else:
        await client.list_tools()
    method = "tools/call" if op == "call" else "tools/list"
    if method not in capture.last:
        raise RuntimeError(f"the SDK client's {method} request was not captured")
    return capture.last[method]
