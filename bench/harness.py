"""What the benchmark scripts share: server processes and their CPU and memory, ports and waits, a local
JWKS, and the load generator (one ``mcp.Client`` session, N requests in flight, or one at a time).

Everything here runs in Arbiter's virtualenv. The servers it starts may run in other virtualenvs
(FastMCP, ContextForge); their CPU and memory are read from ``/proc``, so this module is Linux only.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import httpx2
from joserfc import jwt
from joserfc.jwk import ECKey
from mcp import Client
from mcp.client._transport import TransportStreams
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 30.0
DEMO_POLICY = Path(str(files("arbiter.policies") / "demo.csv"))
MODERN = "2026-07-28"
HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

Mode = Literal["auto", "legacy"]  # mcp.Client modes: auto → 2026-07-28 against mcp 2.3; legacy → handshake
Op = Literal["call", "list"]
T = TypeVar("T")
Sender = Callable[[int], Awaitable[str | None]]  # request number -> the failure as text, or None
RequestHook = Callable[[httpx2.Request], Awaitable[None]]


class BenchError(Exception):
    """A server did not start, a set-up step failed, or a run went wrong."""


# ---------------------------------------------------------------------------------------------- /proc


def _stat(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces; count fields from after its closing paren.
    return stat[stat.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """Every live process below ``root`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            children.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_seconds(root: int) -> float:
    """CPU (user + system) used by ``root`` and every process below it, live or already reaped.

    A peer that forks workers or helpers (ContextForge) is charged for all of them: each live process
    counts its own time plus that of the children it has reaped (cutime/cstime).
    """
    total = 0
    for pid in (root, *descendants(root)):
        with contextlib.suppress(OSError, IndexError, ValueError):
            f = _stat(pid)
            total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / _CLK_TCK


def rss_mb(pid: int) -> float:
    """Resident memory of one process (VmRSS), in MiB; 0 when it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def pss_mb(pid: int) -> float:
    """Proportional set size of one process (shared pages split between their users), in MiB."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    return 0.0


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all cores; /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


def own_cpu_seconds() -> float:
    """CPU of this process and of every child it has reaped (the servers, once stopped, and theirs)."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# ---------------------------------------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    side: bool = False  # the upstream or a helper, not a proxy under test

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu_seconds(self) -> float:
        """CPU of this process and everything it forked (see ``tree_cpu_seconds``)."""
        return tree_cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        return rss_mb(self.pid)

    def children_pss_mb(self) -> tuple[int, float]:
        """How many processes run below this one, and their memory (PSS, so shared pages count once)."""
        kids = descendants(self.pid)
        return len(kids), sum(pss_mb(p) for p in kids)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _die_with_parent() -> None:
    # If the bench is killed outright (SIGKILL), the kernel still stops the servers it started.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the proxy under test runs on, and which the load generator and the upstream share.

    Pinned, the proxy has a core of its own: calls/s then measures the proxy, not how the scheduler
    shared two cores among the three, and runs vary less. Side processes are pinned from the start;
    proxies once they are all up (``Fleet.pin_proxies``: a dozen servers starting together on one core
    missed their start-up timeout), every thread of every process in their trees, so whatever they
    start later inherits it (ContextForge's workers, Arbiter's SQLite thread).
    """

    proxy: frozenset[int]
    side: frozenset[int]

    @staticmethod
    def split() -> Pinning | None:
        """The first CPU for the proxy, the second for the rest; None with fewer than two."""
        cpus = sorted(os.sched_getaffinity(0))
        return Pinning(frozenset(cpus[:1]), frozenset(cpus[1:2])) if len(cpus) >= 2 else None

    def describe(self) -> str:
        return f"proxy on CPU {_cpus(self.proxy)}; load generator and upstream on CPU {_cpus(self.side)}"


def _cpus(cpus: Iterable[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


class Fleet:
    """Every server process this run started; ``close`` stops them all, newest first."""

    def __init__(self, workdir: Path, pinning: Pinning | None = None) -> None:
        self.workdir = workdir
        self.pinning = pinning
        self._procs: list[Proc] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: Path | None = None,
        *,
        side: bool = False,
    ) -> Proc:
        """Start a server; a proxy under test unless ``side`` (the upstream and other helpers)."""
        log = self.workdir / f"{name}.log"
        cpus = self.pinning.side if self.pinning is not None and side else None

        def prepare() -> None:
            _die_with_parent()
            if cpus is not None:
                os.sched_setaffinity(0, cpus)

        with log.open("wb") as out:
            popen = subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Own session and process group: Ctrl-C reaches only the bench, which then stops the
                # servers in order, and stopping one stops whatever it forked.
                start_new_session=True,
                preexec_fn=prepare,
            )
        proc = Proc(name, popen, log, side)
        self._procs.append(proc)
        return proc

    def pin_proxies(self) -> None:
        """Move every proxy's process tree, thread by thread, onto the proxies' CPUs."""
        if self.pinning is None:
            return
        for proc in self._procs:
            if proc.side or not proc.alive():
                continue
            for pid in (proc.pid, *descendants(proc.pid)):
                with contextlib.suppress(OSError):  # a thread or process that just ended
                    for tid in os.listdir(f"/proc/{pid}/task"):
                        with contextlib.suppress(OSError):
                            os.sched_setaffinity(int(tid), self.pinning.proxy)

    def stop(self, proc: Proc) -> None:
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # the group this fleet created for it
        try:
            proc.popen.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.popen.wait(timeout=STOP_TIMEOUT_S)
        with contextlib.suppress(ValueError):
            self._procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(self._procs):
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in list(reversed(self._procs)):
            self.stop(proc)


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
        if not proc.alive():
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
            if not proc.alive():
                raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
            with contextlib.suppress(httpx2.HTTPError):
                if http.get(url).status_code == 200:
                    return
            time.sleep(0.2)
    raise BenchError(f"{url} did not answer 200 within {timeout:g}s:\n{proc.log_tail()}")


def venv_tool(name: str) -> list[str]:
    """A console script of the running virtualenv (``arbiter``), or its module as a fallback."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", f"{name}.cli"]


def clean_env() -> dict[str, str]:
    # Inherited ARBITER_* settings (a config file, Redis, ...) would make runs incomparable.
    return {k: v for k, v in os.environ.items() if not k.startswith("ARBITER_")}


def run_cli(argv: Sequence[str], env: Mapping[str, str], what: str, cwd: Path | None = None) -> str:
    done = subprocess.run(list(argv), env=dict(env), cwd=cwd, capture_output=True, timeout=120, check=False)
    if done.returncode != 0:
        raise BenchError(f"{what} failed ({done.returncode}):\n{done.stdout.decode()}{done.stderr.decode()}")
    return done.stdout.decode()


# ---------------------------------------------------------------------------------------------- JWT


class Jwks:
    """An ES256 signing key and a JWKS for it, served on loopback from a thread of this process (Arbiter
    fetches it once, then caches it)."""

    def __init__(self, port: int, issuer: str = "https://idp.bench.invalid/") -> None:
        self.issuer = issuer
        self.key = ECKey.generate_key("P-256", parameters={"kid": "bench", "alg": "ES256", "use": "sig"})
        self.url = f"http://{HOST}:{port}/jwks"
        body = json.dumps({"keys": [self.key.as_dict(private=False)]}).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer((HOST, port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def mint(
        self, audience: str, subject: str, roles: Sequence[str], tenant: str, ttl_s: int = 86_400
    ) -> str:
        claims = {
            "iss": self.issuer,
            "aud": audience,
            "sub": subject,
            "exp": int(time.time()) + ttl_s,
            "roles": list(roles),
            "tenant": tenant,
        }
        return jwt.encode({"alg": "ES256", "kid": "bench", "typ": "at+jwt"}, claims, self.key)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# ---------------------------------------------------------------------------------------------- load


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[idx]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


@asynccontextmanager
async def transport(
    url: str, concurrency: int, token: str | None, on_request: RequestHook | None = None
) -> AsyncGenerator[TransportStreams]:
    """Streamable HTTP with room for every request in flight (no connection churn mid-run)."""
    pool = concurrency + 8
    http = httpx2.AsyncClient(
        headers={"Authorization": f"Bearer {token}"} if token else None,
        timeout=httpx2.Timeout(CALL_TIMEOUT_S, connect=10.0),
        limits=httpx2.Limits(max_connections=pool, max_keepalive_connections=pool),
        event_hooks={"request": [on_request]} if on_request else None,
    )
    async with http, streamable_http_client(url, http_client=http) as streams:
        yield streams


def open_client(
    url: str, mode: Mode, concurrency: int, token: str | None, on_request: RequestHook | None = None
) -> Client:
    return Client(
        transport(url, concurrency, token, on_request),
        mode=mode,
        cache=None,
        read_timeout_seconds=CALL_TIMEOUT_S,
    )


def sdk_sender(client: Client, op: Op, tool: str) -> Sender:
    """Requests sent by the SDK client itself (``--load-client sdk``)."""

    async def send(i: int) -> str | None:
        return await request_once(client, op, tool, i)

    return send


@dataclass
class Burst:
    """What a stretch of load did: per-request latencies (seconds), failures, and the first failure."""

    latencies: list[float] = field(default_factory=list[float])
    errors: int = 0
    first_error: str | None = None
    seconds: float = 0.0

    @property
    def done(self) -> int:
        return len(self.latencies)


async def request_once(client: Client, op: Op, tool: str, i: int) -> str | None:
    """One ``tools/call`` of the echo tool (a different text each time, so argument-dependent work is
    not answered from a cache) or one ``tools/list``; the failure as text, or None."""
    try:
        if op == "call":
            text = f"hello {i}"
            result = await client.call_tool(tool, {"text": text})
            if result.is_error:
                return f"tool error: {str(result.content)[:200]}"
            first = result.content[0] if result.content else None
            if getattr(first, "text", None) != text:
                return f"unexpected result: {str(result.content)[:200]}"
            return None
        listed = await client.list_tools()
        return None if listed.tools else "empty tools list"
    except MCPError as exc:
        return f"MCPError {exc.error.code}: {exc.error.message}"
    except Exception as exc:  # noqa: BLE001 - any failure of one request is a failed request, counted
        return describe(exc)


def describe(exc: BaseException) -> str:
    """An exception in one line; an exception group by its leaves (the SDK raises those)."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]
    if isinstance(exc, MCPError):
        return f"MCPError {exc.error.code}: {exc.error.message}"
    return f"{type(exc).__name__}: {str(exc)[:300]}"


async def load(
    send: Sender,
    calls: int,
    concurrency: int,
    max_seconds: float | None,
    out: Burst | None = None,
) -> Burst:
    """``calls`` requests with ``concurrency`` in flight, or fewer if ``max_seconds`` runs out first.

    Pass ``out`` to watch the counts while the load runs (the soak samples them).
    """
    out = out if out is not None else Burst()
    issued = 0
    t0 = time.perf_counter()
    deadline = t0 + max_seconds if max_seconds else float("inf")

    async def worker() -> None:
        nonlocal issued
        while issued < calls and time.perf_counter() < deadline:
            issued += 1  # no await between the check and the increment, so tasks never overshoot
            i = issued
            start = time.perf_counter()
            why = await send(i)
            out.latencies.append(time.perf_counter() - start)
            if why is not None:
                out.errors += 1
                out.first_error = out.first_error or why

    async with anyio.create_task_group() as tg:
        for _ in range(max(1, min(concurrency, calls))):
            tg.start_soon(worker)
    out.seconds = time.perf_counter() - t0
    return out


def run_async(fn: Callable[[], Any]) -> Any:
    """Run a coroutine function on a fresh event loop (uvloop when installed, as the servers use)."""
    backend_options = {"use_uvloop": True} if _has_uvloop() else {}
    return anyio.run(fn, backend="asyncio", backend_options=backend_options)


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401  # pyright: ignore[reportUnusedImport]
    except ImportError:
        return False
    return True


def raise_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the ``finally`` blocks that stop the servers run."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
