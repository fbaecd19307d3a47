"""Shared test infrastructure: real upstream MCP servers in subprocesses, Arbiter on a loopback port.

Arbiter runs under uvicorn in a thread with its own event loop, so tests drive it over real sockets with
the real MCP SDK client while its upstream connections live in its own loop, as in production.
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpcore2
import httpx
import httpx2
import pytest
import uvicorn
from mcp import Client
from mcp.client._transport import TransportStreams
from mcp.client.streamable_http import streamable_http_client
from opentelemetry.sdk.trace import TracerProvider
from starlette.types import ASGIApp

from arbiter.app import create_app
from arbiter.demo.runner import free_port
from arbiter.proxy.pipeline import CallContext, CallNext, Interceptor, Result
from arbiter.serving import uvicorn_config
from arbiter.settings import Settings
from arbiter.store import schema

ADMIN_TOKEN = "test-admin-token-0123456789"
# Tests that are not about policy run under a policy that lets every caller use everything; the
# default (empty) policy would deny it all. Policy tests pass their own.
ALLOW_ALL = "p, *, *, *, call, allow\np, *, *, *, read, allow\np, *, *, *, get, allow\n"
# A handshake-era (2025-11-25) initialize request, for tests that speak raw HTTP.
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    },
}
PG_BASE = os.environ.get("ARBITER_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
REQUIRE_SERVICES = os.environ.get("ARBITER_REQUIRE_SERVICES") == "1"


def wait_listening(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout}s")


@asynccontextmanager
async def authed_transport(url: str, token: str) -> AsyncGenerator[TransportStreams]:
    """Streamable HTTP with a bearer credential on every request."""
    headers = {"authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30.0)) as http,
        streamable_http_client(url, http_client=http) as streams,
    ):
        yield streams


@contextmanager
def serve_in_thread(app: ASGIApp, port: int | None = None, **options: Any) -> Iterator[int]:
    """Serve an ASGI app on a loopback port (a free one by default) from a background thread;
    ``options`` are uvicorn's (e.g. ``timeout_keep_alive``)."""
    port = port or free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1, **options
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_listening(port)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        assert not thread.is_alive(), "test server did not stop"


@dataclass(kw_only=True)
class ServerProc:
    """A server process of the test's own on a loopback port, which the test may kill and restart."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Self:
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.port, self.proc)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@dataclass
class UpstreamProc(ServerProc):
    """A demo upstream MCP server in its own process."""

    module: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module, "--port", str(self.port)]


@pytest.fixture(scope="session")
def kb_upstream() -> Iterator[UpstreamProc]:
    up = UpstreamProc("arbiter.demo.kb").start()
    yield up
    up.kill()


@pytest.fixture(scope="session")
def crm_upstream() -> Iterator[UpstreamProc]:
    up = UpstreamProc("arbiter.demo.crm").start()
    yield up
    up.kill()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'arbiter.db'}"
    schema.upgrade(url)
    return url


def service_unavailable(what: str) -> None:
    """Skip when a service is missing, or fail when CI says the services must be there."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{what} is required (ARBITER_REQUIRE_SERVICES=1) but not reachable")
    pytest.skip(f"{what} not reachable")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    import asyncpg  # pyright: ignore[reportMissingTypeStubs]

    name = f"arbiter_test_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(f"{PG_BASE}/test", timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:  # pyright: ignore[reportUnknownMemberType]
        service_unavailable(f"PostgreSQL at {PG_BASE} ({exc})")
    yield f"{PG_BASE}/{name}"
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


