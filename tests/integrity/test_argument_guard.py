"""The argument guard end to end, through a real Arbiter to a real upstream on loopback.

An AWS-style key in an argument is denied, never reaches the upstream, and is audited redacted with the
detector named (read through the admin API); a redact rule forwards the call with the match replaced; a
schema violation is ``invalid_arguments`` without the value; a schema with a remote ``$ref`` (loopback
and https) makes Arbiter fetch nothing and refuse the call; an invalid schema and over-deep arguments are
refused. Upstream annotations (readOnlyHint, idempotentHint) never make a tool call resendable.
"""

from __future__ import annotations

import http.server
import json
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mcp_types as types
import pytest
from mcp.server import MCPServer

from tests.conftest import ArbiterFactory, ArbiterServer, serve_in_thread
from tests.proxy.test_deadlines import ResetAfterRead
from tests.refusals import tool_refusal

AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
MODES = ["legacy", "2026-07-28"]
SECRETS = ["private_key", "jwt", "bearer", "url_password", "api_key", "credential"]


@dataclass
class Hits:
    """A plain HTTP server that records every request it gets (where a remote $ref points)."""

    port: int = 0
    paths: list[str] = field(default_factory=list[str])


@pytest.fixture
def hits() -> Iterator[Hits]:
    found = Hits()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            found.paths.append(self.path)
            body = b'{"type": "string"}'
            self.send_response(200)
            self.send_header("content-type", "application/schema+json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    found.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield found
    server.shutdown()
    server.server_close()


@dataclass
class Upstream:
    url: str
    notes: list[str]


@pytest.fixture
def upstream(hits: Hits) -> Iterator[Upstream]:
    notes: list[str] = []
    server = MCPServer("g")

    @server.tool(structured_output=False)
    def save(note: str, count: int = 1) -> str:
        notes.append(note)
        return f"saved {count}"

    for name in ("remote_local", "remote_https", "broken"):

        @server.tool(name=name, structured_output=False)
        def anything(data: dict[str, Any] | None = None) -> str:
            notes.append("ran")
            return "ran"

    # Hand-built input schemas, as an upstream may publish them.
    manager = server._tool_manager  # pyright: ignore[reportPrivateUsage]
    schemas: dict[str, dict[str, Any]] = {
        "remote_local": {
            "type": "object",
            "properties": {"data": {"$ref": f"http://127.0.0.1:{hits.port}/x.json"}},
        },
        "remote_https": {"type": "object", "properties": {"data": {"$ref": "https://example.com/x.json"}}},
        "broken": {"type": "object", "properties": {"data": {"type": "no-such-type"}}},
    }
    for name, schema in schemas.items():
        tool = manager.get_tool(name)
        assert tool is not None
        tool.parameters = schema
    with serve_in_thread(server.streamable_http_app(stateless_http=True, json_response=True)) as port:
        yield Upstream(f"http://127.0.0.1:{port}/mcp", notes)


@pytest.fixture
def outbound(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every URL the standard library's urllib is asked to open in this process (Arbiter's thread too),
    refused: jsonschema's own remote retrieval would go through it."""
    opened: list[str] = []

    def refuse(url: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(getattr(url, "full_url", url)))
        raise OSError("test: no outbound requests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return opened


def _arbiter(factory: ArbiterFactory, upstream: Upstream, **arguments: Any) -> ArbiterServer:
    rules = [
        {"detectors": SECRETS, "action": "deny"},
        {"tools": ["g__save"], "roles": ["agent"], "detectors": ["email"], "action": "redact"},
    ]
    server = factory(integrity={"arguments": {"rules": rules, **arguments}})
    server.register("g", upstream.url, auto_approve=True)
    return server


def _events(server: ArbiterServer, tool: str, count: int = 1) -> list[dict[str, Any]]:
    """The audit records of calls to ``tool``, through the admin API, once ``count`` are there."""
    with server.admin() as admin:
        for _ in range(200):
            resp = admin.get("/audit/events", params={"kind": "mcp", "tool": tool})
            assert resp.status_code == 200, resp.text
            events: list[dict[str, Any]] = resp.json()["events"]
            if len(events) >= count:
                return events
            threading.Event().wait(0.05)
    raise AssertionError(f"no audit record for {tool}")


@pytest.mark.parametrize("mode", MODES)
async def test_an_aws_key_in_an_argument_is_denied_and_audited_redacted(
    arbiter_factory: ArbiterFactory, upstream: Upstream, mode: str
) -> None:
    server = _arbiter(arbiter_factory, upstream)
    async with server.client(mode) as client:  # pyright: ignore[reportArgumentType]
        result = await client.session.call_tool("g__save", {"note": f"deploy with {AWS_KEY} today"})
    refusal = tool_refusal(result)
    assert refusal["reason"] == "sensitive_argument"
    assert refusal["detectors"] == ["api_key"] and refusal["paths"] == ["$.note"]
    assert AWS_KEY not in json.dumps(result.model_dump())
    assert upstream.notes == []  # never forwarded
    (event,) = _events(server, "g__save")
    assert event["reason"] == "sensitive_argument" and event["decision"] == "deny"
    assert event["outcome"]["guard"]["arguments"]["detectors"] == {"api_key": 1}
    assert AWS_KEY not in json.dumps(event)
    assert "[REDACTED:api_key]" in json.dumps(event["args"])


async def test_a_redact_rule_forwards_the_call_with_the_match_replaced(
    arbiter_factory: ArbiterFactory, upstream: Upstream
) -> None:
    server = _arbiter(arbiter_factory, upstream)
    async with server.client("2026-07-28") as client:  # pyright: ignore[reportArgumentType]
        result = await client.session.call_tool("g__save", {"note": "mail ann@example.com the report"})
    assert result.is_error is False, result
    assert upstream.notes == ["mail [REDACTED:email] the report"]
    (event,) = _events(server, "g__save")
    assert event["outcome"]["guard"]["arguments"] == {
        "detectors": {"email": 1},
        "paths": ["$.note"],
        "action": "redact",
    }


async def test_a_schema_violation_is_invalid_arguments_without_the_value(
    arbiter_factory: ArbiterFactory, upstream: Upstream
) -> None:
    server = _arbiter(arbiter_factory, upstream)
    async with server.client("2026-07-28") as client:  # pyright: ignore[reportArgumentType]
        refusal = tool_refusal(await client.session.call_tool("g__save", {"note": "x", "count": "many-xyz"}))
        missing = tool_refusal(await client.session.call_tool("g__save", {}))
    assert refusal["reason"] == "invalid_arguments"
    assert refusal["errors"] == [{"path": "$.count", "keyword": "type", "expected": "integer"}]
    assert "many-xyz" not in json.dumps(refusal)
    assert missing["errors"] == [{"path": "$", "keyword": "required", "expected": ["note"]}]
    assert upstream.notes == []


async def test_a_remote_ref_makes_no_outbound_request_and_refuses_the_call(
    arbiter_factory: ArbiterFactory, upstream: Upstream, hits: Hits, outbound: list[str]
) -> None:
    server = _arbiter(arbiter_factory, upstream)
    async with server.client("2026-07-28") as client:  # pyright: ignore[reportArgumentType]
        local = tool_refusal(await client.session.call_tool("g__remote_local", {"data": "x"}))
        remote = tool_refusal(await client.session.call_tool("g__remote_https", {"data": "x"}))
    assert local["reason"] == "invalid_tool_schema" and remote["reason"] == "invalid_tool_schema"
    assert f"127.0.0.1:{hits.port}/x.json" in local["message"]
    assert "https://example.com/x.json" in remote["message"]
    assert hits.paths == []  # the local server never got a request
    assert outbound == []
    assert upstream.notes == []


async def test_an_invalid_schema_and_over_deep_arguments_are_refused(
    arbiter_factory: ArbiterFactory, upstream: Upstream
) -> None:
    server = _arbiter(arbiter_factory, upstream, max_depth=4)
    deep: dict[str, Any] = {"a": {"b": {"c": {"d": {"e": 1}}}}}
    async with server.client("2026-07-28") as client:  # pyright: ignore[reportArgumentType]
        broken = tool_refusal(await client.session.call_tool("g__broken", {"data": {}}))
        too_deep = tool_refusal(await client.session.call_tool("g__save", {"note": "x", "deep": deep}))
    assert broken["reason"] == "invalid_tool_schema" and "not a valid JSON Schema" in broken["message"]
    assert too_deep["reason"] == "invalid_arguments" and "deeper than 4" in too_deep["message"]
    assert upstream.notes == []


# --- upstream annotations are informative only ------------------------------------------------------


async def test_an_upstream_claiming_idempotent_and_read_only_is_not_resent(
    arbiter_factory: ArbiterFactory,
) -> None:
    runs: list[int] = []
    server = MCPServer("count")

    @server.tool(
        annotations=types.ToolAnnotations(read_only_hint=True, idempotent_hint=True, destructive_hint=False)
    )
    def charge(amount: int) -> str:
        runs.append(amount)
        return f"charged {amount}"

    with (
        serve_in_thread(server.streamable_http_app(stateless_http=True, json_response=True)) as port,
        ResetAfterRead(port) as front,
    ):
        arbiter = arbiter_factory(upstream={"retry_attempts": 3})
        arbiter.register("count", f"http://127.0.0.1:{front.port}/mcp", auto_approve=True)
        async with arbiter.client("2026-07-28") as client:  # pyright: ignore[reportArgumentType]
            listed = await client.session.list_tools()
            (tool,) = [t for t in listed.tools if t.name == "count__charge"]
            assert tool.annotations is not None and tool.annotations.idempotent_hint is True
            front.resets = 1
            failed = await client.session.call_tool("count__charge", {"amount": 5})
        assert tool_refusal(failed)["reason"] == "upstream_unavailable"
        assert front.reset_done == 1
        assert runs == [5]  # ran once, not sent again: the upstream's own claim is not enough
