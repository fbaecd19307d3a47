"""The benchmark's results: samples, their medians, the ratios the issue sets targets for, and the
markdown, JSON and PNG written to ``bench/results/``."""

from __future__ import annotations

import math
import platform
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import median

from arbiter.settings import LimitSettings

ERA_LABEL = {"auto": "2026-07-28", "legacy": "handshake"}
OP_LABEL = {"call": "tools/call echo", "list": "tools/list (100 tools)"}


@dataclass
class Sample:
    """One measurement: one target, era and operation, one repetition."""

    target: str
    mode: str  # the mcp.Client mode: auto (→ 2026-07-28) or legacy (→ handshake)
    op: str  # call or list
    rep: int
    protocol: str
    calls: int  # requests completed in the throughput phase
    errors: int
    seconds: float
    calls_per_s: float
    proxy_cpu_ms: float | None  # per request, the proxy process (and its children); None for direct
    upstream_cpu_ms: float
    client_cpu_ms: float
    seq_calls: int
    seq_errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rss_before_mb: float | None
    rss_after_mb: float | None
    first_error: str | None = None


@dataclass
class Row:
    """The medians of one target x era x operation over its repetitions."""

    target: str
    label: str
    mode: str
    op: str
    protocol: str
    reps: int
    calls_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    proxy_cpu_ms: float | None
    upstream_cpu_ms: float
    client_cpu_ms: float
    rss_before_mb: float | None  # before this row's first repetition
    rss_after_mb: float | None  # after its last
    errors: int
    first_error: str | None

    @property
    def era(self) -> str:
        return ERA_LABEL.get(self.mode, self.mode)


