"""The tracer provider Arbiter builds from its settings, and the W3C trace-context helpers around it.

Nothing here is global: ``create_app`` builds one provider per app (or takes one a test injects) and
hands its tracer to the tracing steps; OpenTelemetry's global provider is never set, so apps (and tests)
never share spans. With ``telemetry.traces = "off"`` there is no provider at all.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, cast

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, Sampler, TraceIdRatioBased

from arbiter.settings import TelemetrySettings

# The W3C trace-context keys: HTTP headers, and unprefixed ``params._meta`` keys in MCP 2026-07-28.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TRACER_NAME = "arbiter"
_TRACE_ID = re.compile(r"[0-9a-f]{32}")


def build_tracer_provider(settings: TelemetrySettings, version: str) -> TracerProvider | None:
    """The provider ``settings`` ask for, or None when traces are off. The caller shuts it down."""
    if settings.traces == "off":
        return None
    exporter: SpanExporter = (
        OTLPSpanExporter(endpoint=settings.otlp_endpoint)
        if settings.traces == "otlp"
        else ConsoleSpanExporter(service_name=settings.service_name)
    )
    provider = TracerProvider(
        # New traces are sampled at the ratio. A caller's own decision (its traceparent's flag) wins only
        # if the operator trusts callers with it: otherwise any agent could have every call recorded.
        sampler=_sampler(settings),
        # Built here, not from OTEL_* variables: only settings.py reads the environment.
        resource=Resource({"service.name": settings.service_name, "service.version": version}),
        shutdown_on_exit=False,
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def trace_id_of(traceparent: object) -> str | None:
    """The trace id of a W3C ``traceparent`` value (``00-<32 hex>-<16 hex>-<2 hex>``), if well formed."""
    if not isinstance(traceparent, str) or len(traceparent) < 55:
        return None
    tid = traceparent[3:35].lower()
    # Exactly 32 hex digits: int(..., 16) would also take a sign, spaces or underscores.
    if traceparent[2] != "-" or traceparent[35] != "-" or tid == "0" * 32 or not _TRACE_ID.fullmatch(tid):
        return None
    return tid


def _sampler(settings: TelemetrySettings) -> Sampler:
    ratio = TraceIdRatioBased(settings.sample_ratio)
    if not settings.follow_caller_sampling:
        # The ratio decides for every trace, the callers' included (their trace ids stay continued).
        return ParentBased(ratio, remote_parent_sampled=ratio, remote_parent_not_sampled=ratio)
    return ParentBased(ratio)


def meta_context(params: Mapping[str, Any]) -> dict[str, str] | None:
    """The ``traceparent``/``tracestate`` a caller put in ``params._meta`` (2026-07-28), if any."""
    meta: Any = params.get("_meta")
    if not isinstance(meta, dict):
        return None
    found = cast(dict[str, Any], meta)
    parent: Any = found.get(TRACEPARENT)
    if not isinstance(parent, str):
        return None
    carrier = {TRACEPARENT: parent}
    state: Any = found.get(TRACESTATE)
    if isinstance(state, str):
        carrier[TRACESTATE] = state
    return carrier
