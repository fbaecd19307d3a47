"""The benchmark: MCP proxies in front of one fast upstream, measured in one run, interleaved.

    make bench                                   # builds the peers' virtualenvs, then runs this
    .venv/bin/python bench/run.py [--only arbiter,bare] [--reps 3] [--calls 1000] [--quick]
    .venv/bin/python bench/run.py --soak 600     # a warm-up, then ten minutes of load: memory over time

Starts ``bench/upstream.py`` (an ``echo`` tool among 100) on loopback and, in front of it: the bare SDK
pass-through (``bench/bare_proxy.py``), FastMCP's proxy (``create_proxy`` default and with a reused
client, from ``.bench/fastmcp-venv``), ContextForge (from ``.bench/contextforge-venv``, auth on, one
worker), and Arbiter minimal, with all governance on (API key and JWT, SQLite), and with all governance
on over PostgreSQL + Redis. For each target x protocol era x operation (``tools/call`` of echo, a
100-tool ``tools/list``) it measures calls/s with 32 in flight, sequential p50/p95/p99, the proxy's CPU
ms per request (from /proc, its forked children included) and its RSS, repeating every measurement
``--reps`` times in rotating order and reporting medians. It writes ``<out>/<name>.md``, ``.json`` and
``.png`` (default ``bench/results/latest.*``) and prints the ratios the issue's targets are stated in.

Targets whose prerequisites are missing (a peer virtualenv, PostgreSQL) are skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from harness import (
    BENCH_DIR,
    MODERN,
    REPO_DIR,
    BenchError,
    Burst,
    Fleet,
    Jwks,
    Mode,
    Op,
    Pinning,
    describe,
    free_ports,
    load,
    machine_busy_seconds,
    open_client,
    own_cpu_seconds,
    percentile,
    raise_on_sigterm,
    run_async,
    sdk_sender,
)
from raw_load import Capture, Replay, captured_request, replay_session
from report import (
    ERA_LABEL,
    KEY_HOLD_S,
    Report,
    Sample,
    chart,
    machine,
    markdown,
    print_summary,
    soak_chart,
    soak_markdown,
)
from targets import (
    ARBITER_GOV,
    ARBITER_MIN,
    ARBITER_PG,
    ARBITER_SDK,
    ARBITER_TRACED,
    ARBITER_UNCONFIRMED,
    CONTEXTFORGE_VENV,
    FASTMCP_VENV,
    Cleanup,
    Ctx,
    Skipped,
    Target,
    governance_evidence,
    installed_version,
    setup_arbiter,
    setup_bare,
    setup_contextforge,
    setup_direct,
    setup_fastmcp_default,
    setup_fastmcp_reused,
    start_upstream,
)

# Every target, in the order the report lists them.
TARGETS = (
    "direct",
    "bare",
    "fastmcp-default",
    "fastmcp-reused",
    "contextforge",
    "arbiter-min",
    "arbiter-gov",
    "arbiter-gov-jwt",
    "arbiter-pg",
    "arbiter-traced",
    "arbiter-unconfirmed",
    "arbiter-sdk",
)
ALIASES = {
    "all": TARGETS,
    "arbiter": ("arbiter-min", "arbiter-gov", "arbiter-gov-jwt", "arbiter-pg"),
    "fastmcp": ("fastmcp-default", "fastmcp-reused"),
    "peers": ("fastmcp-default", "fastmcp-reused", "contextforge"),
}
REQUIRED = {"direct", "bare", "arbiter-min", "arbiter-gov", "arbiter-gov-jwt"}  # failing to start is fatal


@dataclass(frozen=True)
class Setup:
    names: tuple[str, ...]  # the targets this set-up provides
    start: Callable[[Ctx, Cleanup], list[Target]]


SETUPS = (
    Setup(("direct",), lambda ctx, _: setup_direct(ctx)),
    Setup(("bare",), lambda ctx, _: setup_bare(ctx)),
    Setup(("fastmcp-default",), lambda ctx, _: setup_fastmcp_default(ctx)),
    Setup(("fastmcp-reused",), lambda ctx, _: setup_fastmcp_reused(ctx)),
    Setup(("contextforge",), lambda ctx, _: setup_contextforge(ctx)),
    Setup(("arbiter-min",), lambda ctx, c: setup_arbiter(ctx, ARBITER_MIN, c)),
    Setup(("arbiter-gov", "arbiter-gov-jwt"), lambda ctx, c: setup_arbiter(ctx, ARBITER_GOV, c)),
    Setup(("arbiter-pg",), lambda ctx, c: setup_arbiter(ctx, ARBITER_PG, c)),
    Setup(("arbiter-traced",), lambda ctx, c: setup_arbiter(ctx, ARBITER_TRACED, c)),
    Setup(("arbiter-unconfirmed",), lambda ctx, c: setup_arbiter(ctx, ARBITER_UNCONFIRMED, c)),
    Setup(("arbiter-sdk",), lambda ctx, c: setup_arbiter(ctx, ARBITER_SDK, c)),
)


@dataclass
class Options:
    reps: int
    calls: int
    list_calls: int
    seq_calls: int
    concurrency: int
    warmup: int
    max_seconds: float
    seq_max_seconds: float
    modes: tuple[Mode, ...]
    ops: tuple[Op, ...]
    load_client: str = "raw"  # raw: captured requests replayed over aiohttp; sdk: mcp.Client itself

    def calls_for(self, op: Op) -> int:
        return self.calls if op == "call" else self.list_calls


class EraNotOffered(Exception):
    pass


# ---------------------------------------------------------------------------------------------- set-up


def select(only: str | None) -> list[str]:
    if not only:
        return list(TARGETS)
    chosen: set[str] = set()
    for word in (w.strip() for w in only.split(",") if w.strip()):
        if word in ALIASES:
            chosen.update(ALIASES[word])
        elif word in TARGETS:
            chosen.add(word)
        else:
            names = ", ".join((*TARGETS, *ALIASES))
            raise SystemExit(f"--only: unknown target {word!r}; known: {names}")
    return [t for t in TARGETS if t in chosen]


def start_targets(
    ctx: Ctx, selected: Sequence[str], cleanup: Cleanup, skipped: dict[str, str], pool: ThreadPoolExecutor
) -> list[Target]:
    """Start every selected target's servers in parallel; returns the targets in report order.

    ``pool`` must outlive the servers: each is started with PR_SET_PDEATHSIG, which Linux fires when
    the *thread* that started it exits, so the pool's threads are kept until the fleet is stopped.
    """
    wanted = [s for s in SETUPS if any(n in selected for n in s.names)]
    out: list[Target] = []
    futures: list[tuple[Setup, Future[list[Target]]]] = [
        (s, pool.submit(s.start, ctx, cleanup)) for s in wanted
    ]
    fatal: list[str] = []
    for setup, future in futures:
        names = [n for n in setup.names if n in selected]
        try:
            out += [t for t in future.result() if t.name in selected]
        except Skipped as why:
            skipped.update({n: str(why) for n in names})
        except Exception as exc:  # noqa: BLE001 - a peer that fails to start is reported, not fatal
            why = f"failed to start: {type(exc).__name__}: {exc}"
            if REQUIRED & set(names):
                fatal.append(f"{', '.join(names)}: {why}")
            skipped.update({n: why for n in names})
    if fatal:
        raise BenchError("\n".join(fatal))
    order = {n: i for i, n in enumerate(TARGETS)}
    return sorted(out, key=lambda t: order[t.name])


# ---------------------------------------------------------------------------------------------- measuring


async def measure(ctx: Ctx, target: Target, mode: Mode, op: Op, rep: int, opts: Options) -> Sample:
    proc = target.proc

    def cpu() -> tuple[float | None, float, float]:
        return (
            proc.cpu_seconds() if proc else None,
            ctx.upstream.cpu_seconds(),
            time.process_time(),
        )

    calls = opts.calls_for(op)
    timeout = 120.0 + opts.max_seconds + opts.seq_max_seconds
    with anyio.fail_after(timeout):
        rss0 = proc.rss_mb() if proc else None
        capture = Capture()
        async with (
            open_client(target.url, mode, opts.concurrency, target.token, capture) as client,
            replay_session(opts.concurrency) as http,
        ):
            protocol = client.protocol_version or "?"
            if mode == "auto" and protocol != MODERN:
                raise EraNotOffered(f"asked for 2026-07-28, it negotiated {protocol}")
            if opts.load_client == "raw":
                send = Replay(await captured_request(client, op, target.tool, capture), http).once
            else:
                send = sdk_sender(client, op, target.tool)
            warm = await load(send, opts.warmup, opts.concurrency, None)
            if warm.errors and warm.errors == warm.done:
                raise BenchError(f"every warm-up request failed: {warm.first_error}")
            cpu0 = cpu()
            burst = await load(send, calls, opts.concurrency, opts.max_seconds)
            cpu1 = cpu()
            seq = await load(send, opts.seq_calls, 1, opts.seq_max_seconds)
        rss1 = proc.rss_mb() if proc else None
    done = max(1, burst.done)
    proxy0, up0, cli0 = cpu0
    proxy1, up1, cli1 = cpu1
    lat = sorted(seq.latencies)
    return Sample(
        target=target.name,
        mode=mode,
        op=op,
        rep=rep,
        protocol=protocol,
        calls=burst.done,
        errors=burst.errors,
        seconds=burst.seconds,
        calls_per_s=burst.done / burst.seconds if burst.seconds > 0 else 0.0,
        proxy_cpu_ms=(proxy1 - proxy0) * 1000 / done if proxy0 is not None and proxy1 is not None else None,
        upstream_cpu_ms=(up1 - up0) * 1000 / done,
        client_cpu_ms=(cli1 - cli0) * 1000 / done,
        seq_calls=seq.done,
        seq_errors=seq.errors,
        p50_ms=percentile(lat, 0.50) * 1000,
        p95_ms=percentile(lat, 0.95) * 1000,
        p99_ms=percentile(lat, 0.99) * 1000,
        rss_before_mb=rss0,
        rss_after_mb=rss1,
        first_error=burst.first_error or seq.first_error,
    )


def run_rounds(ctx: Ctx, targets: list[Target], opts: Options, report: Report) -> None:
    """Every target once per round (its order rotated each round), for every operation and era."""
    failures: dict[str, int] = {}
    for rep in range(opts.reps):
        shift = rep % len(targets) if targets else 0
        rotated = targets[shift:] + targets[:shift]
        for op in opts.ops:
            for mode in opts.modes:
                for target in rotated:
                    if mode not in target.modes or failures.get(target.name, 0) >= 3:
                        continue
                    where = f"{target.name} / {ERA_LABEL[mode]} / {op} / round {rep + 1}"
                    try:
                        sample: Sample = run_async(
                            lambda t=target, m=mode, o=op, r=rep: measure(ctx, t, m, o, r, opts)
                        )
                    except EraNotOffered as why:
                        target.modes = tuple(m for m in target.modes if m != mode)
                        report.skipped[f"{target.name} / {ERA_LABEL[mode]}"] = str(why)
                        print(f"  {where}: skipped, {why}", flush=True)
                        continue
                    except Exception as exc:  # noqa: BLE001 - one failed measurement must not end the run
                        failures[target.name] = failures.get(target.name, 0) + 1
                        why = f"{where}: {describe(exc)}"
                        report.problems.append(why)
                        if target.proc is not None and not target.proc.alive():
                            why += f" (the server exited:\n{target.proc.log_tail(15)})"
                        print(f"  FAILED {why}", flush=True)
                        continue
                    report.samples.append(sample)
                    cpu = f"{sample.proxy_cpu_ms:6.2f}" if sample.proxy_cpu_ms is not None else "     -"
                    print(
                        f"  round {rep + 1}/{opts.reps} {op:<4} {ERA_LABEL[mode]:<10} {target.name:<16} "
                        f"{sample.calls_per_s:8.1f}/s  cpu {cpu} ms  p50 {sample.p50_ms:7.2f} ms"
                        + (
                            f"  errors {sample.errors + sample.seq_errors}"
                            if sample.errors or sample.seq_errors
                            else ""
                        ),
                        flush=True,
                    )


# ---------------------------------------------------------------------------------------------- soak


def soak(
    ctx: Ctx,
    cleanup: Cleanup,
    seconds: float,
    out: Path,
    command: str,
    interval: float,
    warmup_s: float,
    load_client: str = "raw",
) -> int:
    """Hold ``tools/call`` load on Arbiter with all governance on for ``warmup_s`` and then ``seconds``
    more; sample its RSS over time and judge it over the ``seconds`` after the warm-up."""
    target = setup_arbiter(ctx, ARBITER_GOV, cleanup)[0]
    ctx.fleet.pin_proxies()
    proc = target.proc
    assert proc is not None
    total = warmup_s + seconds
    concurrency = 32
    points: list[dict[str, float]] = []
    bursts = [Burst(), Burst()]
    started = datetime.now(UTC).isoformat(timespec="seconds")
    print(
        f"soak: {warmup_s:.0f} s of warm-up and {seconds:.0f} s of tools/call on {target.label}, "
        f"{concurrency} in flight",
        flush=True,
    )

    async def go() -> None:
        captures = Capture(), Capture()
        async with (
            open_client(target.url, "auto", concurrency // 2, target.token, captures[0]) as modern,
            open_client(target.url, "legacy", concurrency // 2, target.token, captures[1]) as handshake,
            replay_session(concurrency) as http,
        ):
            senders = [
                Replay(await captured_request(client, "call", target.tool, capture), http).once
                if load_client == "raw"
                else sdk_sender(client, "call", target.tool)
                for client, capture in zip((modern, handshake), captures, strict=True)
            ]
            t0 = time.perf_counter()

            async def sampler() -> None:
                last_done, last_t = 0, t0
                points.append({"t_s": 0.0, "rss_mb": proc.rss_mb(), "calls_per_s": 0.0, "errors": 0.0})
                while time.perf_counter() - t0 < total:
                    await anyio.sleep(min(interval, max(0.0, total - (time.perf_counter() - t0))))
                    now = time.perf_counter()
                    done = sum(b.done for b in bursts)
                    point = {
                        "t_s": now - t0,
                        "rss_mb": proc.rss_mb(),
                        "calls_per_s": (done - last_done) / (now - last_t) if now > last_t else 0.0,
                        "errors": float(sum(b.errors for b in bursts)),
                    }
                    points.append(point)
                    last_done, last_t = done, now
                    print(
                        f"  {point['t_s']:6.0f} s  RSS {point['rss_mb']:7.1f} MB  "
                        f"{point['calls_per_s']:7.1f} calls/s  failed {point['errors']:.0f}",
                        flush=True,
                    )

            async with anyio.create_task_group() as tg:
                tg.start_soon(sampler)
                for send, burst in zip(senders, bursts, strict=True):
                    tg.start_soon(load, send, 10**9, concurrency // 2, total, burst)

    run_async(go)
    after = [p for p in points if p["t_s"] >= warmup_s]
    warm_point = min(points, key=lambda p: abs(p["t_s"] - warmup_s))
    rss_warm = warm_point["rss_mb"]
    deviations = [(p["rss_mb"] - rss_warm) / rss_warm * 100 for p in after] if rss_warm else [0.0]
    max_dev = max(deviations, key=abs) if deviations else 0.0
    calls = sum(b.done for b in bursts)
    summary: dict[str, Any] = {
        "started": started,
        "label": target.label,
        "seconds": seconds,
        "interval_s": interval,
        "concurrency": concurrency,
        "load_client": load_client,
        "warmup_s": warmup_s,
        "calls": calls,
        "calls_per_s": calls / total,
        "errors": sum(b.errors for b in bursts),
        "first_error": bursts[0].first_error or bursts[1].first_error,
        "rss_warm_mb": rss_warm,
        "rss_min_mb": min(p["rss_mb"] for p in after) if after else rss_warm,
        "rss_max_mb": max(p["rss_mb"] for p in after) if after else rss_warm,
        "rss_final_mb": points[-1]["rss_mb"],
        "max_deviation_pct": max_dev,
        "flat": abs(max_dev) <= 5.0,
        "machine": machine(),
        **_checkout(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps({"summary": summary, "points": points}, indent=2) + "\n")
    (out / "soak.md").write_text(soak_markdown(summary, points, command))
    why_not = soak_chart(points, warmup_s, out / "soak.png", f"{target.label}: RSS under load")
    print(
        f"soak: {calls} calls, {summary['errors']} failed; RSS after warm-up {rss_warm:.1f} MB, "
        f"max deviation {max_dev:+.1f}% -> {'flat (within 5%)' if summary['flat'] else 'NOT within 5%'}"
    )
    print(f"wrote {out / 'soak.md'}, soak.json" + (f"; no chart: {why_not}" if why_not else ", soak.png"))
    return 0 if summary["flat"] and not summary["errors"] else 1


# ---------------------------------------------------------------------------------------------- main


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _checkout() -> dict[str, Any]:
    """The commit measured, and whether tracked files differed from it (for the reports)."""
    return {
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for dist in ("arbiter", "mcp", "uvicorn"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "?"
    out["fastmcp (peer venv)"] = installed_version(FASTMCP_VENV, "fastmcp")
    out["mcp-contextforge-gateway (peer venv)"] = installed_version(
        CONTEXTFORGE_VENV, "mcp_contextforge_gateway"
    )
    return out


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--only", help=f"targets or groups, comma-separated: {', '.join((*TARGETS, *ALIASES))}")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every measurement (default 3)")
    p.add_argument("--calls", type=int, default=1000, help="tools/call requests per loaded run (1000)")
    p.add_argument("--list-calls", type=int, default=400, help="tools/list requests per loaded run (400)")
    p.add_argument("--seq-calls", type=int, default=200, help="sequential requests for latency (200)")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight (32)")
    p.add_argument("--warmup", type=int, default=30, help="warm-up requests per measurement (30)")
    p.add_argument("--max-seconds", type=float, default=15.0, help="cap on each loaded run (15 s)")
    p.add_argument("--seq-max-seconds", type=float, default=8.0, help="cap on each sequential run (8 s)")
    p.add_argument("--modes", choices=["both", "auto", "legacy"], default="both", help="protocol eras")
    p.add_argument("--ops", default="call,list", help="call, list or both (default call,list)")
    p.add_argument("--quick", action="store_true", help="one round, few requests: a smoke run")
    p.add_argument(
        "--load-client",
        choices=["raw", "sdk"],
        default="raw",
        help="raw: an SDK request captured, then replayed over aiohttp (default); sdk: mcp.Client sends all",
    )
    p.add_argument("--no-pin", action="store_true", help="do not give the proxy a CPU of its own")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="results directory")
    p.add_argument("--name", help="results file name (default latest; quick with --quick)")
    p.add_argument("--soak", type=float, metavar="SECONDS", help="hold load on Arbiter; report RSS over time")
    p.add_argument("--soak-interval", type=float, default=5.0, help="RSS sampling interval in the soak (5 s)")
    p.add_argument(
        "--soak-warmup",
        type=float,
        default=KEY_HOLD_S + 30,
        help=f"load before the soak's measured SECONDS ({KEY_HOLD_S + 30:g} s: past the {KEY_HOLD_S:g} s a "
        "handshake-era call's request key is held, the longest-lived per-call state in this configuration)",
    )
    p.add_argument(
        "--replot", type=Path, metavar="JSON", help="only rewrite the markdown and chart from a results JSON"
    )
    p.add_argument("--keep-logs", action="store_true", help="print the servers' log tails at the end")
    args = p.parse_args(argv)
    if args.quick:
        # Explicit options still win over the quick defaults.
        given = set(argv or sys.argv[1:])
        for flag, value in (
            ("--reps", 1),
            ("--calls", 60),
            ("--list-calls", 30),
            ("--seq-calls", 20),
            ("--warmup", 5),
            ("--max-seconds", 3.0),
            ("--seq-max-seconds", 2.0),
        ):
            if not any(g == flag or g.startswith(flag + "=") for g in given):
                setattr(args, flag[2:].replace("-", "_"), value)
    if min(args.reps, args.calls, args.list_calls, args.seq_calls, args.concurrency) < 1 or args.warmup < 0:
        p.error("--reps, --calls, --list-calls, --seq-calls and --concurrency must be positive")
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    if not ops or any(o not in ("call", "list") for o in ops):
        p.error("--ops takes call, list or call,list")
    args.ops = ops
    args.name = args.name or ("quick" if args.quick else "latest")
    return args


def write(report: Report, out: Path, name: str) -> tuple[Path, str | None]:
    """The markdown, JSON and chart of a run; the markdown's path, and why there is no chart (or None)."""
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path, png_path = (out / f"{name}.{ext}" for ext in ("md", "json", "png"))
    json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    md_path.write_text(markdown(report, report.config.get("command", "?")))
    return md_path, chart(report, png_path)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.replot:
        report = Report.from_json(json.loads(args.replot.read_text()))
        md_path, why_not = write(report, args.out, args.name)
        print(f"wrote {md_path}" + (f"; no chart: {why_not}" if why_not else " and its chart"))
        return 0
    selected = select(args.only)
    opts = Options(
        reps=args.reps,
        calls=args.calls,
        list_calls=args.list_calls,
        seq_calls=args.seq_calls,
        concurrency=args.concurrency,
        warmup=args.warmup,
        max_seconds=args.max_seconds,
        seq_max_seconds=args.seq_max_seconds,
        modes=("auto", "legacy") if args.modes == "both" else (args.modes,),
        ops=args.ops,
        load_client=args.load_client,
    )
    shown = list(argv) if argv is not None else sys.argv[1:]
    command = "python bench/run.py" + (" " + shlex.join(shown) if shown else "")
    raise_on_sigterm()
    pinning = None if args.no_pin else Pinning.split()
    if pinning is not None:
        # Before any thread starts (the JWKS server, the set-up pool): they inherit it.
        os.sched_setaffinity(0, pinning.side)
    started = datetime.now(UTC)
    t_start = time.monotonic()
    busy0, own0, load0 = machine_busy_seconds(), own_cpu_seconds(), os.getloadavg()
    skipped: dict[str, str] = {}
    with (
        tempfile.TemporaryDirectory(prefix="arbiter-bench-") as tmp,
        # Exits after the fleet has stopped (see start_targets).
        ThreadPoolExecutor(max_workers=len(SETUPS)) as pool,
    ):
        workdir = Path(tmp)
        fleet = Fleet(workdir, pinning)
        cleanup = Cleanup()
        jwks = Jwks(free_ports(1)[0])
        try:
            upstream, upstream_url = start_upstream(fleet)
            ctx = Ctx(fleet, workdir, upstream_url, upstream, jwks)
            if args.soak:
                return soak(
                    ctx,
                    cleanup,
                    args.soak,
                    args.out,
                    command,
                    args.soak_interval,
                    args.soak_warmup,
                    args.load_client,
                )
            print(f"starting {', '.join(selected)} ...", flush=True)
            targets = start_targets(ctx, selected, cleanup, skipped, pool)
            for name, why in skipped.items():
                print(f"  skipped {name}: {why}", flush=True)
            fleet.pin_proxies()
            print(f"set up in {time.monotonic() - t_start:.0f} s; measuring", flush=True)
            report = Report(
                config={},
                labels={t.name: t.label for t in targets},
                skipped=skipped,
            )
            run_rounds(ctx, targets, opts, report)
            by_process: dict[int, list[Target]] = {}
            for t in targets:
                if t.admin and t.proc and t.proc.alive():
                    by_process.setdefault(t.proc.pid, []).append(t)
            for same in by_process.values():
                try:
                    evidence = governance_evidence(same[0])
                except Exception as exc:  # noqa: BLE001 - evidence is a note; its absence is reported
                    evidence = f"could not ask its admin API: {describe(exc)}"
                if evidence:
                    report.notes.append(f"{' and '.join(t.name for t in same)} (one process): {evidence}")
            for t in targets:
                if t.proc is not None and t.proc.alive():
                    kids, pss = t.proc.children_pss_mb()
                    if kids:
                        report.notes.append(
                            f"{t.label} runs {kids} child process(es) ({pss:.0f} MB PSS together); their "
                            "CPU is in its CPU column, their memory is not in its RSS column."
                        )
            if args.keep_logs:
                for t in targets:
                    if t.proc is not None:
                        print(f"--- {t.name} log tail ---\n{t.proc.log_tail()}")
        finally:
            fleet.close()
            cleanup.run()
            jwks.close()
    duration = time.monotonic() - t_start
    # What else ran meanwhile: the machine's busy CPU less this run's own (bench, servers, their children).
    foreign = (machine_busy_seconds() - busy0) - (own_cpu_seconds() - own0)
    cpus = os.cpu_count() or 1
    report.config = {
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "duration_s": duration,
        "reps": opts.reps,
        "calls": opts.calls,
        "list_calls": opts.list_calls,
        "seq_calls": opts.seq_calls,
        "concurrency": opts.concurrency,
        "warmup": opts.warmup,
        "max_seconds": opts.max_seconds,
        "seq_max_seconds": opts.seq_max_seconds,
        "modes": list(opts.modes),
        "ops": list(opts.ops),
        "load_client": opts.load_client,
        "pinning": pinning.describe() if pinning is not None else None,
        "targets": selected,
        "machine": machine(),
        "versions": _versions(),
        **_checkout(),
        "load_average_start": list(load0),
        "load_average_end": list(os.getloadavg()),
        "other_processes_cpu_share": max(0.0, foreign) / (duration * cpus),
    }
    md_path, why_not = write(report, args.out, args.name)
    print()
    print_summary(report)
    print(
        f"\n{duration:.0f} s; wrote {md_path} and its .json"
        + (f"; no chart: {why_not}" if why_not else " and .png")
    )
    failed = report.problems or any(s.errors or s.seq_errors for s in report.samples)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
