"""Storage on SQLite and PostgreSQL: the same tests against both, through migrations and the registry."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from pydantic import SecretStr

from arbiter.app import create_app
from arbiter.errors import SchemaOutOfDate
from arbiter.proxy.catalog import UpstreamCatalog
from arbiter.settings import Settings
from arbiter.store import schema
from arbiter.store.db import create_engine, session_factory
from arbiter.store.models import CatalogItem, Upstream
from arbiter.store.upstreams import canonical_sha256, store_catalog
from tests.conftest import ADMIN_TOKEN, ArbiterFactory, UpstreamProc


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """An empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


async def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: sa.inspect(c).get_table_names()))
    finally:
        await engine.dispose()


def test_migrations_upgrade_from_empty_to_head_and_back(empty_db: str) -> None:
    assert asyncio.run(_tables(empty_db)) == set()
    schema.upgrade(empty_db)
    assert asyncio.run(_tables(empty_db)) == {
        "alembic_version",
        "upstreams",
        "catalog_items",
        "api_keys",
        "policy_rules",
        "policy_state",
        "audit_events",
        "audit_chain",
        "audit_checkpoints",
        "limit_rules",
        "limit_budgets",
        "limit_tool_costs",
        "limit_state",
        "limit_usage",
        "limit_spend",
        "tool_settings",
        "console_sessions",
        "console_logins",
        "approval_uses",
        "approval_requests",
    }
    schema.downgrade(empty_db, "0001")  # one step at a time works too
    assert "api_keys" not in asyncio.run(_tables(empty_db))
    schema.upgrade(empty_db)
    engine = create_engine(empty_db)
    assert asyncio.run(schema.current_revision(engine)) == schema.head_revision()
    asyncio.run(engine.dispose())
    schema.downgrade(empty_db, "base")
    assert asyncio.run(_tables(empty_db)) == {"alembic_version"}


async def _start(app: FastAPI) -> None:
    async with app.router.lifespan_context(app):
        pass


def test_app_refuses_a_database_that_is_behind(empty_db: str) -> None:
    app = create_app(Settings(database_url=empty_db, admin_token=SecretStr(ADMIN_TOKEN)))
    with pytest.raises(SchemaOutOfDate) as err:
        asyncio.run(_start(app))
    assert "run `arbiter migrate`" in str(err.value)
    schema.upgrade(empty_db)
    asyncio.run(_start(create_app(Settings(database_url=empty_db, admin_token=SecretStr(ADMIN_TOKEN)))))


async def _rows(url: str) -> tuple[list[Upstream], list[CatalogItem]]:
    engine = create_engine(url)
    try:
        async with session_factory(engine)() as db:
            ups = list((await db.exec(sa.select(Upstream))).scalars())  # pyright: ignore[reportCallIssue, reportArgumentType]
            items = list((await db.exec(sa.select(CatalogItem))).scalars())  # pyright: ignore[reportCallIssue, reportArgumentType]
            return ups, items
    finally:
        await engine.dispose()


async def _store(url: str, upstream_id: int, snap: UpstreamCatalog) -> None:
    engine = create_engine(url)
    try:
        async with session_factory(engine)() as db:
            await store_catalog(db, upstream_id, snap.items())
            await db.commit()
    finally:
        await engine.dispose()


