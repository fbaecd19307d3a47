"""Failures around the proxy that must not take it down: database blips, upstream restarts, admin
changes racing background work, discovery errors, shutdown with agents still connected."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import httpx
import mcp_types as types
import pytest
from mcp.server import MCPServer, Server
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError
from starlette.types import Receive, Scope, Send

from arbiter.errors import UpstreamUnavailable
from arbiter.proxy.pool import UpstreamPool
from arbiter.proxy.upstream import UpstreamClient, UpstreamSpec
from tests.conftest import ArbiterFactory, UpstreamProc, free_port, serve_in_thread


async def test_database_blip_in_background_work_leaves_mcp_serving(
    arbiter_factory: ArbiterFactory,
    crm_upstream: UpstreamProc,
    sqlite_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = arbiter_factory(upstream={"maintain_interval_s": 0.1})
    server.register("crm", crm_upstream.url)
    db_file = sqlite_url.split("///", 1)[1]
    with sqlite3.connect(db_file) as conn:
        conn.execute("ALTER TABLE upstreams RENAME TO upstreams_gone")  # every background query now fails

    async def failed_passes() -> bool:
        return sum(r.getMessage() == "reconcile failed" for r in caplog.records) >= 3

    try:
        await _until(failed_passes)  # several maintenance passes hit the broken table
        async with server.client("2026-07-28") as client:
            result = await client.call_tool("crm__get_customer", {"customer_id": "C-1001"})
            assert result.structured_content is not None
            assert len((await client.list_tools()).tools) == 4
    finally:
        with sqlite3.connect(db_file) as conn:
            conn.execute("ALTER TABLE upstreams_gone RENAME TO upstreams")
    async with server.client("legacy") as client:
        assert (await client.call_tool("crm__get_customer", {"customer_id": "C-1002"})).is_error is False


class HandshakeOnly:
    """Wraps an MCP server app so it answers only the 2025 handshake era (sessions), like mcp 1.x servers."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers", []))
        if scope["type"] == "http" and headers.get(b"mcp-protocol-version") == b"2026-07-28":
            body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": -32601, "message": "nope"}})
            await send(
                {
                    "type": "http.response.start",
                    "status": 400,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body.encode()})
            return
        await self.app(scope, receive, send)


def _sessionful_app() -> HandshakeOnly:
    server = MCPServer("sessions")

    @server.tool()
    def echo(text: str) -> str:
        return text

    return HandshakeOnly(server.streamable_http_app(json_response=True))


@pytest.mark.parametrize("backoff_s", [0.0, 30.0])
async def test_upstream_that_restarts_and_forgets_our_session_is_reconnected(
    arbiter_factory: ArbiterFactory, backoff_s: float
) -> None:
    # An upstream that lost our session answered: the reconnect backoff (for upstreams that are down)
    # must not delay the new session.
    port = free_port()
    server = arbiter_factory(upstream={"reconnect_backoff_s": backoff_s})
    with serve_in_thread(_sessionful_app(), port):
        server.register("leg", f"http://127.0.0.1:{port}/mcp")
    async with server.client("legacy") as client:
        with serve_in_thread(_sessionful_app(), port):  # the same upstream, restarted: our session is gone
            for _ in range(3):
                result = await client.call_tool("leg__echo", {"text": "still here"})
                assert getattr(result.content[0], "text", "") == "still here"
    assert server.app.state.runtime.pool.get("leg").connects == 2
    with server.admin() as admin:
        assert admin.post("/upstreams/1/refresh").status_code == 502  # upstream gone again: not a 500


async def test_health_reports_from_a_replaced_client_are_ignored() -> None:
    silent = socket.socket()  # accepts connections and never answers: a connect that times out
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    live = UpstreamProc("arbiter.demo.crm").start()
    try:
        async with UpstreamPool(max_connections=10, reconnect_backoff_s=0) as pool:
            dead_url = f"http://127.0.0.1:{silent.getsockname()[1]}/mcp"
            old = await pool.put(UpstreamSpec("x", "streamable_http", url=dead_url, connect_timeout_s=1))
            new: UpstreamClient | None = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(_expect_unavailable, old)

                async def old_is_connecting() -> bool:  # its connection waits in the silent backlog
                    return bool(select.select([silent], [], [], 0)[0])

                await _until(old_is_connecting, poll_s=0.01)
                new = await pool.put(UpstreamSpec("x", "streamable_http", url=live.url))
                await new.discover()
            # The old client failed after the new one connected; what it learnt was not the upstream's.
            assert pool.healthy("x") and pool.down() == []
            assert new is not None
            assert new.connected and not old.connected
    finally:
        live.kill()
        silent.close()


async def test_health_is_what_the_current_client_learnt_and_restored_only_with_a_new_one() -> None:
    dead = f"http://127.0.0.1:{free_port()}/mcp"  # nothing listens: every connect is refused
    async with UpstreamPool(max_connections=4, reconnect_backoff_s=0) as pool:
        spec = UpstreamSpec("x", "streamable_http", url=dead)
        client = await pool.put(spec)
        assert pool.healthy("x")  # nothing learnt yet
        with pytest.raises(UpstreamUnavailable):
            await client.discover()
        assert not pool.healthy("x") and pool.down() == ["x"]
        # The registry restores a definition "as it was" after its replacement failed; when nothing was
        # replaced (the same spec, the same client), what that client learnt stands.
        assert await pool.put(spec, up=True) is client
        assert not pool.healthy("x")
        other = await pool.put(UpstreamSpec("x", "streamable_http", url=dead, call_timeout_s=9), up=True)
        assert other is not client and pool.healthy("x")
        await pool.remove("x")
        assert pool.down() == [] and not pool.healthy("x")


