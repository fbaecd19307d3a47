"""The benchmark's upstream: a fast MCP server with an ``echo`` tool and 100 tools in all.

``python bench/upstream.py --port N`` serves ``/mcp`` on 127.0.0.1 in both protocol eras (handshake and
2026-07-28), stateless, answering JSON rather than SSE, logging at WARNING. It is built on the SDK's
low-level ``Server`` with the tools list made once at start-up, so the upstream spends as little CPU
per call as the SDK allows and the proxies in front of it are what the benchmark sees.

It runs under whichever interpreter starts it (Arbiter's venv), and imports nothing from Arbiter.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import mcp_types as types
import uvicorn
from mcp.server import Server
from mcp.server.context import ServerRequestContext

TOOL_COUNT = 100
ECHO = "echo"


def _filler_tool(i: int) -> types.Tool:
    # Shaped like a real tool (a description, a few typed and documented parameters), so that a list of
    # 100 of them weighs what a real catalogue does (~40 KB of JSON).
    return types.Tool(
        name=f"tool_{i:03d}",
        description=f"Look up record {i} in the bench's imaginary system of record and return a summary.",
        input_schema={
            "type": "object",
            "properties": {
                "record_id": {"type": "string", "description": "The record's identifier, e.g. R-1001"},
                "fields": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "Which fields to return; all when omitted",
                },
                "limit": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
            },
            "required": ["record_id"],
        },
    )


def build_tools() -> list[types.Tool]:
    echo = types.Tool(
        name=ECHO,
        description="Return the given text unchanged.",
        input_schema={
            "type": "object",
            "properties": {"text": {"type": "string", "description": "The text to return"}},
            "required": ["text"],
        },
    )
    return [echo, *(_filler_tool(i) for i in range(1, TOOL_COUNT))]


def build_server() -> Server[Any]:
    tools = build_tools()
    listing = types.ListToolsResult(tools=tools)
    schemas = {t.name: t.input_schema for t in tools}

    async def list_tools(
        _ctx: ServerRequestContext[Any, Any], _params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return listing

    async def call_tool(
        _ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        args = params.arguments or {}
        if params.name == ECHO:
            text = str(args.get("text", ""))
        elif params.name in schemas:
            text = f"record {args.get('record_id', '?')}: ok"
        else:
            return types.CallToolResult(
                content=[types.TextContent(text=f"unknown tool {params.name}")], is_error=True
            )
        return types.CallToolResult(content=[types.TextContent(text=text)])

    return Server(
        "bench-upstream",
        # Answers the SDK's Mcp-Param header check for 2026-07-28 calls without a tools/list round.
        get_tool_input_schema=schemas.get,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    app = build_server().streamable_http_app(stateless_http=True, json_response=True, host=args.host)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
