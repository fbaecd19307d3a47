"""The upstream side of change notifications: hear each upstream, and hold its resource subscriptions.

One watcher task per pooled upstream. It points the upstream's client at the hub
(``UpstreamClient.on_notification``) and keeps Arbiter's own subscriptions in line with what agents
subscribed to (``NotificationHub.resources_wanted``):

- a handshake-era upstream sends its notifications on the SDK client's GET stream; the watcher sends
  ``resources/subscribe`` / ``resources/unsubscribe`` once per resource, again after a reconnect;
- a 2026-07-28 upstream speaks only on ``subscriptions/listen`` streams: the watcher holds one open for
  the list kinds the upstream advertises ``listChanged`` for, and apart from it (if it advertises
  ``resources.subscribe``) the wanted resources, at most ``notifications.listen_max_resources`` per
  stream; only those are re-opened when the wanted resources change. Each stream re-opens after a drop
  with its own backoff. Their frames reach the hub through the same message handler.

Agents choose the URIs, so one agent's URI must not stop anybody else's: a URI the upstream refuses is
parked with its own backoff (doubling to ``listen_backoff_max_s``) while the others are subscribed; a
refused listen of several URIs is split in halves until the refused ones stand alone. Agents subscribing
and leaving are followed at most once per ``notifications.resubscribe_debounce_s``.

A watcher only uses a connection that requests opened (``UpstreamClient.live_session``): it never
connects, so it never marks an upstream down nor takes a slot from calls. Every failure is logged and
retried later; none reaches the request path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
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


@dataclass
class _Parked:
    until: float
    backoff: float


@dataclass
class _Resources:
    """One upstream's resource URIs that are failing: not asked for again before ``until`` (on ``clock``,
    the event loop's unless a test drives it)."""

    clock: Callable[[], float]
    parked: dict[str, _Parked] = field(default_factory=dict[str, _Parked])

    def ready(self, wanted: frozenset[str]) -> list[str]:
        """The wanted URIs not parked (now), in order; forgets parked ones nobody wants any more."""
        for uri in [uri for uri in self.parked if uri not in wanted]:
            del self.parked[uri]
        now = self.clock()
        return sorted(uri for uri in wanted if uri not in self.parked or self.parked[uri].until <= now)

    def park(self, uri: str, first: float, most: float) -> float:
        """Park ``uri`` for its next backoff (``first``, doubling to ``most``); returns that backoff."""
        held = self.parked.get(uri)
        backoff = first if held is None else min(held.backoff * 2, most)
        self.parked[uri] = _Parked(self.clock() + backoff, backoff)
        return backoff

    async def due(self, uri: str) -> None:
        """Until ``uri`` may be asked for again (by ``clock``, so a test moving it is heard: no event)."""
        while (held := self.parked.get(uri)) is not None and (left := held.until - self.clock()) > 0:  # noqa: ASYNC110
            await anyio.sleep(left)

    def release(self, uri: str) -> None:
        self.parked.pop(uri, None)

    def next_due(self, held: Collection[str] = ()) -> float | None:
        """Seconds until the first parked URI not in ``held`` (those wait on their own) is due."""
        due = [p.until for uri, p in self.parked.items() if uri not in held]
        if not due:
            return None
        return max(0.0, min(due) - self.clock())