async def _expect_unavailable(client: Any) -> None:
    with pytest.raises(Exception, match="unavailable"):
        await client.discover()


@pytest.fixture
def failing_discovery() -> Iterator[str]:
    """An upstream whose tools/list answers with a JSON-RPC error."""

    async def list_tools(ctx: ServerRequestContext[Any, Any], params: Any) -> types.ListToolsResult:
        raise MCPError(types.INTERNAL_ERROR, "database of tools is on fire")

    server: Server[Any] = Server("broken", on_list_tools=list_tools)
    with serve_in_thread(server.streamable_http_app(stateless_http=True, json_response=True)) as port:
        yield f"http://127.0.0.1:{port}/mcp"


def test_upstream_error_during_discovery_is_a_502_not_a_500(
    arbiter_factory: ArbiterFactory, failing_discovery: str
) -> None:
    server = arbiter_factory()
    with server.admin() as admin:
        resp = admin.post("/upstreams", json={"name": "broken", "url": failing_discovery})
        assert resp.status_code == 502, resp.text
        assert resp.json()["error"]["code"] == "upstream_protocol_error"
        assert admin.get("/upstreams").json() == []


def test_failed_update_changes_nothing(arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc) -> None:
    server = arbiter_factory()
    created = server.register("crm", crm_upstream.url)
    with server.admin() as admin:
        dead = f"http://127.0.0.1:{free_port()}/mcp"
        resp = admin.patch(f"/upstreams/{created['id']}", json={"url": dead, "connect_timeout_s": 1})
        assert resp.status_code == 502
        after = admin.get(f"/upstreams/{created['id']}").json()
    assert after["url"] == crm_upstream.url and after["connect_timeout_s"] == created["connect_timeout_s"]
    assert server.app.state.runtime.pool.get("crm").spec.url == crm_upstream.url
    assert len(server.app.state.runtime.catalog.views.tools) == 4


def test_shutdown_does_not_wait_forever_for_connected_agents(
    arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc
) -> None:
    server = arbiter_factory(shutdown_grace_s=1)
    server.register("crm", crm_upstream.url)
    connected = threading.Event()
    release = threading.Event()

    async def agent() -> None:
        # A handshake-era client keeps a standalone SSE stream open for the whole session.
        async with server.client("legacy") as client:
            await client.list_tools()
            connected.set()
            await anyio.to_thread.run_sync(release.wait)

    thread = threading.Thread(target=lambda: _run_quietly(agent), daemon=True)
    thread.start()
    assert connected.wait(timeout=20)
    started = time.monotonic()
    server.stop()  # asserts the server thread really ended
    assert time.monotonic() - started < 8
    release.set()
    thread.join(timeout=10)


def _run_quietly(fn: Any) -> None:
    # The agent loses its server on purpose; only the server's shutdown matters here.
    with contextlib.suppress(BaseException):
        anyio.run(fn)


def test_modern_era_malformed_input_gets_spec_errors(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory(mcp={"max_body_bytes": 4096})
    headers = {
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/list",
    }
    with httpx.Client(timeout=10, headers=server.auth_headers) as http:
        bad_json = http.post(server.mcp_url, content=b'{"jsonrpc": ', headers=headers)
        assert (bad_json.status_code, bad_json.json()["error"]["code"]) == (400, -32700)
        batch = http.post(
            server.mcp_url, json=[{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}], headers=headers
        )
        assert (batch.status_code, batch.json()["error"]["code"]) == (400, -32600)
        big = http.post(server.mcp_url, content=b"[" + b"1," * 4000 + b"1]", headers=headers)
        assert big.status_code == 413


async def test_a_second_replica_follows_admin_changes_made_on_the_first(
    arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc
) -> None:
    first = arbiter_factory(upstream={"maintain_interval_s": 0.2})
    second = arbiter_factory(upstream={"maintain_interval_s": 0.2})  # same database, separate process state
    created = first.register("crm", crm_upstream.url)

    async def names() -> set[str]:
        async with second.client("2026-07-28") as client:
            return {t.name for t in (await client.list_tools()).tools}

    async def listed() -> bool:
        return "crm__get_customer" in await names()

    async def gone() -> bool:
        return not await names()

    await _until(listed)
    async with second.client() as client:
        assert (await client.call_tool("crm__get_customer", {"customer_id": "C-1001"})).is_error is False

    with first.admin() as admin:
        assert admin.delete(f"/upstreams/{created['id']}").status_code == 204
    await _until(gone)


async def _until(check: Callable[[], Awaitable[bool]], within_s: float = 10, poll_s: float = 0.2) -> None:
    """Poll a condition another thread or process turns true (its own timer decides when)."""
    with anyio.fail_after(within_s):
        while True:
            if await check():
                return
            await anyio.sleep(poll_s)
