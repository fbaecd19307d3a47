"""The overview charts' aggregate (audit/activity.py) on SQLite and PostgreSQL: counts per bucket, tool
and upstream exactly as the records say, latency percentiles to their bin, sampling beyond SAMPLE, and
the partial index the counts read (migration 0011)."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections import Counter
from typing import Any

import pytest

from arbiter.audit import activity as act
from arbiter.audit.activity import activity, percentile, window
from arbiter.audit.record import Event
from arbiter.store import schema
from arbiter.store.db import create_engine
from tests.audit.corpus import BASE_MS, append, event

HOUR = 3_600_000


def events(count: int, seed: int = 3) -> list[Event]:
    rng = random.Random(seed)
    return [event(rng, BASE_MS + rng.randrange(24 * HOUR)) for _ in range(count)]


def expected(evs: list[Event]) -> tuple[Counter[int], Counter[str], Counter[str], list[float]]:
    calls = [e for e in evs if e.kind == "mcp" and e.method == "tools/call"]
    per_hour = Counter((e.ts_ms - BASE_MS) // HOUR for e in calls)
    per_tool = Counter(e.tool or "(none)" for e in calls)
    denied = Counter(e.tool or "(none)" for e in calls if e.decision == "deny")
    return per_hour, per_tool, denied, sorted(e.latency_ms or 0 for e in calls)


async def check(url: str) -> None:
    evs = events(300)
    await append(url, evs)
    per_hour, per_tool, denied, latencies = expected(evs)
    engine = create_engine(url)
    try:
        found = await activity(engine, BASE_MS, BASE_MS + 24 * HOUR, HOUR, top=3)
    finally:
        await engine.dispose()
    assert [b.calls for b in found.buckets] == [per_hour[h] for h in range(24)]
    assert found.total.calls == len(latencies)
    assert [(t.label, t.calls) for t in found.tools] == [
        (name, n) for name, n in sorted(per_tool.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
    ]
    assert all(t.denials == denied[t.label] for t in found.tools)
    assert found.more_tools == len(per_tool) - 3
    # The corpus's latencies are below 100 ms: binned to the whole ms, so p50/p95 are exact to it.
    for q, got in ((0.5, found.total.p50_ms), (0.95, found.total.p95_ms)):
        assert got == percentile([(float(int(v)), 1) for v in latencies], q)
    assert not found.sampled


async def test_activity_on_sqlite(sqlite_url: str) -> None:
    await check(sqlite_url)


async def test_activity_on_postgresql(postgres_url: str) -> None:
    await asyncio.to_thread(schema.upgrade, postgres_url)  # Alembic runs its own event loop
    await check(postgres_url)


async def test_latencies_are_sampled_beyond_the_sample_size_and_counts_stay_exact(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    evs = events(400, seed=9)
    await append(sqlite_url, evs)
    _, _, _, latencies = expected(evs)
    monkeypatch.setattr(act, "SAMPLE", 50)
    engine = create_engine(sqlite_url)
    try:
        found = await activity(engine, BASE_MS, BASE_MS + 24 * HOUR, HOUR)
    finally:
        await engine.dispose()
    assert found.sampled and found.total.calls == len(latencies)
    exact = percentile([(float(int(v)), 1) for v in latencies], 0.5)
    assert found.total.p50_ms is not None and exact is not None
    assert abs(found.total.p50_ms - exact) < 20  # a sample's median: near, not equal


async def test_an_empty_window_and_the_named_windows(sqlite_url: str) -> None:
    engine = create_engine(sqlite_url)
    try:
        since, until, width = window("24h", BASE_MS + 90 * 60_000)
        assert (until - since, width, until) == (24 * HOUR, HOUR, BASE_MS + 2 * HOUR)
        found = await activity(engine, since, until, width)
    finally:
        await engine.dispose()
    assert len(found.buckets) == 24 and found.total.calls == 0 and found.total.p95_ms is None
    assert found.tools == [] and found.upstreams == []
    with pytest.raises(Exception, match="unknown window"):
        window("1y", BASE_MS)


def test_percentile_is_the_nearest_rank() -> None:
    hist: list[tuple[float, int]] = [(1.0, 50), (2.0, 45), (30.0, 5)]
    assert percentile(hist, 0.5) == 1.0
    assert percentile(hist, 0.95) == 2.0
    assert percentile(hist, 0.96) == 30.0
    assert percentile([], 0.5) is None


def test_the_counts_read_the_partial_index_alone(sqlite_url: str) -> None:
    path = sqlite_url.split(":///", 1)[1]
    db = sqlite3.connect(path)
    try:
        params: dict[str, Any] = {"since": 0, "until": 1, "width": 1}
        plan = db.execute(
            f"EXPLAIN QUERY PLAN SELECT upstream, tool, {act._COUNTS} FROM audit_events"  # pyright: ignore[reportPrivateUsage]
            f" INDEXED BY ix_audit_calls WHERE {act._CALLS} GROUP BY 1, 2",  # pyright: ignore[reportPrivateUsage]
            params,
        ).fetchall()
    finally:
        db.close()
    assert "USING COVERING INDEX ix_audit_calls" in " ".join(str(r) for r in plan)
