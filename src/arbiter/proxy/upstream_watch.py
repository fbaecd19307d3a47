"""The upstream side of change notifications: hear each upstream, and hold its resource subscriptions.

One watcher task per pooled upstream. It points the upstream's client at the hub
(``UpstreamClient.on_notification``) and keeps Arbiter's own subscriptions in line with what agents
subscribed to (``NotificationHub.resources_wanted``):

- a handshake-era upstream sends its notifications on the SDK client's GET stream; the watcher sends
  ``resources/subscribe`` / ``resources/unsubscribe`` once per resource, again after a reconnect;
- a 2026-07-28 upstream speaks only on a ``subscriptions/listen`` stream: the watcher holds one open for
  the list kinds the upstream advertises ``listChanged`` for and the wanted resources (if it advertises
  ``resources.subscribe``), re-opens it when the wanted resources change, and after a drop with backoff.
  Its frames reach the hub through the same message handler.

A watcher only uses a connection that requests opened (``UpstreamClient.live_session``): it never
connects, so it never marks an upstream down nor takes a slot from calls. Every failure is logged and
retried later; none reaches the request path.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from functools import partial

import anyio
import mcp_types as types
from anyio.abc import TaskGroup
from mcp.client.session import ClientSession
from mcp.client.subscriptions import SubscriptionLost, listen
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from arbiter.proxy.notifications import NotificationHub
from arbiter.proxy.pool import UpstreamPool
from arbiter.proxy.upstream import UpstreamClient
from arbiter.settings import NotificationSettings
from arbiter.ticks import ticks

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT_S = 10.0  # one subscribe/unsubscribe request upstream
# What a failed listen or subscribe ends with: the upstream's error, a dropped stream or connection.
_FAILURES = (
    MCPError,
    SubscriptionLost,
    TimeoutError,
    OSError,
    anyio.BrokenResourceError,
    anyio.ClosedResourceError,
)


class UpstreamWatch:
    def __init__(self, pool: UpstreamPool, hub: NotificationHub, settings: NotificationSettings) -> None:
        self._pool = pool
        self._hub = hub
        self._settings = settings

    async def run(self, stopping: anyio.Event) -> None:
        """Start and stop watchers as upstreams come and go, until ``stopping``."""
        watched: dict[str, anyio.CancelScope] = {}
        async with anyio.create_task_group() as tg:
            self._reconcile(tg, watched)
            async for _ in ticks(self._settings.watch_interval_s, stopping):
                self._reconcile(tg, watched)
            tg.cancel_scope.cancel()

    def _reconcile(self, tg: TaskGroup, watched: dict[str, anyio.CancelScope]) -> None:
        names = set(self._pool.names())
        for gone in set(watched) - names:
            watched.pop(gone).cancel()
        for name in names - set(watched):
            scope = watched[name] = anyio.CancelScope()
            tg.start_soon(self._watch, name, scope)

    async def _watch(self, name: str, scope: anyio.CancelScope) -> None:
        backoff = self._settings.listen_backoff_s
        subscribed: set[str] = set()  # on the session below (handshake era)
        session_seen: ClientSession | None = None
        with scope:
            while True:
                client = self._pool.current(name)
                session = self._attach(name, client)
                if session is not session_seen:
                    session_seen, subscribed = session, set()  # a new session holds no subscriptions
                try:
                    if session is None or client is None:
                        await self._wait(name)
                    elif session.protocol_version in MODERN_PROTOCOL_VERSIONS:
                        await self._listen(name, client, session)
                    else:
                        await self._subscribe(name, client, session, subscribed)
                    backoff = self._settings.listen_backoff_s
                except _FAILURES as exc:
                    log.info(
                        "upstream %s: change notifications interrupted (%s); retrying",
                        name,
                        type(exc).__name__,
                    )
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, self._settings.listen_backoff_max_s)
                except Exception:
                    # The top of a background task that shares the lifespan's task group with /mcp: an
                    # unforeseen failure is logged and retried, never allowed to take the endpoint down.
                    log.exception("upstream %s: watching for changes failed; retrying", name)
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, self._settings.listen_backoff_max_s)

    def _attach(self, name: str, client: UpstreamClient | None) -> ClientSession | None:
        if client is None:
            return None
        if client.on_notification is None:
            client.on_notification = partial(self._hub.upstream_notified, name)
        return client.live_session()

    async def _wait(self, name: str) -> None:
        """Until the wanted resources change or a watch interval passes (then a new session is seen)."""
        changed = self._hub.changed(name)
        with anyio.move_on_after(self._settings.watch_interval_s):
            await changed.wait()

    async def _subscribe(
        self, name: str, client: UpstreamClient, session: ClientSession, subscribed: set[str]
    ) -> None:
        caps = session.server_capabilities or types.ServerCapabilities()
        changed = self._hub.changed(name)  # before reading what is wanted: no change can slip between
        if caps.resources is not None and caps.resources.subscribe:
            wanted = self._hub.resources_wanted(name)
            for uri in sorted(wanted - subscribed):
                with anyio.fail_after(_REQUEST_TIMEOUT_S):
                    await session.send_request(
                        types.SubscribeRequest(params=types.SubscribeRequestParams(uri=uri)),
                        types.EmptyResult,
                    )
                subscribed.add(uri)
            for uri in sorted(subscribed - wanted):
                with anyio.fail_after(_REQUEST_TIMEOUT_S):
                    await session.send_request(
                        types.UnsubscribeRequest(params=types.UnsubscribeRequestParams(uri=uri)),
                        types.EmptyResult,
                    )
                subscribed.discard(uri)
        with anyio.move_on_after(self._settings.watch_interval_s):
            await changed.wait()

    async def _listen(self, name: str, client: UpstreamClient, session: ClientSession) -> None:
        caps = session.server_capabilities or types.ServerCapabilities()
        changed = self._hub.changed(name)
        resources = caps.resources
        uris = (
            sorted(self._hub.resources_wanted(name)) if resources is not None and resources.subscribe else []
        )
        tools = bool(caps.tools is not None and caps.tools.list_changed)
        prompts = bool(caps.prompts is not None and caps.prompts.list_changed)
        resource_list = bool(resources is not None and resources.list_changed)
        if not (tools or prompts or resource_list or uris):
            await self._wait(name)  # nothing to listen for
            return
        lost: list[BaseException] = []
        async with AsyncExitStack() as stack:
            with anyio.fail_after(_REQUEST_TIMEOUT_S):
                subscription = await stack.enter_async_context(
                    listen(
                        session,
                        tools_list_changed=tools,
                        prompts_list_changed=prompts,
                        resources_list_changed=resource_list,
                        resource_subscriptions=uris,
                    )
                )
            async with anyio.create_task_group() as tg:

                async def drain() -> None:
                    # The frames reach the hub through the client's message handler; reading them here
                    # only keeps the subscription's backlog empty. The stream's end ends the watch.
                    try:
                        async for _ in subscription:
                            pass
                        lost.append(EOFError("closed by the upstream"))  # retried after the backoff too
                    except _FAILURES as exc:
                        lost.append(exc)
                    tg.cancel_scope.cancel()

                tg.start_soon(drain)
                while client.live_session() is session and not changed.is_set():
                    with anyio.move_on_after(self._settings.watch_interval_s):
                        await changed.wait()
                tg.cancel_scope.cancel()  # re-listen with the new resources, or on the new session
        if lost:
            # It was open: a quiet stream outliving the client's read timeout (upstream call_timeout_s)
            # ends like this. Listen again after the first backoff step; failures to open back off further.
            log.debug("upstream %s: listen stream ended (%s)", name, type(lost[0]).__name__)
            await anyio.sleep(self._settings.listen_backoff_s)
