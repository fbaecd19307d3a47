"""The audit store's database work per record, in isolation: N rendered records appended through the real
``AuditStore`` (holding its connection, as the writer does) in batches of 1, 8 and 64, on SQLite and on
PostgreSQL; and, with ``--writer``, the same records pushed through the real ``AuditWriter`` by
concurrent "requests" that each wait for their record (``audit.confirm_before_answer``), the case where
batches are small.

Per record it prints this process's CPU (every thread), the database work (that CPU less sealing, which
is pure Python and the same whatever the database), the wall time, and on PostgreSQL the server's CPU
(its backends, read from /proc: only when the server runs on this machine). Each figure is the least of
``--reps`` runs: what a busy machine adds is noise. To compare with an earlier Arbiter, run this script
with that version's ``src`` first on ``PYTHONPATH`` (``git archive REV src | tar -x -C /tmp/old``).

Run: ``.venv/bin/python bench/audit_append.py [--no-postgres] [--writer]`` (the PostgreSQL server is
``ARBITER_BENCH_PG``, default ``postgresql://postgres@127.0.0.1:5432``; a database of its own is created
and dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import sqlalchemy as sa
from audit_cost import _as_the_writer, _backend_cpu, _ctx, postgres_db, seal_cost, sqlite_db

from arbiter.audit import tables as t
from arbiter.audit.record import Event, Renderer
from arbiter.audit.redact import Redactor
from arbiter.audit.signing import Signer
from arbiter.audit.store import AuditStore
from arbiter.audit.writer import AuditWriter
from arbiter.proxy.interceptors.audit import mcp_event
from arbiter.settings import AuditSettings, RedactSettings
from arbiter.store.db import create_engine


@dataclass
class Run:
    cpu: float  # µs of process CPU per record
    wall: float  # µs of wall time per record
    server: float | None  # µs of the database server's CPU per record
    batches: int  # store writes


async def _reset(engine: Any) -> None:
    async with engine.begin() as conn:  # each run starts from an empty log
        await conn.execute(sa.delete(t.events))
        await conn.execute(sa.delete(t.checkpoints))
        await conn.execute(sa.update(t.chain).values(seq=0, hash="0" * 64, checkpoint_seq=0))


def _server(before: dict[int, float] | None, after: dict[int, float] | None, n: int) -> float | None:
    if before is None or after is None:
        return None
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items()) / n * 1e6


async def store_run(url: str, bodies: list[dict[str, Any]], batch: int) -> Run:
    engine = create_engine(url)
    try:
        store = AuditStore(engine, Signer.from_secret(None), AuditSettings(), lambda e: {})
        await _reset(engine)
        server_before = await _backend_cpu(engine)
        async with _as_the_writer(store):
            await store.append([dict(b, id=str(uuid.uuid4())) for b in bodies[:batch]])  # warm up
            cpu, wall = time.process_time(), time.perf_counter()
            for at in range(0, len(bodies), batch):
                await store.append(bodies[at : at + batch])
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        server_after = await _backend_cpu(engine)
        report = await store.verify()
        assert report.ok and report.records == len(bodies) + batch, report.to_json()
    finally:
        await engine.dispose()
    n = len(bodies)
    return Run(cpu / n * 1e6, wall / n * 1e6, _server(server_before, server_after, n), -(-n // batch))


def _busy(us: float) -> None:
    end = time.process_time() + us / 1e6
    while time.process_time() < end:
        pass


async def writer_run(url: str, events: list[Event], render: Any, in_flight: int, work_us: float) -> Run:
    """``in_flight`` tasks each reserve, work ``work_us`` of CPU on the event loop (the proxy's own
    work on a call, in two halves with a yield between), submit and wait for one record at a time, as
    requests do. The CPU reported is what the writer adds: the work is subtracted."""
    with tempfile.TemporaryDirectory() as spool:
        cfg = AuditSettings(spool_dir=Path(spool))
        engine = create_engine(url)
        writes = batches = 0
        cpu = wall = 0.0
        server_before = server_after = None

        def wrote(_: float) -> None:
            nonlocal writes
            writes += 1

        try:
            store = AuditStore(engine, Signer.from_secret(None), cfg, render)
            await _reset(engine)
            writer = AuditWriter(store, render, cfg)
            writer.on_write = wrote
            stopping = anyio.Event()
            todo = iter(events)

            async def request() -> None:
                for event in todo:
                    writer.reserve()
                    if work_us:
                        _busy(work_us / 2)
                        await anyio.lowlevel.checkpoint()
                        _busy(work_us / 2)
                    await writer.confirmed(writer.submit(event))

            async with anyio.create_task_group() as tg:
                tg.start_soon(writer.run, stopping)
                writer.reserve()  # started and connected
                await writer.confirmed(writer.submit(mcp_event(_ctx(-1), {"content": []}, None)))
                server_before = await _backend_cpu(engine)
                writes = 0
                cpu, wall = time.process_time(), time.perf_counter()
                async with anyio.create_task_group() as requests:
                    for _ in range(in_flight):
                        requests.start_soon(request)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                batches = writes
                server_after = await _backend_cpu(engine)
                stopping.set()
            report = await store.verify()
            assert report.ok and report.records == len(events) + 1, report.to_json()
        finally:
            await engine.dispose()
    n = len(events)
    return Run(cpu / n * 1e6 - work_us, wall / n * 1e6, _server(server_before, server_after, n), batches)


def _line(label: str, runs: list[Run], seal: float | None) -> str:
    cpu, wall = min(r.cpu for r in runs), min(r.wall for r in runs)
    line = f"{label:34s} CPU {cpu:7.1f}"
    if seal is not None:
        line += f"  db work {cpu - seal:7.1f}"
    line += f"  wall {wall:7.1f}"
    servers = [r.server for r in runs if r.server is not None]
    if servers:
        line += f"  server CPU {min(servers):6.1f}"
    batches = min(r.batches for r in runs)
    return line + f"  µs/record  ({batches} writes)"


async def main_async(args: argparse.Namespace) -> None:
    renderer = Renderer(Redactor(RedactSettings()), b"k" * 32)
    n: int = args.n
    events = [mcp_event(_ctx(i), {"content": []}, None) for i in range(n)]
    bodies = [renderer.render(e) for e in events]
    seal = seal_cost(bodies)
    print(f"seal (canonical text, hash, columns; no database)  {seal:6.1f} µs/record", flush=True)
    dbs = [("SQLite", sqlite_db)] + ([] if args.no_postgres else [("PostgreSQL", postgres_db)])
    for name, db in dbs:
        async with db() as url:
            for batch in args.batches:
                runs = [await store_run(url, [dict(b) for b in bodies], batch) for _ in range(args.reps)]
                print(_line(f"store {name} {batch}/batch", runs, seal), flush=True)
            if args.writer:
                for c in args.in_flight:
                    runs = [
                        await writer_run(url, events, renderer.render, c, args.work_us)
                        for _ in range(args.reps)
                    ]
                    print(_line(f"writer {name} {c} in flight, confirmed", runs, None), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-n", type=int, default=2000, help="records per run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64])
    parser.add_argument("--writer", action="store_true", help="also through AuditWriter, confirmed")
    parser.add_argument("--in-flight", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--work-us", type=float, default=0.0, help="each request's own CPU, µs (--writer)")
    parser.add_argument("--no-postgres", action="store_true")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