class UpstreamWatch:
    def __init__(
        self,
        pool: UpstreamPool,
        hub: NotificationHub,
        settings: NotificationSettings,
        *,
        clock: Callable[[], float] = anyio.current_time,  # when a parked URI is due (tests drive it)
    ) -> None:
        self._pool = pool
        self._hub = hub
        self._settings = settings
        self._clock = clock

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
        failing = _Resources(self._clock)
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
                        await self._listen(name, client, session, failing)
                    else:
                        await self._subscribe(name, session, subscribed, failing)
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

    async def _settle(self, changed: anyio.Event, due: float | None = None) -> None:
        """Until the wanted resources change (then a little longer, so a burst of agents subscribing and
        leaving is followed once), a parked URI is due, or a watch interval passes."""
        wait = self._settings.watch_interval_s if due is None else min(due, self._settings.watch_interval_s)
        with anyio.move_on_after(wait):
            await changed.wait()
        if changed.is_set() and self._settings.resubscribe_debounce_s > 0:
            await anyio.sleep(self._settings.resubscribe_debounce_s)

    async def _subscribe(
        self, name: str, session: ClientSession, subscribed: set[str], failing: _Resources
    ) -> None:
        caps = session.server_capabilities or types.ServerCapabilities()
        changed = self._hub.changed(name)  # before reading what is wanted: no change can slip between
        if caps.resources is not None and caps.resources.subscribe:
            wanted = self._hub.resources_wanted(name)
            for uri in failing.ready(wanted):
                if uri in subscribed:
                    continue
                try:
                    with anyio.fail_after(_REQUEST_TIMEOUT_S):
                        await session.send_request(
                            types.SubscribeRequest(params=types.SubscribeRequestParams(uri=uri)),
                            types.EmptyResult,
                        )
                except (MCPError, TimeoutError) as exc:
                    # Refused (or unanswered) for this URI: parked, and the other URIs go on. A broken
                    # connection raises something else, and the whole pass is retried.
                    failing.park(uri, self._settings.listen_backoff_s, self._settings.listen_backoff_max_s)
                    log.info(
                        "upstream %s: a resource subscription was refused (%s)", name, type(exc).__name__
                    )
                    continue
                failing.release(uri)
                subscribed.add(uri)
            for uri in sorted(subscribed - wanted):
                with anyio.fail_after(_REQUEST_TIMEOUT_S):
                    await session.send_request(
                        types.UnsubscribeRequest(params=types.UnsubscribeRequestParams(uri=uri)),
                        types.EmptyResult,
                    )
                subscribed.discard(uri)
        await self._settle(changed, failing.next_due())

    async def _listen(
        self, name: str, client: UpstreamClient, session: ClientSession, failing: _Resources
    ) -> None:
        """Hold the list-change stream and the resource streams while ``session`` is the live one."""
        caps = session.server_capabilities or types.ServerCapabilities()
        resources = caps.resources
        subscribes = bool(resources is not None and resources.subscribe)
        lists = {
            "tools_list_changed": bool(caps.tools is not None and caps.tools.list_changed),
            "prompts_list_changed": bool(caps.prompts is not None and caps.prompts.list_changed),
            "resources_list_changed": bool(resources is not None and resources.list_changed),
        }
        if not any(lists.values()) and not subscribes:
            await self._wait(name)  # nothing to listen for
            return
        async with anyio.create_task_group() as tg:
            if any(lists.values()):
                tg.start_soon(self._hold_lists, name, session, lists)
            if subscribes:
                tg.start_soon(self._hold_resources, name, session, failing)
            while client.live_session() is session:  # noqa: ASYNC110 - no event marks a reconnect
                await anyio.sleep(self._settings.watch_interval_s)
            tg.cancel_scope.cancel()  # listen again on the new session

    async def _hold_lists(self, name: str, session: ClientSession, lists: dict[str, bool]) -> None:
        """The list-change stream: no agent's URI is in it, so none can make the upstream refuse it."""
        backoff = self._settings.listen_backoff_s
        while True:
            try:
                await self._stream(name, session, lists, ())
                backoff = self._settings.listen_backoff_s  # it was open: listen again after the first step
            except _FAILURES as exc:
                log.info(
                    "upstream %s: listening for list changes failed (%s); retrying", name, type(exc).__name__
                )
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, self._settings.listen_backoff_max_s)

    async def _hold_resources(self, name: str, session: ClientSession, failing: _Resources) -> None:
        """The wanted resources' streams, re-opened when the wanted resources change (and only then: a
        stream is never torn down just because time passed). A URI parked when they were opened gets a
        stream of its own once it is due; one refused while held waits in its own stream's task."""
        size = self._settings.listen_max_resources
        while True:
            changed = self._hub.changed(name)
            wanted = self._hub.resources_wanted(name)
            held: set[str] = set()
            async with anyio.create_task_group() as tg:
                while not changed.is_set():
                    uris = [uri for uri in failing.ready(wanted) if uri not in held]
                    held.update(uris)
                    for at in range(0, len(uris), size):
                        tg.start_soon(self._hold_uris, name, session, uris[at : at + size], failing, tg)
                    await self._settle(changed, failing.next_due(held))
                tg.cancel_scope.cancel()

    async def _hold_uris(
        self, name: str, session: ClientSession, uris: Sequence[str], failing: _Resources, tg: TaskGroup
    ) -> None:
        backoff = self._settings.listen_backoff_s

        def opened() -> None:
            for uri in uris:
                failing.release(uri)

        while True:
            try:
                await self._stream(name, session, {}, uris, opened)
                backoff = self._settings.listen_backoff_s
            except MCPError as exc:
                # The upstream refused this listen: one of its URIs, or their number. Halves are tried
                # on their own until each refused URI stands alone; that one is parked, and retried
                # (alone) after its own backoff.
                if len(uris) > 1:
                    half = len(uris) // 2
                    tg.start_soon(self._hold_uris, name, session, uris[:half], failing, tg)
                    tg.start_soon(self._hold_uris, name, session, uris[half:], failing, tg)
                    return
                parked = failing.park(
                    uris[0], self._settings.listen_backoff_s, self._settings.listen_backoff_max_s
                )
                log.info(
                    "upstream %s: a resource subscription was refused (%s); again in %gs",
                    name,
                    exc.error.code,
                    parked,
                )
                await failing.due(uris[0])
                continue
            except _FAILURES as exc:
                log.info(
                    "upstream %s: listening for resources failed (%s); retrying", name, type(exc).__name__
                )
            await anyio.sleep(backoff)
            backoff = min(backoff * 2, self._settings.listen_backoff_max_s)

    async def _stream(
        self,
        name: str,
        session: ClientSession,
        lists: dict[str, bool],
        uris: Sequence[str],
        opened: Callable[[], None] | None = None,
    ) -> None:
        """One ``subscriptions/listen`` stream, until the upstream ends it; raises if it cannot open."""
        async with AsyncExitStack() as stack:
            try:
                with anyio.fail_after(_REQUEST_TIMEOUT_S):
                    subscription = await stack.enter_async_context(
                        listen(
                            session,
                            tools_list_changed=lists.get("tools_list_changed", False),
                            prompts_list_changed=lists.get("prompts_list_changed", False),
                            resources_list_changed=lists.get("resources_list_changed", False),
                            resource_subscriptions=list(uris),
                        )
                    )
            except RuntimeError as exc:
                # The session closed under the watcher (its task group is gone: the connection ended, or
                # Arbiter is stopping) before it noticed: a dropped connection, not a failure to report.
                raise anyio.ClosedResourceError from exc
            if opened is not None:
                opened()
            # The frames reach the hub through the client's message handler; reading them here only
            # keeps the subscription's backlog empty. A quiet stream outliving the client's read timeout
            # (upstream call_timeout_s) ends too, and is listened to again.
            async for _ in subscription:
                pass
        log.debug("upstream %s: a listen stream ended", name)
