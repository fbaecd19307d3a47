"""A stdio MCP server whose ``report`` tool reports progress and logs three times each during its call;
tests/proxy/test_stdio_streamed.py runs it as Arbiter's upstream (and serves ``server`` over HTTP+SSE)."""

from __future__ import annotations

from mcp.server import MCPServer
from mcp.server.mcpserver import Context

server = MCPServer("stdio-streamer")


@server.tool()
async def report(n: int, ctx: Context) -> str:
    for step in (1, 2, 3):
        await ctx.report_progress(step, 3, f"agent {n}: step {step}")
        await ctx.info(f"agent {n}: log {step}")
    return f"report {n} done"


if __name__ == "__main__":
    server.run("stdio")
