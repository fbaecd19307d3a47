"""What an upstream streams for a call reaches the agent that made it, through Arbiter, in both eras.

A real handshake-era upstream (sessions, answers as event streams) has a tool that reports progress and
logs three times each, a tool that asks the user (elicitation), one that samples, one that lists roots and
one that waits until it is cancelled. Agents speak both SDK client modes to Arbiter.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncGenerator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.context import ClientRequestContext
from mcp.client.streamable_http import streamable_http_client
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from pydantic import BaseModel, FileUrl
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.audit.helpers import of_kind, wait_for
from tests.conftest import ArbiterFactory, ArbiterServer, authed_transport, serve_in_thread

MODES = ["legacy", "2026-07-28"]
WAIT_MAX_S = 60.0  # a tool left waiting never holds the upstream's thread for good


class Confirm(BaseModel):
    ok: bool


@dataclass
class Streamer:
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    ran: list[str] = field(default_factory=list[str])
    waiting: int = 0
    cancelled: int = 0

    def note(self, what: str) -> None:
        with self.lock:
            self.ran.append(what)

    def until(self, what: str, predicate: Any, within_s: float = 30.0) -> None:
        deadline = time.monotonic() + within_s
        while True:
            with self.lock:
                if predicate(self):
                    return
            assert time.monotonic() < deadline, f"the upstream never got to: {what}"
            time.sleep(0.02)


class HandshakeOnly:
    """Answers like an upstream that speaks only the handshake era (no 2026-07-28, no server/discover)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (b"mcp-protocol-version", b"2026-07-28") in scope["headers"]:
            body = b'{"jsonrpc":"2.0","id":null,"error":{"code":-32601,"message":"unsupported"}}'
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 400, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def _streaming_server(state: Streamer) -> MCPServer:
    server = MCPServer("streamer")

    @server.tool()
    async def report(n: int, ctx: Context) -> str:
        state.note(f"report {n}")
        for step in (1, 2, 3):
            await ctx.report_progress(step, 3, f"agent {n}: step {step}")
            await ctx.info(f"agent {n}: log {step}")
        return f"report {n} done"

    @server.tool()
    async def confirm(item: str, ctx: Context) -> str:
        answer = await ctx.elicit(f"Really ship {item}?", Confirm)
        data = answer.data.ok if answer.action == "accept" else None  # pyright: ignore[reportAttributeAccessIssue]
        return f"{item}: {answer.action} {data}"

    @server.tool()
    async def nag(times: int, ctx: Context) -> str:
        """Asks the user ``times`` times in one call (a flood, if there are many)."""
        outcomes: list[str] = []
        for n in range(times):
            try:
                outcomes.append((await ctx.elicit(f"Again ({n})?", Confirm)).action)
            except MCPError:
                outcomes.append("refused")
        return " ".join(outcomes)

    @server.tool()
    async def sample(text: str, ctx: Context) -> str:
        message = types.SamplingMessage(role="user", content=types.TextContent(text=text))
        result = await ctx.request_context.session.create_message(  # pyright: ignore[reportDeprecated]
            messages=[message], max_tokens=10, related_request_id=ctx.request_id
        )
        return f"sampled: {getattr(result.content, 'text', '')}"

    @server.tool()
    async def roots(ctx: Context) -> str:
        session = ctx.request_context.session
        result = await session.send_request(
            types.ListRootsRequest(),
            types.ListRootsResult,
            metadata=_related(ctx.request_id),
        )
        return "roots: " + ", ".join(str(r.uri) for r in result.roots)

    @server.tool()
    async def wait(ctx: Context) -> str:
        with state.lock:
            state.waiting += 1
        try:
            await anyio.sleep(WAIT_MAX_S)
        except anyio.get_cancelled_exc_class():
            with state.lock:
                state.cancelled += 1
            raise
        return "waited"

    return server


@pytest.fixture(scope="module")
def streamer() -> Iterator[Streamer]:
    """A handshake-era upstream: sessions, answers as event streams, requests to the client."""
    state = Streamer()
    app = HandshakeOnly(_streaming_server(state).streamable_http_app(json_response=False))
    with serve_in_thread(app) as port:
        state.url = f"http://127.0.0.1:{port}/mcp"
        yield state


@pytest.fixture(scope="module")
def modern_streamer() -> Iterator[Streamer]:
    """The same tools on an upstream that speaks 2026-07-28 (Arbiter's pooled client picks that era)."""
    state = Streamer()
    app = _streaming_server(state).streamable_http_app(json_response=False)
    with serve_in_thread(app) as port:
        state.url = f"http://127.0.0.1:{port}/mcp"
        yield state


