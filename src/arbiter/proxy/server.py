"""The agent-facing MCP server: the SDK's low-level ``Server`` whose handlers all run the pipeline.

A request that goes upstream runs while its HTTP client is still there: a disconnect cancels it (and so
the upstream request), in every era and response mode. The SDK does not do this for JSON responses,
nor for handshake-era requests, which it handles in the session's task rather than the HTTP request's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

import anyio
import mcp_types as types
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.server.session import ServerSession
from mcp.shared.exceptions import MCPError
from mcp_types.methods import CACHEABLE_METHODS
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel
from starlette.requests import Request
from starlette.types import Receive

from arbiter.auth.principal import Principal
from arbiter.errors import ArbiterError
from arbiter.proxy.call_channel import MAX_REQUESTS, SessionChannel
from arbiter.proxy.catalog import Catalog
from arbiter.proxy.exchange import CALLER, exchange_of
from arbiter.proxy.pipeline import TARGET_KEYS, CallContext, Pipeline, Result
from arbiter.proxy.tool_errors import as_tool_result

log = logging.getLogger(__name__)

SERVER_NAME = "arbiter"


def session_client_info(session: ServerSession) -> dict[str, Any] | None:
    """What the client says it is (initialize, or the 2026-07-28 envelope): recorded, never trusted."""
    params = session.client_params
    info = params.client_info if params is not None else None
    if info is None:
        return None
    return {"name": info.name, "version": info.version, "title": info.title}


def session_capabilities(session: ServerSession) -> dict[str, Any] | None:
    """What the client declared it can do (initialize, or the 2026-07-28 envelope)."""
    caps = session.client_capabilities
    return caps.model_dump(mode="json", by_alias=True, exclude_none=True) if caps is not None else None


async def _unless_disconnected(pipeline: Pipeline, call: CallContext, http: Request) -> Result:
    """Run ``call`` through the pipeline, cancelled if the HTTP client goes away first."""
    with anyio.CancelScope() as scope:
        watcher = asyncio.create_task(_watch(http.receive, scope))
        try:
            return await pipeline(call)
        finally:
            watcher.cancel()
    # Only the watcher cancels this scope; the audit step has recorded the request as cancelled.
    raise MCPError(types.CONNECTION_CLOSED, "Request cancelled: the client disconnected")


async def _watch(receive: Receive, scope: anyio.CancelScope) -> None:
    # The body has been read: what the connection delivers next is its end. (Once the answer is complete
    # the server reports a disconnect too, but by then this task has been cancelled.)
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:
        # The top of this task: a server whose receive() fails cannot report a disconnect either; the
        # call runs to its end as it would without the watcher.
        log.exception("cannot watch the client's connection")
        return
    scope.cancel()


async def answer(pipeline: Pipeline, call: CallContext, *, error_results: bool = True) -> Result:
    """Run ``call`` through the pipeline and shape its result for the agent; failures as ``MCPError``.

    With ``error_results`` (``mcp.tool_errors: result``), a ``tools/call`` refusal the model can act on is
    answered as an ``isError`` tool result instead (``tool_errors.py``); the pipeline, and so the audit
    record, saw the refusal as it was. Shared by the SDK's handlers and the direct 2026-07-28 path
    (``front.py``), so both answer alike.
    """
    http = call.http_request
    try:
        if http is not None and call.method in TARGET_KEYS:
            result = await _unless_disconnected(pipeline, call, http)
        else:
            result = await pipeline(call)
    except ArbiterError as exc:
        converted = as_tool_result(exc, call) if error_results and call.method == "tools/call" else None
        if converted is None:
            raise exc.to_mcp_error() from None
        result = converted
    except MCPError:
        raise  # the upstream's own JSON-RPC error, passed through unchanged
    except Exception:
        log.exception("internal error while handling %s", call.method)
        raise MCPError(types.INTERNAL_ERROR, "Internal error") from None
    if call.protocol_version in MODERN_PROTOCOL_VERSIONS:
        # Lists come from the catalog and an upstream may speak the older era, so the 2026-07-28
        # fields may be missing. What an agent may see depends on who it is: no cache may share
        # results across callers.
        result.setdefault("resultType", "complete")
        if call.method in CACHEABLE_METHODS:
            result["cacheScope"] = "private"
            result.setdefault("ttlMs", 0)
    return result


def visible_input_schema(
    catalog: Catalog, tool_visible: Callable[[Principal, str], bool], principal: Principal, name: str
) -> dict[str, Any] | None:
    """A tool's input schema for the 2026-07-28 ``Mcp-Param-*`` header check, only if ``principal`` may
    see it. The check runs before the pipeline, so it must tell a caller nothing about a tool they may
    not see: for those, no schema and so no header check, and the call is refused like a missing one."""
    schema = catalog.views.input_schemas.get(name)
    if schema is None or not tool_visible(principal, name):
        return None
    return schema


def build_mcp_server(
    pipeline: Pipeline,
    catalog: Catalog,
    version: str,
    tool_visible: Callable[[Principal, str], bool] = lambda principal, name: True,
    *,
    error_results: bool = True,
    relay_requests: bool = True,
    max_requests: int = MAX_REQUESTS,
) -> Server[Any]:
    """A server that answers every proxied method through ``pipeline``.

    ``tool_visible(principal, exposed_name)`` says whether the caller may see a tool: only then does the
    SDK check the call's ``Mcp-Param-*`` headers, so a hidden tool answers exactly like a missing one.
    ``error_results``: see ``answer``. ``relay_requests`` (``mcp.relay_server_requests``): whether an
    upstream's requests during a call are put to its agent (``call_channel.py``), at most
    ``max_requests`` per call (``mcp.input_requests_max``).
    """

    async def handle(ctx: ServerRequestContext[Any, Any], params: BaseModel | None) -> Result:
        request: object = ctx.request
        http = cast(Request, request) if isinstance(request, Request) else None
        exchange = exchange_of(http.scope) if http is not None else None
        call = CallContext(
            method=ctx.method,
            params=ctx.params or {},
            request_id=ctx.request_id,
            protocol_version=ctx.protocol_version,
            http_request=http,
            principal=exchange.principal if exchange is not None else None,
            client_info=session_client_info(ctx.session),
            client_capabilities=session_capabilities(ctx.session),
            exchange=exchange,
        )
        if call.method in TARGET_KEYS:  # what the upstream streams for the call goes back to this agent
            call.downstream = SessionChannel(
                call, ctx.session, relay_requests=relay_requests, max_requests=max_requests
            )
        return await answer(pipeline, call, error_results=error_results)

    async def ping(
        ctx: ServerRequestContext[Any, Any], params: types.RequestParams | None
    ) -> types.EmptyResult:
        return types.EmptyResult()

    def input_schema(name: str) -> dict[str, Any] | None:
        principal = CALLER.get()
        return visible_input_schema(catalog, tool_visible, principal, name) if principal is not None else None

    any_handler: Any = handle  # one handler serves every method; the SDK types each slot separately
    server: Server[Any] = Server(
        SERVER_NAME,
        version=version,
        instructions="Arbiter: governed access to this organisation's MCP tools.",
        get_tool_input_schema=input_schema,
        on_ping=ping,
        on_list_tools=any_handler,
        on_call_tool=any_handler,
        on_list_resources=any_handler,
        on_list_resource_templates=any_handler,
        on_read_resource=any_handler,
        on_list_prompts=any_handler,
        on_get_prompt=any_handler,
        on_completion=any_handler,  # also advertises the completions capability
    )
    # The SDK's OpenTelemetry middleware is a no-op until telemetry lands; drop it from the hot path.
    server.middleware.clear()
    return server
