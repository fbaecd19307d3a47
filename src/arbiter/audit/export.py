"""Exports of the audit log: JSONL and CSV of a filtered query, and the verifiable bundle.

Every format is produced as a stream of text chunks, one per page of rows, so an export of a million
records holds one page in memory and can go straight into an HTTP response or a file.

- JSONL: one record per line, the stored record with its ``hash`` added. Removing ``hash`` and
  re-serialising canonically (``record.canonical``) gives back the exact text that was hashed.
- CSV: flat columns for spreadsheets; text cells that a spreadsheet would run as a formula are
  prefixed with ``'``.
- Bundle: a contiguous range of the chain with everything needed to verify it offline (see
  ``audit/bundle.py``): a header with the range's anchor and the public keys, each record's canonical
  text exactly as stored, and the signed checkpoints in the range.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import cast

import anyio.to_thread
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.audit import tables as t
from arbiter.audit.query import EXPORT_PAGE, Filters, Order, StoredRow, stream_pages, to_record
from arbiter.audit.record import canonical, iso_ms, now_ms
from arbiter.audit.signing import public_key_b64
from arbiter.audit.store import AuditStore
from arbiter.audit.verify import Checkpoint
from arbiter.errors import InvalidInput

BUNDLE_TYPE = "arbiter-audit-bundle"
BUNDLE_VERSION = 1

CSV_COLUMNS = (
    "seq",
    "id",
    "ts",
    "kind",
    "subject",
    "issuer",
    "tenant",
    "auth_method",
    "client_id",
    "api_key_id",
    "source_ip",
    "method",
    "tool",
    "upstream",
    "decision",
    "reason",
    "rule",
    "policy_version",
    "status",
    "error_code",
    "latency_ms",
    "cost",
    "trace_id",
    "args_hmac",
    "args_bytes",
    "args",
    "hash",
)
# A spreadsheet runs a cell starting with one of these as a formula (OWASP "CSV injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


# --- JSONL and CSV --------------------------------------------------------------------------------


def jsonl_line(record: Mapping[str, object]) -> str:
    return canonical(record) + "\n"


async def jsonl_chunks(
    engine: AsyncEngine, filters: Filters, *, order: Order = "asc", page_size: int = EXPORT_PAGE
) -> AsyncIterator[str]:
    async for rows in stream_pages(engine, filters, order=order, page_size=page_size):
        # Decoding and re-serialising a page is ~10-40 ms of CPU: in a worker thread, so that /mcp
        # requests on this replica are not held up while an auditor downloads.
        yield await anyio.to_thread.run_sync(_jsonl_page, rows)


def _jsonl_page(rows: list[StoredRow]) -> str:
    return "".join(jsonl_line(to_record(row)) for row in rows)


def csv_cell(value: object) -> str:
    """One CSV cell. Only text is guarded: a number (``-32602``) is never read as a formula, and
    prefixing it would turn it into text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    text = value if isinstance(value, str) else canonical(value)
    if text.startswith(_FORMULA_START):
        return "'" + text
    return text


def csv_values(record: Mapping[str, object]) -> list[str]:
    actor, policy, outcome = (_mapping(record.get(name)) for name in ("actor", "policy", "outcome"))
    nested = {
        "issuer": actor.get("issuer"),
        "auth_method": actor.get("auth_method"),
        "client_id": actor.get("client_id"),
        "api_key_id": actor.get("api_key_id"),
        "source_ip": actor.get("source_ip"),
        "rule": policy.get("rule"),
        "status": outcome.get("status"),
        "error_code": outcome.get("error_code"),
    }
    values: list[str] = []
    for name in CSV_COLUMNS:
        if name == "args":
            args = record.get("args")
            # Always the JSON text, even for a bare string argument summary, so the column parses.
            values.append(csv_cell(None if args is None else canonical(args)))
        else:
            values.append(csv_cell(nested[name] if name in nested else record.get(name)))
    return values


def _mapping(value: object) -> Mapping[str, object]:
    return cast(Mapping[str, object], value) if isinstance(value, dict) else {}


async def csv_chunks(
    engine: AsyncEngine, filters: Filters, *, order: Order = "asc", page_size: int = EXPORT_PAGE
) -> AsyncIterator[str]:
    yield _csv_text([list(CSV_COLUMNS)])
    async for rows in stream_pages(engine, filters, order=order, page_size=page_size):
        yield await anyio.to_thread.run_sync(_csv_page, rows)


