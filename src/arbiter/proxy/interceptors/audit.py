"""Pipeline step 0 (first, so it sees everything): exactly one audit record per request.

The queue slot is taken before anything runs, so a request that cannot be recorded is refused
(``audit_unavailable``) instead of running unaudited; the record is queued in ``finally``, so allowed,
denied, failed and cancelled requests all leave one.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR

from arbiter.audit.record import Decision, Event, actor_of
from arbiter.audit.writer import AuditWriter
from arbiter.errors import ArbiterError, RequestRejected, UnknownTarget
from arbiter.proxy.interceptors.authorize import DECISION_KEY, VERSION_KEY
from arbiter.proxy.interceptors.limits import COST_KEY
from arbiter.proxy.pipeline import CallContext, CallNext, Result

AUDITED_KEY = "arbiter.audited"  # in the ASGI scope: this HTTP request's record is the pipeline's


class Audit:
    def __init__(self, writer: AuditWriter) -> None:
        self._writer = writer

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        self._writer.reserve()
        if ctx.http_request is not None:
            ctx.http_request.scope[AUDITED_KEY] = True
        result: Result | None = None
        error: BaseException | None = None
        try:
            result = await call_next(ctx)
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._writer.submit(mcp_event(ctx, result, error))


def mcp_event(ctx: CallContext, result: Result | None, error: BaseException | None) -> Event:
    decision: Decision
    outcome: dict[str, Any]
    if error is None:
        decision, reason = "allow", "allowed"
        outcome = {"status": "ok"}
        if result is not None and result.get("isError") is True:
            outcome = {"status": "tool_error", "is_error": True}
    elif isinstance(error, ArbiterError):
        rejected = isinstance(error, RequestRejected | UnknownTarget)
        decision, reason = ("deny" if rejected else "allow"), error.code
        outcome = {
            "status": "refused" if rejected else "error",
            "error_code": error.to_mcp_error().error.code,
            "message": error.message,
        }
    elif isinstance(error, MCPError):  # the upstream's own JSON-RPC error
        decision, reason = "allow", "upstream_error"
        outcome = {"status": "error", "error_code": error.error.code, "message": error.error.message}
    elif isinstance(error, asyncio.CancelledError):
        decision, reason = "allow", "cancelled"
        outcome = {"status": "cancelled"}
    else:
        decision, reason = "error", "internal_error"
        outcome = {"status": "error", "error_code": INTERNAL_ERROR}
    policy: Any = ctx.state.get(DECISION_KEY)
    version: Any = ctx.state.get(VERSION_KEY)
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
        policy_version=version if isinstance(version, int) else None,
        outcome=outcome,
        latency_ms=round((time.perf_counter() - ctx.started) * 1000, 3),
        cost=_cost(ctx.state.get(COST_KEY)),
        trace_id=trace_id(scope),
        request_id=ctx.request_id,
        protocol_version=ctx.protocol_version,
        client_info=ctx.client_info,
        arguments=ctx.arguments,
    )


def _cost(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def client_ip(scope: Any) -> str | None:
    """The peer address of the HTTP connection (what uvicorn puts in the scope)."""
    client: Any = scope.get("client") if scope is not None else None
    return str(client[0]) if client else None


def trace_id(scope: Any) -> str | None:
    """The W3C trace id the caller sent (``traceparent``), if well formed."""
    if scope is None:
        return None
    for name, value in scope.get("headers", ()):
        if name == b"traceparent":
            parts = value.split(b"-")
            if len(parts) >= 4 and len(parts[1]) == 32 and parts[1] != b"0" * 32:
                try:
                    int(parts[1], 16)
                except ValueError:
                    return None
                return parts[1].decode("ascii")
            return None
    return None
