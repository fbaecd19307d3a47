"""Auditor queries on a large audit log, on PostgreSQL and SQLite.

Fills a scratch PostgreSQL database (``arbiter_bench_audit``, created, migrated and dropped) and a
SQLite file with N realistic records (default 1,000,000: rendered and redacted by the real renderer,
hash-chained, with a signed checkpoint every 10,000), runs ANALYZE, then for each typical auditor
query prints the first lines (up to 4) of its EXPLAIN plan and the median of 5 timings, through the same code
the admin API runs (``audit/query.py``). Then a full-chain verify.

Run: ``.venv/bin/python bench/audit_query.py [--n 1000000] [--only pg|sqlite] [--keep]``
(PostgreSQL at ``--pg``, default ``postgresql://postgres@127.0.0.1:5432``).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg  # pyright: ignore[reportMissingTypeStubs]
import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.audit.export import csv_chunks
from arbiter.audit.query import Filters, Order, encode_cursor, fetch_page, page_statement
from arbiter.audit.record import Event, Renderer, columns, seal
from arbiter.audit.redact import Redactor
from arbiter.audit.signing import Signer, checkpoint_payload, generate_key
from arbiter.audit.store import AuditStore
from arbiter.settings import AuditSettings, RedactSettings
from arbiter.store import schema
from arbiter.store.db import create_engine

DB_NAME = "arbiter_bench_audit"
CHUNK = 50_000
CHECKPOINT_EVERY = 10_000
SPAN_MS = 30 * 86_400_000
COLUMNS = ("seq", "id", "ts_ms", "kind", "subject", "tenant", "method", "tool", "upstream", "decision")
COLUMNS += ("reason", "trace_id", "body", "prev_hash", "hash")
SUBJECTS = [f"user-{i:04d}@corp.example" for i in range(5000)]
TENANTS = [f"tenant-{i:02d}" for i in range(50)]
UPSTREAMS = ["crm", "kb", "billing", "tickets", "hr", "search", "files", "mail", "calendar", "wiki"]
UPSTREAMS += ["deploy", "metrics"]
TOOLS = [
    (u, f"{verb}_{noun}")
    for u in UPSTREAMS
    for verb, noun in zip(
        ("get", "list", "search", "update", "create", "delete", "export", "sync"),
        ("customer", "orders", "docs", "record", "ticket", "item", "report", "state"),
        strict=True,
    )
]
OUTCOMES = [
    (0.85, "allow", "allowed", {"status": "ok"}),
    (0.08, "deny", "policy_denied", {"status": "refused", "error_code": -31001, "message": "denied"}),
    (0.03, "deny", "rate_limited", {"status": "refused", "error_code": -31004, "message": "rate"}),
    (0.01, "deny", "budget_exceeded", {"status": "refused", "error_code": -31006, "message": "budget"}),
    (0.02, "allow", "upstream_error", {"status": "error", "error_code": -32603, "message": "upstream"}),
    (0.01, "error", "internal_error", {"status": "error", "error_code": -32603}),
]


class Corpus:
    """Generates the chain chunk by chunk: rows for audit_events, and the checkpoints to sign."""

    def __init__(self, n: int, signer: Signer, seed: int = 7) -> None:
        self.n = n
        self.signer = signer
        self.rng = random.Random(seed)
        self.render = Renderer(Redactor(RedactSettings()), b"bench-hmac-key-0123456789abcdef!").render
        self.start_ms = int(time.time() * 1000) - SPAN_MS
        self.seq = 0
        self.prev = "0" * 64
        self.subject_weights = _zipf(len(SUBJECTS))
        self.tenant_weights = _zipf(len(TENANTS))
        self.outcome_weights = [w for w, *_ in OUTCOMES]
        self.checkpoints: list[tuple[int, str, int, str, str, str]] = []

    def chunk(self, size: int) -> list[tuple[Any, ...]]:
        rng = self.rng
        subjects = rng.choices(SUBJECTS, cum_weights=self.subject_weights, k=size)
        tenants = rng.choices(TENANTS, cum_weights=self.tenant_weights, k=size)
        outcomes = rng.choices(OUTCOMES, weights=self.outcome_weights, k=size)
        rows: list[tuple[Any, ...]] = []
        for subject, tenant, (_, decision, reason, outcome) in zip(subjects, tenants, outcomes, strict=True):
            self.seq += 1
            # Appended in time order with the jitter of several replicas' batches.
            ts = self.start_ms + self.seq * SPAN_MS // self.n - rng.randrange(500)
            upstream, tool = rng.choice(TOOLS)
            kind = "mcp" if rng.random() < 0.95 else rng.choice(("auth", "admin"))
            event = Event(
                kind=kind,
                decision=decision,
                reason=reason,
                actor={
                    "subject": subject,
                    "issuer": "https://idp.corp.example/realms/agents",
                    "tenant": tenant,
                    "client_id": "support-agent",
                    "api_key_id": None,
                    "auth_method": "jwt",
                    "roles": ["support-agent"],
                    "source_ip": f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}",
                },
                ts_ms=ts,
                method="tools/call" if kind == "mcp" else f"{kind}.request",
                tool=f"{upstream}__{tool}",
                upstream=upstream,
                target=tool,
                policy={
                    "decision": decision,
                    "reason": reason,
                    "rule": f"p, role:agent, *, {upstream}/*, call, allow",
                },
                policy_version=42,
                outcome=dict(outcome),
                latency_ms=round(rng.uniform(2, 400), 3),
                cost=1.0,
                trace_id=f"{rng.getrandbits(128):032x}",
                request_id=self.seq,
                protocol_version="2025-11-25",
                client_info={"name": "langchain-mcp", "version": "1.4.0"},
                arguments={
                    "customer_id": rng.randrange(10**6),
                    "query": f"order status {rng.randrange(10**5)}",
                },
            )
            body = self.render(event)
            text, digest = seal(body, self.seq, self.prev)
            cols = columns(body)
            rows.append((self.seq, body["id"], *(cols[c] for c in COLUMNS[2:12]), text, self.prev, digest))
            self.prev = digest
            if self.seq % CHECKPOINT_EVERY == 0 or self.seq == self.n:
                cp_ms = ts + 1000
                signature = self.signer.sign(checkpoint_payload(self.seq, digest, cp_ms, "periodic"))
                self.checkpoints.append((self.seq, digest, cp_ms, "periodic", self.signer.key_id, signature))
        return rows


def _zipf(n: int) -> list[float]:
    total, out = 0.0, []
    for i in range(1, n + 1):
        total += 1 / i
        out.append(total)
    return out


# --- loading ----------------------------------------------------------------------------------------


async def load(n: int, signer: Signer, pg_url: str | None, sqlite_path: Path | None) -> None:
    corpus = Corpus(n, signer)
    pg = await asyncpg.connect(pg_url) if pg_url else None
    lite = sqlite3.connect(sqlite_path) if sqlite_path else None
    if lite is not None:
        lite.execute("PRAGMA journal_mode=WAL")
        lite.execute("PRAGMA synchronous=OFF")
    insert = f"INSERT INTO audit_events ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
    started = time.perf_counter()
    try:
        while corpus.seq < n:
            rows = corpus.chunk(min(CHUNK, n - corpus.seq))
            if pg is not None:
                await pg.copy_records_to_table("audit_events", records=rows, columns=list(COLUMNS))
            if lite is not None:
                with lite:
                    lite.executemany(insert, rows)
            print(f"  loaded {corpus.seq:>9,} records  ({time.perf_counter() - started:6.1f} s)", flush=True)
        head = (corpus.seq, corpus.prev, corpus.checkpoints[-1][0], corpus.checkpoints[-1][2])
        cp_insert = "INSERT INTO audit_checkpoints (seq, hash, ts_ms, kind, key_id, signature) VALUES "
        if pg is not None:
            await pg.executemany(cp_insert + "($1, $2, $3, $4, $5, $6)", corpus.checkpoints)
            await pg.execute(
                "UPDATE audit_chain SET seq=$1, hash=$2, checkpoint_seq=$3, checkpoint_ms=$4 WHERE id=1",
                *head,
            )
            await pg.execute("ANALYZE")
        if lite is not None:
            with lite:
                lite.executemany(cp_insert + "(?, ?, ?, ?, ?, ?)", corpus.checkpoints)
                lite.execute(
                    "UPDATE audit_chain SET seq=?, hash=?, checkpoint_seq=?, checkpoint_ms=? WHERE id=1", head
                )
            lite.execute("ANALYZE")
    finally:
        if pg is not None:
            await pg.close()
        if lite is not None:
            lite.close()


# --- measuring --------------------------------------------------------------------------------------


async def median_ms(work: Callable[[], Awaitable[Any]], runs: int = 5) -> float:
    await work()  # warm the cache: an auditor's second query, not the first after a restart
    times: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        await work()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


async def plan(
    engine: AsyncEngine, filters: Filters, order: Order, after: tuple[int, int] | None
) -> list[str]:
    statement = page_statement(filters, order, after, 101)
    sql = str(statement.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
    async with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = (await conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)).all()
            return [str(r[3]) for r in rows]
        rows = (await conn.exec_driver_sql("EXPLAIN " + sql)).all()
        return [str(r[0]) for r in rows]


async def sample(engine: AsyncEngine, n: int) -> dict[str, Any]:
    """Realistic arguments for the queries, taken from the data itself."""
    c = sa.table(
        "audit_events",
        sa.column("seq"),
        sa.column("ts_ms"),
        sa.column("subject"),
        sa.column("trace_id"),
        sa.column("tenant"),
        sa.column("tool"),
    )
    async with engine.connect() as conn:

        async def at(seq: int) -> Any:
            return (await conn.execute(sa.select(c).where(c.c.seq == seq))).one()

        mid, deep, end = await at(n // 2), await at(n * 9 // 10), await at(n)
        export_end = await at(min(n, n // 2 + 10_000))
        return {
            "subject": mid.subject,
            "tenant": mid.tenant,
            "tool": mid.tool,
            "trace_id": mid.trace_id,
            "day": (end.ts_ms - 86_400_000, end.ts_ms + 1),
            "deep": (deep.ts_ms, deep.seq),
            "export": (mid.ts_ms, export_end.ts_ms),
        }


async def measure(label: str, url: str, n: int, public_key: str) -> None:
    engine = create_engine(url)
    try:
        s = await sample(engine, n)
        since, until = s["day"]
        cases: list[tuple[str, Filters, Order, tuple[int, int] | None]] = [
            (
                "subject + last 24 h",
                Filters(subject=s["subject"], since_ms=since, until_ms=until),
                "desc",
                None,
            ),
            ("tenant", Filters(tenant=s["tenant"]), "desc", None),
            ("tool", Filters(tool=s["tool"]), "asc", None),
            ("trace id", Filters(trace_id=s["trace_id"]), "asc", None),
            ("decision=deny", Filters(decision="deny"), "desc", None),
            ("newest first, no filter", Filters(), "desc", None),
            ("page at 90% via cursor", Filters(), "asc", s["deep"]),
            ("subject, page via cursor", Filters(subject=s["subject"]), "asc", s["deep"]),
        ]
        print(f"\n== {label}: {n:,} records ==")
        for name, filters, order, after in cases:
            cursor = encode_cursor(order, *after) if after else None

            async def page(f: Filters = filters, o: Order = order, cur: str | None = cursor) -> Any:
                return await fetch_page(engine, f, limit=100, cursor=cur, order=o)

            got = len((await page()).events)
            took = await median_ms(page)
            print(f"{name:<28} {took:8.2f} ms  ({got} rows)")
            for line in (await plan(engine, filters, order, after))[:4]:
                print(f"    {line}")

        lo, hi = s["export"]
        export_filters = Filters(since_ms=lo, until_ms=hi)
        rows = 0

        async def export() -> None:
            nonlocal rows
            rows = 0
            async for chunk in csv_chunks(engine, export_filters):
                rows += chunk.count("\n")

        took = await median_ms(export)
        print(f"{'CSV export, time range':<28} {took:8.2f} ms  ({rows - 1:,} rows)")
        for line in (await plan(engine, export_filters, "asc", None))[:3]:
            print(f"    {line}")

        store = AuditStore(
            engine, Signer.from_secret(None), AuditSettings(trusted_public_keys=[public_key]), lambda e: {}
        )
        start = time.perf_counter()
        report = await store.verify()
        took = time.perf_counter() - start
        print(
            f"{'full-chain verify':<28} {took:8.2f} s   ({report.records:,} records, ok={report.ok}, "
            f"{report.checkpoints_valid} signed checkpoints valid)"
        )
    finally:
        await engine.dispose()


async def admin_sql(base: str, sql: str) -> None:
    conn = await asyncpg.connect(f"{base}/postgres", timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--only", choices=("pg", "sqlite"))
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--keep", action="store_true", help="keep the scratch database and file")
    args = parser.parse_args()
    seed, public = generate_key()
    signer = Signer.from_secret(SecretStr(seed))
    pg_url = f"{args.pg}/{DB_NAME}" if args.only != "sqlite" else None
    workdir = Path(tempfile.mkdtemp(prefix="arbiter-bench-audit-"))
    sqlite_path = workdir / "audit.db" if args.only != "pg" else None
    if pg_url:
        await admin_sql(args.pg, f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        await admin_sql(args.pg, f'CREATE DATABASE "{DB_NAME}"')
        await asyncio.to_thread(schema.upgrade, pg_url)
    if sqlite_path:
        await asyncio.to_thread(schema.upgrade, f"sqlite:///{sqlite_path}")
    try:
        targets = [name for name, on in (("PostgreSQL", pg_url), ("SQLite", sqlite_path)) if on]
        print(f"loading {args.n:,} records into {' and '.join(targets)}")
        await load(args.n, signer, pg_url, sqlite_path)
        if pg_url:
            await measure("PostgreSQL", pg_url, args.n, public)
        if sqlite_path:
            await measure("SQLite", f"sqlite:///{sqlite_path}", args.n, public)
    finally:
        if not args.keep:
            if pg_url:
                await admin_sql(args.pg, f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
            await asyncio.to_thread(shutil.rmtree, workdir, True)
        else:
            print(f"kept: {pg_url or ''} {sqlite_path or ''}")


if __name__ == "__main__":
    asyncio.run(main())
