"""The notification hub: upstream catalog changes and resource updates, fanned out to the agents who may
see them.

Agents listen in two ways: a handshake-era session (its standalone GET stream) and a 2026-07-28
``subscriptions/listen`` stream (``proxy/listeners.py`` registers both here, each with the principal that
opened it). Upstreams report through ``upstream_notified`` (``proxy/upstream_watch.py`` wires it to every
pooled client): a ``list_changed`` refreshes that upstream's catalog, at most once per
``notifications.refresh_interval_s``; the catalog's change hook then tells each listener whose principal
may see one of the entries that changed. A resource update reaches the listeners subscribed to that
resource that may still read it, under its exposed ``arbiter://`` URI; Arbiter subscribes upstream once
per resource however many agents subscribe.

Nothing here runs on the request path: deliveries go through a bounded queue per listener, drained by
the listener's own task, so a slow agent loses its own notifications and delays nobody else. A catalog
change is judged in the hub's task, not in ``Catalog.put``: once per policy identity (``identity``; the
listeners the policy cannot tell apart share one answer), yielding between identities, and at most
``notifications.max_changed_judged`` names one by one (a larger change is judged on the upstream as a
whole). Every decision re-reads the listener's principal (``current``): the listener of an API key
revoked or expired since it opened is closed at its next notification (a listen stream ends), and one
whose key's roles changed is judged with the new ones. A JWT's claims are fixed when the stream opens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.shared.subscriptions import (
    PromptsListChanged,
    ResourcesListChanged,
    ResourceUpdated,
    ServerEvent,
    ToolsListChanged,
)

from arbiter.auth.principal import Principal
from arbiter.errors import ArbiterError, PolicyDenied, RequestRejected
from arbiter.naming import exposed_uri, split_uri
from arbiter.proxy.catalog import Catalog, UpstreamCatalog
from arbiter.proxy.resource_uri import normalise, template_matches
from arbiter.proxy.targets import not_found
from arbiter.settings import NotificationSettings

log = logging.getLogger(__name__)

# (principal, "<upstream>/<target>", action) -> None: hidden, False: visible but refused, True: allowed
MayUse = Callable[[Principal, str, str], bool | None]
Refresh = Callable[[str], Awaitable[None]]
# The principal's policy identity: equal identities get equal visibility answers from MayUse.
Identity = Callable[[Principal], Hashable]
# The principal as its credential stands now; None once it is revoked or expired.
Current = Callable[[Principal], Principal | None]

TOOLS, PROMPTS, RESOURCES = "tools", "prompts", "resources"
ALL_KINDS = frozenset({TOOLS, PROMPTS, RESOURCES})
# Each list kind: the catalog fields it covers, the action that uses its entries, the event announcing it.
_KINDS: tuple[tuple[str, tuple[str, ...], str, ServerEvent], ...] = (
    (TOOLS, ("tools",), "call", ToolsListChanged()),
    (PROMPTS, ("prompts",), "get", PromptsListChanged()),
    (RESOURCES, ("resources", "resource_templates"), "read", ResourcesListChanged()),
)
_LIST_CHANGED = frozenset(
    {
        "notifications/tools/list_changed",
        "notifications/prompts/list_changed",
        "notifications/resources/list_changed",
    }
)
RESOURCE_UPDATED = "notifications/resources/updated"


_JUDGE_YIELD_EVERY = 256  # policy checks between two yields to the event loop, judging one change


class TooManyListeners(Exception):
    """``notifications.max_listeners`` are open already, or the caller's own share of them."""


class TooManySubscriptions(RequestRejected):
    """One session or listen stream asked for more resources than ``max_subscriptions_per_listener``."""

    code = "too_many_subscriptions"
    http_status = 429


@dataclass(eq=False)
class Listener:
    """One agent session or listen stream: who it is, what it asked for, and its queue."""

    principal: Principal
    kinds: frozenset[str]
    queue: MemoryObjectSendStream[ServerEvent]
    closed: bool = False
    # (upstream, the upstream's URI) of each resource it subscribed to
    resources: set[tuple[str, str]] = field(default_factory=set[tuple[str, str]])


