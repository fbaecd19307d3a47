"""Pass-through throughput: upstream direct vs a bare SDK proxy vs Arbiter with no governance configured.

    .venv/bin/python bench/passthrough.py [--calls N] [--concurrency 32] [--mode both|auto|legacy]
        [--json out.json] [--bare-stateless] [--keep-logs]

Starts three server processes on 127.0.0.1 (the demo CRM upstream, ``bench/bare_proxy.py`` and
``arbiter serve`` on a fresh SQLite file), then drives each with one ``mcp.Client`` session and a fixed
number of calls in flight. Besides calls/s and latency it samples each server's CPU time from
``/proc/<pid>/stat``: on a small shared box, CPU ms per call is the steadier number, since the load
generator, the proxy and the upstream all compete for the same cores.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

import anyio
import httpx2
from mcp import Client
from mcp.client._transport import TransportStreams
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 30.0
WARMUP_CALLS = 50
Mode = Literal["auto", "legacy"]
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A server did not start, a set-up step failed, or a run went wrong."""


# ---------------------------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def cpu_seconds(self) -> float:
        """utime + stime of the process, from /proc (Linux only)."""
        stat = Path(f"/proc/{self.popen.pid}/stat").read_text()
        # The command name (field 2) may hold spaces; count fields from after its closing paren.
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _die_with_parent() -> None:
    # If this script is killed outright (SIGKILL), the kernel still stops the servers it started.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Fleet:
    """Every server process this run started; ``close`` stops them all, newest first."""

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._procs: list[Proc] = []

    def start(self, name: str, argv: list[str], env: Mapping[str, str]) -> Proc:
        log = self._workdir / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Own session: Ctrl-C reaches only this script, which then stops the servers in order.
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        proc = Proc(name, popen, log)
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self._procs):
            if proc.popen.poll() is None:
                proc.popen.terminate()
        for proc in reversed(self._procs):
            try:
                proc.popen.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(timeout=STOP_TIMEOUT_S)
        self._procs.clear()


DEMO_POLICY = Path(str(files("arbiter.policies") / "demo.csv"))


def free_ports(n: int) -> list[int]:
    # Hold every socket open until all are chosen, so the kernel cannot hand out one port twice.
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]


