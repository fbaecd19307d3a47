"""Queries on the upstream and catalog tables, shared by the registry's admin and background paths."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from arbiter.errors import Conflict, NotFound
from arbiter.settings import UpstreamConfig
from arbiter.store.models import CatalogItem, Upstream, utcnow


def canonical_sha256(definition: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace, UTF-8) of a definition."""
    data = json.dumps(definition, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(data.encode()).hexdigest()


async def by_name(db: AsyncSession, name: str) -> Upstream | None:
    return (await db.exec(select(Upstream).where(Upstream.name == name))).first()


async def editable(db: AsyncSession, upstream_id: int) -> Upstream:
    """The row an admin may change: it exists and was not defined by the operator's configuration."""
    row = await db.get(Upstream, upstream_id)
    if row is None:
        raise NotFound(f"no upstream with id {upstream_id}")
    if row.source == "config":
        raise Conflict(
            f"upstream {row.name!r} is defined in the operator's configuration; change it there",
            source="config",
        )
    return row


async def present_items(db: AsyncSession) -> dict[int, list[tuple[str, str, dict[str, Any]]]]:
    """The latest discovered definitions, per upstream id, as (kind, name, definition)."""
    grouped: dict[int, list[tuple[str, str, dict[str, Any]]]] = {}
    for item in (await db.exec(select(CatalogItem).where(col(CatalogItem.present)))).all():
        grouped.setdefault(item.upstream_id, []).append((item.kind, item.name, item.definition))
    return grouped


async def counts(db: AsyncSession) -> dict[int, Counter[str]]:
    """How many present entries of each kind every upstream has, in one query."""
    query = (
        select(CatalogItem.upstream_id, CatalogItem.kind, func.count())
        .where(col(CatalogItem.present))
        .group_by(col(CatalogItem.upstream_id), col(CatalogItem.kind))
    )
    out: dict[int, Counter[str]] = {}
    for upstream_id, kind, n in (await db.exec(query)).all():
        out.setdefault(upstream_id, Counter())[kind] = n
    return out


async def store_catalog(
    db: AsyncSession, upstream_id: int, entries: Iterable[tuple[str, str, dict[str, Any]]]
) -> None:
    """Upsert the discovered definitions: unchanged ones get ``last_seen``, new ones a row of their own."""
    now = utcnow()
    existing = {
        (i.kind, i.name, i.sha256): i
        for i in (await db.exec(select(CatalogItem).where(CatalogItem.upstream_id == upstream_id))).all()
    }
    seen: set[tuple[str, str, str]] = set()
    for kind, name, definition in entries:
        key = (kind, name, canonical_sha256(definition))
        seen.add(key)
        item = existing.get(key)
        if item is None:
            db.add(
                CatalogItem(
                    upstream_id=upstream_id,
                    kind=kind,
                    name=name,
                    definition=definition,
                    sha256=key[2],
                    first_seen=now,
                    last_seen=now,
                )
            )
        else:
            item.present = True
            item.last_seen = now
    for key, item in existing.items():
        if key not in seen:
            item.present = False


def apply_config(row: Upstream, cfg: UpstreamConfig, credential: dict[str, Any] | None) -> None:
    """Make ``row`` the operator's definition; ``credential`` is its stored form (the column's JSON)."""
    row.transport = cfg.transport
    row.url = cfg.url
    row.command = list(cfg.command) if cfg.command else None
    row.connect_timeout_s = cfg.connect_timeout_s
    row.call_timeout_s = cfg.call_timeout_s
    row.enabled = cfg.enabled
    row.max_concurrency = cfg.max_concurrency
    row.fallback = cfg.fallback
    row.credential = credential
    row.source = "config"
    row.updated_at = utcnow()
