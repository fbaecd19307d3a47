"""Multi-round-trip requests (2026-07-28 ``input_required``) through Arbiter, against a real upstream.

The upstream's tool asks for a confirmation (an embedded form elicitation) with a ``requestState`` of its
own, and completes on the retry. Arbiter relays the question to a 2026-07-28 agent with the state sealed
to that caller, tool and arguments; another caller replaying it, a tampered or foreign state, never reach
the upstream; a handshake-era agent, or one that declared no way to answer, gets a readable tool error.
"""

from __future__ import annotations

import dataclasses
import json
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
from mcp.shared.exceptions import MCPError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from arbiter.auth.principal import Principal
from arbiter.proxy.request_state import Opened, RequestStateSeal, Round, StateRefused
from tests.audit.helpers import of_kind, wait_for
from tests.conftest import ArbiterFactory, ArbiterServer, authed_transport, serve_in_thread
from tests.policies.conftest import new_key
from tests.refusals import tool_refusal

MODERN = "2026-07-28"
FORM = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


@dataclass
class Asker:
    """The upstream, and every tools/call it saw: (tool, its own requestState, the response keys)."""

    url: str
    seen: list[tuple[str, str | None, list[str]]] = field(
        default_factory=list[tuple[str, str | None, list[str]]]
    )
    lock: threading.Lock = field(default_factory=threading.Lock)

    def calls(self) -> list[tuple[str, str | None, list[str]]]:
        with self.lock:
            return list(self.seen)


@pytest.fixture(scope="module")
def asker() -> Iterator[Asker]:
    server = MCPServer("asker")
    state = Asker("")

    def note(tool: str, ctx: Context) -> types.InputResponses | None:
        responses = ctx.input_responses
        with state.lock:
            state.seen.append((tool, ctx.request_state, sorted(responses or {})))
        return responses

    @server.tool()
    def confirm(item: str, ctx: Context) -> types.CallToolResult | types.InputRequiredResult:
        responses = note("confirm", ctx)
        answer = (responses or {}).get("ok")
        if not isinstance(answer, types.ElicitResult):
            ask = types.ElicitRequest(
                params=types.ElicitRequestFormParams(message=f"Really ship {item}?", requested_schema=FORM)
            )
            return types.InputRequiredResult(input_requests={"ok": ask}, request_state=f"asked:{item}")
        text = f"{item}: {answer.action} {(answer.content or {}).get('ok')} after {ctx.request_state}"
        return types.CallToolResult(content=[types.TextContent(text=text)])

    @server.tool()
    def summarise(text: str, ctx: Context) -> types.CallToolResult | types.InputRequiredResult:
        note("summarise", ctx)
        ask = types.CreateMessageRequest(
            params=types.CreateMessageRequestParams(
                messages=[types.SamplingMessage(role="user", content=types.TextContent(text=text))],
                max_tokens=10,
            )
        )
        return types.InputRequiredResult(input_requests={"llm": ask}, request_state="sampling")

    @server.tool(name="vérifier")
    def verify(item: str, ctx: Context) -> types.CallToolResult | types.InputRequiredResult:
        responses = note("vérifier", ctx)
        answer = (responses or {}).get("ok")
        if not isinstance(answer, types.ElicitResult):
            ask = types.ElicitRequest(
                params=types.ElicitRequestFormParams(message=f"Vérifier {item} ?", requested_schema=FORM)
            )
            return types.InputRequiredResult(input_requests={"ok": ask}, request_state=f"vérifié:{item}")
        text = f"{item}: {answer.action} {(answer.content or {}).get('ok')} after {ctx.request_state}"
        return types.CallToolResult(content=[types.TextContent(text=text)])

    @server.prompt()
    def pick(topic: str, ctx: Context) -> str | types.InputRequiredResult:
        responses = note("pick", ctx)
        answer = (responses or {}).get("ok")
        if not isinstance(answer, types.ElicitResult):
            ask = types.ElicitRequest(
                params=types.ElicitRequestFormParams(message=f"Pick for {topic}?", requested_schema=FORM)
            )
            return types.InputRequiredResult(input_requests={"ok": ask}, request_state=f"topic:{topic}")
        return f"{topic}: {answer.action} after {ctx.request_state}"

    app = server.streamable_http_app(json_response=True, stateless_http=True)
    with serve_in_thread(app) as port:
        state.url = f"http://127.0.0.1:{port}/mcp"
        yield state


