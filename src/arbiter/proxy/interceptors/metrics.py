"""Metrics steps: ``ServerMetrics`` runs first (every request, as the audit step sees it) and
``ClientMetrics`` just before forward (the upstream's part of single-target requests).

Only in the pipeline when ``telemetry.metrics`` is on. Labels stay bounded: a target that does not
resolve (or that the caller may not see) is ``tool="unknown"``, never the name the agent sent.
"""

from __future__ import annotations

import asyncio
import time

from arbiter.errors import (
    BudgetExceeded,
    DuplicateRequest,
    LimitsUnavailable,
    RateLimited,
    RepeatedCall,
    UnknownTarget,
    UpstreamUnavailable,
)
from arbiter.naming import exposed_name, exposed_uri
from arbiter.proxy.pipeline import LIST_METHODS, TARGET_KEYS, CallContext, CallNext, Result
from arbiter.proxy.verdict import verdict
from arbiter.telemetry.metrics import Metrics

_METHODS = frozenset({*TARGET_KEYS, *LIST_METHODS, "completion/complete"})
_LIMIT_REFUSALS = (RateLimited, BudgetExceeded, RepeatedCall, DuplicateRequest, LimitsUnavailable)
UNKNOWN = "unknown"
# A resource read through a template: its URI is whatever the agent sent, so it is not a label.
TEMPLATED = "templated"


def outcome_of(result: Result | None, error: BaseException | None) -> tuple[str, str]:
    """(decision, reason) as the audit record states them (``verdict.py``), except that a tool result
    with ``isError`` is ``tool_error`` rather than ``allowed``."""
    if error is None and result is not None and result.get("isError") is True:
        return "allow", "tool_error"
    return verdict(error)


def labels_of(ctx: CallContext, error: BaseException | None) -> tuple[str, str, str]:
    """(method, upstream, tool): bounded by the protocol's methods and the catalog."""
    method = ctx.method if ctx.method in _METHODS else "other"
    if method not in TARGET_KEYS:
        return method, "", ""
    if ctx.upstream is None or isinstance(error, UnknownTarget):
        return method, "", UNKNOWN
    if ctx.definition is None or ctx.target is None:
        return method, ctx.upstream, TEMPLATED
    # The catalog's spelling, never the agent's: many spellings of one resource URI (dot segments,
    # escapes) resolve to the same entry, and each would otherwise make a new series.
    if method == "resources/read":
        return method, ctx.upstream, exposed_uri(ctx.upstream, ctx.target)
    return method, ctx.upstream, exposed_name(ctx.upstream, ctx.target)


class ServerMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        metrics = self._metrics
        metrics.request_started()
        result: Result | None = None
        error: BaseException | None = None
        try:
            result = await call_next(ctx)
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            decision, outcome = outcome_of(result, error)
            method, upstream, tool = labels_of(ctx, error)
            metrics.request_finished(
                method, upstream, tool, outcome, decision, time.perf_counter() - ctx.started
            )
            if isinstance(error, _LIMIT_REFUSALS):
                metrics.limit_refused(outcome, upstream)


class ClientMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        if ctx.method not in TARGET_KEYS:
            return await call_next(ctx)  # lists are answered from the catalog: no upstream call
        started = time.perf_counter()
        result: Result | None = None
        error: BaseException | None = None
        try:
            result = await call_next(ctx)
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            seconds = time.perf_counter() - started
            _, outcome = outcome_of(result, error)
            method, upstream, tool = labels_of(ctx, error)
            self._metrics.upstream_call(method, upstream, tool, outcome, seconds)
            if error is not None and not isinstance(error, asyncio.CancelledError):
                # Refused by the upstream's circuit breaker (open, or half-open with its probe out):
                # no request was sent, which operators tell apart from a failed one.
                breaker = isinstance(error, UpstreamUnavailable) and "circuit" in error.details
                self._metrics.upstream_error(upstream, "circuit_open" if breaker else outcome)