def _related(request_id: Any) -> ServerMessageMetadata:
    return ServerMessageMetadata(related_request_id=request_id)


@pytest.fixture(params=[False, True], ids=["sdk-event-stream", "direct-json"])
def arbiter(
    request: pytest.FixtureRequest, arbiter_factory: ArbiterFactory, streamer: Streamer
) -> ArbiterServer:
    """Arbiter answering through the SDK's transport in event-stream mode, and on the direct paths in JSON
    mode (the default): either way a call's messages ride its own answer."""
    server = arbiter_factory(mcp={"json_response": request.param})
    server.register("up", streamer.url)
    return server


# (agent's mode, mcp.json_response): the direct paths of both eras (JSON unless something is streamed)
# and the SDK's path in event-stream mode.
PATHS = [("legacy", False), ("legacy", True), ("2026-07-28", True), ("2026-07-28", False)]


@dataclass
class Heard:
    progress: list[tuple[float, float | None, str | None]] = field(
        default_factory=list[tuple[float, float | None, str | None]]
    )
    logs: list[Any] = field(default_factory=list[Any])
    asked: list[str] = field(default_factory=list[str])

    async def on_progress(self, progress: float, total: float | None, message: str | None) -> None:
        self.progress.append((progress, total, message))

    async def on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logs.append(params.data)


@asynccontextmanager
async def _json_only_transport(url: str, token: str) -> AsyncGenerator[Any]:
    """Streamable HTTP whose POSTs accept only JSON answers (the SDK client's accept event streams too)."""

    async def json_only(request: httpx2.Request) -> None:
        if request.method == "POST":
            request.headers["accept"] = "application/json"

    headers = {"authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30.0, event_hooks={"request": [json_only]}) as http,
        streamable_http_client(url, http_client=http) as streams,
    ):
        yield streams


def _client(
    server: ArbiterServer, mode: str, heard: Heard | None = None, *, json_only: bool = False, **callbacks: Any
) -> Client:
    transport = (
        _json_only_transport(server.mcp_url, server.agent_key)
        if json_only
        else authed_transport(server.mcp_url, server.agent_key)
    )
    logging: Any = heard.on_log if heard is not None else None
    return Client(
        transport,  # pyright: ignore[reportArgumentType]
        mode=mode,  # pyright: ignore[reportArgumentType]
        cache=None,
        logging_callback=logging,
        log_level="info" if mode != "legacy" else None,
        **callbacks,
    )


def _text(result: types.CallToolResult) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


def _tool_calls(server: ArbiterServer, count: int) -> list[dict[str, Any]]:
    def calls(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in of_kind(records, "mcp") if r["method"] == "tools/call"]

    return calls(wait_for(server, lambda rs: len(calls(rs)) >= count))


async def _until(condition: Any, what: str, within_s: float = 10.0) -> None:
    with anyio.fail_after(within_s):
        # The SDK client's callbacks feed the conditions, so no event of ours can stand in for them.
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


@pytest.mark.parametrize(("mode", "json_response"), PATHS)
async def test_progress_and_logs_reach_the_agent(
    arbiter_factory: ArbiterFactory, streamer: Streamer, mode: str, json_response: bool
) -> None:
    arbiter = arbiter_factory(mcp={"json_response": json_response})
    arbiter.register("up", streamer.url)
    heard = Heard()
    async with _client(arbiter, mode, heard) as client:
        result = await client.call_tool("up__report", {"n": 1}, progress_callback=heard.on_progress)
        assert _text(result) == "report 1 done"
        await _until(lambda: len(heard.progress) == 3 and len(heard.logs) == 3, "all six messages")
    assert heard.progress == [(step, 3, f"agent 1: step {step}") for step in (1, 2, 3)]
    assert heard.logs == [f"agent 1: log {step}" for step in (1, 2, 3)]
    (record,) = _tool_calls(arbiter, 1)  # one record for the call, none for what it streamed
    assert record["outcome"]["status"] == "ok"


@pytest.mark.parametrize(("mode", "json_response"), PATHS)
async def test_progress_from_a_2026_upstream_reaches_the_agent(
    arbiter_factory: ArbiterFactory, modern_streamer: Streamer, mode: str, json_response: bool
) -> None:
    arbiter = arbiter_factory(mcp={"json_response": json_response})
    arbiter.register("up", modern_streamer.url)
    heard = Heard()
    async with _client(arbiter, mode, heard) as client:
        result = await client.call_tool("up__report", {"n": 3}, progress_callback=heard.on_progress)
        assert _text(result) == "report 3 done"
        await _until(lambda: len(heard.progress) == 3, "the three progress messages")
    assert heard.progress == [(step, 3, f"agent 3: step {step}") for step in (1, 2, 3)]
    if mode != "legacy":  # the agent's log-level opt-in crossed to the upstream, which then logged
        await _until(lambda: len(heard.logs) == 3, "the three log messages")
        assert heard.logs == [f"agent 3: log {step}" for step in (1, 2, 3)]


