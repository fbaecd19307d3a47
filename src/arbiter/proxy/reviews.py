"""Reviewing pinned definitions: what waits for a security admin, what changed, and their decisions.

Every discovered tool, prompt and resource template definition is a catalog row keyed by its sha256
(store/upstreams.py decides a new one's status). Agents are served only the present definitions whose
row is approved; this module lists them, shows the difference between an approved definition and its
replacement, and applies decisions: approve a specific hash, reject it, disable or re-enable an entry.
The state lives in the database, so every replica agrees (the registry re-reads it on reconcile).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import AsyncGenerator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from arbiter.audit.record import Event
from arbiter.errors import Conflict, InvalidInput, NotFound
from arbiter.naming import exposed_target
from arbiter.proxy.registry import UpstreamRegistry
from arbiter.store.models import CatalogItem, Upstream, utcnow
from arbiter.store.upstreams import PINNED_KINDS, Arrival, served

Action = Literal["approve", "reject", "disable", "enable"]
_DB_DEADLINE_S = 30.0
_MAX_DIFF_LINES = 2000


@dataclass(frozen=True)
class Selector:
    """One entry a decision is about; ``sha256`` names the exact definition (approve and reject)."""

    kind: str
    name: str
    sha256: str | None = None


@dataclass(frozen=True)
class Review:
    """An entry as a reviewer sees it: its present definition's status, and the approved one's hash."""

    upstream: str
    item: CatalogItem
    status: str
    approved: CatalogItem | None

    def summary(self) -> dict[str, Any]:
        """What an audit record of a decision keeps of the entry: hashes and counts, no definition text."""
        item = self.item
        return {
            "kind": item.kind,
            "name": item.name,
            "status": self.status,
            "sha256": item.sha256,
            "approved_sha256": self.approved.sha256 if self.approved is not None else None,
            "findings": len(item.findings or []),
        }


@dataclass(frozen=True)
class ReviewDetail(Review):
    """One entry in full: the approved and the present definition, their difference, the history."""

    diff: str = ""
    changed_fields: tuple[str, ...] = ()
    history: list[CatalogItem] = field(default_factory=list[CatalogItem])


class Reviews:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], registry: UpstreamRegistry) -> None:
        self._sessions = sessions
        self._registry = registry

    @asynccontextmanager
    async def _db(self) -> AsyncGenerator[AsyncSession]:
        with anyio.CancelScope(shield=True, deadline=anyio.current_time() + _DB_DEADLINE_S):
            async with self._sessions() as db:
                yield db

    async def list(self, upstream_id: int | None = None, status: str | None = None) -> list[Review]:
        """Present pinned entries (optionally of one upstream, or with one status), by upstream and name."""
        async with self._db() as db:
            if upstream_id is not None and await db.get(Upstream, upstream_id) is None:
                raise NotFound(f"no upstream with id {upstream_id}")
            query = (
                select(Upstream.name, CatalogItem)
                .join(Upstream, col(Upstream.id) == col(CatalogItem.upstream_id))
                .where(col(CatalogItem.kind).in_(PINNED_KINDS))
                .order_by(col(Upstream.name), col(CatalogItem.kind), col(CatalogItem.name))
            )
            if upstream_id is not None:
                query = query.where(col(CatalogItem.upstream_id) == upstream_id)
            rows = (await db.exec(query)).all()
        history: dict[tuple[int, str, str], list[CatalogItem]] = {}
        names: dict[int, str] = {}
        for name, item in rows:
            history.setdefault((item.upstream_id, item.kind, item.name), []).append(item)
            names[item.upstream_id] = name
        out: list[Review] = []
        for (uid, _, _), items in history.items():
            present = next((i for i in items if i.present), None)
            if present is None:
                continue  # no longer offered: nothing to review
            review = _review(names[uid], present, items)
            if status is None or review.status == status:
                out.append(review)
        return out

    async def detail(self, upstream_id: int, kind: str, name: str) -> ReviewDetail:
        async with self._db() as db:
            upstream, items = await _entry(db, upstream_id, kind, name)
        present = next((i for i in items if i.present), None) or max(items, key=lambda i: i.last_seen)
        base = _review(upstream.name, present, items)
        diff, changed = ("", ())
        if base.approved is not None and base.approved.sha256 != present.sha256:
            diff, changed = _diff(base.approved.definition, present.definition)
        history = sorted(items, key=lambda i: i.first_seen, reverse=True)
        return ReviewDetail(base.upstream, present, base.status, base.approved, diff, changed, history)

    async def decide(
        self,
        upstream_id: int,
        action: Action,
        selectors: Sequence[Selector],
        by: str,
        *,
        acknowledge_findings: bool = False,
    ) -> list[Review]:
        """Apply one decision to each selected entry, all or nothing; serve the result here at once."""
        async with self._db() as db:
            upstream = await db.get(Upstream, upstream_id)
            if upstream is None:
                raise NotFound(f"no upstream with id {upstream_id}")
            touched: list[tuple[str, str]] = []
            for sel in selectors:
                _, items = await _entry(db, upstream_id, sel.kind, sel.name)
                _apply(action, sel, items, by[:200], acknowledge_findings)
                touched.append((sel.kind, sel.name))
            await db.commit()
            upstream_name = upstream.name
        await self._registry.reload_catalog(upstream_name)
        reviews: list[Review] = []
        for kind, name in touched:
            detail = await self.detail(upstream_id, kind, name)
            reviews.append(Review(detail.upstream, detail.item, detail.status, detail.approved))
        return reviews


def _apply(action: Action, sel: Selector, items: list[CatalogItem], by: str, acknowledged: bool) -> None:
    now = utcnow()
    if action in ("disable", "enable"):
        for item in items:  # the entry, whatever definition of it comes next
            item.disabled = action == "disable"
        return
    if not sel.sha256:
        raise InvalidInput(
            f"{action} names the exact definition it is about: give its sha256", field="sha256"
        )
    chosen = next((i for i in items if i.sha256 == sel.sha256), None)
    if chosen is None:
        raise NotFound(f"{sel.kind} {sel.name!r} has no definition with sha256 {sel.sha256}")
    if action == "approve":
        if not chosen.present:
            # Approving what is not offered would hide what is, and pre-approve a switch nobody saw.
            raise Conflict(
                f"{sel.kind} {sel.name!r} at {sel.sha256[:12]} is not the definition its upstream offers "
                "now; approve the present one"
            )
        if chosen.findings and not acknowledged:
            raise Conflict(
                f"{sel.kind} {sel.name!r} at {sel.sha256[:12]} has {len(chosen.findings)} scan finding(s); "
                "review them and approve with acknowledge_findings=true",
                findings=len(chosen.findings),
            )
        for item in items:
            if item.status == "approved" and item is not chosen:
                item.status = "superseded"  # one approved definition per entry: the one reviewed last
        chosen.status = "approved"
    else:
        chosen.status = "rejected"
    chosen.reviewed_by, chosen.reviewed_at = by, now


async def _entry(
    db: AsyncSession, upstream_id: int, kind: str, name: str
) -> tuple[Upstream, list[CatalogItem]]:
    if kind not in PINNED_KINDS:
        raise InvalidInput(f"kind must be one of {sorted(PINNED_KINDS)}", field="kind")
    upstream = await db.get(Upstream, upstream_id)
    if upstream is None:
        raise NotFound(f"no upstream with id {upstream_id}")
    query = select(CatalogItem).where(
        CatalogItem.upstream_id == upstream_id, CatalogItem.kind == kind, CatalogItem.name == name
    )
    items = list((await db.exec(query)).all())
    if not items:
        raise NotFound(f"upstream {upstream.name!r} has no {kind} named {name!r}")
    return upstream, items


def _review(upstream: str, present: CatalogItem, items: Sequence[CatalogItem]) -> Review:
    approved = next((i for i in items if i.status == "approved"), None)
    return Review(upstream, present, served(present), approved)


def _diff(before: dict[str, Any], after: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """A unified diff of the two definitions as indented canonical JSON, and the top-level fields that
    differ (``description``, ``inputSchema``, ...)."""
    a = json.dumps(before, indent=2, sort_keys=True, ensure_ascii=True).splitlines()
    b = json.dumps(after, indent=2, sort_keys=True, ensure_ascii=True).splitlines()
    lines = list(difflib.unified_diff(a, b, "approved", "current", lineterm=""))
    if len(lines) > _MAX_DIFF_LINES:
        lines = [*lines[:_MAX_DIFF_LINES], f"... {len(lines) - _MAX_DIFF_LINES} more lines"]
    changed = tuple(sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k)))
    return "\n".join(lines), changed


def arrival_events(upstream: str, arrivals: Sequence[Arrival]) -> list[Event]:
    """Audit records of newly seen definitions that matter to a reviewer: quarantined (changed after
    approval), pending review, flagged by a scan, or approved by the upstream's auto-approve."""
    events: list[Event] = []
    for arrival in arrivals:
        item = arrival.item
        if item.kind not in PINNED_KINDS:
            continue
        status = served(item)
        reason = {
            "quarantined": "tool_quarantined",
            "approved": "auto_approved",
            "disabled": "definition_disabled",
        }.get(status, "pending_review")
        findings = [
            {"rule": f.get("rule"), "category": f.get("category"), "field": f.get("field")}
            for f in item.findings or []
        ]
        outcome: dict[str, Any] = {"status": status, "sha256": item.sha256, "findings": findings}
        if arrival.approved is not None:
            outcome["approved_sha256"] = arrival.approved.sha256
            outcome["changed_fields"] = list(_diff(arrival.approved.definition, item.definition)[1])
        events.append(
            Event(
                kind="integrity",
                decision="deny" if status != "approved" else "allow",
                reason=reason,
                actor={"system": "arbiter"},
                method=f"definition.{'changed' if arrival.approved is not None else 'discovered'}",
                tool=exposed_target(item.kind, upstream, item.name),
                upstream=upstream,
                target=item.name,
                outcome=outcome,
            )
        )
    return events