def _csv_page(rows: list[StoredRow]) -> str:
    return _csv_text([csv_values(to_record(row)) for row in rows])


def _csv_text(rows: list[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue()


# --- the bundle -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundlePlan:
    """A bundle's range, fixed (and validated) before the first byte is sent."""

    anchor_seq: int  # the record before the range (0: genesis, or the last purge's cut)
    anchor_hash: str
    from_seq: int
    to_seq: int
    public_keys: list[str]

    def header(self) -> dict[str, object]:
        return {
            "type": BUNDLE_TYPE,
            "version": BUNDLE_VERSION,
            "anchor_seq": self.anchor_seq,
            "anchor_hash": self.anchor_hash,
            "from_seq": self.from_seq,
            "to_seq": self.to_seq,
            "public_keys": self.public_keys,
            "exported_at": iso_ms(now_ms()),
        }


def public_keys(store: AuditStore) -> list[str]:
    """The keys the store itself verifies with: the signer's and ``audit.trusted_public_keys``."""
    return [public_key_b64(key) for key in store.keyring().keys.values()]


async def plan_bundle(
    engine: AsyncEngine, store: AuditStore, from_seq: int | None = None, to_seq: int | None = None
) -> BundlePlan:
    """Resolve a range (default: everything kept) and its anchor: the chain's anchor, or the stored
    hash of the record just before ``from_seq``."""
    head = await store.head()
    start = head.anchor_seq + 1 if from_seq is None else from_seq
    end = head.seq if to_seq is None else to_seq
    if start <= head.anchor_seq:
        raise InvalidInput(
            f"records up to seq {head.anchor_seq} were purged; the kept log starts at {head.anchor_seq + 1}"
        )
    if end > head.seq:
        raise InvalidInput(f"'to_seq' {end} is beyond the newest record ({head.seq})")
    if end < start and (from_seq is not None or to_seq is not None):
        raise InvalidInput(f"'to_seq' ({end}) must not be before 'from_seq' ({start})")
    anchor = start - 1
    if anchor == head.anchor_seq:
        anchor_hash = head.anchor_hash
    else:
        c = t.events.c
        async with engine.connect() as conn:
            found = (await conn.execute(sa.select(c.hash).where(c.seq == anchor))).scalar()
            if found is None:  # the record before the range is gone: start from what the first links to
                found = (await conn.execute(sa.select(c.prev_hash).where(c.seq == start))).scalar()
        if found is None:
            raise InvalidInput(
                f"records {anchor} and {start} are both missing from the database; "
                "run `arbiter audit verify`, or export a range that starts on a stored record"
            )
        anchor_hash = found
    return BundlePlan(anchor, anchor_hash, start, end, public_keys(store))


async def bundle_chunks(
    engine: AsyncEngine, plan: BundlePlan, *, page_size: int = EXPORT_PAGE
) -> AsyncIterator[str]:
    yield _line(plan.header())
    c = t.events.c
    last = plan.anchor_seq
    while last < plan.to_seq:
        query = (
            sa.select(c.seq, c.body, c.hash, c.prev_hash)
            .where(c.seq > last, c.seq <= plan.to_seq)
            .order_by(c.seq)
            .limit(page_size)
        )
        async with engine.connect() as conn:
            page = (await conn.execute(query)).all()
        if page:
            yield "".join(
                _line(
                    {"type": "record", "seq": r.seq, "body": r.body, "hash": r.hash, "prev_hash": r.prev_hash}
                )
                for r in page
            )
        if len(page) < page_size:
            break
        last = page[-1].seq
    # Checkpoints at the anchor (a purge's, signing the cut) through the range's end.
    cp = t.checkpoints.c
    last_id = 0
    while True:
        query = (
            sa.select(t.checkpoints)
            .where(cp.id > last_id, cp.seq >= plan.anchor_seq, cp.seq <= plan.to_seq)
            .order_by(cp.id)
            .limit(page_size)
        )
        async with engine.connect() as conn:
            page = (await conn.execute(query)).all()
        if page:
            yield "".join(
                _line(
                    {
                        "type": "checkpoint",
                        **Checkpoint(r.seq, r.hash, r.ts_ms, r.kind, r.key_id, r.signature).to_json(),
                    }
                )
                for r in page
            )
        if len(page) < page_size:
            return
        last_id = page[-1].id


def _line(value: Mapping[str, object]) -> str:
    # Not canonical: "type" first reads better, and only each record's "body" text is ever hashed.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n"