async def test_a_handshake_agent_that_takes_no_event_stream_gets_the_messages_on_its_session_stream(
    arbiter_factory: ArbiterFactory, streamer: Streamer
) -> None:
    """An agent whose Accept admits only JSON gets a JSON answer, which carries nothing else: the call's
    messages ride the agent's own session stream (GET). Logs all arrive; progress arrives as long as the
    call is open (the SDK client drops progress for a call it has its answer to), so this only checks that
    none is another call's."""
    arbiter = arbiter_factory()  # mcp.json_response: true, the default
    arbiter.register("up", streamer.url)
    heard = Heard()
    async with _client(arbiter, "legacy", heard, json_only=True) as client:
        result = await client.call_tool("up__report", {"n": 5}, progress_callback=heard.on_progress)
        assert _text(result) == "report 5 done"
        await _until(lambda: len(heard.logs) == 3, "the three log messages")
    assert heard.logs == [f"agent 5: log {step}" for step in (1, 2, 3)]
    assert all(m is not None and m.startswith("agent 5: step") for _, _, m in heard.progress)


async def test_a_handshake_agent_without_a_session_gets_its_calls_messages_on_its_answer(
    arbiter_factory: ArbiterFactory, streamer: Streamer
) -> None:
    """mcp.stateless_legacy: no session stream, so the call's own answer is the only way back (the SDK's
    stateless transport in JSON mode drops what a call streams)."""
    arbiter = arbiter_factory(mcp={"stateless_legacy": True})
    arbiter.register("up", streamer.url)
    heard = Heard()
    async with _client(arbiter, "legacy", heard) as client:
        result = await client.call_tool("up__report", {"n": 6}, progress_callback=heard.on_progress)
        assert _text(result) == "report 6 done"
        await _until(lambda: len(heard.progress) == 3 and len(heard.logs) == 3, "all six messages")
    assert heard.progress == [(step, 3, f"agent 6: step {step}") for step in (1, 2, 3)]
    assert heard.logs == [f"agent 6: log {step}" for step in (1, 2, 3)]


@pytest.mark.parametrize("mode", MODES)
async def test_two_agents_at_once_each_get_only_their_own_progress(arbiter: ArbiterServer, mode: str) -> None:
    heard = {1: Heard(), 2: Heard()}

    async def agent(n: int) -> None:
        async with _client(arbiter, mode, heard[n]) as client:
            # Both SDK clients use the same request id, so the same progress token on the shared upstream.
            await client.call_tool("up__report", {"n": n}, progress_callback=heard[n].on_progress)
            await _until(lambda: len(heard[n].progress) == 3 and len(heard[n].logs) == 3, f"agent {n}")

    async with anyio.create_task_group() as tg:
        tg.start_soon(agent, 1)
        tg.start_soon(agent, 2)
    for n in (1, 2):
        assert [m for _, _, m in heard[n].progress] == [f"agent {n}: step {s}" for s in (1, 2, 3)]
        assert heard[n].logs == [f"agent {n}: log {s}" for s in (1, 2, 3)]


