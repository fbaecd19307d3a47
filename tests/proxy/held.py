"""An upstream MCP server whose ``hold`` tool waits until the test releases it: calls in flight on demand."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from mcp.server import MCPServer

from tests.conftest import serve_in_thread
from tests.policies.conftest import MODERN, MODERN_META

HOLD_MAX_S = 120.0  # a forgotten release never hangs the upstream's thread for good


@dataclass
class Held:
    url: str = ""
    release: threading.Event = field(default_factory=threading.Event)
    _started: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def started(self) -> int:
        with self._lock:
            return self._started

    def arrived(self) -> None:
        with self._lock:
            self._started += 1

    def wait_started(self, count: int, within_s: float = 30.0) -> None:
        deadline = time.monotonic() + within_s
        while self.started < count:
            assert time.monotonic() < deadline, f"only {self.started} of {count} calls reached the upstream"
            time.sleep(0.02)


@contextmanager
def held_upstream() -> Iterator[Held]:
    held = Held()
    server = MCPServer("held")

    @server.tool()
    async def hold(n: int) -> str:
        held.arrived()
        with anyio.move_on_after(HOLD_MAX_S):
            # The test's thread sets the release, so no event of this loop can stand in for it.
            while not held.release.is_set():  # noqa: ASYNC110
                await anyio.sleep(0.01)
        return f"done {n}"

    app = server.streamable_http_app(stateless_http=True, json_response=True)
    with serve_in_thread(app) as port:
        held.url = f"http://127.0.0.1:{port}/mcp"
        try:
            yield held
        finally:
            held.release.set()


def hold_call(n: int, token: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A 2026-07-28 ``tools/call`` of ``held__hold`` with JSON-RPC id ``n``: (body, headers)."""
    body = {
        "jsonrpc": "2.0",
        "id": n,
        "method": "tools/call",
        "params": {"name": "held__hold", "arguments": {"n": n}, "_meta": MODERN_META},
    }
    headers = {
        **MODERN,
        "mcp-method": "tools/call",
        "mcp-name": "held__hold",
        "authorization": f"Bearer {token}",
    }
    return body, headers
