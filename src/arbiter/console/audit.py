"""``/console/audit``: search the log with the API's filters, open a record, export, verify the chain.

Read-only, for ``admin:read`` on ``admin/audit`` (the auditor roles have it built in). Searching uses
the same ``Filters`` and keyset pages as ``GET /admin/v1/audit/events``, newest first; exporting the
same streams as ``GET /admin/v1/audit/export`` (JSONL and CSV of the search's filters, or a bundle of a
range of the chain).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any, cast
from urllib.parse import quote

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from arbiter.audit import tables
from arbiter.audit.export import bundle_chunks, csv_chunks, jsonl_chunks, plan_bundle
from arbiter.audit.query import DECISIONS, KINDS, Filters, fetch_page
from arbiter.audit.record import iso_ms, now_ms
from arbiter.audit.replay import recorded_outcome
from arbiter.console.web import ConsoleRoute, Viewer, query_text, render, viewer
from arbiter.errors import InvalidInput, NotFound

router = APIRouter(route_class=ConsoleRoute)
Who = Annotated[Viewer, Depends(viewer)]

FIELDS = ("subject", "tenant", "tool", "upstream", "decision", "reason", "kind", "trace_id", "since", "until")
PAGE = 50


@router.get("/audit")
async def search(request: Request, who: Who) -> Response:
    who.need(request, "audit")
    params = request.query_params
    given = {name: query_text(params, name) for name in FIELDS}
    cursor = query_text(params, "cursor") or None
    error: str | None = None
    events: list[dict[str, Any]] = []
    next_cursor: str | None = None
    try:
        filters = Filters.parse(**{k: v or None for k, v in given.items()})
        page = await fetch_page(who.rt.engine, filters, limit=PAGE, cursor=cursor, order="desc")
        events, next_cursor = [_row(e) for e in page.events], page.next_cursor
    except InvalidInput as exc:  # a bad filter is the person's to fix: the form says what is wrong
        error = exc.message
    return render(
        request,
        "audit.html",
        who,
        given=given,
        export_query="&".join(f"{k}={quote(v, safe='')}" for k, v in given.items() if v),
        events=events,
        next_cursor=next_cursor,
        error=error,
        decisions=DECISIONS,
        kinds=KINDS,
    )


def _row(event: dict[str, Any]) -> dict[str, Any]:
    subject = event.get("subject")  # the actor's subject, copied to the record's top level
    return {
        "seq": event.get("seq"),
        "ts": event.get("ts"),
        "kind": event.get("kind"),
        "subject": subject if isinstance(subject, str) else "",
        "method": event.get("method") or "",
        "tool": event.get("tool") or "",
        "decision": event.get("decision"),
        "reason": event.get("reason"),
    }


@router.get("/audit/export")
async def export(
    request: Request, who: Who, format: str = "jsonl", from_seq: str = "", to_seq: str = ""
) -> Response:
    """A download of the search's records (``jsonl``, ``csv``; oldest first, as the API's), or a
    ``bundle``: a range of the chain by seq, verifiable offline with ``arbiter audit verify --file``."""
    who.need(request, "audit")
    params = request.query_params
    if format == "bundle":
        plan = await plan_bundle(
            who.rt.engine, who.rt.audit.store, _seq(from_seq, "from seq"), _seq(to_seq, "to seq")
        )
        name = f"arbiter-audit-{plan.from_seq}-{plan.to_seq}.bundle.jsonl"
        return _download(bundle_chunks(who.rt.engine, plan), _NDJSON, name)
    filters = Filters.parse(**{name: query_text(params, name) or None for name in FIELDS})
    stamp = iso_ms(now_ms()).replace(":", "").replace(".", "")
    if format == "jsonl":
        return _download(jsonl_chunks(who.rt.engine, filters), _NDJSON, f"arbiter-audit-{stamp}.jsonl")
    if format == "csv":
        return _download(csv_chunks(who.rt.engine, filters), "text/csv", f"arbiter-audit-{stamp}.csv")
    raise InvalidInput(f"unknown format {format!r}; formats are jsonl, csv and bundle")


_NDJSON = "application/x-ndjson"


def _seq(value: str, name: str) -> int | None:
    text = value.strip()
    if not text:
        return None
    if not text.isdigit() or len(text) > 19:
        raise InvalidInput(f"'{name}' must be a record number (a whole number); got {value!r}")
    return int(text)


def _download(chunks: AsyncIterator[str], media_type: str, filename: str) -> StreamingResponse:
    return StreamingResponse(
        chunks, media_type=media_type, headers={"content-disposition": f'attachment; filename="{filename}"'}
    )


@router.get("/audit/verify")
async def verify(request: Request, who: Who) -> Response:
    """The whole chain checked now (from the last purge's anchor), as ``GET /admin/v1/audit/verify``."""
    who.need(request, "audit")
    store = who.rt.audit.store
    head = await store.head()
    report = await store.verify()
    return render(
        request,
        "verify.html",
        who,
        report=report.to_json(),
        head_seq=head.seq,
        anchor_seq=head.anchor_seq,
        verified_at=iso_ms(now_ms()),
    )


@router.get("/audit/{seq}")
async def record(request: Request, who: Who, seq: int) -> Response:
    who.need(request, "audit")
    c = tables.events.c
    async with who.rt.engine.connect() as conn:
        row = (await conn.execute(sa.select(c.body, c.hash).where(c.seq == seq))).first()
    if row is None:
        raise NotFound(f"no audit record {seq} (it may have been purged by retention)")
    body: dict[str, Any] = json.loads(row.body)
    return render(
        request,
        "record.html",
        who,
        seq=seq,
        summary=_row(body),
        explain=_explained(body) if who.may("policies") else None,
        record=json.dumps({**body, "hash": row.hash}, indent=2, sort_keys=True, ensure_ascii=False),
    )


def _explained(body: dict[str, Any]) -> str | None:
    """For a record holding a policy decision (the "Why?" link): what the policy decided then."""
    policy: Any = body.get("policy")
    if body.get("kind") != "mcp" or not isinstance(policy, dict):
        return None
    outcome = recorded_outcome(cast(dict[str, Any], policy))
    return {"allow": "allowed", "approve": "sent for approval", "deny": "denied"}[outcome]
