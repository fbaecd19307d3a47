"""CPU cost of auditing one call: on the request path (build the event, queue it) and in the writer
(redact, HMAC and render; then, in the store, seal (canonical text + hash chain) and insert), per record,
in batches of 500, 50 and 10 (the writer stores what gathered in ``flush_interval_s``, 0.2 s: 50 is
250 calls/s), on SQLite and on PostgreSQL.

A "store" line is this process's CPU (every thread: the event loop, aiosqlite's thread) spent in
``AuditStore.append``, called as the writer calls it; less the "seal" line, what is left is the
database work. For PostgreSQL, "server CPU" is what the database's backend processes spent (read from
/proc, so only when the server runs on this machine). Each figure is the least of three runs (what a
busy machine adds is noise). To compare with an earlier Arbiter, run this same script with that
version's ``src`` first on ``PYTHONPATH`` (e.g. from ``git archive REV src``).

Run: ``.venv/bin/python bench/audit_cost.py`` (``--no-postgres`` to skip it; the server is
``ARBITER_BENCH_PG``, default ``postgresql://postgres@127.0.0.1:5432``, where a database of its own is
created and dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.audit import record
from arbiter.audit import tables as t
from arbiter.audit.record import Event, Renderer
from arbiter.audit.redact import Redactor
from arbiter.audit.signing import Signer
from arbiter.audit.store import AuditStore
from arbiter.auth.principal import Principal
from arbiter.proxy.interceptors.audit import mcp_event
from arbiter.proxy.pipeline import CallContext
from arbiter.settings import AuditSettings, RedactSettings
from arbiter.store import schema
from arbiter.store.db import create_engine

PRINCIPAL = Principal("sam", "arbiter", "api_key", "acme", frozenset({"support-agent"}), api_key_id="k1")
DEFINITION = {"name": "get_customer", "description": "Return a customer", "inputSchema": {"type": "object"}}
ARGS = {"customer_id": "C-1001", "note": "call me at jane@example.com", "limit": 5, "status": "open"}
PG_BASE = os.environ.get("ARBITER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
BATCHES = (500, 50, 10)


def _ctx(i: int) -> CallContext:
    return CallContext(
        method="tools/call",
        params={},
        request_id=i,
        principal=PRINCIPAL,
        exposed="crm__get_customer",
        upstream="crm",
        target="get_customer",
        arguments=dict(ARGS),
        definition=DEFINITION,
    )


def per_call_us(n: int, fn: Callable[[int], object]) -> float:
    start = time.process_time()
    for i in range(n):
        fn(i)
    return (time.process_time() - start) / n * 1e6


@asynccontextmanager
async def sqlite_db() -> AsyncIterator[str]:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
        await asyncio.to_thread(schema.upgrade, url)
        yield url


@asynccontextmanager
async def postgres_db() -> AsyncIterator[str]:
    import asyncpg  # pyright: ignore[reportMissingTypeStubs]

    name = f"arbiter_bench_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(f"{PG_BASE}/postgres", timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    await admin(f'CREATE DATABASE "{name}"')
    try:
        url = f"{PG_BASE}/{name}"
        await asyncio.to_thread(schema.upgrade, url)
        yield url
    finally:
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _backend_cpu(engine: AsyncEngine) -> dict[int, float] | None:
    """CPU seconds so far of every server process connected to this database (PostgreSQL on this
    machine only)."""
    if engine.dialect.name != "postgresql":
        return None
    async with engine.connect() as conn:
        query = sa.text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
        pids = list((await conn.execute(query)).scalars())
    return _cpu_of(pids)


def _cpu_of(pids: list[int]) -> dict[int, float] | None:
    found: dict[int, float] = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        found[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


@dataclass
class Cost:
    """CPU per record, µs."""

    process: float  # all of this process's threads
    threads: float  # threads other than the event loop's: aiosqlite's (SQLite)
    server: float | None  # the database server's processes (PostgreSQL on this machine)


def _other_threads_cpu() -> float:
    """CPU seconds of this process's threads other than the calling one (aiosqlite runs each
    connection in a thread of its own)."""
    me = threading.get_native_id()
    total = 0.0
    for task in Path("/proc/self/task").iterdir():
        if int(task.name) == me:
            continue
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _as_the_writer(store: AuditStore) -> AbstractAsyncContextManager[None]:
    """The store as the writer uses it: holding one connection while it runs (an Arbiter from before
    ``holding`` took one from the pool per batch)."""
    holding: Callable[[], AbstractAsyncContextManager[None]] | None = getattr(store, "holding", None)
    return holding() if holding is not None else nullcontext()


async def store_cost(url: str, bodies: list[dict[str, Any]], batch: int) -> Cost:
    """Per-record CPU of appending ``bodies`` in batches."""
    engine = create_engine(url)
    try:
        store = AuditStore(engine, Signer.from_secret(None), AuditSettings(), lambda e: {})
        async with engine.begin() as conn:  # each measurement starts from an empty log
            await conn.execute(sa.delete(t.events))
            await conn.execute(sa.delete(t.checkpoints))
            await conn.execute(sa.update(t.chain).values(seq=0, hash="0" * 64, checkpoint_seq=0))
        await store.append([dict(b, id=str(uuid.uuid4())) for b in bodies[:batch]])  # warm up
        server_before = await _backend_cpu(engine)
        threads_before = _other_threads_cpu()
        start = time.process_time()
        async with _as_the_writer(store):
            for at in range(0, len(bodies), batch):
                await store.append(bodies[at : at + batch])
        spent = time.process_time() - start
        threads = _other_threads_cpu() - threads_before
        server_after = await _backend_cpu(engine)
        report = await store.verify()
        assert report.ok and report.records == len(bodies) + batch, report.to_json()
    finally:
        await engine.dispose()
    n = len(bodies)
    server = None
    if server_before is not None and server_after is not None:
        server = sum(cpu - server_before.get(pid, 0.0) for pid, cpu in server_after.items()) / n * 1e6
    return Cost(spent / n * 1e6, threads / n * 1e6, server)


def _seal(bodies: list[dict[str, Any]], seq: int) -> None:
    seal_rows = getattr(record, "seal_rows", None)
    if seal_rows is not None:
        seal_rows(bodies, seq, "0" * 64)
        return
    prev = "0" * 64  # an Arbiter from before seal_rows: what its store did for each record
    for body in bodies:
        seq += 1
        _, prev = record.seal(body, seq, prev)
        record.columns(body)


def seal_cost(bodies: list[dict[str, Any]]) -> float:
    """Per-record CPU (µs) of sealing alone: canonical text, hash, indexed columns; no database."""
    runs: list[float] = []
    for _ in range(3):
        copies = [dict(b) for b in bodies]
        start = time.process_time()
        for at in range(0, len(copies), 500):
            _seal(copies[at : at + 500], at)
        runs.append((time.process_time() - start) / len(bodies) * 1e6)
    return min(runs)


async def measure(name: str, url: str, bodies: list[dict[str, Any]]) -> None:
    for batch in BATCHES:
        # Small batches are slow to store: fewer records keep the run short.
        some = bodies[: len(bodies) // 4] if batch < 50 else bodies
        runs = [await store_cost(url, [dict(b) for b in some], batch) for _ in range(3)]
        cpu = min(r.process for r in runs)
        line = f"store: seal + insert ({name:10s} {batch:3d}/txn)  {cpu:7.1f} µs per record"
        if name == "SQLite":
            line += f"; in aiosqlite's thread {min(r.threads for r in runs):5.1f}"
        servers = [r.server for r in runs if r.server is not None]
        if servers:
            line += f"; server CPU {min(servers):5.1f}"
        print(line, flush=True)


async def stores(bodies: list[dict[str, Any]], postgres: bool) -> None:
    async with sqlite_db() as url:
        await measure("SQLite", url, bodies)
    if postgres:
        async with postgres_db() as url:
            await measure("PostgreSQL", url, bodies)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-n", type=int, default=20_000, help="records per measurement")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    n: int = args.n
    renderer = Renderer(Redactor(RedactSettings()), b"k" * 32)
    ctxs = [_ctx(i) for i in range(n)]
    build = per_call_us(n, lambda i: mcp_event(ctxs[i], {"content": []}, None))
    events: list[Event] = [mcp_event(c, {"content": []}, None) for c in ctxs]
    render = per_call_us(n, lambda i: renderer.render(events[i]))
    bodies = [renderer.render(e) for e in events]
    seal = seal_cost(bodies)
    print(f"request path: build the event                {build:7.1f} µs per call")
    print(f"writer: redact + HMAC + render               {render:7.1f} µs per record")
    print(f"store: seal (canonical text, hash, columns)  {seal:7.1f} µs per record")
    asyncio.run(stores(bodies, postgres=not args.no_postgres))


if __name__ == "__main__":
    main()
