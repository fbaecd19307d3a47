"""The upstream registry: keeps the database rows, the connection pool and the in-memory catalog in step.

Both the admin API and ``arbiter demo`` register upstreams through ``create``; startup loads the rows and
the last discovered catalog from the database, so Arbiter serves lists before any upstream answers.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from arbiter.auth.outbound import CredentialSpec
from arbiter.auth.secrets import SecretBox
from arbiter.errors import ArbiterError, Conflict, InvalidInput, NotFound
from arbiter.net.urlcheck import check_upstream_url
from arbiter.proxy.breaker import State
from arbiter.proxy.catalog import Catalog, UpstreamCatalog
from arbiter.proxy.credentials import credential_to_store
from arbiter.proxy.definitions import UpstreamChanges, UpstreamDefinition
from arbiter.proxy.pool import UpstreamPool
from arbiter.proxy.retries import ToolSetting
from arbiter.proxy.upstream import UpstreamClient, UpstreamSpec
from arbiter.settings import UpstreamConfig, UpstreamPolicy
from arbiter.store import upstreams as repo
from arbiter.store.models import CatalogItem, ToolSettingRow, Upstream, utcnow
from arbiter.store.upstreams import Arrival

log = logging.getLogger(__name__)
_DB_DEADLINE_S = 30.0


class DefinitionJudge(Protocol):
    """The integrity scans of one new definition, in the light of the whole catalog (for shadowing)."""

    def __call__(
        self, upstream: str, kind: str, name: str, definition: Mapping[str, Any], catalog: Catalog
    ) -> list[dict[str, Any]]: ...


def spec_of(row: Upstream, config: UpstreamConfig | None = None) -> UpstreamSpec:
    return UpstreamSpec(
        name=row.name,
        transport=row.transport,
        url=row.url,
        command=tuple(row.command or ()),
        env=dict(config.env) if config else {},
        cwd=config.cwd if config else None,
        connect_timeout_s=row.connect_timeout_s,
        call_timeout_s=row.call_timeout_s,
        credential=CredentialSpec.from_json(row.credential),
        max_concurrency=row.max_concurrency,
        fallback=row.fallback,
    )


class UpstreamRegistry:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        pool: UpstreamPool,
        catalog: Catalog,
        policy: UpstreamPolicy,
        configured: Sequence[UpstreamConfig] = (),
        box: SecretBox | None = None,
        judge: DefinitionJudge | None = None,
        on_arrivals: Callable[[str, Sequence[Arrival]], None] | None = None,
        auto_approve_default: bool = False,
    ) -> None:
        self._auto_approve_default = auto_approve_default
        self._box = box or SecretBox(None)
        # Integrity (docs/integrity.md): what the scans say of a new definition, who hears of new ones,
        # and the review statuses last read from the database, per upstream id, to notice other
        # replicas' review decisions.
        self._judge = judge
        self._on_arrivals = on_arrivals
        self._reviewed: dict[int, frozenset[tuple[str, str]]] = {}
        self._sessions = sessions
        self._pool = pool
        self._catalog = catalog
        self._policy = policy
        self._configured = {c.name: c for c in configured}
        self._lock = anyio.Lock()  # serialises changes to which upstreams run in this process
        self._store_lock = anyio.Lock()

    @asynccontextmanager
    async def _db(self) -> AsyncGenerator[AsyncSession]:
        # Shielded, so a shutdown that cancels a background refresh cannot cut a database session in
        # half (aiosqlite then leaves its thread behind and the event loop never closes); bounded, so a
        # hung database cannot hold shutdown forever.
        with anyio.CancelScope(shield=True, deadline=anyio.current_time() + _DB_DEADLINE_S):
            async with self._sessions() as db:
                yield db

    # --- startup and background work ----------------------------------------------------------

    async def load(self) -> None:
        """Sync operator-defined upstreams into the table, then load rows and catalog into memory."""
        async with self._db() as db:
            rows = {r.name: r for r in (await db.exec(select(Upstream)))}
            for cfg in self._configured.values():
                row = rows.get(cfg.name) or Upstream(name=cfg.name, transport=cfg.transport, source="config")
                if row.source != "config":
                    log.warning("configured upstream %s replaces the API-defined one of that name", cfg.name)
                server = (row.url, row.command)
                credential = CredentialSpec.from_config(cfg.credential).to_json()
                repo.apply_config(row, cfg, credential, self._auto_approve_default)
                if row.id is not None and (row.url, row.command) != server:
                    await _forget_tool_settings(db, row.name)  # another server: its tools are others
                db.add(row)
                rows[cfg.name] = row
            for name, row in list(rows.items()):
                if row.source == "config" and name not in self._configured:
                    await db.delete(row)  # removed from the operator's configuration
                    await _forget_tool_settings(db, name)
                    del rows[name]
            await db.commit()
            items = await repo.present_items(db)
            self._pool.set_tool_settings(await _tool_settings(db))
        for row in rows.values():
            if row.enabled:
                assert row.id is not None
                await self._activate(row)
                self._catalog.put(UpstreamCatalog.from_stored(row.name, items.get(row.id, [])))

    async def reconcile(self) -> None:
        """Bring this process in line with the table, which other replicas' admin APIs change too."""
        async with self._lock:
            async with self._db() as db:
                rows = {
                    r.name: r for r in (await db.exec(select(Upstream).where(col(Upstream.enabled)))).all()
                }
                self._pool.set_tool_settings(await _tool_settings(db))
                reviewed = await repo.present_statuses(db)
            for name in set(self._pool.names()) - set(rows):
                log.info("upstream %s was disabled or removed elsewhere; dropping it", name)
                await self._deactivate(name)
            changed = [
                row
                for name, row in rows.items()
                if (client := self._pool.current(name)) is None or client.spec != self._spec(row)
            ]
            for row in changed:
                log.info("upstream %s was added or changed elsewhere; reconnecting", row.name)
                await self._activate(row)
            # Review decisions (approve, reject, disable) and definitions stored by other replicas.
            for name, row in rows.items():
                assert row.id is not None
                seen = reviewed.get(row.id, frozenset())
                if self._reviewed.get(row.id) != seen and name not in {c.name for c in changed}:
                    await self.reload_catalog(name)
                self._reviewed[row.id] = seen
        await self._discover_each([row.name for row in changed], "discovery")

    async def reload_catalog(self, name: str) -> None:
        """Serve an upstream's catalog as stored, with its review statuses (after a review decision)."""
        async with self._db() as db:
            row = await repo.by_name(db, name)
            if row is None or row.id is None or not row.enabled:
                return
            items = await repo.present_items(db, row.id)
        if self._pool.current(name) is not None:
            self._catalog.put(UpstreamCatalog.from_stored(name, items.get(row.id, [])))

    async def refresh_all(self) -> None:
        """Re-discover every enabled upstream; failures are logged and leave the last catalog in place."""
        await self._discover_each(self._pool.names(), "refresh")

    async def refresh_one(self, name: str) -> None:
        """Re-discover one upstream now (it said its lists changed); a failure is logged, as in a refresh."""
        if self._pool.current(name) is not None:
            await self._discover_each([name], "refresh")

    async def discover_new(self) -> None:
        """Discover upstreams never discovered before (e.g. just added to the operator's configuration)."""
        async with self._db() as db:
            query = select(Upstream.name).where(
                col(Upstream.enabled), col(Upstream.last_refresh_at).is_(None)
            )
            names = list((await db.exec(query)).all())
        await self._discover_each(names, "discovery")

    async def heal(self) -> None:
        """Retry discovery on upstreams that are down, so they come back into lists when they recover."""
        await self._discover_each(self._pool.down(), "recovery")

    async def _discover_each(self, names: Sequence[str], why: str) -> None:
        for name in names:
            try:
                await self._discover_and_store(name)
            except (ArbiterError, SQLAlchemyError, OSError) as exc:
                # One bad upstream (or a database blip) must not stop the others, or the loop.
                log.warning("%s of upstream %s failed: %s", why, name, exc)

    # --- admin operations ---------------------------------------------------------------------

    async def list(self) -> list[Upstream]:
        async with self._db() as db:
            return list((await db.exec(select(Upstream).order_by(col(Upstream.name)))).all())

    async def get(self, upstream_id: int) -> Upstream:
        async with self._db() as db:
            row = await db.get(Upstream, upstream_id)
        if row is None:
            raise NotFound(f"no upstream with id {upstream_id}")
        return row

    async def counts(self) -> dict[int, Counter[str]]:
        """Present catalog entries per upstream id and kind."""
        async with self._db() as db:
            return await repo.counts(db)

    async def create(self, data: UpstreamDefinition) -> Upstream:
        """Validate, connect, discover, then store the upstream and its catalog in one transaction."""
        await check_upstream_url(data.url, self._policy)
        credential = await credential_to_store(
            data.credential, CredentialSpec(), moved=False, box=self._box, policy=self._policy
        )
        async with self._lock:
            async with self._db() as db:
                if await repo.by_name(db, data.name) is not None:
                    raise Conflict(f"an upstream named {data.name!r} already exists", field="name")
            row = Upstream(
                name=data.name,
                transport=data.transport,
                url=data.url,
                connect_timeout_s=data.connect_timeout_s,
                call_timeout_s=data.call_timeout_s,
                enabled=data.enabled,
                auto_approve=data.auto_approve,
                credential=credential.to_json(),
                max_concurrency=data.max_concurrency,
                fallback=data.fallback,
            )
            snap = await self._try_spec(row, previous=None) if row.enabled else None
            row = await self._save(row, snap, new=True)
            log.info("registered upstream %s (%s)", row.name, row.transport)
            return row

    async def update(self, upstream_id: int, patch: UpstreamChanges) -> Upstream:
        """Change an upstream; the new definition must connect and discover before anything is saved."""
        changes = patch.fields()
        if patch.url is not None:
            await check_upstream_url(patch.url, self._policy)
        async with self._lock:
            async with self._db() as db:
                row = await repo.editable(db, upstream_id)
            if changes.get("fallback") == row.name:
                raise InvalidInput("an upstream cannot be its own fallback", field="fallback")
            previous = self._spec(row) if row.enabled else None
            moved = changes.get("url", row.url) != row.url
            if patch.credential is not None or moved:
                stored = CredentialSpec.from_json(row.credential)
                credential = await credential_to_store(
                    patch.credential, stored, moved=moved, box=self._box, policy=self._policy
                )
                row.credential = credential.to_json()
            for key, value in changes.items():
                setattr(row, key, value)
            # Network I/O outside any database session: discovery may take the upstream's full timeouts.
            snap = await self._try_spec(row, previous) if row.enabled else None
            row.updated_at = utcnow()
            # A new URL is another server: what an admin said of the old one's tools does not hold.
            row = await self._save(row, snap, new=False, forget_tool_settings=moved)
            if snap is None:
                await self._deactivate(row.name)
            return row

    async def delete(self, upstream_id: int) -> None:
        async with self._lock:
            async with self._db() as db:
                row = await repo.editable(db, upstream_id)
                await db.delete(row)  # catalog rows go with it (ON DELETE CASCADE)
                await _forget_tool_settings(db, row.name)  # keyed by name: gone with it, not inherited
                await db.commit()
                self._pool.set_tool_settings(await _tool_settings(db))
            await self._deactivate(row.name)

    async def refresh(self, upstream_id: int) -> Upstream:
        row = await self.get(upstream_id)
        if not row.enabled:
            raise Conflict(f"upstream {row.name!r} is disabled; enable it before refreshing")
        await self._discover_and_store(row.name)
        return await self.get(upstream_id)

    async def catalog_items(self, upstream_id: int | None = None) -> list[tuple[str, CatalogItem]]:
        """Present catalog entries with their upstream's name, optionally for one upstream."""
        async with self._db() as db:
            query = (
                select(Upstream.name, CatalogItem)
                .join(Upstream, col(Upstream.id) == col(CatalogItem.upstream_id))
                .where(col(CatalogItem.present))
                .order_by(col(Upstream.name), col(CatalogItem.kind), col(CatalogItem.name))
            )
            if upstream_id is not None:
                if await db.get(Upstream, upstream_id) is None:
                    raise NotFound(f"no upstream with id {upstream_id}")
                query = query.where(col(CatalogItem.upstream_id) == upstream_id)
            return [(name, item) for name, item in (await db.exec(query)).all()]

    async def tool_setting(self, upstream_id: int, tool: str) -> tuple[Upstream, ToolSettingRow | None]:
        """An upstream and what is set for one of its tools (None: nothing, the upstream's defaults)."""
        async with self._db() as db:
            return await _tool_setting(db, upstream_id, tool)

    async def put_tool_setting(
        self, upstream_id: int, tool: str, setting: ToolSetting, by: str
    ) -> ToolSettingRow:
        """Set one tool's settings; in force here at once, on other replicas at their next reconcile."""
        async with self._db() as db:
            row, stored = await _tool_setting(db, upstream_id, tool)
            stored = stored or ToolSettingRow(upstream=row.name, tool=tool)
            stored.idempotent = setting.idempotent
            stored.timeout_s = setting.timeout_s
            stored.updated_at = utcnow()
            stored.updated_by = by[:200]
            db.add(stored)
            await db.commit()
            await db.refresh(stored)
            self._pool.set_tool_settings(await _tool_settings(db))
            return stored

    def circuit(self, name: str) -> State | None:
        """The upstream's circuit in this replica (None when it does not run here)."""
        return self._pool.circuit(name)

    def status(self, row: Upstream) -> str:
        if not row.enabled:
            return "disabled"
        client = self._pool.current(row.name)
        if client is None or not self._pool.healthy(row.name):
            return "down"
        return "connected" if client.connected else "idle"

    # --- internals ----------------------------------------------------------------------------

    def _spec(self, row: Upstream) -> UpstreamSpec:
        return spec_of(row, self._configured.get(row.name))

    async def _activate(self, row: Upstream) -> UpstreamClient:
        return await self._pool.put(self._spec(row))

    async def _deactivate(self, name: str) -> None:
        await self._pool.remove(name)
        self._catalog.remove(name)

    async def _save(
        self, row: Upstream, snap: UpstreamCatalog | None, *, new: bool, forget_tool_settings: bool = False
    ) -> Upstream:
        """Store the row and its discovered catalog in one transaction, then serve that catalog
        (``forget_tool_settings``: and delete what was set for its tools)."""
        if snap is not None:
            row.last_refresh_at, row.last_error = utcnow(), None
        async with self._db() as db:
            if new:
                db.add(row)
                try:
                    await db.flush()
                except IntegrityError as exc:  # another replica registered the name just now
                    await self._pool.remove(row.name)
                    raise Conflict(f"an upstream named {row.name!r} already exists", field="name") from exc
            else:
                row = await db.merge(row)
            stored = None
            if snap is not None:
                assert row.id is not None
                stored = await self._store_items(db, row, snap)
            if forget_tool_settings:
                await _forget_tool_settings(db, row.name)
            await db.commit()
            if forget_tool_settings:
                self._pool.set_tool_settings(await _tool_settings(db))
        if snap is not None and stored is not None:
            self._catalog.put(self._arrived(row.name, snap, stored))
        return row

    async def _try_spec(self, row: Upstream, previous: UpstreamSpec | None) -> UpstreamCatalog:
        """Connect to ``row``'s definition and discover it; on failure restore ``previous`` (or nothing)."""
        was_up = self._pool.healthy(row.name)
        client = await self._activate(row)
        try:
            return await client.discover()
        except BaseException:
            # The candidate's failure says nothing about the definition that keeps serving.
            with anyio.CancelScope(shield=True):
                if previous is not None:
                    await self._pool.put(previous, up=was_up)
                else:
                    await self._pool.remove(row.name)
            raise

    async def _discover_and_store(self, name: str) -> UpstreamCatalog:
        client = self._pool.get(name)
        try:
            snap = await client.discover()
        except ArbiterError as exc:
            await self._record_error(name, exc.message)
            raise
        if self._pool.current(name) is not client:
            return snap  # changed or removed while we listed it: the old definition's catalog is moot
        # One writer per process; another replica storing the same definitions at the same moment
        # trips the unique constraint once, and the retry then finds its rows.
        async with self._store_lock:
            stored = None
            for attempt in (1, 2):
                try:
                    stored = await self._store(name, snap)
                    break
                except IntegrityError:
                    if attempt == 2:
                        raise
            if stored is None:
                return snap  # deleted meanwhile: nothing to serve
        served = self._arrived(name, snap, stored)
        self._catalog.put(served)
        return served

    async def _store(self, name: str, snap: UpstreamCatalog) -> repo.Stored | None:
        async with self._db() as db:
            row = await repo.by_name(db, name)
            if row is None:
                return None
            stored = await self._store_items(db, row, snap)
            row.last_refresh_at = utcnow()
            row.last_error = None
            await db.commit()
        return stored

    async def _store_items(self, db: AsyncSession, row: Upstream, snap: UpstreamCatalog) -> repo.Stored:
        """Store a discovered catalog; new definitions are judged and get their review status."""
        assert row.id is not None
        judge = self._judge
        name = row.name

        def judged(kind: str, entry: str, definition: Mapping[str, Any]) -> list[dict[str, Any]]:
            assert judge is not None
            return judge(name, kind, entry, definition, self._catalog)

        return await repo.store_catalog(
            db, row.id, snap.items(), auto_approve=row.auto_approve, judge=judged if judge else None
        )

    def _arrived(self, name: str, snap: UpstreamCatalog, stored: repo.Stored) -> UpstreamCatalog:
        """Once stored: tell who listens of new definitions, and serve only the approved ones."""
        if stored.arrivals and self._on_arrivals is not None:
            self._on_arrivals(name, stored.arrivals)
        return snap.holding(stored.statuses)

    async def _record_error(self, name: str, message: str) -> None:
        async with self._db() as db:
            row = await repo.by_name(db, name)
            if row is not None:
                row.last_error = message[:1000]
                await db.commit()


async def _tool_setting(
    db: AsyncSession, upstream_id: int, tool: str
) -> tuple[Upstream, ToolSettingRow | None]:
    """The upstream ``upstream_id`` (or NotFound) and the row stored for one of its tools, if any."""
    row = await db.get(Upstream, upstream_id)
    if row is None:
        raise NotFound(f"no upstream with id {upstream_id}")
    query = select(ToolSettingRow).where(ToolSettingRow.upstream == row.name, ToolSettingRow.tool == tool)
    return row, (await db.exec(query)).first()


async def _forget_tool_settings(db: AsyncSession, upstream: str) -> None:
    """Delete what was set for an upstream's tools (the upstream is gone, or is another server now)."""
    await db.exec(sa.delete(ToolSettingRow).where(col(ToolSettingRow.upstream) == upstream))  # type: ignore[call-overload]


async def _tool_settings(db: AsyncSession) -> dict[str, dict[str, ToolSetting]]:
    out: dict[str, dict[str, ToolSetting]] = {}
    for row in (await db.exec(select(ToolSettingRow))).all():
        out.setdefault(row.upstream, {})[row.tool] = ToolSetting(row.idempotent, row.timeout_s)
    return out
