"""CPU cost of tracing one call, in process: the spans of a traced ``tools/call`` (SERVER span, the step
spans, the CLIENT span and its context injected for the upstream), and what the request path does with
traces off (the trace id of the audit record, read from the caller's header or ``_meta``).

The pipeline steps here do no work of their own, so the difference between "off" and "on" is what the
tracing steps add: the real SDK tracer provider with a batching processor, as ``telemetry.traces=otlp``
builds it, and an exporter that drops the spans (exporting happens in the SDK's own thread, off the
request path). Each figure is the least of five runs (what a busy machine adds is noise). The end-to-end
figure, with a real upstream and OTLP export over HTTP, is ``bench/run.py --only arbiter-gov,arbiter-traced``.

Run: ``.venv/bin/python bench/tracing_cost.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from starlette.requests import Request

from arbiter.auth.principal import Principal
from arbiter.http_scope import trace_id
from arbiter.proxy.exchange import Exchange
from arbiter.proxy.interceptors.audit import request_trace_id
from arbiter.proxy.interceptors.tracing import Step, Tracing, UpstreamCall
from arbiter.proxy.pipeline import CallContext, CallNext, Interceptor, Pipeline, Result

CALLS = 20_000
RUNS = 5
PRINCIPAL = Principal(subject="agent-1", issuer="arbiter", auth_method="api_key", tenant="acme")
META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


class Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


async def passing(ctx: CallContext, call_next: CallNext) -> Result:
    return await call_next(ctx)


async def resolving(ctx: CallContext, call_next: CallNext) -> Result:
    ctx.upstream, ctx.target = "crm", "get_customer"
    return await call_next(ctx)


async def answering(ctx: CallContext, call_next: CallNext) -> Result:
    return {"content": [{"type": "text", "text": "ok"}]}


def scope(traceparent: bool) -> dict[str, Any]:
    headers = [(b"content-type", b"application/json"), (b"authorization", b"Bearer x")]
    if traceparent:
        headers.append((b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"))
    return {"type": "http", "method": "POST", "path": "/mcp", "headers": headers, "client": ("10.0.0.1", 5)}


def context(http: dict[str, Any]) -> CallContext:
    exchange = Exchange(PRINCIPAL)
    now = time.time_ns()
    exchange.auth_ns = (now, now + 1000)
    return CallContext(
        method="tools/call",
        params={"name": "crm__get_customer", "arguments": {"customer_id": "C-1"}, "_meta": META},
        request_id=7,
        protocol_version="2026-07-28",
        http_request=Request(http),
        principal=PRINCIPAL,
        exchange=exchange,
    )


def pipeline(traced: bool, ratio: float = 1.0) -> Pipeline:
    steps: list[Interceptor] = [passing, resolving, passing, passing, answering]
    if not traced:
        return Pipeline(steps)
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(BatchSpanProcessor(Drop(), max_queue_size=CALLS * 8))  # never drops
    tracer = provider.get_tracer("bench")
    return Pipeline(
        [
            Tracing(tracer, None),
            Step(tracer, "arbiter.audit", passing, after=("tools/call",)),
            resolving,
            Step(tracer, "arbiter.authorize", passing, before=("tools/call",)),
            Step(tracer, "arbiter.limits", passing, before=("tools/call",)),
            UpstreamCall(tracer, answering, lambda name: "http://crm.internal:8080/mcp"),
        ]
    )


async def per_call_us(run: Pipeline, http: dict[str, Any]) -> float:
    best = float("inf")
    for _ in range(RUNS):
        calls = [context(http) for _ in range(CALLS)]
        started = time.process_time()
        for call in calls:
            await run(call)
        best = min(best, (time.process_time() - started) / CALLS * 1e6)
    return best


def trace_id_us(fn: Any, arg: Any) -> float:
    best = float("inf")
    for _ in range(RUNS):
        started = time.process_time()
        for _ in range(CALLS):
            fn(*arg)
        best = min(best, (time.process_time() - started) / CALLS * 1e6)
    return best


async def main() -> None:
    plain, with_parent = scope(False), scope(True)
    off = await per_call_us(pipeline(False), plain)
    on = await per_call_us(pipeline(True), plain)
    on_continued = await per_call_us(pipeline(True), with_parent)
    unsampled = await per_call_us(pipeline(True, ratio=0.0), plain)
    print(f"pipeline of no-op steps, traces off: {off:7.2f} µs CPU per call")
    print(f"  traces on, a new trace:               {on:7.2f} µs (+{on - off:.2f})")
    print(f"  traces on, continuing a traceparent:  {on_continued:7.2f} µs (+{on_continued - off:.2f})")
    print(f"  traces on, not sampled (ratio 0):     {unsampled:7.2f} µs (+{unsampled - off:.2f})")
    ctx = context(plain)
    before = trace_id_us(trace_id, (plain,))
    after = trace_id_us(request_trace_id, (ctx, plain))
    print(f"audit trace id, no traceparent: header only {before:.2f} µs, header and _meta {after:.2f} µs")


if __name__ == "__main__":
    asyncio.run(main())