@dataclass
class Report:
    config: dict[str, Any]
    labels: dict[str, str]
    samples: list[Sample] = field(default_factory=list[Sample])
    skipped: dict[str, str] = field(default_factory=dict[str, str])  # target (or target/era) → why
    problems: list[str] = field(default_factory=list[str])
    notes: list[str] = field(default_factory=list[str])

    def rows(self) -> list[Row]:
        groups: dict[tuple[str, str, str], list[Sample]] = {}
        for s in self.samples:
            groups.setdefault((s.target, s.mode, s.op), []).append(s)
        out: list[Row] = []
        for (target, mode, op), samples in groups.items():
            samples.sort(key=lambda s: s.rep)
            cpu = [s.proxy_cpu_ms for s in samples if s.proxy_cpu_ms is not None]
            errors = sum(s.errors + s.seq_errors for s in samples)
            out.append(
                Row(
                    target=target,
                    label=self.labels.get(target, target),
                    mode=mode,
                    op=op,
                    protocol=samples[0].protocol,
                    reps=len(samples),
                    calls_per_s=median([s.calls_per_s for s in samples]),
                    p50_ms=median([s.p50_ms for s in samples]),
                    p95_ms=median([s.p95_ms for s in samples]),
                    p99_ms=median([s.p99_ms for s in samples]),
                    proxy_cpu_ms=median(cpu) if cpu else None,
                    upstream_cpu_ms=median([s.upstream_cpu_ms for s in samples]),
                    client_cpu_ms=median([s.client_cpu_ms for s in samples]),
                    rss_before_mb=samples[0].rss_before_mb,
                    rss_after_mb=samples[-1].rss_after_mb,
                    errors=errors,
                    first_error=next((s.first_error for s in samples if s.first_error), None),
                )
            )
        order = {name: i for i, name in enumerate(self.labels)}
        out.sort(key=lambda r: (r.op != "call", r.mode != "auto", order.get(r.target, 99)))
        return out

    def ratios(self) -> list[dict[str, Any]]:
        """Per proxy, era and operation: the ratios the issue's targets are stated in."""
        rows = self.rows()
        by = {(r.target, r.mode, r.op): r for r in rows}
        out: list[dict[str, Any]] = []
        for r in rows:
            if r.target in ("direct", "bare"):
                continue

            def peer(name: str, r: Row = r) -> Row | None:
                return by.get((name, r.mode, r.op))

            bare, direct = peer("bare"), peer("direct")
            entry: dict[str, Any] = {"target": r.target, "mode": r.mode, "era": r.era, "op": r.op}
            entry["cpu_vs_bare"] = _div(r.proxy_cpu_ms, bare.proxy_cpu_ms if bare else None)
            entry["throughput_vs_bare"] = _div(r.calls_per_s, bare.calls_per_s if bare else None)
            fm, cf = peer("fastmcp-reused"), peer("contextforge")
            entry["throughput_vs_fastmcp_reused"] = (
                _div(r.calls_per_s, fm.calls_per_s) if fm and fm is not r else None
            )
            entry["throughput_vs_contextforge"] = (
                _div(r.calls_per_s, cf.calls_per_s) if cf and cf is not r else None
            )
            if direct is not None and bare is not None:
                entry["added_p50_vs_bare"] = _div(r.p50_ms - direct.p50_ms, bare.p50_ms - direct.p50_ms)
            else:
                entry["added_p50_vs_bare"] = None
            entry["cpu_vs_bare_paired"] = self._paired(r, "bare")
            if r.target == "arbiter-pg":
                sqlite = peer("arbiter-gov")
                entry["pg_cpu_vs_sqlite"] = _div(r.proxy_cpu_ms, sqlite.proxy_cpu_ms if sqlite else None)
                entry["pg_cpu_vs_sqlite_paired"] = self._paired(r, "arbiter-gov")
            out.append(entry)
        return out

    def _paired(self, row: Row, other: str) -> float | None:
        """The median over repetitions of ``row``'s proxy CPU ÷ ``other``'s in the same repetition.

        This VM's speed drifts between rounds (the load generator's own CPU per call, the same work
        for every target, moves by half between rounds of one run), and a ratio of medians taken from
        different rounds carries that drift; a ratio within each round does not."""

        def by_rep(target: str) -> dict[int, float | None]:
            return {
                s.rep: s.proxy_cpu_ms
                for s in self.samples
                if (s.target, s.mode, s.op) == (target, row.mode, row.op)
            }

        mine, theirs = by_rep(row.target), by_rep(other)
        each = [_div(mine[rep], theirs.get(rep)) for rep in sorted(mine)]
        kept = [v for v in each if v is not None]
        return median(kept) if kept else None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        return cls(
            config=data["config"],
            labels=data["labels"],
            samples=[Sample(**s) for s in data["samples"]],
            skipped=data.get("skipped", {}),
            problems=data.get("problems", []),
            notes=data.get("notes", []),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "labels": self.labels,
            "rows": [asdict(r) | {"era": r.era} for r in self.rows()],
            "ratios": self.ratios(),
            "samples": [asdict(s) for s in self.samples],
            "skipped": self.skipped,
            "problems": self.problems,
            "notes": self.notes,
        }


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _f(v: float | None, digits: int = 2) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.{digits}f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def machine() -> dict[str, Any]:
    import os

    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def _load_client(cfg: dict[str, Any]) -> str:
    if cfg.get("load_client", "sdk") == "sdk":
        return "one `mcp.Client` session sending every request"
    return (
        "one `mcp.Client` session does the era's handshake and one request, which is then replayed "
        "over pooled aiohttp connections (a new id and echo text each time, every answer checked; "
        "bench/raw_load.py)"
    )


def _checkout(d: dict[str, Any]) -> str:
    """Which Arbiter a report measured (``git_commit``, ``git_dirty`` from bench/run.py)."""
    dirty = " with uncommitted changes" if d.get("git_dirty") else ""
    return f"Arbiter at commit {d.get('git_commit') or '?'}{dirty}"