def _answering(heard: Heard, ok: bool) -> Any:
    async def elicit(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        heard.asked.append(params.message)
        return types.ElicitResult(action="accept", content={"ok": ok})

    return elicit


async def test_an_upstreams_question_reaches_the_agent_whose_call_it_is(arbiter: ArbiterServer) -> None:
    heard = {1: Heard(), 2: Heard()}
    results: dict[int, str] = {}

    async def agent(n: int) -> None:
        async with _client(arbiter, "legacy", elicitation_callback=_answering(heard[n], n == 1)) as client:
            results[n] = _text(await client.call_tool("up__confirm", {"item": f"order-{n}"}))

    async with anyio.create_task_group() as tg:
        tg.start_soon(agent, 1)
        tg.start_soon(agent, 2)
    assert results == {1: "order-1: accept True", 2: "order-2: accept False"}
    assert heard[1].asked == ["Really ship order-1?"]
    assert heard[2].asked == ["Really ship order-2?"]
    records = _tool_calls(arbiter, 2)
    accepted = [{"kind": "elicitation", "action": "accept"}]
    assert [r["outcome"]["input_rounds"] for r in records] == [accepted, accepted]
    assert "order-" not in str([r["outcome"] for r in records])  # never the content


@pytest.mark.parametrize("mode", MODES)
async def test_an_upstream_cannot_flood_the_agent_with_questions(
    arbiter_factory: ArbiterFactory, streamer: Streamer, mode: str
) -> None:
    server = arbiter_factory(mcp={"json_response": False, "input_requests_max": 2})
    server.register("up", streamer.url)
    heard = Heard()
    async with _client(server, mode, elicitation_callback=_answering(heard, True)) as client:
        result = await client.call_tool("up__nag", {"times": 6})
    # A handshake-era agent is asked twice, not six times; a 2026-07-28 one cannot be asked at all.
    first = "accept" if mode == "legacy" else "refused"
    assert _text(result) == " ".join([first, first] + ["refused"] * 4)
    assert heard.asked == (["Again (0)?", "Again (1)?"] if mode == "legacy" else [])
    (record,) = _tool_calls(server, 1)
    each = {"kind": "elicitation", "action": first}
    over = {"kind": "over_limit", "action": "refused", "count": 4}  # counted, not recorded one by one
    assert record["outcome"]["input_rounds"] == [each, each, over]


async def test_an_agent_that_cannot_answer_gets_a_clear_refusal(arbiter: ArbiterServer) -> None:
    async with _client(arbiter, "legacy") as client:  # declares no elicitation
        with pytest.raises(MCPError) as refused:  # this upstream passes the refusal on as its own error
            await client.call_tool("up__confirm", {"item": "x"})
    assert refused.value.error.message == (
        "the agent does not support elicitation: it did not declare the elicitation capability"
    )
    (record,) = _tool_calls(arbiter, 1)
    assert record["outcome"]["input_rounds"] == [{"kind": "elicitation", "action": "refused"}]


async def test_a_2026_agent_cannot_be_asked(arbiter: ArbiterServer) -> None:
    heard = Heard()
    async with _client(arbiter, "2026-07-28", elicitation_callback=_answering(heard, True)) as client:
        with pytest.raises(MCPError) as refused:
            await client.call_tool("up__confirm", {"item": "x"})
    assert refused.value.error.message.startswith("the agent cannot be asked: its protocol version")
    assert heard.asked == []


async def test_relaying_requests_can_be_turned_off(
    arbiter_factory: ArbiterFactory, streamer: Streamer
) -> None:
    server = arbiter_factory(mcp={"relay_server_requests": False})
    server.register("up", streamer.url)
    heard = Heard()
    async with _client(server, "legacy", elicitation_callback=_answering(heard, True)) as client:
        with pytest.raises(MCPError) as refused:
            await client.call_tool("up__confirm", {"item": "x"})
    assert refused.value.error.message == "Arbiter does not relay elicitation requests (turned off)"
    assert heard.asked == []


async def test_sampling_and_roots_reach_the_agent_that_declared_them(arbiter: ArbiterServer) -> None:
    async def sample(
        context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(text="from the agent"), model="test"
        )

    async def roots(context: ClientRequestContext) -> types.ListRootsResult:
        return types.ListRootsResult(roots=[types.Root(uri=FileUrl("file:///work"))])

    async with _client(arbiter, "legacy", sampling_callback=sample, list_roots_callback=roots) as client:
        assert _text(await client.call_tool("up__sample", {"text": "hi"})) == "sampled: from the agent"
        assert _text(await client.call_tool("up__roots", {})) == "roots: file:///work"
    async with _client(arbiter, "legacy") as client:
        with pytest.raises(MCPError, match="the agent does not support sampling"):
            await client.call_tool("up__sample", {"text": "hi"})
    records = _tool_calls(arbiter, 3)
    assert [r["outcome"].get("input_rounds") for r in records] == [
        [{"kind": "sampling", "action": "answered"}],
        [{"kind": "roots", "action": "answered"}],
        [{"kind": "sampling", "action": "refused"}],
    ]


@pytest.mark.parametrize("mode", MODES)
async def test_the_agent_cancelling_cancels_the_upstream_call(
    arbiter: ArbiterServer, streamer: Streamer, mode: str
) -> None:
    with streamer.lock:
        waiting, cancelled = streamer.waiting, streamer.cancelled
    async with _client(arbiter, mode) as client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.call_tool, "up__wait", {})
            await anyio.to_thread.run_sync(lambda: streamer.until("wait", lambda s: s.waiting > waiting))
            tg.cancel_scope.cancel()  # the SDK client sends notifications/cancelled (or closes its stream)
        # With the client still open: the answer to the cancelled call (-32800) must find it listening.
        await anyio.to_thread.run_sync(lambda: streamer.until("cancel", lambda s: s.cancelled > cancelled))
    (record,) = _tool_calls(arbiter, 1)
    assert record["reason"] == "cancelled"
    assert record["outcome"]["status"] == "cancelled"


