"""Tool-call activity over a time window, for the console's overview charts: calls, denials, errors
and latency percentiles per time bucket, per upstream and per tool, aggregated from the audit log.

The database does the counting: GROUP BY queries over the window's ``tools/call`` records (a range
of ``ix_audit_calls``, migration 0011, which holds every column they count by), by bucket or by
upstream and tool, and latency rounded to a *latency bin*. Python only turns those groups into counts
and percentiles, so the records never cross the wire. A bin is 1 ms wide below 100 ms, 10 ms below
1 s and 100 ms beyond: a percentile is exact to that width. A record's latency is in its body only, so
reading it is a JSON parse per record: percentiles are taken from a sample of at most ``SAMPLE`` calls
(every k-th by seq) when the window holds more. The counts are always exact.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from arbiter.errors import InvalidInput

# The windows the console offers: name -> (length, bucket width), in ms.
HOUR_MS = 3_600_000
WINDOWS: dict[str, tuple[int, int]] = {
    "1h": (HOUR_MS, 5 * 60_000),
    "24h": (24 * HOUR_MS, HOUR_MS),
    "7d": (7 * 24 * HOUR_MS, 6 * HOUR_MS),
}
DEFAULT_WINDOW = "24h"
TOP = 10  # upstreams and tools listed, the busiest first


@dataclass(frozen=True)
class Stats:
    """Counts and latency percentiles of one bucket, upstream or tool."""

    label: str
    calls: int = 0
    denials: int = 0
    errors: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None


@dataclass(frozen=True)
class Activity:
    since_ms: int
    until_ms: int
    bucket_ms: int
    buckets: list[Stats]  # oldest first, one per bucket of the window (empty ones included)
    upstreams: list[Stats]
    tools: list[Stats]
    total: Stats
    more_tools: int = 0  # tools called in the window beyond those listed
    more_upstreams: int = 0
    starts_ms: list[int] = field(default_factory=list[int])  # each bucket's start
    sampled: bool = False  # the percentiles come from a sample of the calls (the counts never do)


def window(name: str | None, now_ms: int) -> tuple[int, int, int]:
    """``(since_ms, until_ms, bucket_ms)`` of a named window ending with the current bucket."""
    length, bucket = WINDOWS.get(name or DEFAULT_WINDOW, (0, 0))
    if not length:
        raise InvalidInput(f"unknown window {name!r}; windows are: {', '.join(WINDOWS)}")
    until = (now_ms // bucket + 1) * bucket  # buckets on round boundaries; the last one is still filling
    return until - length, until, bucket


def latency_expr(dialect: str) -> str:
    """The SQL of a record's latency in ms: its body's ``latency_ms`` (no column holds it)."""
    if dialect == "postgresql":
        return "CAST(CAST(body AS json) ->> 'latency_ms' AS double precision)"
    return "json_extract(body, '$.latency_ms')"


def _bin(dialect: str, lat: str = "l") -> str:
    floor = "floor({})" if dialect == "postgresql" else "CAST({} AS INTEGER)"  # floor for positives
    return (
        f"CASE WHEN {lat} IS NULL THEN NULL"
        f" WHEN {lat} < 100 THEN {floor.format(lat)}"
        f" WHEN {lat} < 1000 THEN {floor.format(f'{lat} / 10')} * 10"
        f" ELSE {floor.format(f'{lat} / 100')} * 100 END"
    )


_CALLS = "kind = 'mcp' AND method = 'tools/call' AND ts_ms >= :since AND ts_ms < :until"
# What became of a call: refused by Arbiter (a denial), failed (Arbiter's own error, or an allowed call
# that ended with an error: the upstream's, a timeout, an open circuit), or answered (a tool's own
# ``isError`` result counts as answered: the upstream did its job).
_COUNTS = (
    "count(*), sum(CASE WHEN decision = 'deny' THEN 1 ELSE 0 END),"
    " sum(CASE WHEN decision = 'error' OR (decision = 'allow' AND reason NOT IN ('allowed', 'cancelled'))"
    " THEN 1 ELSE 0 END)"
)
# Reading a latency means parsing the record's body (~5 us a record on SQLite): the percentiles are
# taken from at most about this many calls, every k-th by seq, so their cost does not grow with the
# window. Counts are always exact.
SAMPLE = 20_000


def _sampled(dialect: str, where: str, key: str) -> str:
    """Latency bins by ``key`` over every ``:k``-th call of ``where`` (by seq): the body is parsed for
    those rows only, and once each (a materialized CTE, so the bin's CASE does not parse it four times)."""
    return (
        f"WITH c AS MATERIALIZED (SELECT {key} AS key, {latency_expr(dialect)} AS l"
        f" FROM audit_events{_hint(dialect)} WHERE {where} AND seq % :k = 0)"
        f" SELECT key, {_bin(dialect)} AS lat, count(*) FROM c GROUP BY 1, 2"
    )


def _hint(dialect: str) -> str:
    # SQLite's planner prefers ix_audit_time to the partial index the counts need (migration 0011),
    # whose columns hold everything but the latency, so the counts never read a record's row.
    return " INDEXED BY ix_audit_calls" if dialect == "sqlite" else ""


async def activity(
    engine: AsyncEngine, since_ms: int, until_ms: int, bucket_ms: int, *, top: int = TOP
) -> Activity:
    dialect = engine.dialect.name
    table = f"audit_events{_hint(dialect)}"
    bucket = "(ts_ms - :since) / :width"
    count = sa.text(f"SELECT count(*) FROM {table} WHERE {_CALLS}")
    by_time = sa.text(f"SELECT {bucket}, {_COUNTS} FROM {table} WHERE {_CALLS} GROUP BY 1")
    by_tool = sa.text(f"SELECT upstream, tool, {_COUNTS} FROM {table} WHERE {_CALLS} GROUP BY 1, 2")
    params: dict[str, int] = {"since": since_ms, "until": until_ms, "width": bucket_ms}
    buckets = (until_ms - since_ms) // bucket_ms
    per_bucket: list[_Tally] = [_Tally() for _ in range(buckets)]
    total = _Tally()
    per_tool: dict[str, _Tally] = {}
    per_upstream: dict[str, _Tally] = {}
    async with engine.connect() as conn:
        calls = (await conn.execute(count, params)).scalar_one()
        params["k"] = max(1, -(-calls // SAMPLE))
        if calls:
            for b, *counts in await conn.execute(by_time, params):
                if 0 <= b < buckets:
                    per_bucket[int(b)].add(*counts)
                    total.add(*counts)
            for b, lat_bin, n in await conn.execute(sa.text(_sampled(dialect, _CALLS, bucket)), params):
                if 0 <= b < buckets and lat_bin is not None:
                    per_bucket[int(b)].latency[float(lat_bin)] += n
                    total.latency[float(lat_bin)] += n
            for upstream, tool, *counts in await conn.execute(by_tool, params):
                per_tool.setdefault(tool or "(none)", _Tally()).add(*counts)
                per_upstream.setdefault(upstream or "(none)", _Tally()).add(*counts)
        busiest_tools = _top(per_tool, top)
        busiest_upstreams = _top(per_upstream, top)
        for column, busiest, tallies in (
            ("tool", busiest_tools, per_tool),
            ("upstream", busiest_upstreams, per_upstream),
        ):
            if busiest:
                await _latencies(conn, dialect, column, busiest, tallies, params)
    starts = [since_ms + i * bucket_ms for i in range(buckets)]
    return Activity(
        since_ms,
        until_ms,
        bucket_ms,
        [t.stats(str(s)) for t, s in zip(per_bucket, starts, strict=True)],
        [per_upstream[name].stats(name) for name in busiest_upstreams],
        [per_tool[name].stats(name) for name in busiest_tools],
        total.stats("all"),
        more_tools=max(0, len(per_tool) - top),
        more_upstreams=max(0, len(per_upstream) - top),
        starts_ms=starts,
        sampled=params["k"] > 1,
    )


async def _latencies(
    conn: AsyncConnection,
    dialect: str,
    column: str,  # "tool" or "upstream": a fixed name, never input
    names: list[str],
    tallies: dict[str, _Tally],
    params: dict[str, int],
) -> None:
    """The latency histograms of the busiest tools (or upstreams), sampled as the buckets are."""
    calls = sum(tallies[n].calls for n in names)
    binds = {f"n{i}": name for i, name in enumerate(names)}
    where = f"{_CALLS} AND {column} IN ({', '.join(':' + b for b in binds)})"
    rows = await conn.execute(
        sa.text(_sampled(dialect, where, column)), {**params, **binds, "k": max(1, -(-calls // SAMPLE))}
    )
    for name, lat_bin, n in rows:
        if lat_bin is not None and name in tallies:
            tallies[name].latency[float(lat_bin)] += n


def _top(tallies: dict[str, _Tally], top: int) -> list[str]:
    return [name for name, _ in sorted(tallies.items(), key=lambda kv: (-kv[1].calls, kv[0]))[:top]]


class _Tally:
    """Counts by decision and a histogram of latency bins, added up group by group."""

    __slots__ = ("calls", "denials", "errors", "latency")

    def __init__(self) -> None:
        self.calls = self.denials = self.errors = 0
        self.latency: Counter[float] = Counter()

    def add(self, calls: int, denials: int, errors: int) -> None:
        self.calls += calls
        self.denials += denials
        self.errors += errors

    def stats(self, label: str) -> Stats:
        return Stats(
            label,
            self.calls,
            self.denials,
            self.errors,
            percentile(self.latency.items(), 0.50),
            percentile(self.latency.items(), 0.95),
        )


def percentile(histogram: Iterable[tuple[float, int]], q: float) -> float | None:
    """The ``q`` quantile (nearest rank) of a histogram of ``(value, count)``; None when empty."""
    ordered = sorted(histogram)
    size = sum(n for _, n in ordered)
    if size == 0:
        return None
    rank = max(1, -(-int(q * size * 1000) // 1000))  # ceil(q * size) without float drift on whole ranks
    seen = 0
    for value, n in ordered:
        seen += n
        if seen >= rank:
            return value
    return ordered[-1][0]
