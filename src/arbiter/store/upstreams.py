"""Queries on the upstream and catalog tables, shared by the registry's admin and background paths."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import col, func, select
from sqlmodel.ext.asyncio.session import AsyncSession

from arbiter.errors import Conflict, NotFound
from arbiter.settings import UpstreamConfig
from arbiter.store.models import CatalogItem, Upstream, utcnow

# The kinds whose definitions are pinned and reviewed (tools, prompts, resource templates).
PINNED_KINDS = frozenset({"tool", "prompt", "resource_template"})
# (kind, name, definition, status) of a present definition.
Entry = tuple[str, str, dict[str, Any], str]
# What the scans say of a new definition: findings as JSON (empty: nothing found).
Judge = Callable[[str, str, Mapping[str, Any]], list[dict[str, Any]]]


@dataclass(frozen=True)
class Arrival:
    """A definition seen for the first time (its row is new) or offered again while held, and the
    approved one it differs from."""

    item: CatalogItem
    approved: CatalogItem | None


@dataclass
class Stored:
    """What ``store_catalog`` did: the new definitions, and every present entry's status."""

    arrivals: list[Arrival] = field(default_factory=list[Arrival])
    statuses: dict[tuple[str, str], str] = field(default_factory=dict[tuple[str, str], str])


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


async def present_items(db: AsyncSession, upstream_id: int | None = None) -> dict[int, list[Entry]]:
    """The latest discovered definitions, per upstream id, as (kind, name, definition, status)."""
    query = select(CatalogItem).where(col(CatalogItem.present))
    if upstream_id is not None:
        query = query.where(CatalogItem.upstream_id == upstream_id)
    grouped: dict[int, list[Entry]] = {}
    for item in (await db.exec(query)).all():
        grouped.setdefault(item.upstream_id, []).append((item.kind, item.name, item.definition, served(item)))
    return grouped


async def present_statuses(db: AsyncSession) -> dict[int, frozenset[tuple[str, str]]]:
    """(sha256, status) of every present definition, per upstream id: what replicas compare to notice
    another replica's review decisions without loading the definitions themselves (a definition's JSON
    holds its name, so its hash tells entries apart)."""
    query = select(
        CatalogItem.upstream_id, CatalogItem.sha256, CatalogItem.status, CatalogItem.disabled
    ).where(col(CatalogItem.present))
    grouped: dict[int, set[tuple[str, str]]] = {}
    for upstream_id, sha, status, disabled in (await db.exec(query)).all():
        grouped.setdefault(upstream_id, set()).add((sha, effective(status, disabled)))
    return {k: frozenset(v) for k, v in grouped.items()}


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
    db: AsyncSession,
    upstream_id: int,
    entries: Iterable[tuple[str, str, dict[str, Any]]],
    *,
    auto_approve: bool = False,
    judge: Judge | None = None,
) -> Stored:
    """Upsert the discovered definitions: unchanged ones get ``last_seen``, new ones a row of their own
    with its review status (see ``initial_status``) and what ``judge`` found in it."""
    now = utcnow()
    rows = list((await db.exec(select(CatalogItem).where(CatalogItem.upstream_id == upstream_id))).all())
    existing = {(i.kind, i.name, i.sha256): i for i in rows}
    history: dict[tuple[str, str], list[CatalogItem]] = {}
    for i in rows:
        history.setdefault((i.kind, i.name), []).append(i)
    seen: set[tuple[str, str, str]] = set()
    stored = Stored()
    for kind, name, definition in entries:
        key = (kind, name, canonical_sha256(definition))
        seen.add(key)
        item = existing.get(key)
        if item is None:
            prior = history.get((kind, name), [])
            findings = judge(kind, name, definition) if judge is not None and kind in PINNED_KINDS else []
            item = CatalogItem(
                upstream_id=upstream_id,
                kind=kind,
                name=name,
                definition=definition,
                sha256=key[2],
                first_seen=now,
                last_seen=now,
                status=initial_status(kind, prior, findings, auto_approve),
                # Disabling is about the tool, not one definition of it: it holds across changes, also
                # when the upstream left the entry out of a listing in between (decisions set every row).
                disabled=any(p.disabled for p in prior),
                findings=findings or None,
            )
            db.add(item)
            approved = next((p for p in prior if p.status == "approved"), None)
            stored.arrivals.append(Arrival(item, approved))
            await _prune(db, prior)
        else:
            if not item.present and served(item) != "approved":
                # Offered again after another definition (or none): a flip back to a superseded,
                # quarantined or rejected definition is as much a change as a new one; a reviewer hears.
                prior = history.get((kind, name), [])
                approved = next((p for p in prior if p.status == "approved" and p is not item), None)
                stored.arrivals.append(Arrival(item, approved))
            item.present = True
            item.last_seen = now
        stored.statuses[(kind, name)] = served(item)
    for key, item in existing.items():
        if key not in seen:
            item.present = False
    return stored


# Definitions kept per entry: an upstream changing a definition on every listing must not grow the table
# (and the review queue) without end. Approved and superseded ones are never pruned (they decide whether
# a change is quarantined); the oldest others that are no longer offered go first.
MAX_HISTORY = 20


async def _prune(db: AsyncSession, prior: Sequence[CatalogItem]) -> None:
    spare = [p for p in prior if not p.present and p.status not in ("approved", "superseded")]
    excess = len(prior) + 1 - MAX_HISTORY
    for item in sorted(spare, key=lambda p: p.last_seen)[: max(excess, 0)]:
        await db.delete(item)


def initial_status(kind: str, prior: Sequence[CatalogItem], findings: Sequence[object], auto: bool) -> str:
    """A new definition's status. Resources are not pinned (they are data, listed as the upstream has
    them). A changed definition of something once approved is quarantined until a security admin
    approves the new hash; auto-approve only ever applies to a name seen for the first time whose
    scans found nothing."""
    if kind not in PINNED_KINDS:
        return "approved"
    if any(p.status in ("approved", "superseded") for p in prior):
        return "quarantined"
    return "approved" if auto and not prior and not findings else "pending"


def effective(status: str, disabled: bool) -> str:
    """What a definition's row means for agents: ``approved`` is served; anything else is held."""
    if disabled:
        return "disabled"
    return "quarantined" if status == "superseded" else status


def served(item: CatalogItem) -> str:
    return effective(item.status, item.disabled)


def apply_config(
    row: Upstream, cfg: UpstreamConfig, credential: dict[str, Any] | None, auto_approve: bool = False
) -> None:
    """Make ``row`` the operator's definition; ``credential`` is its stored form (the column's JSON)."""
    row.transport = cfg.transport
    row.url = cfg.url
    row.command = list(cfg.command) if cfg.command else None
    row.connect_timeout_s = cfg.connect_timeout_s
    row.call_timeout_s = cfg.call_timeout_s
    row.enabled = cfg.enabled
    row.max_concurrency = cfg.max_concurrency
    row.fallback = cfg.fallback
    row.auto_approve = cfg.auto_approve if cfg.auto_approve is not None else auto_approve
    row.credential = credential
    row.source = "config"
    row.updated_at = utcnow()
