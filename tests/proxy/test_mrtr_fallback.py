"""Multi-round-trip input and fallbacks: a round's state and the user's answers go back to the upstream
that asked, and to no other (docs/protocol.md "Input requests (MRTR)").

Two real 2026-07-28 upstreams, ``ask`` and its fallback ``ask-b``, each with a tool that asks for a
confirmation (its ``requestState`` names the upstream) and a tool that holds ``ask``'s only bulkhead slot,
so a call falls back exactly when the test says so, and stops falling back when it lets go.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.context import ClientRequestContext
from mcp.server import MCPServer
from mcp.server.mcpserver import Context

from tests.audit.helpers import of_kind, wait_for
from tests.conftest import ArbiterFactory, ArbiterServer, authed_transport, serve_in_thread
from tests.refusals import tool_refusal

MODERN = "2026-07-28"
FORM = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
HOLD_MAX_S = 60.0  # a hold never keeps the upstream's thread for good


@dataclass
class Asker:
    """One upstream: what its confirm tool saw (its own requestState, response keys), and its holds."""

    name: str
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    seen: list[tuple[str | None, list[str]]] = field(default_factory=list[tuple[str | None, list[str]]])
    holding: int = 0
    release: threading.Event = field(default_factory=threading.Event)

    def calls(self) -> list[tuple[str | None, list[str]]]:
        with self.lock:
            return list(self.seen)


def _serve(name: str) -> Iterator[Asker]:
    state = Asker(name)
    server = MCPServer(name)

    @server.tool()
    def confirm(item: str, ctx: Context) -> types.CallToolResult | types.InputRequiredResult:
        responses = ctx.input_responses
        with state.lock:
            state.seen.append((ctx.request_state, sorted(responses or {})))
        answer = (responses or {}).get("ok")
        if not isinstance(answer, types.ElicitResult):
            ask = types.ElicitRequest(
                params=types.ElicitRequestFormParams(message=f"Ship {item}?", requested_schema=FORM)
            )
            return types.InputRequiredResult(input_requests={"ok": ask}, request_state=f"{name}:{item}")
        text = f"{name} answered {answer.action} after {ctx.request_state}"
        return types.CallToolResult(content=[types.TextContent(text=text)])

    @server.tool()
    async def hold() -> str:
        with state.lock:
            state.holding += 1
        try:
            with anyio.fail_after(HOLD_MAX_S):
                await anyio.to_thread.run_sync(state.release.wait, abandon_on_cancel=True)
        finally:
            with state.lock:
                state.holding -= 1
        return "held"

    app = server.streamable_http_app(json_response=True, stateless_http=True)
    with serve_in_thread(app) as port:
        state.url = f"http://127.0.0.1:{port}/mcp"
        yield state
    state.release.set()


@pytest.fixture
def primary() -> Iterator[Asker]:
    yield from _serve("ask")


@pytest.fixture
def fallback() -> Iterator[Asker]:
    yield from _serve("ask-b")


@pytest.fixture
def arbiter(arbiter_factory: ArbiterFactory, primary: Asker, fallback: Asker) -> ArbiterServer:
    # One slot on the primary and no queue: while a hold takes it, a call falls back at once.
    server = arbiter_factory(upstream={"max_waiting": 0, "breaker_threshold": 0})
    server.register("ask-b", fallback.url)
    server.register("ask", primary.url, fallback="ask-b", max_concurrency=1)
    return server


async def _yes(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
    return types.ElicitResult(action="accept", content={"ok": True})


YES: types.InputResponses = {"ok": types.ElicitResult(action="accept", content={"ok": True})}


def _client(server: ArbiterServer, mode: str, **callbacks: Any) -> Client:
    return Client(
        authed_transport(server.mcp_url, server.agent_key),  # pyright: ignore[reportArgumentType]
        mode=mode,  # pyright: ignore[reportArgumentType]
        cache=None,
        **callbacks,
    )


async def _until(condition: Any, what: str, within_s: float = 30.0) -> None:
    with anyio.fail_after(within_s):
        while not condition():  # noqa: ASYNC110  (the upstream's thread moves it, no event of ours)
            await anyio.sleep(0.01)
    assert condition(), what


def _text(result: types.CallToolResult) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


def _confirm_calls(server: ArbiterServer, count: int) -> list[dict[str, Any]]:
    def calls(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            r for r in of_kind(records, "mcp") if r["method"] == "tools/call" and r["tool"] == "ask__confirm"
        ]

    return calls(wait_for(server, lambda rs: len(calls(rs)) >= count))


class Hold:
    """A call that keeps the primary's only slot until ``let_go``."""

    def __init__(self, upstream: Asker) -> None:
        self.upstream = upstream
        self.done = anyio.Event()

    async def run(self, client: Client) -> None:
        result = await client.call_tool("ask__hold", {})
        assert _text(result) == "held", result
        self.done.set()

    async def let_go(self) -> None:
        self.upstream.release.set()
        await self.done.wait()  # Arbiter has the answer: the slot is free again