class ArbiterServer:
    """Arbiter under uvicorn in a background thread, on a free loopback port."""

    def __init__(
        self,
        settings: Settings,
        interceptors: Sequence[Interceptor] = (),
        clock: Callable[[], float] = time.time,  # the in-process limits backend's clock (tests skew it)
        monotonic: Callable[[], float] = time.monotonic,  # upstream token expiry (tests advance it)
        tracer_provider: TracerProvider | None = None,  # traces on, into the test's exporter
    ) -> None:
        self.port = free_port()
        self.settings = settings.model_copy(update={"port": self.port})
        self.app = create_app(
            self.settings,
            interceptors=interceptors,
            clock=clock,
            monotonic=monotonic,
            tracer_provider=tracer_provider,
        )
        # The product's own server configuration (keep-alive and all), as `arbiter serve` runs it.
        self.server = uvicorn.Server(
            uvicorn_config(
                self.app, self.settings, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
            )
        )
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        serve = self.server.serve

        async def serve_capturing_loop(sockets: list[socket.socket] | None = None) -> None:
            self.loop = asyncio.get_running_loop()  # for the hang report in stop()
            await serve(sockets)

        self.server.serve = serve_capturing_loop  # type: ignore[method-assign]
        self.server.run()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mcp_url(self) -> str:
        return f"{self.base_url}/mcp"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.agent_key}"}

    def client(self, mode: str = "auto", token: str | None = None) -> Client:
        """An MCP SDK client for this Arbiter, authenticated with the test agent's API key by default."""
        return Client(authed_transport(self.mcp_url, token or self.agent_key), mode=mode, cache=None)  # pyright: ignore[reportArgumentType]

    def start(self) -> ArbiterServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("Arbiter failed to start")
            if time.monotonic() > deadline:
                raise TimeoutError("Arbiter did not start within 30s")
            time.sleep(0.02)
        self.agent_key = ""
        if self.settings.admin_token is not None:  # bootstrap a test agent's key with break-glass
            with self.admin(self.settings.admin_token.get_secret_value()) as admin:
                resp = admin.post(
                    "/api-keys", json={"owner": "test-agent", "roles": ["agent"], "tenant": "acme"}
                )
            assert resp.status_code == 201, resp.text
            self.agent_key = resp.json()["key"]
        return self

    def seed_policy(self, csv: str) -> None:
        """Import ``csv`` as the policy unless the database already has one (a second replica)."""
        with self.admin() as admin:
            if admin.get("/policies").json()["version"] == 0:
                resp = admin.post("/policies/import", content=csv, headers={"content-type": "text/csv"})
                assert resp.status_code == 200, resp.text

    def stop(self) -> None:
        self.server.should_exit = True
        # Bounded, not instant: connections get shutdown_grace_s, and database work in flight is shielded
        # for up to 30 s (proxy/registry.py). A shutdown that hangs still fails here.
        self.thread.join(timeout=self.settings.shutdown_grace_s + 45)
        assert not self.thread.is_alive(), f"Arbiter did not shut down; its tasks:\n{self._tasks_report()}"

    def _tasks_report(self) -> str:
        if self.loop is None:
            return "(no event loop)"
        out = io.StringIO()
        for task in list(asyncio.all_tasks(self.loop)):
            out.write(f"--- {task!r}\n")
            task.print_stack(file=out)
        return out.getvalue()

    def admin(self, token: str | None = ADMIN_TOKEN) -> httpx.Client:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=f"{self.base_url}/admin/v1", headers=headers, timeout=30)

    def register(self, name: str, url: str, **extra: Any) -> dict[str, Any]:
        with self.admin() as client:
            resp = client.post("/upstreams", json={"name": name, "url": url, **extra})
        assert resp.status_code == 201, resp.text
        body: dict[str, Any] = resp.json()
        return body


@pytest.fixture
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every host httpcore's socket backend is asked to connect to, in this process (Arbiter's thread too).

    Anything but loopback is refused before a socket exists: tests never send a packet off this machine,
    even when what they test (an upstream on another network) would.
    """
    hosts: list[str] = []
    # httpcore2 also declares a stub AnyIOBackend (for when anyio is missing), which pyright picks.
    connect = httpcore2.AnyIOBackend.connect_tcp  # pyright: ignore[reportAttributeAccessIssue]

    async def guarded(
        self: httpcore2.AsyncNetworkBackend, host: str, port: int, *args: Any, **kwargs: Any
    ) -> httpcore2.AsyncNetworkStream:
        hosts.append(host)
        if not ipaddress.ip_address(host).is_loopback:
            raise httpcore2.ConnectError(f"test: {host} is not loopback; not connecting")
        return await connect(self, host, port, *args, **kwargs)

    monkeypatch.setattr(httpcore2.AnyIOBackend, "connect_tcp", guarded)
    return hosts


class Recorder:
    """An interceptor that records every request reaching the pipeline."""

    def __init__(self) -> None:
        self.calls: list[CallContext] = []

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        self.calls.append(ctx)
        return await call_next(ctx)


ArbiterFactory = Callable[..., ArbiterServer]


@pytest.fixture
def arbiter_factory(sqlite_url: str, tmp_path: Path) -> Iterator[ArbiterFactory]:
    """Start Arbiters on the test's SQLite file (or another URL); all are stopped at teardown."""
    started: list[ArbiterServer] = []

    def make(
        interceptors: Sequence[Interceptor] = (),
        policy: str | None = ALLOW_ALL,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        tracer_provider: TracerProvider | None = None,
        **overrides: Any,
    ) -> ArbiterServer:
        # Each test spools audit records (if it ever must) under its own directory, not the checkout.
        overrides["audit"] = {"spool_dir": str(tmp_path / "audit-spool"), **overrides.get("audit", {})}
        # Tests about something else use their upstreams' tools as they come (tests/integrity/ review them).
        overrides["integrity"] = {"auto_approve_default": True, **overrides.get("integrity", {})}
        settings = Settings(**{"database_url": sqlite_url, "admin_token": ADMIN_TOKEN, **overrides})
        server = ArbiterServer(settings, interceptors, clock, monotonic, tracer_provider).start()
        if policy is not None and settings.admin_token is not None:
            server.seed_policy(policy)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def arbiter(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc, crm_upstream: UpstreamProc
) -> ArbiterServer:
    """Arbiter with both demo upstreams registered through the admin API."""
    server = arbiter_factory()
    server.register("kb", kb_upstream.url)
    server.register("crm", crm_upstream.url)
    return server