def markdown(report: Report, command: str) -> str:
    cfg = report.config
    rows = report.rows()
    direct = {(r.mode, r.op): r for r in rows if r.target == "direct"}
    m = cfg.get("machine", {})
    lines = [
        "# Arbiter benchmark: proxies in front of one fast upstream",
        "",
        f"Run {cfg.get('started', '?')}, {cfg.get('duration_s', 0):.0f} s, with `{command}`.",
        f"Machine: {m.get('cpus')} CPUs ({m.get('cpu_model')}), Linux {m.get('kernel')}, "
        f"Python {m.get('python')}; "
        + (
            f"{cfg['pinning']}"
            if cfg.get("pinning")
            else "load generator, proxy and upstream share the machine"
        )
        + (
            f"; other processes used {cfg['other_processes_cpu_share']:.0%} of its CPU during the run."
            if "other_processes_cpu_share" in cfg
            else "."
        ),
        f"Each measurement: {_load_client(cfg)}, {cfg.get('warmup')} warm-up requests, then "
        f"{cfg.get('calls')} `tools/call` / {cfg.get('list_calls')} `tools/list` requests with "
        f"{cfg.get('concurrency')} in flight (at most {cfg.get('max_seconds')} s), then "
        f"{cfg.get('seq_calls')} one at a time (at most {cfg.get('seq_max_seconds')} s) for latency. "
        f"{cfg.get('reps')} repetitions, interleaved (every target once per round, the order rotated "
        "each round); medians shown.",
        "",
        "Proxy CPU is user + system time of the proxy's process (and any it forked) during the loaded "
        "phase, divided by the requests completed; RSS is the proxy process's resident memory before "
        "the row's first repetition and after its last. Every server runs for the whole run, so idle ones "
        "do their background work meanwhile.",
        "",
    ]
    versions = cfg.get("versions", {})
    if versions:
        lines += [
            f"{_checkout(cfg)}; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
            "",
        ]
    for op in ("call", "list"):
        op_rows = [r for r in rows if r.op == op]
        if not op_rows:
            continue
        lines += [
            f"## {OP_LABEL[op]}",
            "",
            "| target | era | calls/s | ÷ direct | p50 ms | p95 ms | p99 ms | proxy CPU ms/call "
            "| upstream CPU ms/call | RSS MB before → after | errors |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in op_rows:
            d = direct.get((r.mode, r.op))
            vs_direct = _x(_div(r.calls_per_s, d.calls_per_s)) if d and r.target != "direct" else ""
            rss = (
                f"{_f(r.rss_before_mb, 0)} → {_f(r.rss_after_mb, 0)}" if r.rss_before_mb is not None else "-"
            )
            lines.append(
                f"| {r.label} | {r.era} | {_f(r.calls_per_s, 1)} | {vs_direct} | {_f(r.p50_ms)} | "
                f"{_f(r.p95_ms)} | {_f(r.p99_ms)} | {_f(r.proxy_cpu_ms)} | {_f(r.upstream_cpu_ms)} | "
                f"{rss} | {r.errors} |"
            )
        lines.append("")
    ratios = report.ratios()
    if ratios:
        lines += [
            "## Ratios",
            "",
            "Added p50 is the sequential p50 over the direct call's, divided by the bare SDK "
            "pass-through's added p50. The issue's targets for Arbiter with all governance on: CPU ÷ bare "
            "≤ 0.6; calls/s ÷ bare ≥ 1.3, ÷ FastMCP reused ≥ 2, ÷ ContextForge ≥ 10; added p50 ÷ bare's "
            "≤ 0.5; PostgreSQL + Redis CPU ÷ SQLite CPU ≤ 1.15. The CPU ratios are given twice: the ratio "
            "of the medians, and (paired) the median of each repetition's own ratio, which the machine's "
            "drift between rounds does not move.",
            "",
            "| target | era | operation | CPU ÷ bare (paired) | calls/s ÷ bare | ÷ FastMCP reused "
            "| ÷ ContextForge | added p50 ÷ bare's | PG+Redis CPU ÷ SQLite (paired) |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for e in ratios:
            pg = (
                f"{_x(e.get('pg_cpu_vs_sqlite'))} ({_x(e.get('pg_cpu_vs_sqlite_paired'))})"
                if e.get("pg_cpu_vs_sqlite") is not None
                else "-"
            )
            lines.append(
                f"| {report.labels.get(e['target'], e['target'])} | {e['era']} | {e['op']} | "
                f"{_x(e['cpu_vs_bare'])} ({_x(e.get('cpu_vs_bare_paired'))}) | "
                f"{_x(e['throughput_vs_bare'])} | "
                f"{_x(e['throughput_vs_fastmcp_reused'])} | {_x(e['throughput_vs_contextforge'])} | "
                f"{_x(e['added_p50_vs_bare'])} | {pg} |"
            )
        lines.append("")
    if report.skipped:
        lines += ["## Skipped", ""]
        lines += [f"- **{name}**: {why}" for name, why in report.skipped.items()]
        lines.append("")
    if report.problems or any(r.errors for r in rows):
        lines += ["## Problems", ""]
        lines += [f"- {p}" for p in report.problems]
        lines += [
            f"- {r.label} / {r.era} / {r.op}: {r.errors} failed requests, first: {r.first_error}"
            for r in rows
            if r.errors
        ]
        lines.append("")
    if report.notes:
        lines += ["## Notes", ""]
        lines += [f"- {n}" for n in report.notes]
        lines.append("")
    return "\n".join(lines)


def print_summary(report: Report) -> None:
    rows = report.rows()
    head = (
        f"{'target':<17} {'era':<10} {'op':<4} {'calls/s':>8} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
        f"{'cpu ms':>7} {'up cpu':>7} {'rss MB':>13} {'err':>4}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        rss = f"{_f(r.rss_before_mb, 0)}->{_f(r.rss_after_mb, 0)}" if r.rss_before_mb is not None else "-"
        print(
            f"{r.target:<17} {r.era:<10} {r.op:<4} {r.calls_per_s:>8.1f} {r.p50_ms:>7.2f} {r.p95_ms:>7.2f} "
            f"{r.p99_ms:>7.2f} {_f(r.proxy_cpu_ms):>7} {r.upstream_cpu_ms:>7.2f} {rss:>13} {r.errors:>4}"
        )
    print()
    names = {
        "cpu_vs_bare": "CPU÷bare",
        "cpu_vs_bare_paired": "(paired)",
        "throughput_vs_bare": "calls/s÷bare",
        "throughput_vs_fastmcp_reused": "÷FastMCP-reused",
        "throughput_vs_contextforge": "÷ContextForge",
        "added_p50_vs_bare": "added-p50÷bare's",
        "pg_cpu_vs_sqlite": "PG+Redis-CPU÷SQLite",
        "pg_cpu_vs_sqlite_paired": "(paired)",
    }
    for e in report.ratios():
        parts = [f"{label} {_x(e[key])}" for key, label in names.items() if e.get(key) is not None]
        if parts:
            print(f"{e['target']:<17} {e['era']:<10} {e['op']:<4} " + "  ".join(parts))
    for name, why in report.skipped.items():
        print(f"skipped {name}: {why}")
    for p in report.problems:
        print(f"problem: {p}")


# ---------------------------------------------------------------------------------------------- charts


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def chart(report: Report, path: Path) -> str | None:
    """A PNG of throughput, proxy CPU and added latency per target and era; None, or why not."""
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed (`make bench` installs it: pip install -e '.[bench]')"
    rows = report.rows()
    targets = [t for t in report.labels if any(r.target == t for r in rows)]
    direct = {(r.mode, r.op): r for r in rows if r.target == "direct"}
    by = {(r.target, r.mode, r.op): r for r in rows}
    panels: list[tuple[str, str, Any]] = [
        ("call", "calls/s, 32 in flight — tools/call", lambda r: r.calls_per_s),
        ("call", "proxy CPU ms per call — tools/call", lambda r: r.proxy_cpu_ms),
        ("list", "calls/s, 32 in flight — tools/list (100 tools)", lambda r: r.calls_per_s),
        (
            "call",
            "added sequential p50 ms over direct — tools/call",
            lambda r: (r.p50_ms - direct[(r.mode, r.op)].p50_ms) if (r.mode, r.op) in direct else None,
        ),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    colors = {"auto": "#3b6fb6", "legacy": "#e08a2c"}
    for ax, (op, title, value) in zip(axes.flat, panels, strict=True):
        # The upstream has no proxy CPU and adds no latency to itself.
        names = [t for t in targets if t != "direct" or not ("CPU" in title or "added" in title)]
        series: dict[str, list[float]] = {}
        for mode in ("auto", "legacy"):
            vals: list[float] = []
            for t in names:
                r = by.get((t, mode, op))
                v = value(r) if r is not None else None
                vals.append(float(v) if v is not None and not math.isnan(v) else math.nan)
            series[mode] = vals
        positive = [v for vals in series.values() for v in vals if v > 0]
        floor = min(positive) / 2 if positive else 1.0
        # Log scale: the peers span two orders of magnitude, and ratios read as distances.
        ax.set_xscale("log")
        height = 0.38
        for k, (mode, vals) in enumerate(series.items()):
            pos = [y + (k - 0.5) * height for y in range(len(names))]
            shown = [v if v > 0 else math.nan for v in vals]
            ax.barh(pos, shown, height=height, color=colors[mode], label=ERA_LABEL[mode])
            for y, v in zip(pos, vals, strict=True):
                if math.isnan(v):
                    continue
                text = f" {v:.3g}" if v > 0 else " <= 0"
                ax.text(v if v > 0 else floor, y, text, va="center", fontsize=7)
        ax.set_yticks(list(range(len(names))))
        ax.set_yticklabels([_short(report.labels.get(t, t)) for t in names], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3, which="both")
        if positive:
            ax.set_xlim(floor, max(positive) * 3)
        ax.xaxis.set_major_formatter(plt.FuncFormatter(lambda x, _pos: f"{x:g}"))
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=2, fontsize=9, bbox_to_anchor=(0.5, 0.965))
    cfg = report.config
    fig.suptitle(
        f"MCP proxies in front of one fast upstream — {cfg.get('started', '')}, "
        f"{cfg.get('machine', {}).get('cpus')} CPUs, "
        + ("the proxy on a CPU of its own" if cfg.get("pinning") else "shared by load, proxy and upstream")
        + "; "
        f"medians of {cfg.get('reps')} interleaved runs",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _short(label: str) -> str:
    return label if len(label) <= 60 else label[:58] + "…"


def soak_chart(points: Sequence[dict[str, float]], warmup_s: float, path: Path, title: str) -> str | None:
    plt = _pyplot()
    if plt is None:
        return "matplotlib is not installed (`make bench` installs it: pip install -e '.[bench]')"
    fig, ax = plt.subplots(figsize=(10, 5))
    ts = [p["t_s"] for p in points]
    ax.plot(ts, [p["rss_mb"] for p in points], color="#3b6fb6", label="Arbiter RSS MB")
    ax.axvline(warmup_s, color="grey", linestyle="--", label="end of warm-up")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS MB")
    ax2 = ax.twinx()
    ax2.plot(ts, [p["calls_per_s"] for p in points], color="#e08a2c", alpha=0.6, label="calls/s")
    ax2.set_ylabel("calls/s (interval)")
    ax.set_title(title, fontsize=10)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# How long a handshake-era call's request key is held (the soak runs Arbiter with the default): the
# longest-lived state a soak call leaves behind, which its warm-up must outlast.
KEY_HOLD_S: float = LimitSettings.model_fields["session_request_key_ttl_s"].default


def soak_markdown(summary: dict[str, Any], points: Iterable[dict[str, float]], command: str) -> str:
    lines = [
        "# Arbiter soak: memory under steady load",
        "",
        f"Run {summary['started']} with `{command}`: {summary['label']}, {summary['concurrency']} requests "
        f"in flight ({summary['concurrency'] // 2} per era, both eras) of `tools/call` for "
        f"{summary['warmup_s']:.0f} s of warm-up and then the {summary['seconds']:.0f} s judged, sent by "
        f"{_load_client(summary)}; RSS sampled every {summary['interval_s']:g} s. "
        + (
            f"The warm-up outlasts the {KEY_HOLD_S:g} s a handshake-era call's request key is held "
            "(limits.session_request_key_ttl_s), the longest-lived state a call leaves behind."
            if summary["warmup_s"] > KEY_HOLD_S
            else f"The warm-up is shorter than the {KEY_HOLD_S:g} s a handshake-era call's request key is "
            "held (limits.session_request_key_ttl_s): those keys still accumulate in the judged time."
        ),
        "",
        f"{_checkout(summary)}.",
        "",
        f"- requests: {summary['calls']} ({summary['calls_per_s']:.1f}/s), failed: {summary['errors']}",
        f"- RSS at the end of warm-up ({summary['warmup_s']:.0f} s): {summary['rss_warm_mb']:.1f} MB; "
        f"after it: min {summary['rss_min_mb']:.1f}, max {summary['rss_max_mb']:.1f}, "
        f"final {summary['rss_final_mb']:.1f} MB",
        f"- largest deviation after warm-up: {summary['max_deviation_pct']:+.1f}% — "
        + ("**flat (within 5%)**" if summary["flat"] else "**NOT within 5%**"),
        "",
        "| t s | RSS MB | calls/s | failed so far |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {p['t_s']:.0f} | {p['rss_mb']:.1f} | {p['calls_per_s']:.1f} | {p['errors']:.0f} |" for p in points
    ]
    lines.append("")
    return "\n".join(lines)
