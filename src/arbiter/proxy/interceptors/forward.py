"""Pipeline step 7 (the last): answer lists from the catalog, send single-target requests upstream."""

from __future__ import annotations

from typing import Any, cast

from mcp.shared.exceptions import MCPError
from mcp_types import LOG_LEVEL_META_KEY, METHOD_NOT_FOUND

from arbiter.naming import exposed_uri
from arbiter.proxy.catalog import UNAVAILABLE_META, Catalog
from arbiter.proxy.pipeline import COMPLETE, CallContext, CallNext, Result
from arbiter.proxy.pool import UpstreamPool
from arbiter.proxy.relay import UpstreamRequest

_SERVER_INFO_META = "io.modelcontextprotocol/serverInfo"


def _sent(ctx: CallContext) -> None:
    ctx.sent = True  # handed to the upstream: the tool may run from now on


def _fell_back(ctx: CallContext, upstream: str) -> None:
    ctx.fallback = upstream  # the primary could not take the call; the audit record names where it went


class Forward:
    def __init__(self, catalog: Catalog, pool: UpstreamPool) -> None:
        self._catalog = catalog
        self._pool = pool

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        views = self._catalog.views
        # Lists are fresh list objects over shared entries: interceptors may filter them, not edit entries.
        match ctx.method:
            case "tools/list":
                listed: Result = {"tools": list(views.tools)}
                if views.unavailable_tools:  # upstreams down; the authorize step narrows this per caller
                    ctx.unavailable = views.unavailable_tools
                    listed["_meta"] = {UNAVAILABLE_META: sorted(views.unavailable_tools)}
                return listed
            case "resources/list":
                return {"resources": list(views.resources)}
            case "resources/templates/list":
                return {"resourceTemplates": list(views.resource_templates)}
            case "prompts/list":
                return {"prompts": list(views.prompts)}
            case _:
                return await self._forward(ctx)

    async def _forward(self, ctx: CallContext) -> Result:
        assert ctx.upstream is not None and ctx.target is not None, "resolve runs before forward"
        # Only the progress token crosses over (and, with traces on, Arbiter's own trace context); the
        # rest of _meta is the agent's envelope, not the upstream's.
        meta: Any = ctx.params.get("_meta")
        progress: Any = cast(dict[str, Any], meta).get("progressToken") if isinstance(meta, dict) else None
        params: dict[str, Any]
        schema: Any = None
        if ctx.method == "resources/read":
            params = {"uri": ctx.target}
        elif ctx.method == COMPLETE:
            params = _completion_params(ctx)
        else:
            arguments = ctx.arguments
            if ctx.method == "prompts/get" and arguments:
                arguments = {k: v if isinstance(v, str) else str(v) for k, v in arguments.items()}
            params = {"name": ctx.target}
            if arguments:
                params["arguments"] = arguments
            if ctx.method == "tools/call" and ctx.definition is not None:
                schema = ctx.definition.get("inputSchema")
        if ctx.request_state is not None:  # a retry: the upstream's own state, opened by input_rounds
            params["requestState"] = ctx.request_state
        responses: Any = ctx.params.get("inputResponses")
        if responses is not None and ctx.method != COMPLETE:  # the agent's answers, passed on unchanged
            params["inputResponses"] = responses
        if progress is not None:
            params["_meta"] = {"progressToken": progress}
        level: Any = cast(dict[str, Any], meta).get(LOG_LEVEL_META_KEY) if isinstance(meta, dict) else None
        if level is not None:  # the agent's 2026-07-28 opt-in to this call's log messages
            params["_meta"] = {**params.get("_meta", {}), LOG_LEVEL_META_KEY: level}
        trace = ctx.trace_context  # set by the tracing step (traces on): the upstream call's own span
        if trace is not None:
            params["_meta"] = {**params.get("_meta", {}), **trace}
        request = UpstreamRequest(
            ctx.method,
            params,
            cast(dict[str, Any], schema) if isinstance(schema, dict) else None,
            trace,
            client_capabilities=ctx.client_capabilities,
            downstream=ctx.downstream,  # what the upstream streams for this call goes to its agent
            max_result_bytes=ctx.result_cap,  # the result guard's: the relay reads no further
            inspect=ctx.inspect_result,
        )
        # The caller's own token goes along for an upstream that exchanges it (RFC 8693), and only the
        # pool reads it, for those alone; every other upstream gets Arbiter's credential.
        caller = ctx.exchange.caller_token if ctx.exchange is not None else None
        via = ctx.state_upstream  # a retry with an upstream's state: to that upstream only, no fallback
        if via is not None and via != ctx.upstream:
            ctx.fallback = via
        try:
            result = await self._pool.request(
                ctx.upstream,
                request,
                caller=caller,
                on_send=lambda: _sent(ctx),
                on_fallback=lambda upstream: _fell_back(ctx, upstream),
                via=via,
            )
        except MCPError as exc:
            if ctx.method == COMPLETE and exc.error.code == METHOD_NOT_FOUND:
                # Arbiter offers completions for every upstream; one without them has nothing to suggest.
                return {"completion": {"values": [], "hasMore": False}}
            raise
        _strip_upstream_identity(result)
        if ctx.method == "resources/read":
            _rename_contents(result, ctx.upstream)
        return result


def _completion_params(ctx: CallContext) -> dict[str, Any]:
    """completion/complete in the upstream's own names: its prompt name or resource template URI."""
    ref: Any = ctx.params.get("ref")
    kind: Any = cast(dict[str, Any], ref).get("type") if isinstance(ref, dict) else None
    key = "name" if kind == "ref/prompt" else "uri"
    params: dict[str, Any] = {"ref": {"type": kind, key: ctx.target}}
    for field in ("argument", "context"):
        value: Any = ctx.params.get(field)
        if value is not None:
            params[field] = value
    return params


def _strip_upstream_identity(result: Result) -> None:
    # The upstream's serverInfo stamp describes it, not Arbiter; agents talk to Arbiter.
    meta = result.get("_meta")
    if isinstance(meta, dict) and _SERVER_INFO_META in meta:
        rest: dict[str, Any] = {k: v for k, v in meta.items() if k != _SERVER_INFO_META}  # pyright: ignore[reportUnknownVariableType]
        if rest:
            result["_meta"] = rest
        else:
            del result["_meta"]


def _rename_contents(result: Result, upstream: str) -> None:
    contents = result.get("contents")
    if isinstance(contents, list):
        for item in contents:  # pyright: ignore[reportUnknownVariableType]
            if isinstance(item, dict) and isinstance(item.get("uri"), str):  # pyright: ignore[reportUnknownMemberType]
                item["uri"] = exposed_uri(upstream, item["uri"])  # pyright: ignore[reportUnknownArgumentType]
