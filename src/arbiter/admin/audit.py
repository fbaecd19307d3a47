"""``/admin/v1/audit``: what auditors read. Query and export the log, verify the chain, list checkpoints.

Read-only: every route needs ``admin:read`` on ``admin/audit``, which the auditor roles have built in.
Query parameters arrive as text and are validated here rather than by FastAPI, so a bad value answers
with the same ``{"error": {"code": "invalid_input", ...}}`` as every other Arbiter error; an unknown
parameter (a misspelt filter) is refused rather than silently widening the result.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Iterable
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from arbiter.admin.deps import require, runtime
from arbiter.admin.outputs import AuditVerifyOut, CheckpointsPage
from arbiter.audit.export import bundle_chunks, csv_chunks, jsonl_chunks, plan_bundle
from arbiter.audit.query import (
    FILTERS,
    MAX_LIMIT,
    Filters,
    Order,
    fetch_checkpoints,
    fetch_page,
    parse_limit,
    parse_order,
)
from arbiter.audit.record import iso_ms, now_ms
from arbiter.auth.principal import Principal
from arbiter.errors import InvalidInput
from arbiter.runtime import Runtime

Auditor = Annotated[Principal, Depends(require("audit", "admin:read"))]
Rt = Annotated[Runtime, Depends(runtime)]

router = APIRouter()

_FILTERS = tuple(FILTERS)
_NDJSON = "application/x-ndjson"


def _param(description: str) -> object:
    return Query(description=description)


Text = str | None


def filters(**raw: str | None) -> Filters:
    return Filters.parse(**raw)


# One optional text query parameter per filter, as FastAPI should see them.
filters.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Text, _param(help)]
        )
        for name, help in FILTERS.items()
    ],
    return_annotation=Filters,
)


FilterQuery = Annotated[Filters, Depends(filters)]


class EventsPage(BaseModel):
    events: list[dict[str, object]]
    next_cursor: str | None


_TEXT = {"schema": {"type": "string"}}
_DOWNLOADS: dict[int | str, dict[str, object]] = {
    200: {
        "model": EventsPage,
        "content": {_NDJSON: _TEXT, "text/csv": _TEXT},
        "description": "A page of records (JSON), or with format=jsonl|csv the whole result as a download",
    }
}


@router.get("/audit/events", response_model=None, responses=_DOWNLOADS)
async def list_events(
    request: Request,
    _: Auditor,
    rt: Rt,
    query: FilterQuery,
    limit: Annotated[Text, _param(f"Records per page, 1 to {MAX_LIMIT} (default 100)")] = None,
    cursor: Annotated[Text, _param("The previous page's next_cursor")] = None,
    order: Annotated[Text, _param("asc (oldest first, default) or desc")] = None,
    format: Annotated[Text, _param("json (a page, default), jsonl or csv (the whole result)")] = None,
) -> Response:
    """Records matching every given filter, in (time, seq) order, a page at a time."""
    _only(request, (*_FILTERS, "limit", "cursor", "order", "format"))
    direction = parse_order(order)
    fmt = format or "json"
    if fmt == "json":
        page = await fetch_page(rt.engine, query, limit=parse_limit(limit), cursor=cursor, order=direction)
        return JSONResponse(page.to_json())
    if limit or cursor:
        raise InvalidInput(
            f"format={fmt} streams the whole result, so it takes no 'limit' or 'cursor'; "
            "narrow it with since/until and the other filters"
        )
    return _download(rt, query, direction, fmt)


@router.get(
    "/audit/export",
    response_model=None,
    response_class=StreamingResponse,
    responses={200: {"content": {_NDJSON: _TEXT, "text/csv": _TEXT}, "description": "A download"}},
)
async def export(
    request: Request,
    _: Auditor,
    rt: Rt,
    query: FilterQuery,
    format: Annotated[Text, _param("bundle (default; verifiable offline), jsonl or csv")] = None,
    from_seq: Annotated[Text, _param("bundle: first record (default: the oldest kept)")] = None,
    to_seq: Annotated[Text, _param("bundle: last record (default: the newest)")] = None,
    order: Annotated[Text, _param("jsonl/csv: asc (default) or desc")] = None,
) -> Response:
    """A download: a bundle (a contiguous range of the chain with its checkpoints and public keys,
    for `arbiter audit verify --file`), or the filtered records as JSONL or CSV."""
    _only(request, (*_FILTERS, "format", "from_seq", "to_seq", "order"))
    fmt = format or "bundle"
    if fmt != "bundle":
        if from_seq or to_seq:
            raise InvalidInput("'from_seq'/'to_seq' select a bundle's range; jsonl and csv take filters")
        return _download(rt, query, parse_order(order), fmt)
    if query != Filters() or order:
        raise InvalidInput(
            "a bundle is a contiguous range of the chain (from_seq/to_seq), so it takes no filters or "
            "order; filtered exports are format=jsonl or format=csv"
        )
    plan = await plan_bundle(rt.engine, rt.audit.store, _seq(from_seq, "from_seq"), _seq(to_seq, "to_seq"))
    name = f"arbiter-audit-{plan.from_seq}-{plan.to_seq}.bundle.jsonl"
    return _stream(bundle_chunks(rt.engine, plan), _NDJSON, name)


@router.get("/audit/verify", response_model=AuditVerifyOut)
async def verify(request: Request, _: Auditor, rt: Rt) -> dict[str, object]:
    """Check the whole chain (from the last purge's anchor) and every checkpoint's signature. Answers
    200 either way: ``ok`` is false, and ``first_broken`` names the record, when it does not verify."""
    _only(request, ())
    store = rt.audit.store
    head = await store.head()
    report = await store.verify()
    return {
        **report.to_json(),
        "head_seq": head.seq,
        "anchor_seq": head.anchor_seq,
        "key_ids": sorted(store.keyring().keys),
        "verified_at": iso_ms(now_ms()),
    }


@router.get("/audit/checkpoints", response_model=CheckpointsPage)
async def list_checkpoints(
    request: Request,
    _: Auditor,
    rt: Rt,
    limit: Annotated[Text, _param(f"Checkpoints per page, 1 to {MAX_LIMIT} (default 100)")] = None,
    cursor: Annotated[Text, _param("The previous page's next_cursor")] = None,
    order: Annotated[Text, _param("asc (default) or desc (newest first)")] = None,
) -> dict[str, object]:
    """Signed checkpoints by sequence number, each with whether its signature verifies with the keys
    this Arbiter trusts."""
    _only(request, ("limit", "cursor", "order"))
    return await fetch_checkpoints(
        rt.engine,
        rt.audit.store.keyring(),
        limit=parse_limit(limit),
        cursor=cursor,
        order=parse_order(order),
    )


def _download(rt: Runtime, query: Filters, order: Order, fmt: str) -> Response:
    stamp = iso_ms(now_ms()).replace(":", "").replace(".", "")
    if fmt == "jsonl":
        return _stream(jsonl_chunks(rt.engine, query, order=order), _NDJSON, f"arbiter-audit-{stamp}.jsonl")
    if fmt == "csv":
        return _stream(csv_chunks(rt.engine, query, order=order), "text/csv", f"arbiter-audit-{stamp}.csv")
    raise InvalidInput(f"unknown format {fmt!r}; formats are json, jsonl, csv (and bundle on /audit/export)")


def _stream(chunks: AsyncIterator[str], media_type: str, filename: str) -> StreamingResponse:
    return StreamingResponse(
        chunks,
        media_type=media_type,
        headers={
            "content-disposition": f'attachment; filename="{filename}"',
            "cache-control": "no-store",  # audit records must not linger in shared caches
        },
    )


def _only(request: Request, allowed: Iterable[str]) -> None:
    known = set(allowed)
    params = request.query_params
    for name in params:
        if name not in known:
            accepted = ", ".join(sorted(known)) or "none"
            raise InvalidInput(f"unknown query parameter {name!r}; this endpoint accepts: {accepted}")
        if len(params.getlist(name)) > 1:
            raise InvalidInput(f"query parameter {name!r} is given more than once")


def _seq(value: str | None, name: str) -> int | None:
    if not value:
        return None
    if not value.isdigit() or len(value) > 19:
        raise InvalidInput(f"'{name}' must be a record's sequence number (a whole number >= 1)")
    seq = int(value)
    if seq < 1:
        raise InvalidInput(f"'{name}' must be >= 1")
    return seq
