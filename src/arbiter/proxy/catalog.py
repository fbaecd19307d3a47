"""The in-memory catalog agents are served from: what each upstream offers, renamed for agents.

Lists are precomputed once per change, so ``tools/list`` and call routing never touch the database or
the upstreams. Discovery (``discover``) fans out to an upstream and builds its snapshot.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import mcp_types as types
from mcp.client.session import ClientSession
from pydantic import BaseModel

from arbiter.naming import exposed_name, exposed_uri
from arbiter.proxy.health import Health

# Each kind of entry and the UpstreamCatalog field that holds it.
KIND_FIELDS = {
    "tool": "tools",
    "resource": "resources",
    "resource_template": "resource_templates",
    "prompt": "prompts",
}
_MAX_PAGES = 100
# In a tools/list result's _meta: the upstreams that are down, whose tools are missing from the list.
UNAVAILABLE_META = "arbiter/unavailable"
# Catalog rows key entries by name/URI in a bounded column; an upstream offering longer ones is odd.
MAX_NAME_LENGTH = 1024
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpstreamCatalog:
    """What one upstream offers, keyed by its own names (tool/prompt name, resource URI or template)."""

    upstream: str
    tools: dict[str, dict[str, Any]] = field(default_factory=dict[str, dict[str, Any]])
    resources: dict[str, dict[str, Any]] = field(default_factory=dict[str, dict[str, Any]])
    resource_templates: dict[str, dict[str, Any]] = field(default_factory=dict[str, dict[str, Any]])
    prompts: dict[str, dict[str, Any]] = field(default_factory=dict[str, dict[str, Any]])
    # Definitions the upstream offers that agents may not use yet, (kind, name) -> status (pending,
    # quarantined, rejected, disabled; see store/upstreams.py): never listed, and a call to one is
    # refused naming its status (interceptors/integrity.py), to callers the policy lets see it.
    held: dict[tuple[str, str], str] = field(default_factory=dict[tuple[str, str], str])

    def entries(self, kind: str) -> dict[str, dict[str, Any]]:
        entries: dict[str, dict[str, Any]] = getattr(self, KIND_FIELDS[kind])
        return entries

    def items(self) -> Iterable[tuple[str, str, dict[str, Any]]]:
        """(kind, name, definition) for every entry."""
        for kind in KIND_FIELDS:
            for name, definition in self.entries(kind).items():
                yield kind, name, definition

    @classmethod
    def from_items(cls, upstream: str, items: Iterable[tuple[str, str, dict[str, Any]]]) -> UpstreamCatalog:
        snap = cls(upstream)
        for kind, name, definition in items:
            snap.entries(kind)[name] = definition
        return snap

    @classmethod
    def from_stored(
        cls, upstream: str, entries: Iterable[tuple[str, str, dict[str, Any], str]]
    ) -> UpstreamCatalog:
        """A snapshot of stored definitions with their statuses: only approved ones are served."""
        entries = list(entries)
        snap = cls.from_items(upstream, [(kind, name, d) for kind, name, d, _ in entries])
        return snap.holding({(kind, name): status for kind, name, _, status in entries})

    def holding(self, statuses: Mapping[tuple[str, str], str]) -> UpstreamCatalog:
        """This snapshot with every entry whose status is not ``approved`` held out of sight (an entry
        without a status is held as pending: nothing is served unreviewed by accident)."""
        snap = UpstreamCatalog(self.upstream)
        for kind, name, definition in self.items():
            status = statuses.get((kind, name), "pending")
            if status == "approved":
                snap.entries(kind)[name] = definition
            else:
                snap.held[(kind, name)] = status
        return snap


@dataclass(frozen=True)
class Views:
    """Agent-facing lists and lookup tables, rebuilt whenever any upstream's snapshot changes."""

    tools: list[dict[str, Any]]
    resources: list[dict[str, Any]]
    resource_templates: list[dict[str, Any]]
    prompts: list[dict[str, Any]]
    # exposed tool name -> input schema, for the SDK's Mcp-Param header validation
    input_schemas: dict[str, dict[str, Any]]
    # Upstreams hidden because they are down -> their own tool names: tools/list names them as missing
    # to callers who could see one of those tools (see interceptors/forward.py and authorize.py).
    unavailable_tools: dict[str, tuple[str, ...]] = field(default_factory=dict[str, tuple[str, ...]])