@pytest.fixture(params=[True, False], ids=["direct", "sdk"])
def arbiter(request: pytest.FixtureRequest, arbiter_factory: ArbiterFactory, asker: Asker) -> ArbiterServer:
    # mcp.json_response: 2026-07-28 requests take the direct path (front.py), or the SDK's transport.
    server = arbiter_factory(mcp={"json_response": request.param})
    server.register("ask", asker.url)
    with asker.lock:
        asker.seen.clear()
    return server


async def _yes(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
    return types.ElicitResult(action="accept", content={"ok": True})


def _client(
    server: ArbiterServer, mode: str, key: str | None = None, *, answers: bool = True, callback: Any = None
) -> Client:
    return Client(
        authed_transport(server.mcp_url, key or server.agent_key),  # pyright: ignore[reportArgumentType]
        mode=mode,  # pyright: ignore[reportArgumentType]
        cache=None,
        elicitation_callback=callback or (_yes if answers else None),
    )


def _text(result: types.CallToolResult) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


def _tool_calls(server: ArbiterServer, count: int) -> list[dict[str, Any]]:
    def calls(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in of_kind(records, "mcp") if r["method"] == "tools/call"]

    return calls(wait_for(server, lambda rs: len(calls(rs)) >= count))


async def test_a_modern_agent_answers_the_upstreams_question_through_arbiter(
    arbiter: ArbiterServer, asker: Asker
) -> None:
    async with _client(arbiter, MODERN) as client:
        result = await client.call_tool("ask__confirm", {"item": "box"})
    assert not result.is_error
    assert _text(result) == "box: accept True after asked:box"  # the upstream got its own state back
    assert asker.calls() == [("confirm", None, []), ("confirm", "asked:box", ["ok"])]
    first, retry = _tool_calls(arbiter, 2)
    assert first["decision"] == "allow" and first["outcome"]["input_required"] is True
    assert first["outcome"]["input_requests"] == ["ok"]
    assert retry["decision"] == "allow" and retry["outcome"]["input_responses"] == ["ok"]
    assert "input_required" not in retry["outcome"]
    assert "True" not in str(retry["outcome"])  # keys only, never what the user answered


async def test_the_agent_gets_a_sealed_state_that_only_opens_for_its_own_round(
    arbiter: ArbiterServer, asker: Asker
) -> None:
    other = new_key(arbiter, "mallory", ["agent"])
    yes: types.InputResponses = {"ok": types.ElicitResult(action="accept", content={"ok": True})}
    async with _client(arbiter, MODERN) as alice:
        first = await alice.session.call_tool("ask__confirm", {"item": "box"}, allow_input_required=True)
        assert isinstance(first, types.InputRequiredResult) and first.request_state is not None
        assert set(first.input_requests or {}) == {"ok"}
        sealed = first.request_state
        assert sealed.startswith("arb1.") and "asked" not in sealed  # encrypted, not the upstream's
        refusals: dict[str, tuple[str, dict[str, Any]]] = {
            "tampered": (sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB"), {"item": "box"}),
            "other arguments": (sealed, {"item": "crate"}),
        }
        for what, (state, args) in refusals.items():
            with pytest.raises(MCPError) as refused:
                await alice.session.call_tool(
                    "ask__confirm", args, input_responses=yes, request_state=state, allow_input_required=True
                )
            assert refused.value.error.code == types.INVALID_PARAMS, what
            assert (refused.value.error.data or {}).get("reason") == "invalid_request_state", what
    async with _client(arbiter, MODERN, other) as mallory:
        with pytest.raises(MCPError) as replayed:
            await mallory.session.call_tool(
                "ask__confirm",
                {"item": "box"},
                input_responses=yes,
                request_state=sealed,
                allow_input_required=True,
            )
    assert replayed.value.error.code == types.INVALID_PARAMS
    assert replayed.value.error.message == "Invalid or expired requestState"
    assert asker.calls() == [("confirm", None, [])]  # no refused round reached the upstream
    records = _tool_calls(arbiter, 4)
    why = [r["outcome"].get("request_state") for r in records if r["reason"] == "invalid_request_state"]
    assert why == ["seal", "arguments", "principal"]
    assert all(r["decision"] == "deny" for r in records if r["reason"] == "invalid_request_state")


async def test_arbiter_completes_the_rounds_for_a_handshake_era_agent(
    arbiter: ArbiterServer, asker: Asker
) -> None:
    async with _client(arbiter, "legacy") as client:  # asked over its own session (elicitation/create)
        result = await client.call_tool("ask__confirm", {"item": "box"})
    assert not result.is_error and _text(result) == "box: accept True after asked:box"
    assert asker.calls() == [("confirm", None, []), ("confirm", "asked:box", ["ok"])]
    (record,) = _tool_calls(arbiter, 1)  # one request, one record
    assert record["decision"] == "allow" and record["outcome"]["input_required"] is True
    assert record["outcome"]["input_rounds_completed"] == 1


async def test_a_handshake_era_agent_that_cannot_answer_gets_a_readable_tool_error(
    arbiter: ArbiterServer, asker: Asker
) -> None:
    async with _client(arbiter, "legacy", answers=False) as client:  # declares no elicitation
        result = await client.call_tool("ask__confirm", {"item": "box"})
    assert result.is_error and "needs input from the user" in _text(result)
    assert (result.structured_content or {}).get("reason") == "input_unavailable"
    assert asker.calls() == [("confirm", None, [])]
    (record,) = _tool_calls(arbiter, 1)
    assert record["reason"] == "input_unavailable" and record["outcome"]["input_required"] is True


@pytest.mark.parametrize("answers", [True, False])
async def test_only_input_kinds_the_agent_declared_are_relayed(
    arbiter: ArbiterServer, asker: Asker, answers: bool
) -> None:
    async with _client(arbiter, MODERN, answers=answers) as client:
        # The client declares elicitation only with a callback, and sampling never: nothing is left.
        result = await client.call_tool("ask__summarise", {"text": "hello"})
        assert result.is_error and (result.structured_content or {}).get("reason") == "input_unavailable"
        if not answers:
            confirm = await client.call_tool("ask__confirm", {"item": "box"})
            assert (
                confirm.is_error and (confirm.structured_content or {}).get("reason") == "input_unavailable"
            )
    record = _tool_calls(arbiter, 1)[0]
    assert (
        record["outcome"]["input_requests_dropped"] == ["llm"] and record["outcome"]["input_requests"] == []
    )


def test_a_state_expires_and_is_bound_to_every_claim() -> None:
    now = [1000.0]
    seal = RequestStateSeal([b"k" * 32], ttl_s=60, clock=lambda: now[0])
    alice = Principal(
        subject="alice", issuer="arbiter", auth_method="api_key", tenant="acme", api_key_id="k1"
    )
    bob = Principal(subject="alice", issuer="arbiter", auth_method="api_key", tenant="other", api_key_id="k2")
    other_app = dataclasses.replace(alice, client_id="another-oauth-client")
    mine = Round(alice, "ask", "tools/call", "confirm", {"item": "box"})
    token = seal.seal(mine, "upstream-state")
    assert seal.open(mine, token) == Opened("upstream-state", "ask")
    others = {
        "principal": Round(bob, "ask", "tools/call", "confirm", {"item": "box"}),
        "client": Round(other_app, "ask", "tools/call", "confirm", {"item": "box"}),
        "target": Round(alice, "ask", "tools/call", "delete", {"item": "box"}),
        "upstream": Round(alice, "other", "tools/call", "confirm", {"item": "box"}),
        "arguments": Round(alice, "ask", "tools/call", "confirm", {"item": "crate"}),
    }
    reasons = {"client": "principal", "upstream": "target"}
    for what, other in others.items():
        with pytest.raises(StateRefused, match=reasons.get(what, what)):
            seal.open(other, token)
    with pytest.raises(StateRefused, match="seal"):  # another deployment's key
        RequestStateSeal([b"x" * 32], ttl_s=60, clock=lambda: now[0]).open(mine, token)
    rotated = RequestStateSeal([b"n" * 32, b"k" * 32], ttl_s=60, clock=lambda: now[0])
    assert rotated.open(mine, token).state == "upstream-state"  # an old key still opens during rotation
    now[0] += 61
    with pytest.raises(StateRefused, match="expired"):
        seal.open(mine, token)


def test_names_beyond_ascii_are_bound_like_any_other() -> None:
    """A tool or resource named beyond ASCII opens its own state, and only its own (never a crash)."""
    seal = RequestStateSeal([b"k" * 32], ttl_s=60)
    alice = Principal(subject="alicé", issuer="https://idp.example/é", auth_method="jwt", client_id="app-ü")
    mine = Round(alice, "ask", "tools/call", "vérifier", {"quoi": "boîte"})
    token = seal.seal(mine, "état")
    assert seal.open(mine, token) == Opened("état", "ask")
    for target in ("vérifiér", "verifier", "確認"):
        with pytest.raises(StateRefused, match="target"):
            seal.open(dataclasses.replace(mine, target=target), token)
    uri = Round(alice, "ask", "resources/read", "file:///données/€.txt", None)
    assert seal.open(uri, seal.seal(uri, "s")).state == "s"
    with pytest.raises(StateRefused, match="target"):
        seal.open(dataclasses.replace(uri, target="file:///données/$.txt"), seal.seal(uri, "s"))


def test_a_state_names_the_upstream_that_answered() -> None:
    """A fallback's state says so: the retry goes back to the fallback, whatever the primary does."""
    seal = RequestStateSeal([b"k" * 32], ttl_s=60)
    alice = Principal(subject="alice", issuer="arbiter", auth_method="api_key", api_key_id="k1")
    mine = Round(alice, "ask", "tools/call", "confirm", {"item": "box"})
    assert seal.open(mine, seal.seal(mine, "s", via="ask-b")) == Opened("s", "ask-b")
    assert seal.open(mine, seal.seal(mine, "s", via="ask")) == Opened("s", "ask")


async def test_a_tool_named_beyond_ascii_completes_its_rounds(arbiter: ArbiterServer, asker: Asker) -> None:
    async with _client(arbiter, MODERN) as client:
        result = await client.call_tool("ask__vérifier", {"item": "boîte"})
    assert not result.is_error, result
    assert _text(result) == "boîte: accept True after vérifié:boîte"
    assert asker.calls() == [("vérifier", None, []), ("vérifier", "vérifié:boîte", ["ok"])]


async def test_a_prompt_asks_for_input_too(arbiter: ArbiterServer, asker: Asker) -> None:
    async with _client(arbiter, MODERN) as client:
        prompt = await client.get_prompt("ask__pick", {"topic": "tea"})
    assert getattr(prompt.messages[0].content, "text", "") == "tea: accept after topic:tea"
    assert asker.calls() == [("pick", None, []), ("pick", "topic:tea", ["ok"])]


async def test_a_question_the_handshake_era_agent_leaves_unanswered_ends_the_call(
    arbiter_factory: ArbiterFactory, asker: Asker
) -> None:
    """Arbiter waits for each answer at most mcp.request_state_ttl_s, not for ever."""
    server = arbiter_factory(mcp={"request_state_ttl_s": 0.5})
    server.register("ask", asker.url)
    asked = anyio.Event()
    done = anyio.Event()

    async def never(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.set()
        await done.wait()  # the user walked away (until the test is over)
        return types.ElicitResult(action="cancel")

    async with _client(server, "legacy", callback=never) as client:
        with anyio.fail_after(30):  # without the bound the call would wait for ever
            result = await client.call_tool("ask__confirm", {"item": "box"})
        done.set()
    assert asked.is_set()
    refusal = tool_refusal(result)
    assert refusal["reason"] == "input_unavailable", refusal
    assert refusal["message"] == "ask__confirm needs input from the user, which did not come within 0.5 s"
    (record,) = _tool_calls(server, 1)
    assert record["reason"] == "input_unavailable" and record["outcome"]["input_required"] is True


class Misshapen:
    """Rewrites the upstream's input_required answers: a requestState that is not a string, or
    inputRequests that is not an object (what a broken or hostile upstream may send)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def rewrite(message: Message) -> None:
            if message["type"] == "http.response.start":
                held.append(message)
                return
            if message["type"] == "http.response.body" and message.get("more_body"):
                held.append(message)
                return
            body = b"".join(m.get("body", b"") for m in held[1:]) + message.get("body", b"")
            body = _misshape(body)
            start = dict(held[0])
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            start["headers"] = [*headers, (b"content-length", str(len(body)).encode())]
            await send(start)
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)


def _misshape(body: bytes) -> bytes:
    try:
        message = json.loads(body)
    except ValueError:
        return body
    result = message.get("result") if isinstance(message, dict) else None
    if isinstance(result, dict) and result.get("resultType") == "input_required":
        ask = result["inputRequests"]["ok"]  # its message says how to misshape the answer
        if ask["params"]["message"] == "object":
            result["requestState"] = {"upstream": "secret"}
        if ask["params"]["message"] == "list":
            result["inputRequests"] = [ask]
        return json.dumps(message).encode()
    return body


@pytest.fixture(scope="module")
def misshapen() -> Iterator[str]:
    server = MCPServer("misshapen")

    @server.tool()
    def odd(how: str) -> types.InputRequiredResult:
        ask = types.ElicitRequest(params=types.ElicitRequestFormParams(message=how, requested_schema=FORM))
        return types.InputRequiredResult(input_requests={"ok": ask}, request_state="fine")

    with serve_in_thread(
        Misshapen(server.streamable_http_app(json_response=True, stateless_http=True))
    ) as port:
        yield f"http://127.0.0.1:{port}/mcp"


@pytest.mark.parametrize("mode", [MODERN, "legacy"])
@pytest.mark.parametrize(
    ("how", "what"),
    [("object", "a requestState that is not a string"), ("list", "inputRequests that is not an object")],
)
async def test_a_misshapen_input_required_answer_is_an_upstream_error(
    arbiter_factory: ArbiterFactory, misshapen: str, mode: str, how: str, what: str
) -> None:
    server = arbiter_factory()
    server.register("odd", misshapen)
    asked: list[str] = []

    async def answer(context: ClientRequestContext, params: types.ElicitRequestParams) -> types.ElicitResult:
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"ok": True})

    async with _client(server, mode, callback=answer) as client:
        result = await client.call_tool("odd__odd", {"how": how})
    refusal = tool_refusal(result)
    assert refusal["reason"] == "upstream_protocol_error", refusal
    assert refusal["message"] == f"upstream 'odd' answered tools/call with input_required and {what}"
    assert "secret" not in str(result) and asked == []  # nothing of it reached the agent or its user
