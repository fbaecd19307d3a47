"""Traces: agent → Arbiter → a real upstream on a loopback port share one trace, seen through an in-memory
span exporter on the app's own tracer provider and through what the upstream received (its HTTP
``traceparent`` header and ``params._meta``)."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from mcp.server import MCPServer
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.types import ASGIApp, Receive, Scope, Send

from arbiter.app import create_app
from arbiter.proxy.body import replay_body
from arbiter.proxy.interceptors.tracing import Step, Tracing, UpstreamCall
from arbiter.settings import Settings, TelemetrySettings
from arbiter.telemetry.tracing import build_tracer_provider, trace_id_of
from tests.conftest import ADMIN_TOKEN, ALLOW_ALL, ArbiterFactory, ArbiterServer, serve_in_thread
from tests.refusals import refusal_of

T = TypeVar("T")
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
MODERN = "2026-07-28"
# The agent's own span: the trace Arbiter must continue.
AGENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
AGENT_SPAN = "00f067aa0ba902b7"
AGENT_PARENT = f"00-{AGENT_TRACE}-{AGENT_SPAN}-01"
_PROPAGATOR = TraceContextTextMapPropagator()
# A conditional deny keeps the tool visible: the call is refused as policy_denied, not unknown.
POLICY = ALLOW_ALL + 'p, *, *, rec/echo, call, deny, r.args.text == "forbidden"\n'


# --- a real upstream that records the trace context it is sent -------------------------------------


@dataclass
class Received:
    header: str | None  # the HTTP traceparent header
    meta: str | None  # params._meta.traceparent
    meta_state: str | None


@dataclass
class TraceRecorder:
    """An ASGI wrapper around a real MCP server, recording the trace context of every ``tools/call``."""

    app: ASGIApp
    calls: list[Received] = field(default_factory=list[Received])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        decoded: Any = json.loads(body) if body else None
        if isinstance(decoded, dict) and decoded.get("method") == "tools/call":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            meta: dict[str, Any] = decoded.get("params", {}).get("_meta") or {}
            self.calls.append(
                Received(headers.get("traceparent"), meta.get("traceparent"), meta.get("tracestate"))
            )
        await self.app(scope, replay_body(body, receive), send)


FAIL = "please fail"


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[TraceRecorder, str]]:
    server = MCPServer("rec")

    @server.tool()
    def echo(text: str, password: str = "") -> str:
        if text == FAIL:
            raise ValueError("the tool itself failed")  # the SDK answers an isError result
        return text

    recorder = TraceRecorder(server.streamable_http_app(json_response=True, stateless_http=True))
    with serve_in_thread(recorder) as port:
        yield recorder, f"http://127.0.0.1:{port}/mcp"


@dataclass
class Traced:
    server: ArbiterServer
    exporter: InMemorySpanExporter
    recorder: TraceRecorder

    def spans(self, trace_id: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if _tid(s) == trace_id]

    def server_span(self, trace_id: str) -> ReadableSpan:
        found = wait_for(lambda: [s for s in self.spans(trace_id) if s.kind == SpanKind.SERVER])
        assert len(found) == 1, found
        return found[0]


@pytest.fixture
def traced(arbiter_factory: ArbiterFactory, upstream: tuple[TraceRecorder, str]) -> Traced:
    recorder, url = upstream
    recorder.calls.clear()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = arbiter_factory(tracer_provider=provider, policy=POLICY)
    server.register("rec", url)
    return Traced(server, exporter, recorder)


# --- helpers ---------------------------------------------------------------------------------------


def wait_for(probe: Callable[[], T], timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def _tid(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


def _sid(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.span_id, "016x")


def _parent(span: ReadableSpan) -> str | None:
    return format(span.parent.span_id, "016x") if span.parent is not None else None


def modern_call(
    server: ArbiterServer,
    arguments: dict[str, Any],
    *,
    header: str | None = None,
    meta: str | None = None,
    name: str = "rec__echo",
    status: int | None = 200,
) -> dict[str, Any]:
    """A raw 2026-07-28 tools/call, with a traceparent in the HTTP header and/or ``params._meta``."""
    envelope: dict[str, Any] = {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    if meta is not None:
        envelope["traceparent"] = meta
        envelope["tracestate"] = "agent=1"
    body = {
        "jsonrpc": "2.0",
        "id": 7,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments, "_meta": envelope},
    }
    headers = {**HEADERS, **server.auth_headers, "mcp-protocol-version": MODERN, "mcp-method": "tools/call"}
    headers["mcp-name"] = name
    if header is not None:
        headers["traceparent"] = header
    resp = httpx.post(server.mcp_url, json=body, headers=headers, timeout=30)
    if status is not None:
        assert resp.status_code == status, resp.text
    out: dict[str, Any] = resp.json()
    return out


def trace_of(traceparent: str | None) -> tuple[str, str]:
    assert traceparent is not None
    _, trace_id, span_id, _ = traceparent.split("-")
    return trace_id, span_id


def audited_trace_ids(server: ArbiterServer, trace_id: str) -> list[dict[str, Any]]:
    with server.admin(ADMIN_TOKEN) as admin:

        def probe() -> list[dict[str, Any]]:
            resp = admin.get("/audit/events", params={"trace_id": trace_id, "kind": "mcp"})
            assert resp.status_code == 200, resp.text
            return [e for e in resp.json()["events"] if e.get("method") == "tools/call"]

        return wait_for(probe)


# --- the tests -------------------------------------------------------------------------------------


def test_agent_arbiter_and_upstream_share_the_trace_the_agent_started(traced: Traced) -> None:
    out = modern_call(traced.server, {"text": "hello"}, header=AGENT_PARENT)
    assert out["result"]["content"][0]["text"] == "hello"
    [seen] = traced.recorder.calls
    # The upstream got Arbiter's CLIENT span as its parent, in _meta and as the HTTP header alike.
    assert seen.header == seen.meta
    trace_id, parent_id = trace_of(seen.header)
    assert trace_id == AGENT_TRACE
    server_span = traced.server_span(AGENT_TRACE)
    assert _parent(server_span) == AGENT_SPAN  # continued from the agent's header
    [client] = [s for s in traced.spans(AGENT_TRACE) if s.kind == SpanKind.CLIENT]
    assert _sid(client) == parent_id and _parent(client) == _sid(server_span)
    # The audit record names the same trace.
    [record] = audited_trace_ids(traced.server, AGENT_TRACE)
    assert record["trace_id"] == AGENT_TRACE


def test_a_trace_is_continued_from_meta(traced: Traced) -> None:
    modern_call(traced.server, {"text": "hi"}, meta=AGENT_PARENT)
    [seen] = traced.recorder.calls
    assert trace_of(seen.meta)[0] == AGENT_TRACE and trace_of(seen.header)[0] == AGENT_TRACE
    assert seen.meta_state == "agent=1"  # tracestate travels with it
    assert _parent(traced.server_span(AGENT_TRACE)) == AGENT_SPAN


def test_without_incoming_context_arbiter_starts_the_trace_the_upstream_continues(traced: Traced) -> None:
    modern_call(traced.server, {"text": "new"})
    [seen] = traced.recorder.calls
    trace_id, _ = trace_of(seen.header)
    assert trace_of(seen.meta)[0] == trace_id and trace_id != AGENT_TRACE
    assert _parent(traced.server_span(trace_id)) is None  # a root span: Arbiter started the trace


async def test_server_span_attributes_and_step_spans(traced: Traced) -> None:
    async with traced.server.client(mode="legacy") as client:  # the SDK client: handshake era, a session
        result = await client.call_tool("rec__echo", {"text": "attrs"})
        assert not result.is_error
    [seen] = traced.recorder.calls
    trace_id, client_id = trace_of(seen.header)
    span = traced.server_span(trace_id)
    attrs = dict(span.attributes or {})
    assert span.name == "tools/call rec__echo"
    assert attrs["mcp.method.name"] == "tools/call"
    assert attrs["gen_ai.tool.name"] == "rec__echo"
    assert attrs["gen_ai.operation.name"] == "execute_tool"
    assert isinstance(attrs["jsonrpc.request.id"], str)
    assert attrs["mcp.protocol.version"] != MODERN
    assert isinstance(attrs["mcp.session.id"], str) and attrs["mcp.session.id"]  # handshake era only
    assert attrs["client.address"] == "127.0.0.1"
    assert attrs["arbiter.subject"] == "test-agent" and attrs["arbiter.tenant"] == "acme"
    assert attrs["arbiter.upstream"] == "rec"
    assert attrs["arbiter.decision"] == "allow"
    assert isinstance(attrs["arbiter.policy.version"], int) and attrs["arbiter.policy.version"] >= 1
    assert "error.type" not in attrs
    spans = {s.name: s for s in traced.spans(trace_id)}
    for step in ("arbiter.authenticate", "arbiter.authorize", "arbiter.limits", "arbiter.audit"):
        assert step in spans, sorted(spans)
        assert _parent(spans[step]) == _sid(span), step
    client = spans["tools/call echo"]  # the upstream's own tool name
    assert client.kind == SpanKind.CLIENT and _sid(client) == client_id
    client_attrs = dict(client.attributes or {})
    assert client_attrs["server.address"] == "127.0.0.1" and isinstance(client_attrs["server.port"], int)
    assert client_attrs["gen_ai.tool.name"] == "echo" and client_attrs["arbiter.upstream"] == "rec"


def test_a_denied_call_names_its_trace_in_the_error_and_the_span(traced: Traced) -> None:
    out = modern_call(traced.server, {"text": "forbidden"}, header=AGENT_PARENT)
    refusal = refusal_of(out)
    assert refusal is not None and refusal["reason"] == "policy_denied", out
    assert refusal["trace_id"] == AGENT_TRACE
    span = traced.server_span(AGENT_TRACE)
    attrs = dict(span.attributes or {})
    assert attrs["error.type"] == "policy_denied" and attrs["arbiter.decision"] == "deny"
    assert span.status.status_code == StatusCode.ERROR
    [authorize] = [s for s in traced.spans(AGENT_TRACE) if s.name == "arbiter.authorize"]
    assert authorize.status.status_code == StatusCode.ERROR
    assert not traced.recorder.calls  # nothing went upstream
    # A hidden or missing tool still answers exactly like a missing one: no trace id, no data.
    missing = modern_call(traced.server, {"text": "x"}, header=AGENT_PARENT, name="rec__nope", status=400)
    assert "data" not in missing["error"], missing


def test_a_tool_error_result_is_error_type_tool_error(traced: Traced) -> None:
    # The upstream's tool fails (valid arguments, so Arbiter's guard lets it through): an isError result
    # from the tool, not a refusal by Arbiter.
    out = modern_call(traced.server, {"text": FAIL}, header=AGENT_PARENT)
    assert out["result"]["isError"] is True, out
    attrs = dict(traced.server_span(AGENT_TRACE).attributes or {})
    assert attrs["error.type"] == "tool_error"


def _all_attribute_text(spans: list[ReadableSpan]) -> str:
    return json.dumps([{k: str(v) for k, v in (s.attributes or {}).items()} for s in spans])


def test_arguments_are_never_on_spans(traced: Traced) -> None:
    marker = f"marker-{uuid.uuid4().hex}"
    modern_call(traced.server, {"text": marker, "password": "hunter2-" + marker}, header=AGENT_PARENT)
    traced.server_span(AGENT_TRACE)
    text = _all_attribute_text(traced.spans(AGENT_TRACE))
    assert marker not in text and "gen_ai.tool.call.arguments" not in text
    assert traced.server.agent_key not in text


def test_arguments_opted_in_are_redacted_as_in_the_audit_log(
    arbiter_factory: ArbiterFactory, upstream: tuple[TraceRecorder, str]
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = arbiter_factory(tracer_provider=provider, telemetry={"trace_arguments": True})
    server.register("rec", upstream[1])
    marker = f"marker-{uuid.uuid4().hex}"
    secret = f"hunter2-{uuid.uuid4().hex}"
    modern_call(server, {"text": marker, "password": secret}, header=AGENT_PARENT)
    [span] = wait_for(
        lambda: [
            s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER and _tid(s) == AGENT_TRACE
        ]
    )
    arguments = json.loads(str((span.attributes or {})["gen_ai.tool.call.arguments"]))
    assert arguments["text"] == marker
    assert secret not in json.dumps(arguments) and arguments["password"] != secret
    assert secret not in _all_attribute_text(list(exporter.get_finished_spans()))


def test_traces_off_means_no_tracing_steps_and_no_context_sent(
    arbiter_factory: ArbiterFactory, upstream: tuple[TraceRecorder, str]
) -> None:
    recorder, url = upstream
    recorder.calls.clear()
    server = arbiter_factory(policy=POLICY)  # telemetry.traces defaults to off
    pipeline = server.app.state.runtime.pipeline
    assert not [i for i in pipeline.interceptors if isinstance(i, Tracing | Step | UpstreamCall)]
    server.register("rec", url)
    modern_call(server, {"text": "quiet"}, header=AGENT_PARENT)
    [seen] = recorder.calls
    assert seen.header is None and seen.meta is None  # nothing of the agent's envelope crosses over
    # The caller's trace id still names the request: in the audit record and in an error's data.
    assert audited_trace_ids(server, AGENT_TRACE)
    refusal = refusal_of(modern_call(server, {"text": "forbidden"}, meta=AGENT_PARENT))
    assert refusal is not None and refusal["trace_id"] == AGENT_TRACE


def test_the_settings_build_no_provider_when_off_and_an_exporting_one_otherwise(tmp_path: Any) -> None:
    from arbiter.telemetry.tracing import build_tracer_provider

    assert build_tracer_provider(Settings().telemetry, "1") is None
    cfg = Settings(telemetry={"traces": "otlp", "otlp_endpoint": "http://127.0.0.1:9/v1/traces"}).telemetry  # pyright: ignore[reportArgumentType]
    provider = build_tracer_provider(cfg, "1")
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "arbiter"
    provider.shutdown()
    app = create_app(Settings(database_url=f"sqlite+aiosqlite:///{tmp_path}/x.db"))
    assert not [
        i for i in app.state.runtime.pipeline.interceptors if isinstance(i, Tracing | Step | UpstreamCall)
    ]


def test_an_unsampled_request_records_no_span_but_still_propagates_its_trace(
    arbiter_factory: ArbiterFactory, upstream: tuple[TraceRecorder, str]
) -> None:
    recorder, url = upstream
    recorder.calls.clear()
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.0)))  # telemetry.sample_ratio = 0
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = arbiter_factory(tracer_provider=provider)
    server.register("rec", url)
    modern_call(server, {"text": "unsampled"})
    [seen] = recorder.calls
    trace_id, _ = trace_of(seen.header)
    assert seen.header == seen.meta and seen.header is not None
    assert int(seen.header.rsplit("-", 1)[1], 16) & 1 == 0  # the sampled flag is off
    assert audited_trace_ids(server, trace_id)  # the audit record names the trace the upstream saw
    assert not exporter.get_finished_spans()


def test_a_stdio_upstream_is_sent_the_client_span_as_its_parent(arbiter_factory: ArbiterFactory) -> None:
    # The SDK's client (stdio and SSE upstreams) injects the *current* context into the request's _meta
    # itself: the CLIENT span must be current then, or the upstream would hang off the SERVER span.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    script = Path(__file__).with_name("stdio_trace.py")
    stdio = {"name": "st", "transport": "stdio", "command": [sys.executable, str(script)]}
    server = arbiter_factory(tracer_provider=provider, upstreams=[stdio])

    def discovered() -> bool:  # config upstreams are discovered in the background at start-up
        with server.admin() as admin:
            [listed] = [u for u in admin.get("/upstreams").json() if u["name"] == "st"]
        return bool(listed.get("catalog", {}).get("tools"))

    wait_for(discovered, timeout=60)
    out = modern_call(server, {}, header=AGENT_PARENT, name="st__traceparent")
    assert "result" in out, out
    seen = out["result"]["structuredContent"]["result"]
    trace_id, parent_id = trace_of(seen)
    assert trace_id == AGENT_TRACE
    spans = [s for s in exporter.get_finished_spans() if _tid(s) == AGENT_TRACE]
    [client] = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert _sid(client) == parent_id


def test_a_trace_id_must_be_exactly_32_hex_digits() -> None:
    good = f"00-{AGENT_TRACE}-{AGENT_SPAN}-01"
    assert trace_id_of(good) == AGENT_TRACE
    assert trace_id_of(good.upper()) == AGENT_TRACE  # hex case does not matter
    for bad_id in ("+" + "0" * 30 + "1", " " + "1" * 31, "_" + "1" * 31, "g" * 32, "0" * 32):
        assert trace_id_of(f"00-{bad_id}-{AGENT_SPAN}-01") is None, bad_id


@pytest.mark.parametrize("follow", [True, False])
def test_callers_decide_sampling_only_when_trusted_to(follow: bool) -> None:
    settings = TelemetrySettings(traces="console", sample_ratio=0.0, follow_caller_sampling=follow)
    provider = build_tracer_provider(settings, "test")
    assert provider is not None
    try:
        parent = _PROPAGATOR.extract({"traceparent": AGENT_PARENT})  # the caller says: sampled
        with provider.get_tracer("t").start_as_current_span("s", context=parent) as span:
            assert span.is_recording() is follow
            assert span.get_span_context().trace_id == int(AGENT_TRACE, 16)  # continued either way
    finally:
        provider.shutdown()


def test_without_step_spans_only_the_server_and_client_spans_are_made(
    arbiter_factory: ArbiterFactory, upstream: tuple[TraceRecorder, str]
) -> None:
    recorder, url = upstream
    recorder.calls.clear()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    server = arbiter_factory(tracer_provider=provider, policy=POLICY, telemetry={"trace_steps": False})
    server.register("rec", url)
    modern_call(server, {"text": "lean"}, header=AGENT_PARENT)
    [seen] = recorder.calls
    _, parent_id = trace_of(seen.header)
    spans = wait_for(lambda: [s for s in exporter.get_finished_spans() if _tid(s) == AGENT_TRACE])
    kinds = sorted(str(s.kind) for s in spans)
    assert kinds == sorted([str(SpanKind.SERVER), str(SpanKind.CLIENT)]), [s.name for s in spans]
    [client] = [s for s in spans if s.kind == SpanKind.CLIENT]
    assert _sid(client) == parent_id  # the upstream still continues Arbiter's CLIENT span
