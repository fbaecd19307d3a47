"""The agent side of change notifications, on the SDK's low-level ``Server``.

- Handshake era: a session is registered with the hub when its client sends ``notifications/initialized``
  (with the principal that sent it); its notifications go out on the session's standalone GET stream and
  it is forgotten when the session ends. ``resources/subscribe`` and ``resources/unsubscribe`` add and
  remove resources on it.
- 2026-07-28: ``subscriptions/listen`` is one stream per request, acknowledged first, every frame stamped
  with the listen request's id (as the SDK's own ``ListenHandler`` does); its resource subscriptions are
  checked like ``resources/read`` before the acknowledgment.

``install`` registers the handlers and makes ``initialize`` advertise ``listChanged`` (the 2026-07-28
``server/discover`` derives it, and ``resources.subscribe``, from the listen handler being there).

Subscribe, unsubscribe and listen requests are audited (proxy/subscription_audit.py) and bounded: listen
streams and sessions per caller (``max_listeners_per_principal``), resources per stream or session
(``max_subscriptions_per_listener``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import mcp_types as types
from anyio.streams.memory import MemoryObjectReceiveStream
from mcp.server import Server
from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.models import InitializationOptions
from mcp.server.session import ServerSession
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import (
    SUBSCRIPTION_ID_META_KEY,
    PromptsListChanged,
    ResourceUpdated,
    ServerEvent,
    ToolsListChanged,
    event_to_notification,
)
from starlette.requests import Request

from arbiter.audit.writer import AuditWriter
from arbiter.auth.principal import Principal
from arbiter.errors import ArbiterError
from arbiter.proxy.exchange import exchange_of
from arbiter.proxy.notifications import (
    ALL_KINDS,
    PROMPTS,
    RESOURCES,
    TOOLS,
    Listener,
    NotificationHub,
    TooManyListeners,
)
from arbiter.proxy.subscription_audit import SubscriptionAudit

log = logging.getLogger(__name__)

_LISTENER_KEY = "arbiter.listener"  # in a handshake session's Connection.state


def install(
    server: Server[Any], hub: NotificationHub, *, send_timeout_s: float, audit: AuditWriter | None = None
) -> None:
    """Serve change notifications and resource subscriptions on ``server`` through ``hub``; record each
    subscribe, unsubscribe and listen request through ``audit``."""
    records = SubscriptionAudit(audit)

    async def initialized(ctx: ServerRequestContext[Any, Any], params: types.NotificationParams) -> None:
        _session_listener(hub, ctx, send_timeout_s)

    async def subscribe(
        ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams
    ) -> types.EmptyResult:
        await _change(hub, records, ctx, "resources/subscribe", params.uri, send_timeout_s)
        return types.EmptyResult()

    async def unsubscribe(
        ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        await _change(hub, records, ctx, "resources/unsubscribe", params.uri, send_timeout_s)
        return types.EmptyResult()

    async def listen(
        ctx: ServerRequestContext[Any, Any], params: types.SubscriptionsListenRequestParams
    ) -> types.SubscriptionsListenResult:
        return await _listen(hub, records, ctx, params)

    server.add_notification_handler("notifications/initialized", types.NotificationParams, initialized)
    server.add_request_handler("resources/subscribe", types.SubscribeRequestParams, subscribe)
    server.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, unsubscribe)
    server.add_request_handler("subscriptions/listen", types.SubscriptionsListenRequestParams, listen)
    # The handshake-era initialize result takes listChanged from NotificationOptions, which the SDK's
    # session manager never passes: give the server's own factory that default.
    create_options: Callable[..., InitializationOptions] = server.create_initialization_options

    def with_list_changed(
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        options = notification_options or NotificationOptions(True, True, True)
        return create_options(options, experimental_capabilities, extensions)

    setattr(server, "create_initialization_options", with_list_changed)  # noqa: B010 - a method, on purpose


async def _change(
    hub: NotificationHub,
    records: SubscriptionAudit,
    ctx: ServerRequestContext[Any, Any],
    method: str,
    uri: str,
    send_timeout_s: float,
) -> None:
    """A handshake session's ``resources/subscribe`` or ``resources/unsubscribe``, audited."""
    try:
        records.begin(ctx.request)
    except ArbiterError as exc:
        raise exc.to_mcp_error() from None
    error: ArbiterError | MCPError | None = None
    key: tuple[str, str] | None = None
    try:
        listener = _subscriber(hub, ctx, send_timeout_s)
        if method == "resources/subscribe":
            key = hub.subscribe(listener, uri)
        else:
            hub.unsubscribe(listener, uri)
    except ArbiterError as exc:
        error = exc
        raise exc.to_mcp_error() from None
    except MCPError as exc:
        error = exc
        raise
    finally:
        upstream, target = key if key is not None else (None, None)
        records.end(
            ctx.request,
            _principal(ctx),
            method,
            resources=[uri],
            upstream=upstream,
            target=target,
            error=error,
        )


