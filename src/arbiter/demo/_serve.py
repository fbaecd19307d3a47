"""Shared command line for the demo upstreams: ``python -m arbiter.demo.kb --port N``."""

from __future__ import annotations

import argparse
import logging

from mcp.server import MCPServer


def serve(server: MCPServer, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=f"Run the {server.name} demo MCP server")
    parser.add_argument("--transport", choices=["streamable-http", "stdio", "sse"], default="streamable-http")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.transport == "stdio":
        server.run("stdio")
    elif args.transport == "sse":
        server.run("sse", host=args.host, port=args.port)
    else:
        server.run("streamable-http", host=args.host, port=args.port, json_response=True, stateless_http=True)
