"""The governance pipeline: an ordered chain of interceptors, each ``async (ctx, call_next) -> result``.

The chain is composed once at construction, so a request pays one function call per interceptor and
nothing else. Interceptors may refuse (raise an ``ArbiterError``), rewrite ``ctx`` before calling on,
or rewrite/observe the result after. Results are the JSON-RPC ``result`` objects as dicts.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from arbiter.auth.principal import Principal
from arbiter.policies.engine import Decision
from arbiter.proxy.exchange import Exchange

if TYPE_CHECKING:
    from arbiter.proxy.downstream import Downstream

Result = dict[str, Any]
CallNext = Callable[["CallContext"], Awaitable[Result]]
Interceptor = Callable[["CallContext", CallNext], Awaitable[Result]]

# Methods that address one target, and the params key naming it.
TARGET_KEYS: dict[str, str] = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
LIST_METHODS = frozenset({"tools/list", "resources/list", "resources/templates/list", "prompts/list"})
# completion/complete names its target inside params.ref (a prompt or a resource template).
COMPLETE = "completion/complete"


@dataclass(slots=True)
class CallContext:
    """Everything the interceptors know about one request.

    Each fact a later step reads is a typed field, set by the step that learns it, so steps share this
    class and nothing else: no interceptor imports another.
    """

    method: str
    params: Mapping[str, Any]
    request_id: str | int | None = None
    protocol_version: str | None = None
    # The HTTP request that carried it (None on non-HTTP transports); headers are parsed only if asked for.
    http_request: Request | None = None
    principal: Principal | None = None  # set by authentication for every request on /mcp
    client_info: Mapping[str, Any] | None = None
    client_capabilities: Mapping[str, Any] | None = None  # what the client declared (this request)
    # Filled by the resolve step for single-target methods:
    exposed: str | None = None  # the name/URI the agent used
    upstream: str | None = None
    target: str | None = None  # the upstream's own tool/prompt name or resource URI
    arguments: dict[str, Any] | None = None
    definition: Mapping[str, Any] | None = None  # catalog definition (None for a templated resource)
    # The target's definition is offered but not approved: its status (pending, quarantined, rejected,
    # disabled). The integrity step refuses it, after authorize has hidden it from callers who may not see it.
    held: str | None = None
    # What /mcp learnt about the HTTP request (None off /mcp): the caller's token, "audited".
    exchange: Exchange | None = None
    # Filled by authorize: the policy version deciding the request, and its decision on a single target.
    policy_version: int | None = None
    decision: Decision | None = None
    cost: float | None = None  # limits: the units charged to a tool call (0.0 when refunded)
    sent: bool = False  # forward: handed to the upstream, so the tool may run from then on
    fallback: str | None = None  # forward: the fallback upstream that took the call instead (resilience)
    # forward, on tools/list while upstreams are down: each one's own tool names (authorize then names
    # only those the caller could see a tool of). None: every upstream is listed.
    unavailable: Mapping[str, Sequence[str]] | None = None
    # Multi-round-trip input (interceptors/input_rounds.py): the upstream's own requestState, opened from
    # Arbiter's seal on a retry (forward sends it on), the upstream that issued it (the tool's own or its
    # fallback: forward sends the retry there only, never falling back), and what the audit record says.
    request_state: str | None = None
    state_upstream: str | None = None
    input_round: dict[str, object] | None = None
    # Where what the upstream streams for this call goes (proxy/downstream.py; set by server.py and
    # front.py), and each request the upstream put to the agent during the call (kind, action; the audit
    # record carries them, never their content).
    downstream: Downstream | None = None
    input_rounds: list[dict[str, str | int]] | None = None
    # Approval (interceptors/approval.py), when the policy said a person must approve the call: how the
    # user was asked and what they answered (never the content); the audit record carries it.
    approval: dict[str, object] | None = None
    # Tracing (proxy/interceptors/tracing.py, only when traces are on): this request's trace id (32 hex),
    # and the W3C context (traceparent, tracestate) the upstream call carries in _meta and HTTP headers.
    trace_id: str | None = None
    trace_context: dict[str, str] | None = None
    # The guards (interceptors/guard_arguments.py, guard_result.py): what they found, by detector and
    # path, never by value (the audit record's outcome carries it); the most of the upstream's answer
    # forward may read, and who sees its raw bytes first.
    guard: dict[str, object] | None = None
    result_cap: int | None = None
    inspect_result: Callable[[bytes], None] | None = None
    started: float = field(default_factory=time.perf_counter)
    # The open slot for third-party interceptors to hand facts to one another; Arbiter's own steps use
    # the typed fields above.
    state: dict[str, object] = field(default_factory=dict[str, object])


class Pipeline:
    """Runs interceptors in order; the last one must produce a result without calling on."""

    def __init__(self, interceptors: Sequence[Interceptor]) -> None:
        if not interceptors:
            raise ValueError("a pipeline needs at least one interceptor (the forward step)")
        self.interceptors = tuple(interceptors)
        self._entry = self._compose()

    def _compose(self) -> CallNext:
        async def end(ctx: CallContext) -> Result:
            raise RuntimeError(f"pipeline fell off the end while handling {ctx.method}")

        call: CallNext = end
        for interceptor in reversed(self.interceptors):
            call = _bind(interceptor, call)
        return call

    def __call__(self, ctx: CallContext) -> Awaitable[Result]:
        return self._entry(ctx)


def _bind(interceptor: Interceptor, call_next: CallNext) -> CallNext:
    # A plain function handing back the interceptor's coroutine: no extra coroutine frame per step.
    def step(ctx: CallContext) -> Awaitable[Result]:
        return interceptor(ctx, call_next)

    return step
