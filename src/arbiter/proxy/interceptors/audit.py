"""Pipeline step 0 (first, so it sees everything): exactly one audit record per request.

The queue slot is taken before anything runs, so a request that cannot be recorded is refused
(``audit_unavailable``) instead of running unaudited; the record is queued in ``finally``, so allowed,
denied, failed and cancelled requests all leave one, and an answered request is answered once its record
is stored (``audit.confirm_before_answer``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR

from arbiter.audit.record import Event, actor_of
from arbiter.audit.writer import AuditWriter
from arbiter.errors import ArbiterError, UnknownTarget
from arbiter.http_scope import client_ip, trace_id
from arbiter.proxy.pipeline import CallContext, CallNext, Result
from arbiter.proxy.verdict import refused, verdict
from arbiter.telemetry.tracing import TRACEPARENT, meta_context, trace_id_of


class Audit:
    def __init__(self, writer: AuditWriter) -> None:
        self._writer = writer

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        self._writer.reserve()
        if ctx.exchange is not None:
            ctx.exchange.audited = True  # this HTTP request's record is the pipeline's, not the endpoint's
        result: Result | None = None
        error: BaseException | None = None
        try:
            result = await call_next(ctx)
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            event = mcp_event(ctx, result, error)
            if event.trace_id is not None and isinstance(error, ArbiterError):
                with_trace_id(error, event.trace_id)
            number = self._writer.submit(event)
            if error is None or isinstance(error, Exception):
                # Answered (a result or an error the agent gets): not before its record is safe, so a
                # replica killed right after answering has lost no record of it. A cancelled request is
                # answered by nobody and does not wait.
                await self._writer.confirmed(number)


def with_trace_id(error: ArbiterError, tid: str) -> None:
    """Name the trace in an error the agent gets (``data.trace_id``), so it can be found from either end.
    Not on an unknown target: that answer must stay exactly what a missing tool gets."""
    if not isinstance(error, UnknownTarget):
        error.details.setdefault("trace_id", tid)


def request_trace_id(ctx: CallContext, scope: Mapping[str, Any] | None) -> str | None:
    """This request's trace id: Arbiter's own span's when traces are on, else the caller's
    ``traceparent`` (HTTP header, or ``params._meta`` in 2026-07-28), if any."""
    if ctx.trace_id is not None:
        return ctx.trace_id
    found = trace_id(scope)
    if found is None and "_meta" in ctx.params:
        carrier = meta_context(ctx.params)
        found = trace_id_of(carrier[TRACEPARENT]) if carrier is not None else None
    return found


def mcp_event(ctx: CallContext, result: Result | None, error: BaseException | None) -> Event:
    decision, reason = verdict(error)
    outcome: dict[str, Any]
    if error is None:
        outcome = {"status": "ok"}
        if result is not None and result.get("isError") is True:
            outcome = {"status": "tool_error", "is_error": True}
    elif isinstance(error, ArbiterError):
        outcome = {
            "status": "refused" if refused(error) else "error",
            "error_code": error.to_mcp_error().error.code,
            "message": error.message,
        }
        if "circuit" in error.details:  # refused by the upstream's open circuit breaker
            outcome["circuit"] = error.details["circuit"]
    elif isinstance(error, MCPError):  # the upstream's own JSON-RPC error
        outcome = {"status": "error", "error_code": error.error.code, "message": error.error.message}
    elif isinstance(error, asyncio.CancelledError):
        outcome = {"status": "cancelled"}
    else:
        outcome = {"status": "error", "error_code": INTERNAL_ERROR}
    if ctx.fallback is not None:
        outcome["fallback"] = ctx.fallback
    if ctx.input_rounds:  # requests the upstream put to the agent during the call: kind and answer only
        outcome["input_rounds"] = ctx.input_rounds
    if ctx.input_round is not None:  # a multi-round-trip round: input asked for / given (keys only)
        outcome.update(ctx.input_round)
    if ctx.approval is not None:  # the user was to approve the call: how asked, the answer (never content)
        outcome["approval"] = ctx.approval
    if ctx.guard is not None:  # what the argument and result guards found: detector names and paths
        outcome["guard"] = ctx.guard
    policy = ctx.decision
    http = ctx.http_request
    scope = http.scope if http is not None else None
    return Event(
        kind="mcp",
        decision=decision,
        reason=reason,
        actor=actor_of(ctx.principal, client_ip(scope)),
        method=ctx.method,
        tool=ctx.exposed,
        upstream=ctx.upstream,
        target=ctx.target,
        definition=ctx.definition,
        policy=policy.to_json() if policy is not None else None,
        policy_version=ctx.policy_version,
        outcome=outcome,
        latency_ms=round((time.perf_counter() - ctx.started) * 1000, 3),
        cost=ctx.cost,
        trace_id=request_trace_id(ctx, scope),
        request_id=ctx.request_id,
        protocol_version=ctx.protocol_version,
        client_info=ctx.client_info,
        arguments=ctx.arguments,
    )
