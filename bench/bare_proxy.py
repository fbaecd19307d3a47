"""A bare MCP pass-through proxy on the SDK's low-level ``Server``: the baseline Arbiter must beat.

``python bench/bare_proxy.py --upstream http://127.0.0.1:P/mcp --port Q`` serves ``/mcp`` and forwards
``tools/list`` and ``tools/call`` to one upstream over ONE ``ClientSession`` that is opened once in the
server lifespan and shared by every request. It is deliberately what a careful engineer would write with
the SDK and nothing more:

- calls are forwarded with ``session.send_request`` so the proxy never re-validates output schemas;
- ``get_tool_input_schema`` answers from the tools list fetched at start-up, so 2026-07-28 calls do not
  pay an upstream ``tools/list`` round trip for the SDK's ``Mcp-Param`` header check;
- the upstream ``httpx2`` pool keeps 100 connections (Arbiter's default), not the SDK's 20;
- SDK logging at WARNING, no access log;
- ``stateless_http=False`` (the SDK's default, and Arbiter's default for handshake-era clients): each
  2025-11-25 client keeps a session, which is also ~1 ms CPU/call cheaper than stateless mode.
  2026-07-28 requests are stateless whatever the flag says. ``--stateless`` flips it for comparison.
- the SDK's default server middleware (OpenTelemetry spans, a no-op without an exporter) is kept,
  because that is what the SDK gives a proxy author out of the box.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncGenerator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx2
import mcp_types as types
import uvicorn
from mcp import Client
from mcp.client._transport import TransportStreams
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from pydantic import TypeAdapter

_POOL = 100  # upstream keep-alive connections; Arbiter's ARBITER_UPSTREAM__MAX_CONNECTIONS default
_CALL_RESULT: TypeAdapter[types.CallToolResult] = TypeAdapter(types.CallToolResult)
_LIST_RESULT: TypeAdapter[types.ListToolsResult] = TypeAdapter(types.ListToolsResult)


@dataclass
class Upstream:
    """The one shared upstream session and the tool schemas cached at start-up."""

    session: ClientSession | None = None
    input_schemas: dict[str, dict[str, Any]] = field(default_factory=dict[str, dict[str, Any]])


@asynccontextmanager
async def _transport(url: str) -> AsyncGenerator[TransportStreams]:
    http = httpx2.AsyncClient(
        timeout=httpx2.Timeout(30.0, connect=10.0),
        limits=httpx2.Limits(max_connections=_POOL, max_keepalive_connections=_POOL),
    )
    # streamable_http_client does not close a client it was given, so close it with the transport.
    async with http, streamable_http_client(url, http_client=http) as streams:
        yield streams


def build_server(upstream_url: str, mode: str = "auto") -> Server[Upstream]:
    state = Upstream()

    @asynccontextmanager
    async def lifespan(_: Server[Upstream]) -> AsyncGenerator[Upstream]:
        # Entered once by the HTTP session manager, in one task, so the client's task group is happy.
        async with Client(_transport(upstream_url), mode=mode, cache=None) as client:
            state.session = client.session
            listed = await client.session.send_request(types.ListToolsRequest(), _LIST_RESULT)
            state.input_schemas = {t.name: t.input_schema for t in listed.tools}
            yield state

    def input_schema(name: str) -> Mapping[str, Any] | None:
        return state.input_schemas.get(name)

    async def list_tools(
        ctx: ServerRequestContext[Upstream, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        session = ctx.lifespan_context.session
        assert session is not None
        cursor = params.cursor if params is not None else None
        req_params = types.PaginatedRequestParams(cursor=cursor) if cursor is not None else None
        return await session.send_request(types.ListToolsRequest(params=req_params), _LIST_RESULT)

    async def call_tool(
        ctx: ServerRequestContext[Upstream, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        session = ctx.lifespan_context.session
        assert session is not None
        # Only name and arguments go upstream: the front request's _meta describes the front connection.
        request = types.CallToolRequest(
            params=types.CallToolRequestParams(name=params.name, arguments=params.arguments)
        )
        return await session.send_request(request, _CALL_RESULT)

    return Server(
        "bare-proxy",
        lifespan=lifespan,
        get_tool_input_schema=input_schema,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--upstream", required=True, help="upstream streamable HTTP URL, e.g. http://127.0.0.1:8001/mcp"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", default="auto", help="protocol negotiation towards the upstream")
    parser.add_argument("--stateless", action="store_true", help="stateless handshake-era sessions")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    server = build_server(args.upstream, args.mode)
    app = server.streamable_http_app(stateless_http=args.stateless, json_response=True, host=args.host)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