def test_registry_stores_upstreams_and_versioned_catalog(
    empty_db: str, arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc
) -> None:
    schema.upgrade(empty_db)
    server = arbiter_factory(database_url=empty_db)
    created = server.register("crm", crm_upstream.url)

    ups, items = asyncio.run(_rows(empty_db))
    assert [(u.name, u.transport, u.url, u.source) for u in ups] == [
        ("crm", "streamable_http", crm_upstream.url, "api")
    ]
    tools = {i.name: i for i in items if i.kind == "tool"}
    assert set(tools) == {"get_customer", "list_tickets", "create_ticket", "delete_customer"}
    for item in items:
        assert item.sha256 == canonical_sha256(item.definition)
        assert item.present and item.first_seen <= item.last_seen

    # A changed definition is a new row; the old one is kept but no longer present; unchanged ones persist.
    snap = UpstreamCatalog.from_items("crm", [(i.kind, i.name, i.definition) for i in items])
    snap.tools["get_customer"] = {**snap.tools["get_customer"], "description": "changed upstream-side"}
    del snap.tools["delete_customer"]
    asyncio.run(_store(empty_db, created["id"], snap))
    _, after = asyncio.run(_rows(empty_db))
    by_key = {(i.name, i.sha256): i for i in after if i.kind == "tool"}
    assert len(by_key) == 5
    old = by_key[("get_customer", tools["get_customer"].sha256)]
    new = next(i for (n, _), i in by_key.items() if n == "get_customer" and i is not old)
    assert not old.present and new.present
    assert new.definition["description"] == "changed upstream-side"
    assert not by_key[("delete_customer", tools["delete_customer"].sha256)].present
    kept = by_key[("list_tickets", tools["list_tickets"].sha256)]
    assert kept.present and kept.first_seen == tools["list_tickets"].first_seen
    assert kept.last_seen > tools["list_tickets"].last_seen

    # Deleting the upstream deletes its catalog with it.
    with server.admin() as admin:
        assert admin.delete(f"/upstreams/{created['id']}").status_code == 204
    assert asyncio.run(_rows(empty_db)) == ([], [])


def test_catalog_survives_restart_without_upstream(empty_db: str, arbiter_factory: ArbiterFactory) -> None:
    schema.upgrade(empty_db)
    crm = UpstreamProc("arbiter.demo.crm").start()
    try:
        first = arbiter_factory(database_url=empty_db)
        first.register("crm", crm.url)
        first.stop()
    finally:
        crm.kill()
    # Restarted with the upstream gone: the stored catalog is loaded from the database, not rediscovered.
    second = arbiter_factory(database_url=empty_db)
    snap = second.app.state.runtime.catalog.get("crm")
    assert snap is not None and len(snap.tools) == 4


async def _columns(url: str, table: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda c: {col["name"] for col in sa.inspect(c).get_columns(table)})
    finally:
        await engine.dispose()


async def _count(url: str, table: str) -> int:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return int((await conn.execute(sa.text(f"SELECT count(*) FROM {table}"))).scalar_one())
    finally:
        await engine.dispose()


async def _add_upstream_with_credential(url: str, credential: dict[str, Any]) -> None:
    engine = create_engine(url)
    try:
        async with session_factory(engine)() as db:
            row = Upstream(
                name="crm", transport="streamable_http", url="http://crm/mcp", credential=credential
            )
            db.add(row)
            await db.flush()
            assert row.id is not None
            await store_catalog(db, row.id, [("tool", "t", {"name": "t"})])
            await db.commit()
    finally:
        await engine.dispose()


def test_credential_column_migrates_both_ways_and_keeps_the_catalog(empty_db: str) -> None:
    schema.upgrade(empty_db)
    credential = {"kind": "header", "header": "X-Api-Key", "value_sealed": "gAAAA-not-a-secret"}
    asyncio.run(_add_upstream_with_credential(empty_db, credential))
    [row], _ = asyncio.run(_rows(empty_db))
    assert row.credential == credential
    schema.downgrade(empty_db, "0002")
    assert "credential" not in asyncio.run(_columns(empty_db, "upstreams"))
    # Dropping the column must not drop (and so cascade-delete from) the upstreams table on SQLite.
    assert asyncio.run(_count(empty_db, "catalog_items")) == 1
    schema.upgrade(empty_db)
    [row], items = asyncio.run(_rows(empty_db))
    assert row.credential is None and len(items) == 1


async def test_sqlite_commits_are_synced_to_disk(tmp_path: Any) -> None:
    # An answered call's audit record must survive a power cut, not only a killed process: every
    # commit is synced (FULL, 2), whatever default this SQLite build was compiled with.
    engine = create_engine(f"sqlite:///{tmp_path / 'synced.db'}")
    try:
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql("PRAGMA synchronous")).scalar() == 2
            assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
    finally:
        await engine.dispose()
