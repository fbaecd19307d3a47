"""Auditors' queries over ``audit_events``: filters, keyset (cursor) pagination, streaming for export.

Pages are keyed on ``(ts_ms, seq)``, the order every filter index ends with, so the next page is an
index range that starts where the last one stopped: page 10,000 costs what page 1 costs, where an
OFFSET would re-read everything before it. ``seq`` breaks ties between records of the same millisecond,
so the order is total and a cursor never skips or repeats a record.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, NamedTuple

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.audit import tables as t
from arbiter.audit.filters import FILTERS as FILTERS  # re-exported: the admin API imports it from here
from arbiter.audit.record import columns, iso_ms
from arbiter.audit.signing import KeyRing, checkpoint_payload
from arbiter.audit.verify import Checkpoint
from arbiter.errors import InvalidInput

Order = Literal["asc", "desc"]
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
EXPORT_PAGE = 1000

DECISIONS = ("allow", "deny", "error")
KINDS = ("mcp", "auth", "admin", "audit", "integrity")
# Epoch values below this (1973-03-03 in ms) are almost certainly seconds: refuse them rather than
# silently answer for January 1970.
_MIN_EPOCH_MS = 100_000_000_000
_MAX_EPOCH_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CURSOR_RE = re.compile(r"([ec])\.([ad])\.(\d{1,19})\.(\d{1,19})")
_TRACE_RE = re.compile(r"[0-9a-f]{32}")


class StoredRow(NamedTuple):
    seq: int
    ts_ms: int
    body: str  # the canonical record text, exactly as hashed
    hash: str


# The filters' names and help texts live in audit/filters.py (imported by the CLI without SQLAlchemy).


@dataclass(frozen=True)
class Filters:
    """What an auditor asks for. ``since_ms`` is inclusive, ``until_ms`` exclusive; the rest are
    exact matches on the record's indexed columns (``kind`` and ``method`` have no index of their
    own: combine them with a time range on a large log)."""

    since_ms: int | None = None
    until_ms: int | None = None
    subject: str | None = None
    tenant: str | None = None
    tool: str | None = None
    upstream: str | None = None
    decision: str | None = None
    reason: str | None = None
    trace_id: str | None = None
    kind: str | None = None
    method: str | None = None

    @classmethod
    def parse(
        cls,
        *,
        since: str | None = None,
        until: str | None = None,
        subject: str | None = None,
        tenant: str | None = None,
        tool: str | None = None,
        upstream: str | None = None,
        decision: str | None = None,
        reason: str | None = None,
        trace_id: str | None = None,
        kind: str | None = None,
        method: str | None = None,
    ) -> Filters:
        """Validate raw values (query parameters, CLI options); an empty value means "no filter"."""
        since_ms = parse_time(since, "since") if since else None
        until_ms = parse_time(until, "until") if until else None
        if since_ms is not None and until_ms is not None and since_ms >= until_ms:
            raise InvalidInput("'since' must be earlier than 'until' (since is inclusive, until exclusive)")
        if decision and decision not in DECISIONS:
            raise InvalidInput(f"unknown decision {decision!r}; decisions are: {', '.join(DECISIONS)}")
        if kind and kind not in KINDS:
            raise InvalidInput(f"unknown kind {kind!r}; kinds are: {', '.join(KINDS)}")
        if trace_id:
            trace_id = trace_id.lower()
            if not _TRACE_RE.fullmatch(trace_id):
                raise InvalidInput("'trace_id' must be a W3C trace id: 32 hexadecimal characters")
        # Long values are stored cut to their column's size; cut the filter the same way so it matches.
        cut = columns(
            {
                "subject": subject or None,
                "tenant": tenant or None,
                "tool": tool or None,
                "upstream": upstream or None,
                "method": method or None,
            }
        )
        return cls(
            since_ms=since_ms,
            until_ms=until_ms,
            subject=cut["subject"],
            tenant=cut["tenant"],
            tool=cut["tool"],
            upstream=cut["upstream"],
            decision=decision or None,
            reason=reason or None,
            trace_id=trace_id or None,
            kind=kind or None,
            method=cut["method"],
        )

    def equals(self) -> dict[str, str]:
        """The exact-match filters that are set, by column name."""
        found: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("since_ms", "until_ms") and value is not None:
                found[f.name] = value
        return found


def parse_time(value: str, name: str) -> int:
    """ISO 8601 (``2026-05-01``, ``2026-05-01T12:00:00Z``, with an offset; no zone means UTC) or epoch
    milliseconds, as epoch milliseconds."""
    text = value.strip()
    if re.fullmatch(r"\d{1,16}", text):
        ms = int(text)
        if ms < _MIN_EPOCH_MS:
            raise InvalidInput(
                f"'{name}' = {text} looks like epoch seconds; give epoch milliseconds or ISO 8601"
            )
        if ms > _MAX_EPOCH_MS:
            raise InvalidInput(f"'{name}' = {text} is beyond the year 9999")
        return ms
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(
            f"'{name}' must be ISO 8601 (e.g. 2026-05-01T12:00:00Z) or epoch milliseconds; got {value!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def parse_limit(value: str | int | None) -> int:
    if value is None or value == "":
        return DEFAULT_LIMIT
    try:
        limit = int(value)
    except ValueError:
        raise InvalidInput(f"'limit' must be a whole number from 1 to {MAX_LIMIT}; got {value!r}") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"'limit' must be from 1 to {MAX_LIMIT}; got {limit}")
    return limit


def parse_order(value: str | None) -> Order:
    if value is None or value in ("", "asc"):
        return "asc"
    if value == "desc":
        return "desc"
    raise InvalidInput(f"'order' must be 'asc' or 'desc'; got {value!r}")


def encode_cursor(order: Order, ts_ms: int, seq: int, *, of: Literal["e", "c"] = "e") -> str:
    """An opaque cursor: what it pages (``e`` events, ``c`` checkpoints), the order, and the last key."""
    raw = f"{of}.{order[0]}.{ts_ms}.{seq}".encode("ascii")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str, order: Order, *, of: Literal["e", "c"] = "e") -> tuple[int, int]:
    """The key a cursor continues after. A cursor is only valid for the order it was made in:
    followed the other way it would silently skip everything already seen."""
    bad = InvalidInput(
        "'cursor' is not a cursor this API issued for this list; pass the 'next_cursor' of the "
        "previous page unchanged"
    )
    if len(cursor) > 64:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        raise bad from None
    match = _CURSOR_RE.fullmatch(raw)
    if match is None or match[1] != of:
        raise bad
    made_for: Order = "asc" if match[2] == "a" else "desc"
    if made_for != order:
        raise InvalidInput(f"'cursor' was issued for order={made_for}; repeat the request with that order")
    return int(match[3]), int(match[4])


def page_statement(
    filters: Filters, order: Order = "asc", after: tuple[int, int] | None = None, limit: int = DEFAULT_LIMIT
) -> sa.Select[int, int, str, str]:
    """The one statement behind every page and export (the bench and the query-plan test EXPLAIN it).

    The cursor is folded into the time bounds (``ts_ms >= cursor`` rather than a row-value comparison)
    so that every planner sees one plain range on ``ts_ms`` after the equality filter; the ``OR`` only
    drops the few rows of the cursor's own millisecond that were already returned.
    """
    c = t.events.c
    lo = filters.since_ms
    hi = filters.until_ms - 1 if filters.until_ms is not None else None
    clauses: list[sa.ColumnElement[bool]] = [c[name] == value for name, value in filters.equals().items()]
    if after is not None:
        ts, seq = after
        if order == "asc":
            lo = ts if lo is None else max(lo, ts)
            clauses.append(sa.or_(c.ts_ms > ts, c.seq > seq))
        else:
            hi = ts if hi is None else min(hi, ts)
            clauses.append(sa.or_(c.ts_ms < ts, c.seq < seq))
    if lo is not None:
        clauses.append(c.ts_ms >= lo)
    if hi is not None:
        clauses.append(c.ts_ms <= hi)
    keys = (c.ts_ms, c.seq) if order == "asc" else (c.ts_ms.desc(), c.seq.desc())
    return sa.select(c.seq, c.ts_ms, c.body, c.hash).where(*clauses).order_by(*keys).limit(limit)


def to_record(row: StoredRow) -> dict[str, Any]:
    """The stored record as an auditor sees it: its body, plus the hash it is chained by."""
    record: dict[str, Any] = json.loads(row.body)
    record["hash"] = row.hash
    return record


@dataclass(frozen=True)
class Page:
    events: list[dict[str, Any]]
    next_cursor: str | None

    def to_json(self) -> dict[str, object]:
        return {"events": self.events, "next_cursor": self.next_cursor}


async def fetch_page(
    engine: AsyncEngine,
    filters: Filters,
    *,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    order: Order = "asc",
) -> Page:
    after = decode_cursor(cursor, order) if cursor else None
    # One row more than asked tells whether there is a next page without a second query.
    rows = await _fetch(engine, page_statement(filters, order, after, limit + 1))
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1] if rows else None
    next_cursor = encode_cursor(order, last.ts_ms, last.seq) if more and last is not None else None
    return Page([to_record(r) for r in rows], next_cursor)


async def stream_pages(
    engine: AsyncEngine,
    filters: Filters,
    *,
    order: Order = "asc",
    after: tuple[int, int] | None = None,
    page_size: int = EXPORT_PAGE,
) -> AsyncIterator[list[StoredRow]]:
    """Every matching row, a page at a time: at most one page is held, and no connection is held
    while the consumer (a slow download) works through it."""
    while True:
        rows = await _fetch(engine, page_statement(filters, order, after, page_size))
        if rows:
            yield rows
        if len(rows) < page_size:
            return
        after = (rows[-1].ts_ms, rows[-1].seq)


async def _fetch(engine: AsyncEngine, statement: sa.Select[int, int, str, str]) -> list[StoredRow]:
    async with engine.connect() as conn:
        result = await conn.execute(statement)
        return [StoredRow(r.seq, r.ts_ms, r.body, r.hash) for r in result]


async def fetch_checkpoints(
    engine: AsyncEngine,
    keys: KeyRing,
    *,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    order: Order = "asc",
) -> dict[str, object]:
    """Signed checkpoints by (seq, id), each with whether its signature verifies with ``keys``."""
    c = t.checkpoints.c
    query = sa.select(t.checkpoints)
    if cursor:
        seq, id_ = decode_cursor(cursor, order, of="c")
        if order == "asc":
            query = query.where(c.seq >= seq, sa.or_(c.seq > seq, c.id > id_))
        else:
            query = query.where(c.seq <= seq, sa.or_(c.seq < seq, c.id < id_))
    keys_order = (c.seq, c.id) if order == "asc" else (c.seq.desc(), c.id.desc())
    async with engine.connect() as conn:
        rows = (await conn.execute(query.order_by(*keys_order).limit(limit + 1))).all()
    more = len(rows) > limit
    rows = rows[:limit]
    items: list[dict[str, object]] = []
    for r in rows:
        cp = Checkpoint(r.seq, r.hash, r.ts_ms, r.kind, r.key_id, r.signature)
        valid = keys.verify(cp.key_id, checkpoint_payload(cp.seq, cp.hash, cp.ts_ms, cp.kind), cp.signature)
        items.append({**cp.to_json(), "ts": iso_ms(cp.ts_ms), "signature_valid": valid})
    next_cursor = encode_cursor(order, rows[-1].seq, rows[-1].id, of="c") if more and rows else None
    return {"checkpoints": items, "next_cursor": next_cursor, "key_ids": sorted(keys.keys)}
