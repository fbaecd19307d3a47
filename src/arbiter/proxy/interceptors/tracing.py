"""Tracing steps (only with ``telemetry.traces`` on): spans after the MCP semantic conventions.

``traced`` puts ``Tracing`` first in the pipeline and wraps the steps that do work. ``Tracing`` opens the
SERVER span ``{mcp.method.name} {target}``, continuing the caller's W3C context (``params._meta`` first,
as 2026-07-28 sends it, else the HTTP headers). The steps' spans are its children and siblings of one
another, each covering its own step's work only (authorize and limits before they call on, the audit
enqueue after); the upstream call is a CLIENT span whose context the upstream receives, in ``_meta`` and
as HTTP headers. No argument, result or credential goes on a span, except arguments redacted as for the
audit log when an operator opts in (``telemetry.trace_arguments``).

With traces off none of this is in the pipeline: no step here runs, and no tracing work is done per call.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from opentelemetry import context as otel_context
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, StatusCode, Tracer, get_current_span, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from arbiter.audit.redact import Redactor
from arbiter.errors import ArbiterError
from arbiter.http_scope import client_ip
from arbiter.proxy.interceptors.audit import Audit, with_trace_id
from arbiter.proxy.interceptors.authorize import Authorize
from arbiter.proxy.interceptors.forward import Forward
from arbiter.proxy.interceptors.limits import Limits
from arbiter.proxy.pipeline import LIST_METHODS, TARGET_KEYS, CallContext, CallNext, Interceptor, Result
from arbiter.telemetry.tracing import TRACEPARENT, meta_context

_PROPAGATOR = TraceContextTextMapPropagator()
_SESSION_HEADER = "mcp-session-id"
# The attribute naming a single-target request's target, by method (MCP semantic conventions).
_TARGET_ATTRIBUTE = {"tools/call": "gen_ai.tool.name", "prompts/get": "gen_ai.prompt.name"}
_RESOURCE_ATTRIBUTE = "mcp.resource.uri"
_ALL_METHODS = frozenset(TARGET_KEYS) | LIST_METHODS

UpstreamUrl = Callable[[str], str | None]


def traced(
    steps: Sequence[Interceptor],
    tracer: Tracer,
    upstream_url: UpstreamUrl,
    redactor: Redactor | None = None,
    *,
    step_spans: bool = True,
) -> list[Interceptor]:
    """``steps`` with ``Tracing`` first and Arbiter's own working steps wrapped in spans.

    ``upstream_url(name)`` gives an upstream's URL (for ``server.address``/``server.port``); ``redactor``,
    when given, puts the redacted arguments of tool calls on the SERVER span (opt-in only). Without
    ``step_spans`` (``telemetry.trace_steps``) only the SERVER and CLIENT spans are made: each span costs
    its making and its export, so a third of the spans costs about a third.
    """
    out: list[Interceptor] = [Tracing(tracer, redactor)]
    for step in steps:
        if not step_spans:
            out.append(UpstreamCall(tracer, step, upstream_url) if isinstance(step, Forward) else step)
        elif isinstance(step, Audit):
            out.append(Step(tracer, "arbiter.audit", step, after=_ALL_METHODS))
        elif isinstance(step, Authorize):
            # A single target is decided before calling on; a list is filtered after.
            out.append(Step(tracer, "arbiter.authorize", step, before=TARGET_KEYS, after=LIST_METHODS))
        elif isinstance(step, Limits):
            out.append(Step(tracer, "arbiter.limits", step, before=("tools/call",)))
        elif isinstance(step, Forward):
            out.append(UpstreamCall(tracer, step, upstream_url))
        else:
            out.append(step)
    return out


class Tracing:
    """The SERVER span of one request; first in the pipeline."""

    def __init__(self, tracer: Tracer, redactor: Redactor | None) -> None:
        self._tracer = tracer
        self._redactor = redactor

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        name, attributes = _server_attributes(ctx)
        auth = ctx.exchange.auth_ns if ctx.exchange is not None else None
        span = self._tracer.start_span(
            name,
            context=_incoming(ctx),
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=auth[0] if auth is not None else None,  # the request began with authentication
        )
        current = set_span_in_context(span)
        recording = span.is_recording()  # False: not sampled; the steps then open no spans of their own
        if auth is not None and recording:
            self._tracer.start_span("arbiter.authenticate", context=current, start_time=auth[0]).end(auth[1])
        ctx.trace_id = format(span.get_span_context().trace_id, "032x")
        if self._redactor is not None and recording and ctx.method == "tools/call":
            arguments: Any = ctx.params.get("arguments")
            if isinstance(arguments, dict):
                redacted = self._redactor.arguments(arguments).value  # pyright: ignore[reportUnknownArgumentType]
                span.set_attribute("gen_ai.tool.call.arguments", json.dumps(redacted, sort_keys=True))
        token = otel_context.attach(current)  # log lines written meanwhile carry this trace id
        try:
            result = await call_next(ctx)
            if result.get("isError") is True:
                span.set_attribute("error.type", "tool_error")
            return result
        except BaseException as exc:
            _record_error(span, exc)
            if isinstance(exc, ArbiterError):
                with_trace_id(exc, ctx.trace_id)
            raise
        finally:
            _decided(span, ctx)
            otel_context.detach(token)
            span.end()


class Step:
    """A span over one step's own work: before it calls on (``before`` methods) or after the rest of the
    pipeline has answered (``after`` methods). Methods in neither get no span."""

    def __init__(
        self,
        tracer: Tracer,
        name: str,
        inner: Interceptor,
        *,
        before: Collection[str] = (),
        after: Collection[str] = (),
    ) -> None:
        self._tracer = tracer
        self._name = name
        self._inner = inner
        self._before = frozenset(before)
        self._after = frozenset(after)

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        if ctx.method in self._before and get_current_span().is_recording():
            return await self._spanning_before(ctx, call_next)
        if ctx.method in self._after and get_current_span().is_recording():
            return await self._spanning_after(ctx, call_next)
        return await self._inner(ctx, call_next)

    async def _spanning_before(self, ctx: CallContext, call_next: CallNext) -> Result:
        pending = [self._tracer.start_span(self._name)]  # open until the step calls on

        async def then(next_ctx: CallContext) -> Result:
            if pending:
                pending.pop().end()
            return await call_next(next_ctx)

        try:
            return await self._inner(ctx, then)
        except BaseException as exc:
            if pending:  # refused by this step itself
                _record_error(pending[0], exc)
            raise
        finally:
            if pending:
                pending.pop().end()

    async def _spanning_after(self, ctx: CallContext, call_next: CallNext) -> Result:
        spans: list[Span] = []

        async def then(next_ctx: CallContext) -> Result:
            try:
                return await call_next(next_ctx)
            finally:
                spans.append(self._tracer.start_span(self._name))

        try:
            return await self._inner(ctx, then)
        finally:
            for span in spans:
                span.end()


class UpstreamCall:
    """The CLIENT span of the upstream call, whose context the upstream receives; lists are answered
    from the catalog, with no upstream call and no span."""

    def __init__(self, tracer: Tracer, forward: Interceptor, upstream_url: UpstreamUrl) -> None:
        self._tracer = tracer
        self._forward = forward
        self._upstream_url = upstream_url

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        if ctx.method not in TARGET_KEYS or ctx.upstream is None or ctx.target is None:
            return await self._forward(ctx, call_next)
        if not get_current_span().is_recording():
            # Not sampled: no span, but the upstream still continues this trace (and its decision).
            carrier: dict[str, str] = {}
            _PROPAGATOR.inject(carrier)
            ctx.trace_context = carrier
            return await self._forward(ctx, call_next)
        attributes: dict[str, AttributeValue] = {
            "mcp.method.name": ctx.method,
            "arbiter.upstream": ctx.upstream,
        }
        attributes[_TARGET_ATTRIBUTE.get(ctx.method, _RESOURCE_ATTRIBUTE)] = ctx.target
        if ctx.method == "tools/call":
            attributes["gen_ai.operation.name"] = "execute_tool"
        url = self._upstream_url(ctx.upstream)
        if url is not None:
            attributes.update(_server_address(url))
        span = self._tracer.start_span(
            f"{ctx.method} {ctx.target}", kind=SpanKind.CLIENT, attributes=attributes
        )
        carrier = {}
        current = set_span_in_context(span)
        _PROPAGATOR.inject(carrier, context=current)
        ctx.trace_context = carrier
        # Current while the upstream is called: the SDK's client (stdio and SSE upstreams) injects the
        # current context into the request's _meta itself, and must inject this span's, not the SERVER's.
        token = otel_context.attach(current)
        try:
            result = await self._forward(ctx, call_next)
            if result.get("isError") is True:
                span.set_attribute("error.type", "tool_error")
            return result
        except BaseException as exc:
            _record_error(span, exc)
            raise
        finally:
            otel_context.detach(token)
            span.end()


def _incoming(ctx: CallContext) -> Context | None:
    """The caller's W3C trace context: ``params._meta`` (2026-07-28), else the HTTP headers."""
    carrier: Mapping[str, str] | None = meta_context(ctx.params) if "_meta" in ctx.params else None
    if carrier is None and ctx.http_request is not None:
        headers = ctx.http_request.headers
        if TRACEPARENT in headers:
            carrier = headers
    return _PROPAGATOR.extract(carrier) if carrier is not None else None