async def test_a_fallbacks_question_is_answered_to_the_fallback_even_once_the_primary_is_free(
    arbiter: ArbiterServer, primary: Asker, fallback: Asker
) -> None:
    async with _client(arbiter, MODERN, elicitation_callback=_yes) as agent, anyio.create_task_group() as tg:
        hold = Hold(primary)
        tg.start_soon(hold.run, agent)
        await _until(lambda: primary.holding == 1, "the primary's slot is held")
        first = await agent.session.call_tool("ask__confirm", {"item": "box"}, allow_input_required=True)
        assert isinstance(first, types.InputRequiredResult), first
        assert fallback.calls() == [(None, [])]  # the fallback asked
        await hold.let_go()
        result = await agent.session.call_tool(
            "ask__confirm", {"item": "box"}, input_responses=YES, request_state=first.request_state
        )
        assert not result.is_error, result
        assert _text(result) == "ask-b answered accept after ask-b:box"
    assert primary.calls() == []  # never the fallback's state, nor the user's answers
    assert fallback.calls() == [(None, []), ("ask-b:box", ["ok"])]
    first_record, retry = _confirm_calls(arbiter, 2)
    assert first_record["outcome"]["fallback"] == "ask-b" and retry["outcome"]["fallback"] == "ask-b"


async def test_a_handshake_era_agents_rounds_stay_on_the_upstream_that_asked(
    arbiter: ArbiterServer, primary: Asker, fallback: Asker
) -> None:
    hold = Hold(primary)

    async def answer_once_the_primary_is_free(
        context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult:
        await hold.let_go()  # asked by the fallback; the primary could take the next round now
        return await _yes(context, params)

    async with (
        _client(arbiter, MODERN) as holder,
        _client(arbiter, "legacy", elicitation_callback=answer_once_the_primary_is_free) as agent,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(hold.run, holder)
        await _until(lambda: primary.holding == 1, "the primary's slot is held")
        result = await agent.call_tool("ask__confirm", {"item": "box"})
        assert not result.is_error, result
        assert _text(result) == "ask-b answered accept after ask-b:box"
    assert primary.calls() == []
    assert fallback.calls() == [(None, []), ("ask-b:box", ["ok"])]


async def test_a_primarys_question_is_never_answered_to_the_fallback(
    arbiter: ArbiterServer, primary: Asker, fallback: Asker
) -> None:
    async with _client(arbiter, MODERN, elicitation_callback=_yes) as agent, anyio.create_task_group() as tg:
        first = await agent.session.call_tool("ask__confirm", {"item": "box"}, allow_input_required=True)
        assert isinstance(first, types.InputRequiredResult), first
        hold = Hold(primary)
        tg.start_soon(hold.run, agent)
        await _until(lambda: primary.holding == 1, "the primary's slot is held")
        result = await agent.session.call_tool(
            "ask__confirm", {"item": "box"}, input_responses=YES, request_state=first.request_state
        )
        await hold.let_go()
        refusal = tool_refusal(result)
        assert refusal["reason"] == "upstream_unavailable" and refusal["upstream"] == "ask", refusal
        assert refusal["message"].endswith("so it is not sent to another"), refusal
    assert fallback.calls() == []  # neither the primary's state nor the user's answers
    assert primary.calls() == [(None, [])]
    _, retry = _confirm_calls(arbiter, 2)
    assert retry["reason"] == "upstream_unavailable" and "fallback" not in retry["outcome"]
