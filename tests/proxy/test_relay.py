"""The lean relay: what an upstream answers reaches the agent as it was sent, whatever the era, the
response mode (JSON or an event stream) or the shape of the result; a broken answer is an upstream
error, never a crash."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

import httpx
import mcp_types as types
import pytest
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from starlette.types import Receive, Scope, Send

from arbiter.net.egress import connector
from arbiter.proxy.relay import Interrupted, Relay, UpstreamRequest, relay_sessions
from tests.conftest import ArbiterFactory, ArbiterServer, serve_in_thread

# A result with what a careless proxy would lose: nested structures, non-ASCII text, numbers that must not
# turn into strings or floats, annotations, binary content, the upstream's own _meta beside its stamp.
ODD_RESULT: dict[str, Any] = {
    "content": [
        {"type": "text", "text": "Zürich → 東京 \u2028 done", "annotations": {"priority": 0.25}},
        {"type": "image", "data": "aGVsbG8=", "mimeType": "image/png"},
    ],
    "structuredContent": {
        "total": 12345678901234,
        "ratio": 0.1,
        "tags": ["a", None, True],
        "nested": {"k": [{}]},
    },
    "isError": False,
    "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "odd"}, "vendor/keep": 1},
}
TOOL = types.Tool(name="odd", input_schema={"type": "object", "properties": {"x": {"type": "string"}}})


def _odd_upstream(*, json_response: bool, stateless: bool) -> Any:
    """A low-level SDK server answering ``odd`` with ODD_RESULT."""

    async def list_tools(ctx: ServerRequestContext[Any, Any], params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[TOOL])

    async def call_tool(ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams) -> Any:
        return types.CallToolResult.model_validate(ODD_RESULT)

    server: Server[Any] = Server("odd", on_list_tools=list_tools, on_call_tool=call_tool)
    return server.streamable_http_app(stateless_http=stateless, json_response=json_response)


def _expected() -> dict[str, Any]:
    # What the agent must see: the upstream's result, without the upstream's identity stamp.
    expected = json.loads(json.dumps(ODD_RESULT))
    expected["_meta"] = {"vendor/keep": 1}
    return expected


def _call(server: ArbiterServer, era: str) -> dict[str, Any]:
    headers = {**server.auth_headers, "accept": "application/json, text/event-stream"}
    params: dict[str, Any] = {"name": "odd__odd", "arguments": {"x": "y"}}
    if era == "2026-07-28":
        headers.update({"mcp-protocol-version": era, "mcp-method": "tools/call", "mcp-name": "odd__odd"})
        params["_meta"] = {
            "io.modelcontextprotocol/protocolVersion": era,
            "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {},
        }
    with httpx.Client(timeout=30) as http:
        if era != "2026-07-28":
            init = {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": era,
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "1"},
                },
            }
            resp = http.post(server.mcp_url, json=init, headers=headers)
            assert resp.status_code == 200, resp.text
            headers["mcp-protocol-version"] = era
            if sid := resp.headers.get("mcp-session-id"):
                headers["mcp-session-id"] = sid
            http.post(
                server.mcp_url,
                json={"jsonrpc": "2.0", "method": "notifications/initialized"},
                headers=headers,
            )
        body = {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params}
        resp = http.post(server.mcp_url, json=body, headers=headers)
    assert resp.status_code == 200, resp.text
    text = resp.text
    if resp.headers["content-type"].startswith("text/event-stream"):
        text = [line[5:] for line in text.splitlines() if line.startswith("data:")][-1]
    message = json.loads(text)
    assert message["id"] == 7, message
    return message["result"]


@pytest.mark.parametrize("agent_era", ["2026-07-28", "2025-11-25"])
@pytest.mark.parametrize(
    ("json_response", "stateless"), [(True, True), (False, False)], ids=["json", "sse-session"]
)
def test_the_upstreams_result_reaches_the_agent_as_sent(
    arbiter_factory: ArbiterFactory, agent_era: str, json_response: bool, stateless: bool
) -> None:
    server = arbiter_factory()
    with serve_in_thread(_odd_upstream(json_response=json_response, stateless=stateless)) as port:
        server.register("odd", f"http://127.0.0.1:{port}/mcp")
        result = _call(server, agent_era)
    result.pop("resultType", None)  # the 2026-07-28 field (the SDK upstream's, or Arbiter's if missing)
    if agent_era == "2026-07-28":  # Arbiter's own identity stamp, where the upstream's was
        assert result["_meta"].pop("io.modelcontextprotocol/serverInfo")["name"] == "arbiter"
    assert result == _expected()


def test_fields_no_schema_names_reach_a_2026_agent_untouched(arbiter_factory: ArbiterFactory) -> None:
    # An upstream that is not an SDK server may add fields of its own, and stream notifications first.
    odd = {**ODD_RESULT, "vendorExtension": {"trace": "abc", "cost": {"units": 3}}}
    server = arbiter_factory()
    broken = Broken(_odd_upstream(json_response=True, stateless=True))
    with serve_in_thread(broken) as port:
        server.register("odd", f"http://127.0.0.1:{port}/mcp")
        for kind in ("application/json", "text/event-stream"):
            broken.answer = lambda rid, kind=kind: (200, kind, _framed(kind, rid, odd))
            result = _call(server, "2026-07-28")
            assert result.pop("resultType") == "complete"
            assert result["_meta"].pop("io.modelcontextprotocol/serverInfo")["name"] == "arbiter"
            assert result == {**_expected(), "vendorExtension": {"trace": "abc", "cost": {"units": 3}}}


def _framed(kind: str, rid: object, result: dict[str, Any]) -> bytes:
    response = {"jsonrpc": "2.0", "id": rid, "result": result}
    if kind == "application/json":
        return json.dumps(response).encode()
    progress = {
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progressToken": 1, "progress": 1},
    }
    return b": ping\n\n" + _sse(progress, response)


class Broken:
    """An upstream that discovers well and then answers ``tools/call`` however the test says: a stand-in
    for a broken server, which no SDK server can be made to be."""

    def __init__(self, app: Any) -> None:
        self.app = app
        # None: the real server answers; else the status, content type and body, or a function of the
        # request's id giving them.
        self.answer: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer: Any = self.answer
        if (
            answer is None
            or scope["type"] != "http"
            or dict(scope["headers"]).get(b"mcp-method") != b"tools/call"
        ):
            await self.app(scope, receive, send)
            return
        request = b""
        while True:
            message = await receive()
            request += message.get("body", b"")
            if not message.get("more_body"):
                break
        framed = answer(json.loads(request)["id"]) if callable(answer) else answer
        status, kind, body = cast(tuple[int, str, bytes], framed)
        headers = [(b"content-type", kind.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _sse(*messages: object) -> bytes:
    return b"".join(b"event: message\r\ndata: " + json.dumps(m).encode() + b"\r\n\r\n" for m in messages)


@pytest.mark.parametrize(
    ("answer", "code", "reason"),
    [
        ((200, "application/json", b"not json"), -31003, "upstream_protocol_error"),
        ((200, "application/json", b"[1, 2]"), -31003, "upstream_protocol_error"),
        ((200, "application/json", b'{"jsonrpc":"2.0","id":"someone-else","result":{}}'), -31003, None),
        (
            lambda rid: (
                200,
                "application/json",
                json.dumps({"jsonrpc": "2.0", "id": rid, "result": []}).encode(),
            ),
            -31003,
            None,
        ),
        ((200, "text/plain", b"hello"), -31003, None),
        (
            (200, "text/event-stream", _sse({"jsonrpc": "2.0", "method": "notifications/progress"})),
            -31002,
            None,
        ),
        ((200, "text/event-stream", b"event: message\r\ndata: {nope\r\n\r\n"), -31003, None),
        ((500, "text/plain", b"boom"), types.INTERNAL_ERROR, None),
        (
            (
                400,
                "application/json",
                b'{"jsonrpc":"2.0","id":null,"error":{"code":-32602,"message":"bad x"}}',
            ),
            -32602,
            None,
        ),
    ],
    ids=[
        "not-json",
        "not-object",
        "other-id",
        "result-not-object",
        "text",
        "stream-ends",
        "bad-event",
        "500",
        "400-error",
    ],
)
def test_a_broken_answer_is_an_upstream_error_and_arbiter_keeps_serving(
    arbiter_factory: ArbiterFactory, answer: object, code: int, reason: str | None
) -> None:
    server = arbiter_factory(mcp={"tool_errors": "jsonrpc"})  # about the error codes themselves
    broken = Broken(_odd_upstream(json_response=True, stateless=True))
    with serve_in_thread(broken) as port:
        server.register("odd", f"http://127.0.0.1:{port}/mcp")
        broken.answer = answer
        headers = {
            **server.auth_headers,
            "accept": "application/json",
            "mcp-protocol-version": "2026-07-28",
            "mcp-method": "tools/call",
            "mcp-name": "odd__odd",
        }
        meta = {
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
        }
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {"name": "odd__odd", "_meta": meta},
        }
        with httpx.Client(timeout=30) as http:
            resp = http.post(server.mcp_url, json=body, headers=headers)
            assert resp.status_code < 500 or code == types.INTERNAL_ERROR, resp.text
            error = resp.json()["error"]
            assert error["code"] == code, error
            if reason is not None:
                assert error["data"]["reason"] == reason
            # A bad answer does not mark the upstream down: the next good one goes straight through.
            broken.answer = None
            resp = http.post(server.mcp_url, json=body, headers=headers)
            assert resp.json()["result"]["structuredContent"]["total"] == 12345678901234, resp.text
        with server.admin() as admin:
            (row,) = admin.get("/upstreams").json()
        assert row["status"] == "connected", row


async def test_a_request_a_new_connection_carried_is_never_sent_twice() -> None:
    # An upstream that reads the request (and so may run it), then drops the connection unanswered, as a
    # crashing worker would. The connection was new, not an idle one from the pool: no retry.
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")
        )
        received.append(await reader.readexactly(length))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pools = relay_sessions(
        connector(None, limit=4, keepalive_s=30),
        connector(None, limit=4, keepalive_s=None),
        connect_timeout_s=5,
    )
    try:
        async with pools as (http, fresh):
            relay = Relay(
                f"http://127.0.0.1:{port}/mcp", http, fresh, protocol_version="2026-07-28", session_id=None
            )
            with pytest.raises(Interrupted):
                await relay.request(
                    UpstreamRequest("tools/call", {"name": "refund", "arguments": {"amount": 100}})
                )
    finally:
        server.close()
    assert len(received) == 1
