"""The support agent on the older ``langchain-mcp-adapters`` (``MultiServerMCPClient``, mcp 1.x).

That package pins ``mcp<2``, so it cannot share Arbiter's environment; run it from its own venv:

    python -m venv .venv-legacy && .venv-legacy/bin/pip install -r examples/requirements-legacy.txt
    .venv-legacy/bin/python examples/legacy_adapters_agent.py --mcp-url http://127.0.0.1:8080/mcp

Same flags and output as ``support_agent.py``. The mcp 1.x client speaks the handshake era
(the ``initialize`` handshake, protocol 2025-11-25), so it also exercises that side of Arbiter.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from datetime import timedelta

from agent_common import main
from langchain_core.tools import BaseTool
from langchain_mcp_adapters.client import MultiServerMCPClient
from langchain_mcp_adapters.tools import load_mcp_tools

SERVER_NAME = "arbiter"


@asynccontextmanager
async def open_tools(url: str, token: str | None) -> AsyncGenerator[list[BaseTool], None]:
    client = MultiServerMCPClient(
        {
            SERVER_NAME: {
                "transport": "streamable_http",
                "url": url,
                # Plain headers are the simplest way to send a bearer token here (an httpx.Auth under
                # "auth" also works).
                "headers": {"Authorization": f"Bearer {token}"} if token else None,
                "timeout": timedelta(seconds=30),
                "sse_read_timeout": timedelta(seconds=60),
            }
        }
    )
    # client.get_tools() would open a new session (initialize handshake) for every tool call; one
    # explicit session serves discovery and all calls of this run.
    async with client.session(SERVER_NAME) as session:
        yield await load_mcp_tools(session, server_name=SERVER_NAME)


if __name__ == "__main__":
    sys.exit(main(open_tools, "Support agent on langchain-mcp-adapters (mcp 1.x)"))