@pytest.mark.parametrize("mode", MODES)
async def test_a_hidden_tool_sends_nothing(
    arbiter_factory: ArbiterFactory, streamer: Streamer, mode: str
) -> None:
    server = arbiter_factory(policy="p, *, *, up/confirm, call, allow\n")
    server.register("up", streamer.url)
    heard = Heard()
    with streamer.lock:
        before = len(streamer.ran)
    async with _client(server, mode, heard) as client:
        with pytest.raises(MCPError) as missing:
            await client.call_tool("up__report", {"n": 9}, progress_callback=heard.on_progress)
        with pytest.raises(MCPError) as unknown:
            await client.call_tool("up__nope", {"n": 9}, progress_callback=heard.on_progress)
    assert missing.value.error.code == unknown.value.error.code
    assert missing.value.error.message == "Unknown tool: up__report"  # as for up__nope, which is missing
    assert heard.progress == [] and heard.logs == []
    with streamer.lock:
        assert len(streamer.ran) == before


async def test_langchain_mcp_progress_and_elicitation_work_through_arbiter(
    arbiter: ArbiterServer, streamer: Streamer
) -> None:
    """``langchain.mcp`` (on the FastMCP client) with the agent's own progress and elicitation handlers."""
    from fastmcp import Client as FastMCPClient
    from langchain.mcp import MCPAdapter

    progress: list[str | None] = []
    asked: list[str] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(message)

    async def on_elicit(message: str, response_type: Any, params: Any, context: Any) -> dict[str, Any]:
        asked.append(message)
        return {"ok": True}

    client: Any = FastMCPClient(
        arbiter.mcp_url,
        auth=arbiter.agent_key,
        mode="legacy",  # elicitation needs a session to be asked on
        progress_handler=on_progress,
        elicitation_handler=on_elicit,
    )
    async with MCPAdapter(client) as adapter:
        tools = {t.name: t for t in await adapter.list_tools()}
        assert "report 7 done" in str(await tools["up__report"].ainvoke({"n": 7}))
        await _until(lambda: len(progress) == 3, "the three progress messages")
        assert "lc: accept True" in str(await tools["up__confirm"].ainvoke({"item": "lc"}))
    assert progress == [f"agent 7: step {step}" for step in (1, 2, 3)]
    assert asked == ["Really ship lc?"]


async def test_a_late_message_never_splits_or_follows_the_end_of_a_streamed_answer() -> None:
    # Progress comes from other tasks too (the SDK's per-request callback for stdio/SSE upstreams): a
    # message mid-send when the result is ready must finish before the last event, and one that comes
    # after it must not be sent at all (a body after the end makes the server raise).
    from arbiter.proxy.pipeline import CallContext
    from arbiter.proxy.streamed import StreamedAnswer

    sent: list[Message] = []
    gate = anyio.Event()

    async def send(message: Message) -> None:
        sent.append(message)
        if message["type"] == "http.response.start":
            await gate.wait()  # the first message is caught mid-send

    log = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "x"}}
    streamed = StreamedAnswer(CallContext(method="tools/call", params={}), send)
    finished: list[bool] = []

    async def finish() -> None:
        finished.append(await streamed.finish({"jsonrpc": "2.0", "id": 1, "result": {}}))

    async with anyio.create_task_group() as tg:
        tg.start_soon(streamed.message, log)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(finish)
        await anyio.wait_all_tasks_blocked()
        gate.set()
    await streamed.message(log)  # after the end: dropped
    assert finished == [True]
    assert [(m["type"], m.get("more_body")) for m in sent] == [
        ("http.response.start", None),
        ("http.response.body", True),
        ("http.response.body", False),
    ]

    # Nothing streamed before the result: the caller answers in JSON, and nothing is sent after it.
    quiet: list[Message] = []

    async def record(message: Message) -> None:
        quiet.append(message)

    unstarted = StreamedAnswer(CallContext(method="tools/call", params={}), record)
    assert await unstarted.finish({"jsonrpc": "2.0", "id": 2, "result": {}}) is False
    await unstarted.message(log)
    assert quiet == []