def _server_attributes(ctx: CallContext) -> tuple[str, dict[str, AttributeValue]]:
    method = ctx.method
    attributes: dict[str, AttributeValue] = {"mcp.method.name": method}
    name = method
    key = TARGET_KEYS.get(method)
    target: Any = ctx.params.get(key) if key is not None else None
    if isinstance(target, str):
        name = f"{method} {target}"
        attributes[_TARGET_ATTRIBUTE.get(method, _RESOURCE_ATTRIBUTE)] = target
    if method == "tools/call":
        attributes["gen_ai.operation.name"] = "execute_tool"
    if ctx.request_id is not None:
        attributes["jsonrpc.request.id"] = str(ctx.request_id)
    if ctx.protocol_version is not None:
        attributes["mcp.protocol.version"] = ctx.protocol_version
    http = ctx.http_request
    if http is not None:
        address = client_ip(http.scope)
        if address is not None:
            attributes["client.address"] = address
        if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:  # sessions exist in the handshake era only
            session = http.headers.get(_SESSION_HEADER)
            if session:
                attributes["mcp.session.id"] = session
    principal = ctx.principal
    if principal is not None:
        attributes["arbiter.subject"] = principal.subject
        attributes["arbiter.auth.method"] = principal.auth_method
        if principal.tenant is not None:
            attributes["arbiter.tenant"] = principal.tenant
    return name, attributes


