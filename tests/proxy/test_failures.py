"""A dead upstream and malformed input: clear errors, no upstream call, and Arbiter keeps serving."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import anyio
import httpx
import pytest
from mcp.server import MCPServer

from tests.conftest import INITIALIZE, ArbiterFactory, ArbiterServer, Recorder, UpstreamProc, serve_in_thread
from tests.refusals import tool_refusal

HANDSHAKE_HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


async def test_killed_upstream_list_survives_and_calls_fail_fast(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc
) -> None:
    crm = UpstreamProc("arbiter.demo.crm").start()
    try:
        server = arbiter_factory()
        server.register("kb", kb_upstream.url)
        server.register("crm", crm.url, call_timeout_s=5)
        async with server.client("legacy") as client:
            await client.call_tool("crm__get_customer", {"customer_id": "C-1001"})
            crm.kill()

            started = time.monotonic()
            failed = await client.session.call_tool("crm__get_customer", {"customer_id": "C-1001"})
            assert time.monotonic() - started < 5  # within the upstream's timeout
            refusal = tool_refusal(failed)
            assert refusal["reason"] == "upstream_unavailable" and refusal["upstream"] == "crm"
            assert "crm" in refusal["message"]

            # The list still works: the live upstream's tools are there, the dead one's are not.
            names = {t.name for t in (await client.list_tools()).tools}
            assert "kb__search_docs" in names
            assert not any(n.startswith("crm__") for n in names)

            # A call to the dead upstream's tool still names it unavailable, rather than unknown.
            again = await client.session.call_tool("crm__list_tickets", {"customer_id": "C-1001"})
            assert tool_refusal(again)["reason"] == "upstream_unavailable"

            result = await client.call_tool("kb__get_doc", {"doc_id": "sso-setup"})
            assert result.is_error is False
        async with httpx.AsyncClient() as http:
            ready = (await http.get(f"{server.base_url}/readyz")).json()
        assert ready["upstreams_down"] == ["crm"]
    finally:
        crm.kill()


async def test_upstream_that_comes_back_is_listed_again(arbiter_factory: ArbiterFactory) -> None:
    crm = UpstreamProc("arbiter.demo.crm").start()
    try:
        server = arbiter_factory(upstream={"reconnect_backoff_s": 0.0})
        server.register("crm", crm.url)
        crm.kill()
        async with server.client("2026-07-28") as client:
            failed = await client.session.call_tool("crm__get_customer", {"customer_id": "C-1001"})
            refusal = tool_refusal(failed)
            assert refusal["reason"] == "upstream_unavailable" and refusal["upstream"] == "crm"
            assert (await client.list_tools()).tools == []
            crm = UpstreamProc("arbiter.demo.crm", port=crm.port).start()  # killed in finally, like the first
            # The next call reconnects on its own; the upstream is listed again.
            result = await client.call_tool("crm__get_customer", {"customer_id": "C-1001"})
            assert result.structured_content is not None
            assert result.structured_content["name"] == "Acme Logistics"
            assert len((await client.list_tools()).tools) == 4
    finally:
        crm.kill()


@pytest.fixture
def recorded(arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc) -> tuple[ArbiterServer, Recorder]:
    recorder = Recorder()
    server = arbiter_factory(interceptors=[recorder], mcp={"max_body_bytes": 64 * 1024})
    server.register("crm", crm_upstream.url)
    return server, recorder


def _initialize(http: httpx.Client, url: str) -> dict[str, str]:
    resp = http.post(url, json=INITIALIZE, headers=HANDSHAKE_HEADERS)
    assert resp.status_code == 200, resp.text
    session = resp.headers["mcp-session-id"]
    headers = {**HANDSHAKE_HEADERS, "mcp-session-id": session, "mcp-protocol-version": "2025-11-25"}
    http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
    return headers


def _modern(
    method: str, params: dict[str, object], **headers: str
) -> tuple[dict[str, object], dict[str, str]]:
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    body: dict[str, object] = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": method,
        "params": {**params, "_meta": meta},
    }
    hdrs = {**HANDSHAKE_HEADERS, "mcp-protocol-version": "2026-07-28", "mcp-method": method, **headers}
    return body, hdrs


def test_malformed_input_gets_spec_errors_and_never_reaches_upstream(
    recorded: tuple[ArbiterServer, Recorder],
) -> None:
    server, recorder = recorded
    url = server.mcp_url
    with httpx.Client(timeout=10, headers=server.auth_headers) as http:
        headers = _initialize(http, url)
        cases: list[tuple[str, bytes, dict[str, str], int, int]] = [
            ("invalid JSON", b'{"jsonrpc": "2.0", "id": 1, "method": ', headers, 400, -32700),
            (
                "batch",
                json.dumps([{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}]).encode(),
                headers,
                400,
                -32600,
            ),
            ("not an object", b'"tools/list"', headers, 400, -32600),
            (
                "oversized",
                b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"crm__get_customer",'
                b'"arguments":{"x":"' + b"a" * 70_000 + b'"}}}',
                headers,
                413,
                -32600,
            ),
            (
                "Mcp-Name disagrees (handshake era)",
                json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": 2,
                        "method": "tools/call",
                        "params": {"name": "crm__get_customer", "arguments": {"customer_id": "C-1001"}},
                    }
                ).encode(),
                {**headers, "mcp-method": "tools/call", "mcp-name": "crm__delete_customer"},
                400,
                -32020,
            ),
            (
                "Mcp-Method disagrees (handshake era)",
                json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": 3,
                        "method": "tools/call",
                        "params": {"name": "crm__get_customer", "arguments": {}},
                    }
                ).encode(),
                {**headers, "mcp-method": "tools/list"},
                400,
                -32020,
            ),
        ]
        body, mheaders = _modern(
            "tools/call",
            {"name": "crm__get_customer", "arguments": {"customer_id": "C-1"}},
            **{"mcp-name": "crm__delete_customer"},
        )
        cases.append(("Mcp-Name disagrees (2026-07-28)", json.dumps(body).encode(), mheaders, 400, -32020))
        for label, payload, hdrs, status, code in cases:
            resp = http.post(url, content=payload, headers=hdrs)
            assert resp.status_code == status, (label, resp.status_code, resp.text)
            assert resp.json()["error"]["code"] == code, (label, resp.text)

        resp = http.post(
            url, json={"jsonrpc": "2.0", "id": 9, "method": "tools/frobnicate", "params": {}}, headers=headers
        )
        assert resp.status_code < 500
        assert resp.json()["error"]["code"] == -32601
        body, mheaders = _modern("tools/frobnicate", {})
        resp = http.post(url, json=body, headers=mheaders)
        assert resp.status_code < 500
        assert resp.json()["error"]["code"] == -32601
    assert recorder.calls == []  # nothing above reached the pipeline, let alone an upstream

    # And the proxy still serves a well-formed request afterwards.
    with httpx.Client(timeout=10, headers=server.auth_headers) as http:
        body, mheaders = _modern(
            "tools/call",
            {"name": "crm__get_customer", "arguments": {"customer_id": "C-1001"}},
            **{"mcp-name": "crm__get_customer"},
        )
        resp = http.post(url, json=body, headers=mheaders)
    assert resp.status_code == 200
    assert resp.json()["result"]["structuredContent"]["name"] == "Acme Logistics"
    assert [c.method for c in recorder.calls] == ["tools/call"]


@pytest.fixture
def slow_upstream() -> Iterator[str]:
    """A real MCP server on a loopback port whose tool can take longer than Arbiter's deadline."""
    server = MCPServer("slow")

    @server.tool()
    async def sleep(seconds: float) -> str:
        await anyio.sleep(seconds)
        return f"slept {seconds}"

    app = server.streamable_http_app(stateless_http=True, json_response=True)
    with serve_in_thread(app) as port:
        yield f"http://127.0.0.1:{port}/mcp"


async def test_slow_upstream_call_is_cut_at_its_deadline(
    arbiter_factory: ArbiterFactory, slow_upstream: str
) -> None:
    server = arbiter_factory()
    server.register("slow", slow_upstream, call_timeout_s=1)
    async with server.client("2026-07-28") as client:
        started = time.monotonic()
        failed = await client.session.call_tool("slow__sleep", {"seconds": 5})
        elapsed = time.monotonic() - started
        assert 0.9 < elapsed < 4
        assert tool_refusal(failed)["upstream"] == "slow"
        assert tool_refusal(failed)["reason"] == "upstream_timeout"  # issue 13: a code of its own
        # A slow call is not a broken connection: the upstream stays listed and serves the next call.
        assert [t.name for t in (await client.list_tools()).tools] == ["slow__sleep"]
        fast = await client.call_tool("slow__sleep", {"seconds": 0})
        assert getattr(fast.content[0], "text", "") == "slept 0.0"
