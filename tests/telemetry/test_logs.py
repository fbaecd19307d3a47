"""Log lines: JSON (serve) or text (demo), each with time, level, logger, message and the current trace; and
never a credential, checked by grepping everything a running Arbiter logged at DEBUG while it was used with
an API key, a JWT and an upstream credential."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from mcp.server import MCPServer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from arbiter.proxy.pipeline import CallContext, CallNext, Result
from arbiter.telemetry.logs import JsonFormatter, TextFormatter, configure_logging, scrub
from tests.auth.jwks import ISSUER, RESOURCE, JwksServer, SigningKey, claims, mint, rsa_key
from tests.conftest import ADMIN_TOKEN, ArbiterFactory, serve_in_thread

_LOUD = ("arbiter", "mcp", "httpx", "httpx2", "httpcore", "httpcore2", "authlib", "uvicorn", "aiohttp")
log = logging.getLogger("arbiter.test.pipeline")


def _record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    return logging.LogRecord("arbiter.x", logging.WARNING, __file__, 1, message, args, exc_info)


def test_json_lines_carry_the_current_trace_and_text_lines_read_well() -> None:
    provider = TracerProvider()
    tracer = provider.get_tracer("t")
    plain = json.loads(JsonFormatter().format(_record("hello %s", "world")))
    assert set(plain) == {"ts", "level", "logger", "message"}
    assert (
        plain["level"] == "WARNING" and plain["logger"] == "arbiter.x" and plain["message"] == "hello world"
    )
    assert plain["ts"].endswith("Z") and "T" in plain["ts"]
    with tracer.start_as_current_span("s") as span:
        traced = json.loads(JsonFormatter().format(_record("x", exc=True)))
        text = TextFormatter().format(_record("hello"))
    context = span.get_span_context()
    assert traced["trace_id"] == format(context.trace_id, "032x")
    assert traced["span_id"] == format(context.span_id, "016x")
    assert "ValueError: boom" in traced["exception"]
    assert " WARNING arbiter.x: hello [trace=" in text and format(context.trace_id, "032x") in text


def test_credential_shapes_are_masked() -> None:
    key = "arb_0123456789ab_" + "s" * 43
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    line = f"Authorization: Bearer tok-{uuid.uuid4().hex} key={key} jwt={jwt}"
    masked = scrub(line)
    assert "tok-" not in masked and key not in masked and jwt not in masked
    assert scrub("nothing secret here: arbiter 1.0") == "nothing secret here: arbiter 1.0"


class LogsInPipeline:
    """A third-party interceptor that logs while a request is in the pipeline (inside its SERVER span)."""

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        log.info("in the pipeline: %s", ctx.method)
        return await call_next(ctx)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    saved = {name: logging.getLogger(name).level for name in _LOUD}
    handler = configure_logging("json", logging.DEBUG, stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        for name, old in saved.items():
            logging.getLogger(name).setLevel(old)


@pytest.fixture(scope="module")
def idp_key() -> SigningKey:
    return rsa_key("log-test")


async def test_a_running_arbiter_logs_json_with_trace_ids_and_no_secret(
    arbiter_factory: ArbiterFactory, captured: io.StringIO, idp_key: SigningKey
) -> None:
    server_mcp = MCPServer("rec")

    @server_mcp.tool()
    def echo(text: str) -> str:
        return text

    upstream_secret = f"upstream-secret-{uuid.uuid4().hex}"
    jwt = mint(claims(sub="user-7", jti=uuid.uuid4().hex), idp_key)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with (
        JwksServer(keys=[idp_key]).running() as idp,
        serve_in_thread(server_mcp.streamable_http_app(json_response=True, stateless_http=True)) as port,
    ):
        server = arbiter_factory(
            interceptors=[LogsInPipeline()],
            tracer_provider=provider,
            secret_key=Fernet.generate_key().decode(),
            auth={"resource_url": RESOURCE, "issuers": [{"issuer": ISSUER, "jwks_uri": idp.url}]},
        )
        for name in _LOUD:  # create_app quiets the SDK and HTTP loggers; this test wants all of it
            logging.getLogger(name).setLevel(logging.DEBUG)
        credential = {"kind": "header", "header": "X-Api-Key", "value": upstream_secret}
        with server.admin() as admin:
            body: dict[str, Any] = {
                "name": "rec",
                "url": f"http://127.0.0.1:{port}/mcp",
                "credential": credential,
            }
            resp = admin.post("/upstreams", json=body)
            assert resp.status_code == 201, resp.text
        for token in (server.agent_key, jwt):
            async with server.client(token=token) as client:
                assert not (await client.call_tool("rec__echo", {"text": "hi"})).is_error
        forged = {"authorization": f"Bearer {jwt}x", "accept": "application/json, text/event-stream"}
        async with httpx.AsyncClient(timeout=30) as http:
            assert (await http.post(server.mcp_url, json={}, headers=forged)).status_code == 401
        server.stop()
    text = captured.getvalue()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert lines, "nothing was logged, so the checks below prove nothing"
    for line in lines:
        assert {"ts", "level", "logger", "message"} <= set(line), line
    for secret in (server.agent_key, jwt, upstream_secret, ADMIN_TOKEN):
        assert secret not in text
    server_traces = {
        format(s.context.trace_id, "032x")
        for s in exporter.get_finished_spans()
        if s.kind == SpanKind.SERVER and s.context is not None
    }
    in_pipeline = [line for line in lines if line["message"] == "in the pipeline: tools/call"]
    assert len(in_pipeline) == 2
    assert all(line.get("trace_id") in server_traces for line in in_pipeline), in_pipeline
