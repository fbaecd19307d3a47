"""The overview's activity charts as server-rendered SVG geometry: stacked bars of calls (answered,
denied, failed) per time bucket, and lines of latency p50/p95.

No script draws them and no inline style positions them (the console's CSP allows neither): the
template writes the SVG elements with the coordinates computed here, and the stylesheet colours them
by class. Each chart has a text title and a table of the same numbers for screen readers and people
who prefer figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from arbiter.audit.activity import WINDOWS, Activity, Stats

WIDTH = 720
HEIGHT = 180
LEFT = 48  # room for the axis labels
BOTTOM = 20
TOP = 10  # room for the top label


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    width: float
    height: float
    css: str  # ok | deny | error


@dataclass(frozen=True)
class Column:
    label: str  # the bucket's start, as shown under the chart and in the table
    title: str  # what a pointer over the column shows
    rects: list[Rect]


@dataclass(frozen=True)
class Tick:
    y: float
    label: str


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    columns: list[Column]
    ticks: list[Tick]
    p50: list[tuple[float, float]]  # the line's points (x, y); none without latencies
    p95: list[tuple[float, float]]
    x_labels: list[tuple[float, str]]


def _label(ms: int, bucket_ms: int) -> str:
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.strftime("%m-%d %H:%M") if bucket_ms >= 3_600_000 * 6 else moment.strftime("%H:%M")


def _nice(top: float) -> float:
    """A round axis maximum at or above ``top``: 1, 2 or 5 times a power of ten."""
    if top <= 0:
        return 1
    step = 1.0
    while step * 10 <= top:
        step *= 10
    for m in (1, 2, 5, 10):
        if m * step >= top:
            return m * step
    return 10 * step


def _fmt(value: float) -> str:
    return f"{value:g}" if value < 10_000 else f"{value / 1000:g}k"


def calls_chart(activity: Activity) -> Chart:
    buckets = activity.buckets
    plot_w, plot_h = WIDTH - LEFT, HEIGHT - BOTTOM - TOP
    top = _nice(max((b.calls for b in buckets), default=0))
    slot = plot_w / max(1, len(buckets))
    columns: list[Column] = []
    for i, (b, start) in enumerate(zip(buckets, activity.starts_ms, strict=True)):
        x = LEFT + i * slot + slot * 0.1
        y = float(TOP + plot_h)
        rects: list[Rect] = []
        for count, css in ((b.calls - b.denials - b.errors, "ok"), (b.denials, "deny"), (b.errors, "error")):
            h = plot_h * count / top
            if count:
                y -= h
                rects.append(Rect(round(x, 1), round(y, 1), round(slot * 0.8, 1), round(h, 1), css))
        label = _label(start, activity.bucket_ms)
        title = f"{label}: {b.calls} calls, {b.denials} denied, {b.errors} failed"
        columns.append(Column(label, title, rects))
    ticks = [Tick(round(TOP + plot_h - plot_h * f, 1), _fmt(top * f)) for f in (0, 0.5, 1)]
    return Chart(WIDTH, HEIGHT, columns, ticks, [], [], _x_labels(activity, slot))


def latency_chart(activity: Activity) -> Chart:
    buckets = activity.buckets
    slot = (WIDTH - LEFT) / max(1, len(buckets))
    p50, p95, ticks = _latency(buckets, slot)
    columns: list[Column] = []
    for b, start in zip(buckets, activity.starts_ms, strict=True):
        label = _label(start, activity.bucket_ms)
        columns.append(Column(label, f"{label}: p50 {_ms(b.p50_ms)}, p95 {_ms(b.p95_ms)}", []))
    return Chart(WIDTH, HEIGHT, columns, ticks, p50, p95, _x_labels(activity, slot))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g} ms"


Points = list[tuple[float, float]]


def _latency(buckets: list[Stats], slot: float) -> tuple[Points, Points, list[Tick]]:
    plot_h = HEIGHT - BOTTOM - TOP
    top = _nice(max((b.p95_ms or 0 for b in buckets), default=0))

    def points(values: list[float | None]) -> Points:
        return [
            (round(LEFT + i * slot + slot / 2, 1), round(TOP + plot_h - plot_h * v / top, 1))
            for i, v in enumerate(values)
            if v is not None
        ]

    ticks = [Tick(round(TOP + plot_h - plot_h * f, 1), f"{_fmt(top * f)} ms") for f in (0, 0.5, 1)]
    return points([b.p50_ms for b in buckets]), points([b.p95_ms for b in buckets]), ticks


def polyline(points: Points) -> str:
    return " ".join(f"{x},{y}" for x, y in points)


def _x_labels(activity: Activity, slot: float) -> list[tuple[float, str]]:
    """About six labels along the time axis."""
    count = len(activity.buckets)
    every = max(1, -(-count // 6))
    return [
        (round(LEFT + i * slot + slot / 2, 1), _label(activity.starts_ms[i], activity.bucket_ms))
        for i in range(0, count, every)
    ]


def bar_width(stats: Stats, busiest: int, width: int = 160) -> float:
    """A row's bar in the per-upstream and per-tool tables, relative to the busiest row."""
    return round(width * stats.calls / busiest, 1) if busiest else 0.0


def overview_charts(activity: Activity, window: str) -> dict[str, Any]:
    """Everything the overview's activity section shows."""
    busiest_tool = max((t.calls for t in activity.tools), default=0)
    busiest_upstream = max((u.calls for u in activity.upstreams), default=0)
    return {
        "window": window,
        "windows": list(WINDOWS),
        "since": _label(activity.since_ms, 86_400_000),
        "until": _label(activity.until_ms, 86_400_000),
        "activity": activity,
        "calls": calls_chart(activity),
        "latency": latency_chart(activity),
        "tools": [(t, bar_width(t, busiest_tool)) for t in activity.tools],
        "upstreams": [(u, bar_width(u, busiest_upstream)) for u in activity.upstreams],
        "ms": _ms,
        "polyline": polyline,
    }
