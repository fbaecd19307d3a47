"""A real MCP upstream for the guard tests, run in its own process (``python -m``), so that what it
allocates (a 50 MB answer) is not counted as Arbiter's memory.

``--sse`` answers over an event stream instead of a JSON body.
"""

from __future__ import annotations

import argparse
from typing import Any

import mcp_types as types
import uvicorn
from mcp.server import MCPServer

PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\n"
    "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n"
    "-----END RSA PRIVATE KEY-----"
)
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
COUNT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"count": {"type": "integer"}},
    "required": ["count"],
}
_LINE = "the quick brown fox jumps over the lazy dog 0123456789\n"


def build() -> MCPServer:
    server = MCPServer("guarded")

    @server.tool(structured_output=False)
    def huge(kb: int) -> str:
        """Text of ``kb`` KiB."""
        return (_LINE * (kb * 1024 // len(_LINE) + 1))[: kb * 1024]

    @server.tool(structured_output=False)
    def leak() -> str:
        return f"here is the deploy key:\n{PEM}\nand that is all"

    @server.tool(structured_output=False)
    def plain() -> str:
        return "nothing to see here"

    @server.tool(structured_output=False)
    def leak_structured() -> types.CallToolResult:
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=f"key {AWS_KEY}")],
            structured_content={"note": f"the key is {AWS_KEY}"},
        )

    @server.tool(structured_output=False)
    def wrong() -> types.CallToolResult:
        return types.CallToolResult(
            content=[types.TextContent(type="text", text='{"count": "many"}')],
            structured_content={"count": "many"},
        )

    @server.tool(structured_output=False)
    def right() -> types.CallToolResult:
        return types.CallToolResult(
            content=[types.TextContent(type="text", text='{"count": 3}')], structured_content={"count": 3}
        )

    # Published output schemas the SDK does not enforce itself (hand-built metadata): what an upstream
    # that breaks its own contract looks like.
    manager = server._tool_manager  # pyright: ignore[reportPrivateUsage]
    for name, schema in (
        ("wrong", COUNT_SCHEMA),
        ("right", COUNT_SCHEMA),
        ("leak_structured", {"type": "object"}),
    ):
        tool = manager.get_tool(name)
        assert tool is not None
        tool.fn_metadata.output_schema = schema
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sse", action="store_true")
    args = parser.parse_args()
    app = build().streamable_http_app(stateless_http=True, json_response=not args.sse)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
