"""A LangChain support agent whose tools come from an MCP endpoint (Arbiter) via ``langchain.mcp``.

    python examples/support_agent.py --mcp-url http://127.0.0.1:8080/mcp --token "$ARBITER_TOKEN"

Without OPENAI_API_KEY it runs offline with a scripted model that still makes real tool calls; with
OPENAI_API_KEY (and optionally OPENAI_BASE_URL / OPENAI_MODEL) it uses ``langchain-openai``.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager

from agent_common import main
from fastmcp import Client
from langchain_core._api import suppress_langchain_beta_warning
from langchain_core.tools import BaseTool

with suppress_langchain_beta_warning():
    from langchain.mcp import MCPAdapter

MCP_TIMEOUT_S = 30.0


@asynccontextmanager
async def open_tools(url: str, token: str | None) -> AsyncGenerator[list[BaseTool], None]:
    # MCPAdapter has no header/auth option of its own; a pre-built fastmcp Client carries the bearer
    # token (auth=str becomes an Authorization: Bearer header) and the adapter clones it.
    client = Client(url, auth=token, timeout=MCP_TIMEOUT_S)
    # Holding the adapter open keeps one connection for discovery and every tool call; the tools
    # would otherwise reconnect on each call.
    async with MCPAdapter(client) as adapter:
        yield await adapter.list_tools()


if __name__ == "__main__":
    sys.exit(main(open_tools, "Support agent on langchain.mcp.MCPAdapter (mcp 2.x)"))