def wait_for_port(proc: Proc, port: int, timeout: float = START_TIMEOUT_S) -> None:
    """Wait until ``port`` accepts connections (uvicorn binds only after its lifespan has started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.1)
    raise BenchError(f"{proc.name} did not listen on {HOST}:{port} within {timeout:g}s:\n{proc.log_tail()}")


def wait_for_http_ok(proc: Proc, url: str, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    with httpx2.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
            with contextlib.suppress(httpx2.HTTPError):
                if http.get(url).status_code == 200:
                    return
            time.sleep(0.1)
    raise BenchError(f"{url} did not answer 200 within {timeout:g}s:\n{proc.log_tail()}")


def _venv_tool(name: str) -> list[str]:
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", f"{name}.cli"]


def _clean_env() -> dict[str, str]:
    # Inherited ARBITER_* settings (a config file, Redis, ...) would make runs incomparable.
    return {k: v for k, v in os.environ.items() if not k.startswith("ARBITER_")}


@dataclass
class Target:
    name: str
    url: str
    tool: str
    server: Proc  # the process whose CPU is charged to this target
    upstream: Proc
    token: str | None = None  # Arbiter's API key for the load generator


def start_servers(fleet: Fleet, workdir: Path, bare_stateless: bool) -> list[Target]:
    env = _clean_env()
    up_port, bare_port, arb_port = free_ports(3)
    upstream_url = f"http://{HOST}:{up_port}/mcp"
    upstream = fleet.start(
        "upstream", [sys.executable, "-m", "arbiter.demo.crm", "--port", str(up_port)], env
    )
    wait_for_port(upstream, up_port)

    bare_argv = [
        sys.executable,
        str(BENCH_DIR / "bare_proxy.py"),
        "--upstream",
        upstream_url,
        "--port",
        str(bare_port),
    ]
    bare = fleet.start("bare", [*bare_argv, *(["--stateless"] if bare_stateless else [])], env)

    arb_env = {
        **env,
        "ARBITER_DATABASE_URL": f"sqlite:///{workdir / 'b.db'}",
        "ARBITER_LOG_LEVEL": "WARNING",
    }
    for step in (["migrate"], ["api-key", "create", "--owner", "bench", "--role", "security-admin"]):
        done = subprocess.run(
            [*_venv_tool("arbiter"), *step], env=arb_env, capture_output=True, timeout=60, check=False
        )
        if done.returncode != 0:
            raise BenchError(f"arbiter {step[0]} failed:\n{done.stdout.decode()}{done.stderr.decode()}")
    # One key both registers the upstream and authenticates the load generator: API keys are what a
    # service agent would use, and their check is part of the hot path being measured.
    token = done.stdout.decode().strip()
    arbiter = fleet.start(
        "arbiter", [*_venv_tool("arbiter"), "serve", "--host", HOST, "--port", str(arb_port)], arb_env
    )

    wait_for_port(bare, bare_port)
    wait_for_http_ok(arbiter, f"http://{HOST}:{arb_port}/healthz")
    with httpx2.Client(timeout=30.0) as http:
        resp = http.post(
            f"http://{HOST}:{arb_port}/admin/v1/upstreams",
            json={"name": "crm", "url": upstream_url},
            headers={"Authorization": f"Bearer {token}"},
        )
        if resp.status_code != 201:
            raise BenchError(f"registering the upstream answered {resp.status_code}: {resp.text[:500]}")
        # Calls are decided by a realistic policy (the demo's rules plus one for the bench's caller);
        # the empty default policy would deny them all.
        policy = (
            DEMO_POLICY.read_text(encoding="utf-8") + "p, role:security-admin, *, crm/get_*, call, allow\n"
        )
        resp = http.post(
            f"http://{HOST}:{arb_port}/admin/v1/policies/import",
            content=policy,
            headers={"Authorization": f"Bearer {token}", "content-type": "text/csv"},
        )
        if resp.status_code != 200:
            raise BenchError(f"importing the policy answered {resp.status_code}: {resp.text[:500]}")
    return [
        Target("direct", upstream_url, "get_customer", upstream, upstream),
        Target("bare", f"http://{HOST}:{bare_port}/mcp", "get_customer", bare, upstream),
        Target("arbiter", f"http://{HOST}:{arb_port}/mcp", "crm__get_customer", arbiter, upstream, token),
    ]


# ---------------------------------------------------------------------------------------------- load


@dataclass
class RunResult:
    target: str
    mode: str
    protocol: str
    calls: int
    errors: int
    seconds: float
    calls_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    server_cpu_ms_per_call: float  # the target's own process (the upstream itself for "direct")
    upstream_cpu_ms_per_call: float
    client_cpu_ms_per_call: float
    first_error: str | None = None


@dataclass
class _Burst:
    latencies: list[float] = field(default_factory=list[float])
    errors: int = 0
    first_error: str | None = None


@asynccontextmanager
async def _transport(url: str, concurrency: int, token: str | None) -> AsyncGenerator[TransportStreams]:
    # Room for every call in flight, so the load generator never opens and closes connections mid-run.
    pool = concurrency + 8
    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"} if token else None,
        timeout=httpx2.Timeout(CALL_TIMEOUT_S, connect=10.0),
        limits=httpx2.Limits(max_connections=pool, max_keepalive_connections=pool),
    )
    async with http, streamable_http_client(url, http_client=http) as streams:
        yield streams


async def _burst(client: Client, tool: str, calls: int, concurrency: int) -> _Burst:
    out = _Burst()
    issued = 0
    args = {"customer_id": "C-1001"}

    async def worker() -> None:
        nonlocal issued
        while issued < calls:
            issued += 1  # no await between the check and the increment, so tasks never overshoot
            t0 = time.perf_counter()
            try:
                result = await client.call_tool(tool, args)
                failed = result.is_error
                why = str(result.content)[:200] if failed else None
            except MCPError as exc:
                failed, why = True, f"MCPError {exc.error.code}: {exc.error.message}"
            out.latencies.append(time.perf_counter() - t0)
            if failed:
                out.errors += 1
                out.first_error = out.first_error or why

    async with anyio.create_task_group() as tg:
        for _ in range(min(concurrency, calls)):
            tg.start_soon(worker)
    return out


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[idx]


async def measure(target: Target, mode: Mode, calls: int, concurrency: int, run_timeout: float) -> RunResult:
    def cpu() -> tuple[float, float, float]:
        # Reading two /proc files takes microseconds; not worth a thread hop in the middle of a run.
        return target.server.cpu_seconds(), target.upstream.cpu_seconds(), time.process_time()

    with anyio.fail_after(run_timeout):
        client = Client(
            _transport(target.url, concurrency, target.token),
            mode=mode,
            cache=None,
            read_timeout_seconds=CALL_TIMEOUT_S,
        )
        async with client:
            protocol = client.protocol_version or "?"
            warm = await _burst(client, target.tool, WARMUP_CALLS, concurrency)
            if warm.errors == WARMUP_CALLS:
                raise BenchError(f"{target.name}/{mode}: every warm-up call failed: {warm.first_error}")
            cpu0 = cpu()
            t0 = time.perf_counter()
            run = await _burst(client, target.tool, calls, concurrency)
            elapsed = time.perf_counter() - t0
            cpu1 = cpu()
    lat = sorted(run.latencies)
    per_call = [(b - a) * 1000 / calls for a, b in zip(cpu0, cpu1, strict=True)]
    return RunResult(
        target=target.name,
        mode=mode,
        protocol=protocol,
        calls=calls,
        errors=run.errors,
        seconds=elapsed,
        calls_per_s=calls / elapsed,
        p50_ms=statistics.median(lat) * 1000,
        p95_ms=_percentile(lat, 0.95) * 1000,
        p99_ms=_percentile(lat, 0.99) * 1000,
        server_cpu_ms_per_call=per_call[0],
        upstream_cpu_ms_per_call=per_call[1],
        client_cpu_ms_per_call=per_call[2],
        first_error=run.first_error,
    )


# ---------------------------------------------------------------------------------------------- report


def print_table(results: list[RunResult]) -> None:
    head = (
        f"{'target':<8} {'mode':<6} {'protocol':<10} {'calls/s':>8} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'p99 ms':>7} {'errors':>6} {'srv cpu':>8} {'up cpu':>7} {'cli cpu':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        srv = "-" if r.target == "direct" else f"{r.server_cpu_ms_per_call:.2f}"
        print(
            f"{r.target:<8} {r.mode:<6} {r.protocol:<10} {r.calls_per_s:>8.1f} {r.p50_ms:>7.1f} "
            f"{r.p95_ms:>7.1f} {r.p99_ms:>7.1f} {r.errors:>6} {srv:>8} {r.upstream_cpu_ms_per_call:>7.2f} "
            f"{r.client_cpu_ms_per_call:>8.2f}"
        )
    print(
        "(cpu columns: CPU ms per call of the proxy process, the upstream process, and this load generator)"
    )
    for r in results:
        if r.first_error:
            print(f"first error for {r.target}/{r.mode}: {r.first_error}")


def ratios(results: list[RunResult]) -> dict[str, dict[str, float]]:
    by = {(r.target, r.mode): r for r in results}
    out: dict[str, dict[str, float]] = {}
    for mode in dict.fromkeys(r.mode for r in results):
        bare, arb, direct = by.get(("bare", mode)), by.get(("arbiter", mode)), by.get(("direct", mode))
        if bare is None or arb is None:
            continue
        out[mode] = {
            "throughput_arbiter_over_bare": arb.calls_per_s / bare.calls_per_s,
            "cpu_ms_per_call_bare": bare.server_cpu_ms_per_call,
            "cpu_ms_per_call_arbiter": arb.server_cpu_ms_per_call,
            "cpu_arbiter_over_bare": arb.server_cpu_ms_per_call / bare.server_cpu_ms_per_call,
        }
        if direct is not None:
            out[mode]["bare_over_direct"] = bare.calls_per_s / direct.calls_per_s
            out[mode]["arbiter_over_direct"] = arb.calls_per_s / direct.calls_per_s
    return out


def print_ratios(table: dict[str, dict[str, float]]) -> None:
    for mode, r in table.items():
        verdict = "OK" if r["throughput_arbiter_over_bare"] >= 1.0 else "SLOWER than bare"
        print(
            f"{mode:<6} Arbiter/bare throughput {r['throughput_arbiter_over_bare']:.2f} ({verdict}); "
            f"proxy CPU ms/call bare {r['cpu_ms_per_call_bare']:.2f} "
            f"vs Arbiter {r['cpu_ms_per_call_arbiter']:.2f} (x{r['cpu_arbiter_over_bare']:.2f})"
        )


# ---------------------------------------------------------------------------------------------- main


def _raise_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers


def _run(fn: Callable[[], Any]) -> Any:
    backend_options = {"use_uvloop": True} if _has_uvloop() else {}
    return anyio.run(fn, backend="asyncio", backend_options=backend_options)


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401  # pyright: ignore[reportUnusedImport]
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Arbiter pass-through throughput vs a bare SDK proxy.")
    parser.add_argument("--calls", type=int, default=2000, help="measured calls per target and mode")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight")
    parser.add_argument(
        "--mode",
        choices=["both", "auto", "legacy"],
        default="both",
        help="auto: 2026-07-28; legacy: the 2025-11-25 handshake",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--bare-stateless",
        action="store_true",
        help="run the bare proxy with stateless_http=True (default: the SDK default, False)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="print the servers' log tails at the end")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.concurrency < 1:
        parser.error("--calls and --concurrency must be positive")
    modes: list[Mode] = ["auto", "legacy"] if args.mode == "both" else [args.mode]
    # Generous but bounded: even 20 calls/s would finish well within it.
    run_timeout = 120.0 + args.calls / 20

    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    results: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="arbiter-bench-") as tmp:
        workdir = Path(tmp)
        fleet = Fleet(workdir)
        try:
            targets = start_servers(fleet, workdir, args.bare_stateless)
            print(
                f"{args.calls} calls per run, {args.concurrency} in flight, warm-up {WARMUP_CALLS}; "
                f"{os.cpu_count()} CPUs",
                flush=True,
            )
            for mode in modes:
                for target in targets:
                    result: RunResult = _run(
                        lambda t=target, m=mode: measure(t, m, args.calls, args.concurrency, run_timeout)
                    )
                    results.append(result)
                    print(f"  {target.name:<8} {mode:<6} {result.calls_per_s:7.1f} calls/s", flush=True)
            if args.keep_logs:
                for proc in (t.server for t in targets):
                    print(f"--- {proc.name} log tail ---\n{proc.log_tail()}")
        finally:
            fleet.close()
    print()
    print_table(results)
    print()
    table = ratios(results)
    print_ratios(table)
    if args.json:
        payload = {
            "config": {
                "calls": args.calls,
                "concurrency": args.concurrency,
                "warmup": WARMUP_CALLS,
                "bare_stateless": args.bare_stateless,
                "cpus": os.cpu_count(),
            },
            "results": [asdict(r) for r in results],
            "ratios": table,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if all(r.errors == 0 for r in results) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
