"""A stdio MCP server whose one tool answers with the trace context its request's ``_meta`` carried."""

from __future__ import annotations

from typing import Any

from mcp.server import MCPServer
from mcp.server.mcpserver import Context

server = MCPServer("stdio-trace")


@server.tool()
def traceparent(ctx: Context[Any, Any]) -> str:
    meta: Any = ctx.request_context.meta
    found = meta.get("traceparent") if isinstance(meta, dict) else getattr(meta, "traceparent", None)
    return str(found or "")


if __name__ == "__main__":
    server.run("stdio")