class NotificationHub:
    def __init__(
        self,
        catalog: Catalog,
        may_use: MayUse,
        refresh: Refresh,
        settings: NotificationSettings,
        *,
        identity: Identity | None = None,
        current: Current | None = None,
    ) -> None:
        self._catalog = catalog
        self._may_use = may_use
        self._identity: Identity = identity or _itself
        self._current: Current = current or _itself
        self._refresh_upstream = refresh
        self._settings = settings
        self._listeners: set[Listener] = set()
        self._per_owner: dict[str, int] = {}  # Principal.key -> listeners open
        self._changes: dict[str, tuple[UpstreamCatalog | None, UpstreamCatalog | None]] = {}
        self._fanning: set[str] = set()  # upstreams whose changes a hub task is announcing
        self._subscribers: dict[tuple[str, str], set[Listener]] = {}
        self._pending: set[str] = set()  # upstreams with a refresh scheduled
        self._last_refresh: dict[str, float] = {}
        self._changed: dict[str, anyio.Event] = {}
        self._tg: TaskGroup | None = None
        catalog.on_change = self._catalog_changed

    async def run(self, stopping: anyio.Event) -> None:
        """Hold the task group that refreshes and delivery tasks run in, until ``stopping``."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                await stopping.wait()
            finally:
                self._tg = None
                for listener in list(self._listeners):
                    self.close(listener)  # listen streams end gracefully; session pumps return
                tg.cancel_scope.cancel()

    def spawn(self, work: Callable[[], Coroutine[Any, Any, None]]) -> bool:
        """Run ``work`` in the hub's task group; False when the hub is not running."""
        if self._tg is None:
            return False
        self._tg.start_soon(work)
        return True

    # --- agents ---------------------------------------------------------------------------------

    def open(
        self, principal: Principal, kinds: frozenset[str]
    ) -> tuple[Listener, MemoryObjectReceiveStream[ServerEvent]]:
        """Register a listener; the caller drains the returned stream and calls ``close`` at the end."""
        owner = principal.key
        held = self._per_owner.get(owner, 0)
        if (
            len(self._listeners) >= self._settings.max_listeners
            or held >= self._settings.max_listeners_per_principal
        ):
            raise TooManyListeners
        send, receive = anyio.create_memory_object_stream[ServerEvent](self._settings.buffer)
        listener = Listener(principal, kinds, send)
        self._listeners.add(listener)
        self._per_owner[owner] = held + 1
        return listener, receive

    def close(self, listener: Listener) -> None:
        if not listener.closed:
            listener.closed = True
            self._listeners.discard(listener)
            owner = listener.principal.key
            left = self._per_owner.get(owner, 1) - 1
            if left > 0:
                self._per_owner[owner] = left
            else:
                self._per_owner.pop(owner, None)
        for key in list(listener.resources):
            self._drop_subscriber(key, listener)
        listener.queue.close()

    def subscribe(self, listener: Listener, exposed: str) -> tuple[str, str]:
        """Subscribe ``listener`` to the resource at ``exposed`` (an ``arbiter://`` URI); returns the
        (upstream, upstream's URI) subscribed to.

        Resolved and authorized as ``resources/read`` would be: a resource the caller may not see is
        answered exactly like a missing one; one it sees but may not read is refused. At most
        ``max_subscriptions_per_listener`` resources per listener."""
        principal = self._current(listener.principal)
        if principal is None:
            raise PolicyDenied("your credential is no longer valid")
        upstream, target = self._readable(principal, exposed)
        key = (upstream, target)
        if key in listener.resources:
            return key
        if len(listener.resources) >= self._settings.max_subscriptions_per_listener:
            raise TooManySubscriptions(
                f"at most {self._settings.max_subscriptions_per_listener} resource subscriptions per "
                "session or listen stream"
            )
        listener.resources.add(key)
        subscribers = self._subscribers.setdefault(key, set())
        subscribers.add(listener)
        if len(subscribers) == 1:
            self._signal(upstream)  # the first subscriber: the watcher subscribes upstream
        return key

    def unsubscribe(self, listener: Listener, exposed: str) -> bool:
        """Whether ``listener`` was subscribed to ``exposed`` (it is not any more)."""
        parts = split_uri(exposed)
        if parts is None:
            return False
        dropped = False
        for key in [(parts[0], parts[1]), (parts[0], _normal_or_none(parts[1]))]:
            if key in listener.resources:
                listener.resources.discard(key)
                self._drop_subscriber(key, listener)
                dropped = True
        return dropped

    def _readable(self, principal: Principal, exposed: str) -> tuple[str, str]:
        method = "resources/read"  # answered exactly as a read of the same URI
        parts = split_uri(exposed)
        if parts is None:
            raise not_found(method, exposed)
        target = normalise(parts[1])
        snap = self._catalog.get(parts[0])
        if snap is None:
            raise not_found(method, exposed)
        if parts[1] in snap.resources:
            target = parts[1]
        if target not in snap.resources and not any(
            template_matches(template, target) for template in snap.resource_templates
        ):
            raise not_found(method, exposed)  # neither listed nor made by one of its templates
        allowed = self._may_use(principal, f"{parts[0]}/{target}", "read")
        if allowed is None:
            raise not_found(method, exposed)
        if not allowed:
            raise PolicyDenied(f"the policy does not allow you to read {exposed}")
        return parts[0], target

    def _drop_subscriber(self, key: tuple[str, str], listener: Listener) -> None:
        subscribers = self._subscribers.get(key)
        if subscribers is None:
            return
        subscribers.discard(listener)
        if not subscribers:
            del self._subscribers[key]
            self._signal(key[0])  # the last one left: the watcher unsubscribes upstream

    # --- upstreams ------------------------------------------------------------------------------

    def resources_wanted(self, upstream: str) -> frozenset[str]:
        """The upstream's own URIs that at least one agent is subscribed to."""
        return frozenset(uri for name, uri in self._subscribers if name == upstream)

    def changed(self, upstream: str) -> anyio.Event:
        """Set once ``resources_wanted(upstream)`` changes after this call."""
        event = self._changed.get(upstream)
        if event is None or event.is_set():
            event = self._changed[upstream] = anyio.Event()
        return event

    def _signal(self, upstream: str) -> None:
        event = self._changed.pop(upstream, None)
        if event is not None:
            event.set()

    def upstream_notified(self, upstream: str, method: str, params: dict[str, Any] | None) -> None:
        """An upstream's change notification. Never blocks: the work is scheduled."""
        if method in _LIST_CHANGED:
            self._schedule_refresh(upstream)
        elif method == RESOURCE_UPDATED and params is not None:
            uri = params.get("uri")
            if isinstance(uri, str):
                self._resource_updated(upstream, uri)

    def _schedule_refresh(self, upstream: str) -> None:
        if upstream in self._pending:
            return  # a refresh is already due: this change will be in it
        if self.spawn(lambda: self._refresh(upstream)):
            self._pending.add(upstream)

    async def _refresh(self, upstream: str) -> None:
        # Coalescing: at most one refresh per interval; a change announced while one runs schedules one
        # more (it may have been missed by the listing in flight).
        wait = self._last_refresh.get(upstream, -math.inf) + self._settings.refresh_interval_s
        delay = wait - anyio.current_time()
        if delay > 0:
            await anyio.sleep(delay)
        self._pending.discard(upstream)
        self._last_refresh[upstream] = anyio.current_time()
        try:
            await self._refresh_upstream(upstream)
        except Exception:
            # The top of a background task: a failed refresh leaves the last catalog; the next
            # list_changed or the refresh timer tries again.
            log.exception("refreshing the catalog of upstream %s failed", upstream)

    def _resource_updated(self, upstream: str, uri: str) -> None:
        key = (upstream, uri)
        subscribers = self._subscribers.get(key)
        if not subscribers:
            return
        event = ResourceUpdated(uri=exposed_uri(upstream, uri))
        for listener in list(subscribers):
            # Policy and credential now, not at subscription time: a reader whose access was withdrawn
            # hears nothing more.
            principal = self._current(listener.principal)
            if principal is None:
                self.close(listener)  # its credential was revoked or expired: told nothing more
            elif self._may_use(principal, f"{upstream}/{uri}", "read"):
                self._post(listener, event)

    def _catalog_changed(
        self, upstream: str, before: UpstreamCatalog | None, after: UpstreamCatalog | None
    ) -> None:
        """``Catalog.put``'s hook: only notes the change; the hub's task judges and announces it."""
        if not self._listeners:
            return
        pending = self._changes.get(upstream)
        self._changes[upstream] = (before if pending is None else pending[0], after)
        if upstream in self._fanning:
            return  # the running announcer takes it next
        if self.spawn(lambda: self._announce_changes(upstream)):
            self._fanning.add(upstream)
        else:
            del self._changes[upstream]  # the hub is not running: nobody is being told anything

    async def _announce_changes(self, upstream: str) -> None:
        try:
            while (change := self._changes.pop(upstream, None)) is not None:
                await self._announce(upstream, *change)
        except Exception:
            log.exception("announcing a catalog change of upstream %s failed", upstream)
        finally:
            self._fanning.discard(upstream)
            self._changes.pop(upstream, None)

    async def _announce(
        self, upstream: str, before: UpstreamCatalog | None, after: UpstreamCatalog | None
    ) -> None:
        cap = self._settings.max_changed_judged
        for kind, fields, action, event in _KINDS:
            changed = _changed_names(fields, before, after)
            if not changed:
                continue
            # Beyond the cap, judging name by name would cost too much: a listener is told if it may
            # see any entry of this kind on the upstream, before or after the change.
            names: Iterable[str] = changed if len(changed) <= cap else _all_names(fields, before, after)
            names = tuple(names)
            groups: dict[Hashable, list[Listener]] = {}
            principals: dict[Hashable, Principal] = {}
            for listener in list(self._listeners):
                if kind not in listener.kinds:
                    continue
                principal = self._current(listener.principal)
                if principal is None:
                    self.close(listener)  # its credential was revoked or expired: told nothing more
                    continue
                identity = self._identity(principal)
                groups.setdefault(identity, []).append(listener)
                principals.setdefault(identity, principal)
            for identity, members in groups.items():
                if await self._sees_any(principals[identity], upstream, names, action):
                    for listener in members:
                        self._post(listener, event)
                await anyio.lowlevel.checkpoint()  # one identity at a time: requests run in between

    async def _sees_any(
        self, principal: Principal, upstream: str, names: tuple[str, ...], action: str
    ) -> bool:
        for i, name in enumerate(names, 1):
            if self._may_use(principal, f"{upstream}/{name}", action) is not None:
                return True
            if i % _JUDGE_YIELD_EVERY == 0:
                await anyio.lowlevel.checkpoint()
        return False

    def _post(self, listener: Listener, event: ServerEvent) -> None:
        try:
            listener.queue.send_nowait(event)
        except anyio.WouldBlock:
            log.warning("an agent is not reading its notifications; dropped one (%s)", type(event).__name__)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.close(listener)


def _changed_names(
    fields: tuple[str, ...], before: UpstreamCatalog | None, after: UpstreamCatalog | None
) -> set[str]:
    """Names (tool/prompt names, resource URIs or templates) added, removed or changed in ``fields``."""
    changed: set[str] = set()
    for name in fields:
        old: dict[str, Any] = getattr(before, name) if before is not None else {}
        new: dict[str, Any] = getattr(after, name) if after is not None else {}
        changed.update(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    return changed


def _all_names(
    fields: tuple[str, ...], before: UpstreamCatalog | None, after: UpstreamCatalog | None
) -> set[str]:
    names: set[str] = set()
    for name in fields:
        for snap in (before, after):
            if snap is not None:
                names.update(getattr(snap, name))
    return names


def _itself(principal: Principal) -> Principal:
    return principal


# An RFC 6570 expression: reserved ({+x}) and fragment ({#x}) expansion may hold "/", the others not.


def _normal_or_none(uri: str) -> str:
    try:
        return normalise(uri)
    except ArbiterError:  # an ambiguous URI was never subscribed: nothing to drop
        return uri
