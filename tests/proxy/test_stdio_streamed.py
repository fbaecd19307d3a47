"""Progress and log messages from stdio and HTTP+SSE upstreams during a call, through Arbiter.

Those upstreams are served by the SDK's client session, shared by every agent's calls. Progress finds its
call: the SDK gives each request a progress token of its own, and Arbiter hands what comes back to that
call's agent under the agent's own token. A ``notifications/message`` cannot be told apart so: on stdio
and on the HTTP+SSE transport all of the server's messages share one stream, and a log message carries
no request id (the SDK's ``related_request_id`` only picks a response stream, which those transports do
not have). Which call, if any, a log message belongs to is unknowable, so Arbiter drops them (and does
not ask a 2026-07-28 upstream for them): never another agent's.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client

from tests.conftest import ArbiterFactory, ArbiterServer, authed_transport, serve_in_thread
from tests.proxy.stdio_streamer import server as streamer

# The test upstream logs through the deprecated logging capability, on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")
MODES = ["legacy", "2026-07-28"]
SCRIPT = Path(__file__).with_name("stdio_streamer.py")


@dataclass
class Heard:
    progress: list[tuple[float, float | None, str | None]] = field(
        default_factory=list[tuple[float, float | None, str | None]]
    )
    logs: list[Any] = field(default_factory=list[Any])

    async def on_progress(self, progress: float, total: float | None, message: str | None) -> None:
        self.progress.append((progress, total, message))

    async def on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append(params.data)


@pytest.fixture(scope="module")
def sse_url() -> Iterator[str]:
    """The same server over the HTTP+SSE transport (handshake era only: it logs unasked)."""
    with serve_in_thread(streamer.sse_app()) as port:
        yield f"http://127.0.0.1:{port}/sse"


async def _gateway(arbiter_factory: ArbiterFactory, sse_url: str) -> ArbiterServer:
    stdio = {"name": "st", "transport": "stdio", "command": [sys.executable, str(SCRIPT)]}
    server = arbiter_factory(upstreams=[stdio])
    server.register("ss", sse_url, transport="sse")

    def discovered() -> bool:  # config upstreams are discovered in the background at start-up
        with server.admin() as admin:
            [listed] = [u for u in admin.get("/upstreams").json() if u["name"] == "st"]
        return bool(listed.get("catalog", {}).get("tools"))

    with anyio.fail_after(60):
        while not discovered():  # noqa: ASYNC110 - Arbiter's thread discovers it
            await anyio.sleep(0.05)
    return server


def _client(server: ArbiterServer, mode: str, heard: Heard) -> Client:
    return Client(
        authed_transport(server.mcp_url, server.agent_key),  # pyright: ignore[reportArgumentType]
        mode=mode,  # pyright: ignore[reportArgumentType]
        cache=None,
        logging_callback=heard.on_log,
        log_level="info" if mode != "legacy" else None,  # the 2026-07-28 agent opts in to log messages
    )


async def _until(condition: Any) -> None:
    with anyio.fail_after(20):
        while not condition():  # noqa: ASYNC110 - the SDK client's callbacks feed it
            await anyio.sleep(0.01)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("upstream", ["st", "ss"])
async def test_progress_reaches_the_agent_and_log_messages_no_other(
    arbiter_factory: ArbiterFactory, sse_url: str, mode: str, upstream: str
) -> None:
    arbiter = await _gateway(arbiter_factory, sse_url)
    heard = Heard()
    async with _client(arbiter, mode, heard) as client:
        result = await client.call_tool(f"{upstream}__report", {"n": 1}, progress_callback=heard.on_progress)
        assert [getattr(c, "text", "") for c in result.content] == ["report 1 done"]
        await _until(lambda: len(heard.progress) == 3)
    assert heard.progress == [(step, 3, f"agent 1: step {step}") for step in (1, 2, 3)]
    # The upstream logged before each step's progress, on the same stream: had Arbiter relayed a log
    # message, the first two would have come before the last progress.
    assert heard.logs == []


@pytest.mark.parametrize("mode", MODES)
async def test_two_agents_on_one_stdio_session_each_get_only_their_own_progress(
    arbiter_factory: ArbiterFactory, sse_url: str, mode: str
) -> None:
    arbiter = await _gateway(arbiter_factory, sse_url)
    heard = {1: Heard(), 2: Heard()}

    async def agent(n: int) -> None:
        async with _client(arbiter, mode, heard[n]) as client:
            # Both SDK clients use the same request id, so the same progress token through Arbiter.
            await client.call_tool("st__report", {"n": n}, progress_callback=heard[n].on_progress)
            await _until(lambda: len(heard[n].progress) == 3)

    async with anyio.create_task_group() as tg:
        tg.start_soon(agent, 1)
        tg.start_soon(agent, 2)
    for n in (1, 2):
        assert [m for _, _, m in heard[n].progress] == [f"agent {n}: step {s}" for s in (1, 2, 3)]
        assert heard[n].logs == []