class Catalog:
    """Snapshots per upstream plus the merged, renamed views; replaced atomically, read lock-free."""

    def __init__(self, health: Health | None = None) -> None:
        self._snaps: dict[str, UpstreamCatalog] = {}
        # Which upstreams are down: the pool's (it alone writes it); read here, never told.
        self._health = health or Health()
        self._views = Views([], [], [], [], {})
        self._built_for = self._health.version
        # Told (upstream, before, after) when an upstream's snapshot changes (proxy/notifications.py).
        self.on_change: Callable[[str, UpstreamCatalog | None, UpstreamCatalog | None], None] | None = None

    def put(self, snap: UpstreamCatalog) -> None:
        before = self._snaps.get(snap.upstream)
        self._snaps[snap.upstream] = snap
        self._rebuild()
        if self.on_change is not None and before != snap:
            self.on_change(snap.upstream, before, snap)

    @property
    def views(self) -> Views:
        """The merged lists, without down upstreams' entries; rebuilt when a snapshot or health changed."""
        if self._built_for != self._health.version:
            self._rebuild()
        return self._views

    def remove(self, upstream: str) -> None:
        before = self._snaps.pop(upstream, None)
        self._rebuild()
        if self.on_change is not None and before is not None:
            self.on_change(upstream, before, None)

    def get(self, upstream: str) -> UpstreamCatalog | None:
        """An upstream's snapshot, also while it is down (so a call names it unavailable, not unknown)."""
        return self._snaps.get(upstream)

    def hidden(self) -> list[str]:
        """Upstreams whose entries the lists leave out because they are down."""
        return [name for name in sorted(self._snaps) if not self._health.up(name)]

    def tool_notice(self, upstream: str, name: str) -> str | None:
        """Why a report on who may call ``upstream``'s tool ``name`` is about the policy alone: the catalog
        has no such tool, or holds it back from agents (its review status); None when agents are served it."""
        snap = self._snaps.get(upstream)
        status = snap.held.get(("tool", name)) if snap is not None else None
        if snap is None or (name not in snap.tools and status is None):
            return f"no tool {exposed_name(upstream, name)} in the catalog; showing what the policy says"
        if status is not None:
            return f"{exposed_name(upstream, name)} is not approved for agents ({status})"
        return None

    def upstreams(self) -> list[str]:
        return sorted(self._snaps)

    def _rebuild(self) -> None:
        tools: list[dict[str, Any]] = []
        resources: list[dict[str, Any]] = []
        templates: list[dict[str, Any]] = []
        prompts: list[dict[str, Any]] = []
        schemas: dict[str, dict[str, Any]] = {}
        unavailable: dict[str, tuple[str, ...]] = {}
        self._built_for = self._health.version  # before reading it: a change meanwhile rebuilds again
        for name in sorted(self._snaps):
            if not self._health.up(name):
                if self._snaps[name].tools:
                    unavailable[name] = tuple(self._snaps[name].tools)
                continue
            snap = self._snaps[name]
            for tool_name, tool in snap.tools.items():
                exposed = exposed_name(name, tool_name)
                tools.append({**tool, "name": exposed})
                schemas[exposed] = tool.get("inputSchema") or {}
            for uri, res in snap.resources.items():
                resources.append(
                    {**res, "uri": exposed_uri(name, uri), "name": exposed_name(name, res["name"])}
                )
            for tmpl, res in snap.resource_templates.items():
                templates.append(
                    {**res, "uriTemplate": exposed_uri(name, tmpl), "name": exposed_name(name, res["name"])}
                )
            for prompt_name, prompt in snap.prompts.items():
                prompts.append({**prompt, "name": exposed_name(name, prompt_name)})
        self._views = Views(tools, resources, templates, prompts, schemas, unavailable)


async def discover(upstream: str, session: ClientSession) -> UpstreamCatalog:
    """List everything an upstream offers (following pagination) for the capabilities it declares."""
    caps = session.server_capabilities or types.ServerCapabilities()
    snap = UpstreamCatalog(upstream)

    async def tools(cursor: str | None) -> Page:
        page = await session.list_tools(params=types.PaginatedRequestParams(cursor=cursor))
        return [(t.name, t) for t in page.tools], page.next_cursor

    async def resources(cursor: str | None) -> Page:
        page = await session.list_resources(params=types.PaginatedRequestParams(cursor=cursor))
        return [(str(r.uri), r) for r in page.resources], page.next_cursor

    async def templates(cursor: str | None) -> Page:
        page = await session.list_resource_templates(params=types.PaginatedRequestParams(cursor=cursor))
        return [(t.uri_template, t) for t in page.resource_templates], page.next_cursor

    async def prompts(cursor: str | None) -> Page:
        page = await session.list_prompts(params=types.PaginatedRequestParams(cursor=cursor))
        return [(p.name, p) for p in page.prompts], page.next_cursor

    if caps.tools is not None:
        await _collect(tools, snap.tools)
    if caps.resources is not None:
        await _collect(resources, snap.resources)
        await _collect(templates, snap.resource_templates)
    if caps.prompts is not None:
        await _collect(prompts, snap.prompts)
    return snap


Page = tuple[list[tuple[str, BaseModel]], str | None]


async def _collect(fetch: Callable[[str | None], Awaitable[Page]], into: dict[str, dict[str, Any]]) -> None:
    cursor: str | None = None
    for _ in range(_MAX_PAGES):
        items, cursor = await fetch(cursor)
        for key, model in items:
            if len(key) > MAX_NAME_LENGTH:
                log.warning("skipping an upstream entry whose name is %d characters long", len(key))
                continue
            into[key] = model.model_dump(by_alias=True, mode="json", exclude_none=True)
        if not cursor:
            return
