"""FastMCP's proxy in front of one streamable-HTTP upstream, as a FastMCP user would write it.

    .bench/fastmcp-venv/bin/python bench/fastmcp_proxy.py --upstream URL --port N [--reuse]

Runs in its own virtualenv (``make bench-peers`` builds it with fastmcp 4.1.2; Arbiter's venv does not
have fastmcp). Two shapes, both serving ``/mcp`` with JSON responses, sessions for handshake-era
clients (the SDK's default, as the bare proxy and Arbiter do), logging at WARNING:

- default: ``create_proxy(url)``, which gives every proxied request a new upstream client (and so a new
  connection and handshake), its era mirroring the front connection's;
- ``--reuse``: ``FastMCPProxy(client_factory=lambda: backend)`` with one fastmcp ``Client`` connected
  in the server's lifespan and shared by every request (what fastmcp's docs suggest for speed).
"""

# pyright: reportMissingImports=false, reportUnknownMemberType=false, reportUnknownVariableType=false
# pyright: reportUnknownArgumentType=false, reportAttributeAccessIssue=false
from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastmcp import Client
from fastmcp.server import create_proxy
from fastmcp.server.providers.proxy import FastMCPProxy


def build(upstream: str, reuse: bool) -> Any:
    if not reuse:
        return create_proxy(upstream, name="fastmcp-proxy")
    backend = Client(upstream, timeout=30)

    @asynccontextmanager
    async def lifespan(_server: Any) -> AsyncIterator[dict[str, Any]]:
        async with backend:
            yield {}

    return FastMCPProxy(client_factory=lambda: backend, name="fastmcp-proxy-reused", lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reuse", action="store_true", help="share one connected upstream client")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in ("fastmcp", "mcp", "httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    app = build(args.upstream, args.reuse).http_app(path="/mcp", json_response=True, stateless_http=False)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
