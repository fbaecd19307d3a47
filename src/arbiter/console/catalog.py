"""Overview, upstreams and their tool definitions, and the review of a changed definition.

Reading needs ``admin:read`` on ``admin/upstreams``; approving or rejecting is for security admins only,
as on ``/admin/v1`` (admin/definitions.py), through the same ``Reviews.decide`` and recorded as the same
admin change, attributed to the person.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal
from urllib.parse import quote

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Form, Request, Response
from sqlmodel import col

from arbiter.audit.activity import DEFAULT_WINDOW, WINDOWS, activity
from arbiter.audit.activity import window as activity_window
from arbiter.audit.events import admin_change
from arbiter.audit.record import now_ms
from arbiter.console.charts import overview_charts
from arbiter.console.paging import paginate
from arbiter.console.web import ConsoleRoute, Viewer, form_viewer, redirect, render, viewer
from arbiter.naming import exposed_target
from arbiter.proxy.reviews import Review, Reviews, Selector
from arbiter.store.models import CatalogItem, Upstream
from arbiter.store.upstreams import PINNED_KINDS

router = APIRouter(route_class=ConsoleRoute)

Who = Annotated[Viewer, Depends(viewer)]
Kind = Literal["tool", "prompt", "resource_template"]
REVIEW_QUEUE = ("pending", "quarantined")
PAGE = 50


def _reviews(who: Viewer) -> Reviews:
    return Reviews(who.rt.sessions, who.rt.registry)


def _upstream_row(who: Viewer, row: Upstream, counts: dict[int, Any]) -> dict[str, Any]:
    reg = who.rt.registry
    assert row.id is not None
    per_kind = counts.get(row.id)
    return {
        "id": row.id,
        "name": row.name,
        "transport": row.transport,
        "enabled": row.enabled,
        "status": reg.status(row),
        "circuit": reg.circuit(row.name) or "-",
        "auto_approve": row.auto_approve,
        "tools": per_kind["tool"] if per_kind is not None else 0,
        "last_error": row.last_error,
    }


@router.get("")
async def overview(request: Request, who: Who, window: str = DEFAULT_WINDOW) -> Response:
    upstreams: list[dict[str, Any]] = []
    queue: dict[str, int] = {}
    if who.may("upstreams"):
        reg = who.rt.registry
        counts = await reg.counts()
        upstreams = [_upstream_row(who, row, counts) for row in await reg.list()]
        queue = await _review_queue(who)
    chain: dict[str, Any] | None = None
    charts: dict[str, Any] | None = None
    if who.may("audit"):  # the charts are counted from the audit log: for who may read it
        head = await who.rt.audit.store.head()
        chain = {"head_seq": head.seq, "anchor_seq": head.anchor_seq}
        window = window if window in WINDOWS else DEFAULT_WINDOW  # a bad value: the default, not an error
        since, until, width = activity_window(window, now_ms())
        charts = overview_charts(await activity(who.rt.engine, since, until, width), window)
    return render(
        request,
        "overview.html",
        who,
        upstreams=upstreams[:20],
        more_upstreams=len(upstreams) > 20,
        queue=queue,
        chain=chain,
        charts=charts,
    )


async def _review_queue(who: Viewer) -> dict[str, int]:
    """How many offered definitions wait for review, by status, as ``Reviews.list`` would report them
    (``store.upstreams.effective``), counted by the database: with 2,000 tools, listing every review
    with its definition only to count them took a tenth of a second and more."""
    item = CatalogItem
    status = sa.case((col(item.status) == "superseded", "quarantined"), else_=col(item.status))
    query = (
        sa.select(status, sa.func.count())
        .where(col(item.present), sa.not_(col(item.disabled)), col(item.kind).in_(PINNED_KINDS))
        .where(col(item.status).in_(("pending", "quarantined", "superseded")))
        .group_by(status)
    )
    async with who.rt.engine.connect() as conn:
        found = {name: n for name, n in await conn.execute(query)}
    return {s: found.get(s, 0) for s in REVIEW_QUEUE}


@router.get("/upstreams")
async def upstreams(request: Request, who: Who, page: int = 1) -> Response:
    who.need(request, "upstreams")
    reg = who.rt.registry
    counts = await reg.counts()
    pager = paginate(await reg.list(), page, PAGE)
    rows = [_upstream_row(who, row, counts) for row in pager.items]
    may_write = who.may("upstreams", "admin:write")
    return render(request, "upstreams.html", who, rows=rows, pager=pager, may_write=may_write)


@router.get("/upstreams/{upstream_id}")
async def upstream(request: Request, who: Who, upstream_id: int, status: str = "", page: int = 1) -> Response:
    who.need(request, "upstreams")
    row = await who.rt.registry.get(upstream_id)
    found = await _reviews(who).list(upstream_id, status or None)
    pager = paginate(found, page, PAGE)
    items = [_brief(r) for r in pager.items]
    return render(
        request,
        "upstream.html",
        who,
        upstream=_upstream_row(who, row, await who.rt.registry.counts()),
        items=items,
        pager=pager,
        status=status,
        statuses=("approved", "pending", "quarantined", "rejected", "disabled"),
        may_write=who.may("upstreams", "admin:write"),  # edit, disable, delete (console/upstream_forms.py)
    )


def _brief(review: Review) -> dict[str, Any]:
    item = review.item
    description = item.definition.get("description")
    return {
        "kind": item.kind,
        "name": item.name,
        "exposed": exposed_target(item.kind, review.upstream, item.name),
        "status": review.status,
        "sha256": item.sha256,
        "description": description if isinstance(description, str) else "",
        "findings": len(item.findings or []),
    }


@router.get("/upstreams/{upstream_id}/definitions/{kind}/{name:path}")
async def definition(request: Request, who: Who, upstream_id: int, kind: Kind, name: str) -> Response:
    who.need(request, "upstreams")
    detail = await _reviews(who).detail(upstream_id, kind, name)
    item, approved = detail.item, detail.approved
    description = item.definition.get("description")
    return render(
        request,
        "definition.html",
        who,
        upstream_id=upstream_id,
        upstream=detail.upstream,
        kind=kind,
        name=name,
        item=_brief(detail),
        description=description if isinstance(description, str) else "",
        definition=json.dumps(item.definition, indent=2, sort_keys=True, ensure_ascii=False),
        approved_sha256=approved.sha256 if approved is not None else None,
        diff=[_diff_line(line) for line in detail.diff.splitlines()],
        changed_fields=detail.changed_fields,
        findings=item.findings or [],
        history=detail.history,
        # Only what may be decided is offered: the present definition, not already approved.
        decidable=who.security_admin and item.present and detail.status != "approved",
    )


def _diff_line(line: str) -> tuple[str, str]:
    if line.startswith(("+++", "---", "@@")):
        return ("meta", line)
    if line.startswith("+"):
        return ("added", line)
    if line.startswith("-"):
        return ("removed", line)
    return ("same", line)


@router.post("/upstreams/{upstream_id}/definitions/{kind}/{name:path}")
async def decide(
    request: Request,
    who: Annotated[Viewer, Depends(form_viewer)],
    upstream_id: int,
    kind: Kind,
    name: str,
    action: Annotated[Literal["approve", "reject"], Form()],
    sha256: Annotated[str, Form(min_length=64, max_length=64)],
    acknowledge_findings: Annotated[bool, Form()] = False,
) -> Response:
    who.need_security_admin(request)
    revs = _reviews(who)
    selectors = [Selector(kind, name, sha256)]
    caller = who.principal
    # The same record as POST /admin/v1/upstreams/{id}/definitions/{action}.
    async with admin_change(who.rt.audit, caller, request, f"definition.{action}", str(upstream_id)) as ch:
        ch.before = [(await revs.detail(upstream_id, kind, name)).summary()]
        done = await revs.decide(
            upstream_id, action, selectors, caller.subject, acknowledge_findings=acknowledge_findings
        )
        ch.after = [r.summary() for r in done]
        ch.details["via"] = "console"
    verb = "approved" if action == "approve" else "rejected"
    who.session.flash.append(f"{kind} {name} {verb} (sha256 {sha256[:12]}…).")
    return redirect(f"/upstreams/{upstream_id}/definitions/{kind}/{quote(name, safe='')}")