def _decided(span: Span, ctx: CallContext) -> None:
    """What the pipeline learnt: where the request went and what the policy said."""
    if ctx.upstream is not None:
        span.set_attribute("arbiter.upstream", ctx.upstream)
    if ctx.policy_version is not None:
        span.set_attribute("arbiter.policy.version", ctx.policy_version)
    decision = ctx.decision
    if decision is not None:
        span.set_attribute("arbiter.decision", decision.outcome)  # allow, approve or deny
        span.set_attribute("arbiter.decision.reason", decision.reason)
    if ctx.cost is not None:
        span.set_attribute("arbiter.cost", ctx.cost)


def _record_error(span: Span, exc: BaseException) -> None:
    if isinstance(exc, ArbiterError):
        error_type = exc.code
        # The code, not the message: a message may quote an upstream's error text.
        span.set_status(StatusCode.ERROR, exc.code)
    elif isinstance(exc, MCPError):  # the upstream's own JSON-RPC error
        error_type = str(exc.error.code)
        span.set_attribute("rpc.response.status_code", error_type)
        span.set_status(StatusCode.ERROR)
    elif isinstance(exc, asyncio.CancelledError):
        error_type = "cancelled"
    else:
        error_type = type(exc).__qualname__
        span.set_status(StatusCode.ERROR)
    span.set_attribute("error.type", error_type)


@lru_cache(maxsize=256)
def _server_address(url: str) -> dict[str, AttributeValue]:
    parts = urlsplit(url)
    out: dict[str, AttributeValue] = {}
    if parts.hostname:
        out["server.address"] = parts.hostname
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    if port is not None:
        out["server.port"] = port
    return out
