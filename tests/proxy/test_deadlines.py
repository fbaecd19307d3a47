"""Deadlines and safe retries (issue 13, items 4-5), against real upstream servers on loopback.

A trickling upstream (it streams events and never answers) fails at the call's deadline with
``upstream_timeout`` and is told to stop (``notifications/cancelled``). An upstream that resets the
connection after reading a request runs a ``tools/call`` once, unless a security admin marked the tool
idempotent, and then the call is sent again and succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
from mcp.server import MCPServer
from starlette.types import Message, Receive, Scope, Send

from tests.audit.helpers import of_kind, wait_for
from tests.conftest import ArbiterFactory, free_port, serve_in_thread, wait_listening
from tests.proxy.test_resilience import HandshakeOnly
from tests.refusals import tool_refusal


class Trickle:
    """Wraps an MCP server app: a ``tools/call`` of ``trickle`` is answered with an SSE stream that sends
    a progress event every 50 ms and never the response (for 60 s at most). Every POSTed JSON-RPC
    message is recorded, so the test sees the ``notifications/cancelled`` Arbiter sends."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            decoded: Any = json.loads(body)
        except ValueError:
            decoded = None
        if isinstance(decoded, dict):
            self.messages.append(decoded)
            params: Any = decoded.get("params") or {}
            if decoded.get("method") == "tools/call" and params.get("name") == "trickle":
                await self._trickle(decoded["id"], receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _trickle(self, rid: object, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )
        with anyio.move_on_after(60):
            for n in range(1200):
                note = {
                    "jsonrpc": "2.0",
                    "method": "notifications/message",
                    "params": {"level": "info", "data": n},
                }
                await send(
                    {
                        "type": "http.response.body",
                        "body": f"data: {json.dumps(note)}\n\n".encode(),
                        "more_body": True,
                    }
                )
                await anyio.sleep(0.05)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def cancelled(self) -> list[object]:
        return [
            m["params"]["requestId"] for m in self.messages if m.get("method") == "notifications/cancelled"
        ]

    def calls(self) -> list[object]:
        return [m["id"] for m in self.messages if m.get("method") == "tools/call"]


def _trickle_server(stateless: bool) -> MCPServer:
    server = MCPServer("trickle")

    @server.tool()
    async def trickle() -> str:  # answered by the Trickle wrapper, never by this body
        return "never"

    return server


@pytest.mark.parametrize("era", ["2026-07-28", "handshake"])
async def test_trickling_upstream_times_out_at_the_deadline_and_is_cancelled(
    arbiter_factory: ArbiterFactory, era: str
) -> None:
    if era == "handshake":  # the notification goes on the request's own session
        trickle = Trickle(_trickle_server(False).streamable_http_app(json_response=True))
        app: Any = HandshakeOnly(trickle)
    else:  # a POST of its own
        trickle = Trickle(_trickle_server(True).streamable_http_app(stateless_http=True, json_response=True))
        app = trickle
    server = arbiter_factory()
    with serve_in_thread(app) as port:
        # The tool's own deadline, not the upstream's call_timeout_s: that one also bounds discovery,
        # which a busy machine may not finish within 1 s.
        created = server.register("slow", f"http://127.0.0.1:{port}/mcp")
        with server.admin() as admin:
            resp = admin.put(f"/upstreams/{created['id']}/tools/trickle/settings", json={"timeout_s": 1})
            assert resp.status_code == 200, resp.text
        async with server.client("2026-07-28") as client:
            failed = await client.session.call_tool("slow__trickle", {})
            refusal = tool_refusal(failed)
            assert refusal["reason"] == "upstream_timeout", refusal
            assert refusal["upstream"] == "slow" and refusal["deadline_s"] == 1

            async def told_to_stop() -> bool:
                return bool(trickle.cancelled())

            await _until(told_to_stop)
            assert trickle.cancelled() == trickle.calls()  # the request it was sent, by its id
            assert str(trickle.calls()[0]).startswith("arbiter-")
        records = wait_for(server, lambda rs: len(of_kind(rs, "mcp")) >= 1)
        (rec,) = [r for r in of_kind(records, "mcp") if r["method"] == "tools/call"]
        assert rec["reason"] == "upstream_timeout"


# --- an upstream that resets the connection after reading the request --------------------------


class ResetAfterRead:
    """A TCP front for a real upstream that answers each connection's one request and closes it (so no
    connection is ever reused). While ``resets`` is above zero, a ``tools/call`` of ``charge`` is passed
    to the upstream (which runs it) and then the client's connection is reset, unanswered."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target = f"http://127.0.0.1:{target_port}"
        self.resets = 0
        self.reset_done = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> ResetAfterRead:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        wait_listening(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _start(self) -> None:
        self._http = httpx.AsyncClient(base_url=self._target, timeout=30)
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def _stop(self) -> None:
        self._server.close()
        await self._http.aclose()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = [tuple(line.split(":", 1)) for line in lines[1:] if ":" in line]
            length = next((int(v) for k, v in headers if k.strip().lower() == "content-length"), 0)
            body = await reader.readexactly(length) if length else b""
            forward = {
                k.strip(): v.strip()
                for k, v in headers
                if k.strip().lower() not in ("host", "content-length", "connection", "transfer-encoding")
            }
            resp = await self._http.request(method, path, content=body, headers=forward)
            if self.resets > 0 and b'"tools/call"' in body and b'"charge"' in body:
                self.resets -= 1
                self.reset_done += 1
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()  # RST: the upstream ran it, the caller gets nothing
                return
            out = [f"HTTP/1.1 {resp.status_code} {resp.reason_phrase}"]
            for k, v in resp.headers.items():
                if k.lower() not in ("content-length", "connection", "transfer-encoding", "content-encoding"):
                    out.append(f"{k}: {v}")
            out += [f"content-length: {len(resp.content)}", "connection: close", "", ""]
            writer.write("\r\n".join(out).encode("latin-1") + resp.content)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, httpx.HTTPError):
            pass
        finally:
            with contextlib.suppress(OSError):
                writer.close()


@contextlib.contextmanager
def counting_server() -> Iterator[tuple[int, list[int]]]:
    """A real MCP server on loopback whose ``charge`` tool records every run: its port, and the runs."""
    runs: list[int] = []
    server = MCPServer("count")

    @server.tool()
    def charge(amount: int) -> str:
        runs.append(amount)
        return f"charged {amount}"

    with serve_in_thread(server.streamable_http_app(stateless_http=True, json_response=True)) as port:
        yield port, runs


@pytest.fixture
def counting_upstream() -> Iterator[tuple[ResetAfterRead, list[int]]]:
    """The counting server behind a ``ResetAfterRead`` front."""
    with counting_server() as (port, runs), ResetAfterRead(port) as front:
        yield front, runs


async def test_reset_after_read_runs_a_tool_once_unless_marked_idempotent(
    arbiter_factory: ArbiterFactory, counting_upstream: tuple[ResetAfterRead, list[int]]
) -> None:
    front, runs = counting_upstream
    server = arbiter_factory()
    created = server.register("count", f"http://127.0.0.1:{front.port}/mcp")
    async with server.client("2026-07-28") as client:
        front.resets = 1
        failed = await client.session.call_tool("count__charge", {"amount": 5})
        assert tool_refusal(failed)["reason"] == "upstream_unavailable"
        assert front.reset_done == 1
        assert runs == [5]  # it ran once and was not sent again: nobody said it may run twice

        with server.admin() as admin:
            settings_url = f"/upstreams/{created['id']}/tools/charge/settings"
            assert admin.get(settings_url).json()["idempotent"] is False
            resp = admin.put(settings_url, json={"idempotent": True})
            assert resp.status_code == 200, resp.text
            assert resp.json()["idempotent"] is True and resp.json()["updated_by"]
            assert admin.get(settings_url).json()["idempotent"] is True

        front.resets = 1
        result = await client.call_tool("count__charge", {"amount": 7})
        assert result.is_error is False, result
        assert front.reset_done == 2
        assert runs == [5, 7, 7]  # reset after the first run, sent again: the retry answered
    # The change is an audited admin change like the others.
    records = wait_for(server, lambda rs: any(r["method"] == "upstream.tool_settings" for r in rs))
    (change,) = [r for r in of_kind(records, "admin") if r["method"] == "upstream.tool_settings"]
    assert change["admin"]["before"]["idempotent"] is False and change["admin"]["after"]["idempotent"] is True


def test_tool_settings_are_for_security_admins_and_validated(
    arbiter_factory: ArbiterFactory, counting_upstream: tuple[ResetAfterRead, list[int]]
) -> None:
    front, _ = counting_upstream
    server = arbiter_factory()
    created = server.register("count", f"http://127.0.0.1:{front.port}/mcp")
    url = f"/upstreams/{created['id']}/tools/charge/settings"
    with server.admin(token=server.agent_key) as agent:
        assert agent.put(url, json={"idempotent": True}).status_code == 403
    with server.admin() as admin:
        assert admin.put(url, json={"timeout_s": 0}).status_code == 422
        assert admin.put(url, json={"idempotent": "maybe"}).status_code == 422
        assert admin.put("/upstreams/999/tools/charge/settings", json={}).status_code == 404
        resp = admin.put(url, json={"idempotent": False, "timeout_s": 2.5})
        assert resp.status_code == 200 and resp.json()["timeout_s"] == 2.5


async def _until(check: Callable[[], Awaitable[bool]], within_s: float = 10, poll_s: float = 0.05) -> None:
    """Poll a condition another thread turns true (its own timing decides when)."""
    with anyio.fail_after(within_s):
        while True:
            if await check():
                return
            await anyio.sleep(poll_s)