async def _listen(
    hub: NotificationHub,
    records: SubscriptionAudit,
    ctx: ServerRequestContext[Any, Any],
    params: types.SubscriptionsListenRequestParams,
) -> types.SubscriptionsListenResult:
    subscription_id = ctx.request_id
    if subscription_id is None:
        raise MCPError(types.INVALID_REQUEST, "subscriptions/listen requires a request id")
    principal = _principal(ctx)
    if principal is None:  # every /mcp request is authenticated first; anything else fails closed
        raise MCPError(types.INVALID_REQUEST, "no authenticated caller")
    try:
        records.begin(ctx.request)
    except ArbiterError as exc:
        raise exc.to_mcp_error() from None
    wanted = params.notifications
    uris = list(wanted.resource_subscriptions or ())
    kinds = frozenset(
        kind
        for kind, flag in (
            (TOOLS, wanted.tools_list_changed),
            (PROMPTS, wanted.prompts_list_changed),
            (RESOURCES, wanted.resources_list_changed),
        )
        if flag
    )

    def record(error: ArbiterError | MCPError | None) -> None:
        records.end(ctx.request, principal, "subscriptions/listen", resources=uris, kinds=kinds, error=error)

    try:
        listener, inbox = hub.open(principal, kinds)
    except TooManyListeners:
        refused = MCPError(types.INTERNAL_ERROR, "Subscription limit reached")
        record(refused)
        raise refused from None
    meta: dict[str, Any] = {SUBSCRIPTION_ID_META_KEY: subscription_id}
    try:
        try:
            for uri in uris:
                hub.subscribe(listener, uri)  # a resource the caller may not read: refused like a missing one
        except ArbiterError as exc:
            record(exc)
            raise
        record(None)
        honored = types.SubscriptionFilter(
            tools_list_changed=True if TOOLS in kinds else None,
            prompts_list_changed=True if PROMPTS in kinds else None,
            resources_list_changed=True if RESOURCES in kinds else None,
            resource_subscriptions=uris or None,
        )
        await ctx.session.send_notification(
            types.SubscriptionsAcknowledgedNotification(
                params=types.SubscriptionsAcknowledgedNotificationParams(notifications=honored, _meta=meta)
            ),
            related_request_id=subscription_id,
        )
        async with inbox:
            async for event in inbox:
                await ctx.session.send_notification(
                    event_to_notification(event, meta), related_request_id=subscription_id
                )
    except ArbiterError as exc:
        raise exc.to_mcp_error() from None
    finally:
        hub.close(listener)
    return types.SubscriptionsListenResult(_meta=meta)


async def _pump_session(
    session: ServerSession, inbox: MemoryObjectReceiveStream[ServerEvent], send_timeout_s: float
) -> None:
    """Deliver a handshake session's notifications on its standalone stream, in order."""
    async with inbox:
        async for event in inbox:
            with anyio.move_on_after(send_timeout_s):
                # Best effort by the SDK's design: a session without an open GET stream misses it.
                await session.send_notification(_handshake_notification(event))


def _handshake_notification(event: ServerEvent) -> types.ServerNotification:
    if isinstance(event, ResourceUpdated):
        return types.ResourceUpdatedNotification(
            params=types.ResourceUpdatedNotificationParams(uri=event.uri)
        )
    if isinstance(event, ToolsListChanged):
        return types.ToolListChangedNotification()
    if isinstance(event, PromptsListChanged):
        return types.PromptListChangedNotification()
    return types.ResourceListChangedNotification()


def _connection(ctx: ServerRequestContext[Any, Any]) -> Connection | None:
    # The SDK hands handlers the session, not the connection whose state and teardown this needs.
    connection: object = getattr(ctx.session, "_connection", None)
    return connection if isinstance(connection, Connection) else None


def _session_listener(
    hub: NotificationHub, ctx: ServerRequestContext[Any, Any], send_timeout_s: float
) -> Listener | None:
    """The handshake session's listener, registered on first need (``notifications/initialized``, or a
    subscribe that overtook it), with the principal that opened the session."""
    connection = _connection(ctx)
    principal = _principal(ctx)
    if connection is None or principal is None or not connection.has_standalone_channel:
        return None  # stateless: no stream to tell anything on
    known = connection.state.get(_LISTENER_KEY)
    if isinstance(known, Listener):
        return known
    try:
        listener, inbox = hub.open(principal, ALL_KINDS)
    except TooManyListeners:
        log.warning("too many agents listening for changes; a new session will not be told of any")
        return None
    session = ctx.session

    async def pump() -> None:
        await _pump_session(session, inbox, send_timeout_s)

    if not hub.spawn(pump):
        hub.close(listener)
        return None
    connection.state[_LISTENER_KEY] = listener
    connection.exit_stack.callback(hub.close, listener)
    return listener


def _subscriber(hub: NotificationHub, ctx: ServerRequestContext[Any, Any], send_timeout_s: float) -> Listener:
    listener = _session_listener(hub, ctx, send_timeout_s)
    if listener is None:
        raise MCPError(
            types.INVALID_REQUEST, "resource subscriptions need a session (mcp.stateless_legacy is on)"
        )
    return listener


def _principal(ctx: ServerRequestContext[Any, Any]) -> Principal | None:
    request: object = ctx.request
    exchange = exchange_of(request.scope) if isinstance(request, Request) else None
    return exchange.principal if exchange is not None else None
