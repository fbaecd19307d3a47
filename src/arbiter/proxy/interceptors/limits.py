"""Pipeline steps 5 and 6: rate limits, the loop breaker and budgets, for calls the policy allowed.

A tool call is admitted (or refused) before it is forwarded; its cost is reserved then, and given back
if the upstream failed before the tool could run. What counts as "the same request" for charging once:
the caller's ``params._meta["arbiter/idempotency-key"]`` if it sends one, else, in the handshake era,
the MCP session id plus the JSON-RPC id (unique within a session by the protocol), held for the shorter
``limits.session_request_key_ttl_s``. Stateless-era requests without the key are each a new request:
their JSON-RPC ids are unique only per client.
"""

from __future__ import annotations

from typing import Any, cast

import anyio
from mcp.shared.exceptions import MCPError
from mcp_types import REQUEST_TIMEOUT

from arbiter.errors import ArbiterError, UpstreamUnavailable
from arbiter.limits.limiter import SESSION_KEY_PREFIX, Limiter
from arbiter.proxy.pipeline import CallContext, CallNext, Result

IDEMPOTENCY_META = "arbiter/idempotency-key"
_MAX_KEY_LENGTH = 200


def request_key(ctx: CallContext) -> str | None:
    """What makes a retried request the same request (see the module docstring); None: each is new."""
    meta: Any = ctx.params.get("_meta")
    if isinstance(meta, dict):
        key: Any = cast(dict[str, Any], meta).get(IDEMPOTENCY_META)
        if isinstance(key, str) and 0 < len(key) <= _MAX_KEY_LENGTH:
            return f"k:{key}"
    if ctx.http_request is not None and ctx.request_id is not None:
        session = ctx.http_request.headers.get("mcp-session-id")
        if session:
            return f"{SESSION_KEY_PREFIX}{session}:{type(ctx.request_id).__name__}:{ctx.request_id}"
    return None


def ran_before_failing(exc: BaseException, sent: bool) -> bool:
    """Could the tool have run although the call failed? Then its cost stands.

    ``sent``: the forward step handed the request to the upstream. Before that (no connection, a
    connect timeout, no credential, a refusal by another step) the tool cannot have run. After it:
    the upstream's own JSON-RPC error says it did not run; a deadline that passed, a malformed answer
    or a later step's refusal may all come after the tool did its work. A connection that broke is
    refunded: the SDK reports a dead upstream (connection refused) and a connection cut mid-call the
    same way, and the first is by far the common case; docs/limits.md states the trade-off.
    """
    if isinstance(exc, MCPError):
        return False  # the upstream's own JSON-RPC error: it refused the request
    if not sent:
        return False
    if isinstance(exc, UpstreamUnavailable):
        cause = exc.__cause__
        return isinstance(cause, TimeoutError) or (
            isinstance(cause, MCPError) and cause.code == REQUEST_TIMEOUT
        )
    return True


class Limits:
    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        if ctx.method != "tools/call":
            return await call_next(ctx)
        assert ctx.principal is not None and ctx.upstream is not None and ctx.target is not None
        ticket = await self._limiter.admit(
            ctx.principal, ctx.upstream, ctx.target, ctx.arguments, request_key(ctx)
        )
        ctx.cost = ticket.cost
        try:
            return await call_next(ctx)
        except (ArbiterError, MCPError) as exc:
            if not ran_before_failing(exc, ctx.sent):
                await self._limiter.refund(ticket)
                ctx.cost = 0.0
            raise
        except anyio.get_cancelled_exc_class():
            # Cancelled (the agent went away) before the request reached the upstream: nothing ran, so
            # the charge and the request key are given back, shielded from the cancellation (the refund
            # bounds its own Redis round trip). Once sent, a cancelled call stays charged.
            if not ctx.sent:
                with anyio.CancelScope(shield=True):
                    await self._limiter.refund(ticket)
                ctx.cost = 0.0
            raise
        finally:
            self._limiter.commit(ticket)  # no-op after a refund
