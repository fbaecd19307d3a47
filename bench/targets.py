"""The benchmark's targets: how each server is started, configured, and reached.

Every target sits in front of the same upstream (``bench/upstream.py``). Each ``setup_*`` function
starts its server(s) in the run's ``Fleet``, configures them through their own CLI and HTTP API only,
and returns the ``Target``s it serves, or raises ``Skipped`` with the reason it cannot run here (a peer
virtualenv not built, PostgreSQL not reachable, ...). Set-ups are independent, so the run starts them in
parallel threads.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from harness import (
    BENCH_DIR,
    DEMO_POLICY,
    HOST,
    REPO_DIR,
    BenchError,
    Fleet,
    Jwks,
    Mode,
    Proc,
    clean_env,
    free_ports,
    run_cli,
    venv_tool,
    wait_for_http_ok,
    wait_for_port,
)

PEERS_DIR = Path(os.environ.get("ARBITER_BENCH_PEERS", REPO_DIR / ".bench"))
FASTMCP_VENV = PEERS_DIR / "fastmcp-venv"
CONTEXTFORGE_VENV = PEERS_DIR / "contextforge-venv"
PG_BASE = os.environ.get("ARBITER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("ARBITER_BENCH_REDIS", f"redis://{HOST}:6379/0")
UPSTREAM_NAME = "up"  # Arbiter exposes the echo tool as up__echo
AGENT_ROLE = "bench-agent"
TENANT = "acme"
BOTH: tuple[Mode, ...] = ("auto", "legacy")

# Arbiter with all governance on: the demo's 12 rules and 5 for the bench's agent, with argument
# conditions on the tools it calls, a conditional deny over the whole upstream, an unconditional deny
# and a role link: 17 rules, so a decision scans a realistic policy.
_ROLE, _UP = f"role:{AGENT_ROLE}", UPSTREAM_NAME
GOVERNED_RULES = f"""
p, {_ROLE}, {TENANT}, {_UP}/echo, call, allow, r.args.text != "forbidden" and r.sub.tenant == "{TENANT}"
p, {_ROLE}, {TENANT}, {_UP}/tool_*, call, allow, "limit" not in r.args or r.args.limit <= 100
p, {_ROLE}, *, {_UP}/*, call, deny, r.args.force == True
p, {_ROLE}, *, {_UP}/delete_*, call, deny
g, role:bench-lead, {_ROLE}
"""
MINIMAL_POLICY = f"p, role:{AGENT_ROLE}, *, {UPSTREAM_NAME}/*, call, allow\n"


class Skipped(Exception):
    """A target cannot run here; the message says why, and the report shows it."""


@dataclass
class Target:
    name: str  # what --only selects and the report's key, e.g. arbiter-gov
    label: str  # what the report calls it
    url: str
    tool: str  # the echo tool's name as this target exposes it
    proc: Proc | None  # the process charged as the proxy (None: the upstream itself, "direct")
    token: str | None = None  # the load generator's bearer credential
    modes: tuple[Mode, ...] = BOTH
    admin: tuple[str, str] | None = None  # Arbiter: its admin API's base URL and token, for evidence


@dataclass
class Ctx:
    fleet: Fleet
    workdir: Path
    upstream_url: str
    upstream: Proc
    jwks: Jwks
    env: dict[str, str] = field(default_factory=clean_env)


# ---------------------------------------------------------------------------------------------- upstream


def start_upstream(fleet: Fleet) -> tuple[Proc, str]:
    (port,) = free_ports(1)
    proc = fleet.start(
        "upstream",
        [sys.executable, str(BENCH_DIR / "upstream.py"), "--port", str(port)],
        clean_env(),
        side=True,
    )
    wait_for_port(proc, port)
    return proc, f"http://{HOST}:{port}/mcp"


def setup_direct(ctx: Ctx) -> list[Target]:
    return [Target("direct", "upstream, direct", ctx.upstream_url, "echo", None)]


# ---------------------------------------------------------------------------------------------- bare SDK


def setup_bare(ctx: Ctx) -> list[Target]:
    (port,) = free_ports(1)
    argv = [sys.executable, str(BENCH_DIR / "bare_proxy.py"), "--upstream", ctx.upstream_url]
    proc = ctx.fleet.start("bare", [*argv, "--port", str(port)], ctx.env)
    wait_for_port(proc, port)
    return [Target("bare", "bare SDK pass-through", f"http://{HOST}:{port}/mcp", "echo", proc)]


# ---------------------------------------------------------------------------------------------- FastMCP


def installed_version(venv: Path, dist: str) -> str:
    """The version of a distribution installed in a virtualenv, from its dist-info directory's name."""
    for info in venv.glob(f"lib/python*/site-packages/{dist}-*.dist-info"):
        return info.name.removeprefix(f"{dist}-").removesuffix(".dist-info")
    return "?"


def _fastmcp_python() -> Path:
    python = FASTMCP_VENV / "bin" / "python"
    if not python.exists() or installed_version(FASTMCP_VENV, "fastmcp") == "?":
        raise Skipped(f"no FastMCP virtualenv at {FASTMCP_VENV} (build it with `make bench-peers`)")
    return python


def _setup_fastmcp(ctx: Ctx, reuse: bool) -> list[Target]:
    python = _fastmcp_python()
    (port,) = free_ports(1)
    name = "fastmcp-reused" if reuse else "fastmcp-default"
    argv = [str(python), str(BENCH_DIR / "fastmcp_proxy.py"), "--upstream", ctx.upstream_url]
    proc = ctx.fleet.start(name, [*argv, "--port", str(port), *(["--reuse"] if reuse else [])], ctx.env)
    wait_for_port(proc, port)
    version = installed_version(FASTMCP_VENV, "fastmcp")
    label = f"FastMCP {version} proxy, " + ("reused client" if reuse else "`create_proxy` default")
    return [Target(name, label, f"http://{HOST}:{port}/mcp", "echo", proc)]


def setup_fastmcp_default(ctx: Ctx) -> list[Target]:
    return _setup_fastmcp(ctx, reuse=False)


def setup_fastmcp_reused(ctx: Ctx) -> list[Target]:
    return _setup_fastmcp(ctx, reuse=True)


# ---------------------------------------------------------------------------------------------- ContextForge

CF_ADMIN = "admin@example.com"
CF_START_TIMEOUT_S = 180.0  # its first start migrates a fresh SQLite database: ~25 s here


def _strong_password() -> str:
    # Its password policy wants length, upper and lower case and a special character.
    return f"Bench-{secrets.token_urlsafe(18)}-a1!"


def setup_contextforge(ctx: Ctx) -> list[Target]:
    """ContextForge (mcp-contextforge-gateway) with its authentication on, one uvicorn worker, SQLite.

    The upstream is registered as a gateway through its REST API with a JWT minted by its own CLI; its
    tools are grouped into a virtual server, whose MCP endpoint (``/servers/<id>/mcp``) is measured.
    """
    python = CONTEXTFORGE_VENV / "bin" / "python"
    if not python.exists() or installed_version(CONTEXTFORGE_VENV, "mcp_contextforge_gateway") == "?":
        raise Skipped(
            f"no ContextForge virtualenv at {CONTEXTFORGE_VENV} (build it with `make bench-peers`; "
            "ContextForge 1.1 needs Python 3.12 or 3.13)"
        )
    (port,) = free_ports(1)
    home = ctx.workdir / "contextforge"
    home.mkdir()  # its working directory: an empty one, so it reads no .env of ours
    jwt_secret = secrets.token_urlsafe(48)
    env = {
        **ctx.env,
        "HOST": HOST,
        "PORT": str(port),
        "DATABASE_URL": f"sqlite:///{home / 'mcp.db'}",
        # Authentication on (its defaults, stated): every REST and MCP request needs a valid JWT.
        "AUTH_REQUIRED": "true",
        "MCP_CLIENT_AUTH_ENABLED": "true",
        "JWT_SECRET_KEY": jwt_secret,
        "AUTH_ENCRYPTION_SECRET": secrets.token_urlsafe(48),
        "PLATFORM_ADMIN_EMAIL": CF_ADMIN,
        "PLATFORM_ADMIN_PASSWORD": _strong_password(),
        "DEFAULT_USER_PASSWORD": _strong_password(),
        "BASIC_AUTH_PASSWORD": _strong_password(),
        # The upstream is on loopback, which its SSRF protection refuses by default.
        "SSRF_ALLOW_LOCALHOST": "true",
        # Its rate limiter stays on, with a limit the bench never reaches (as Arbiter's rate rule): by
        # default MCP endpoints allow 100 requests a minute and then lock the caller out for 15 minutes.
        # In memory, as Arbiter's on SQLite: its default would keep counters in the machine's Redis.
        "RATE_LIMIT_MEDIUM_RPM": "1000000",
        "RATE_LIMIT_MEDIUM_BURST": "1000000",
        "RATE_LIMITING_REDIS_ENABLED": "false",
        "MCPGATEWAY_UI_ENABLED": "false",
        "LOG_LEVEL": "ERROR",
    }
    mcpgateway = CONTEXTFORGE_VENV / "bin" / "mcpgateway"
    # `mcpgateway` is uvicorn with its app: one worker unless --workers is given.
    proc = ctx.fleet.start(
        "contextforge", [str(mcpgateway), "--host", HOST, "--port", str(port)], env, cwd=home
    )
    base = f"http://{HOST}:{port}"
    wait_for_http_ok(proc, f"{base}/health", timeout=CF_START_TIMEOUT_S)
    token = run_cli(
        [
            str(python),
            "-m",
            "mcpgateway.utils.create_jwt_token",
            "--username",
            CF_ADMIN,
            "--exp",
            "1440",
            "--secret",
            jwt_secret,
        ],
        env,
        "contextforge create_jwt_token",
        cwd=home,
    ).strip()
    headers = {"Authorization": f"Bearer {token}"}
    with httpx2.Client(base_url=base, headers=headers, timeout=60.0) as http:
        resp = http.post(
            "/gateways",
            json={"name": "bench_up", "url": ctx.upstream_url, "transport": "STREAMABLEHTTP"},
        )
        if resp.status_code not in (200, 201):
            raise BenchError(
                f"contextforge: registering the gateway answered {resp.status_code}: {resp.text[:500]}"
            )
        tools: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            tools = http.get("/tools", params={"limit": 0}).json()
            if len(tools) >= 100:
                break
            time.sleep(0.5)
        echo = [t for t in tools if (t.get("originalName") or t.get("original_name")) == "echo"]
        if not echo:
            raise BenchError(f"contextforge: the gateway's tools do not include echo ({len(tools)} tools)")
        resp = http.post(
            "/servers",
            json={"server": {"name": "bench", "associated_tools": [t["id"] for t in tools]}},
        )
        if resp.status_code not in (200, 201):
            raise BenchError(
                f"contextforge: creating the virtual server answered {resp.status_code}: {resp.text[:500]}"
            )
        server_id = resp.json()["id"]
    version = installed_version(CONTEXTFORGE_VENV, "mcp_contextforge_gateway")
    label = f"ContextForge {version}, one worker"
    target = Target("contextforge", label, f"{base}/servers/{server_id}/mcp", echo[0]["name"], proc, token)
    return [target]


# ---------------------------------------------------------------------------------------------- Arbiter


@dataclass(frozen=True)
class ArbiterSpec:
    name: str
    governed: bool  # all governance on: 17-rule policy, rate rule, cost, budget, signed audit, JWT too
    postgres: bool  # PostgreSQL + Redis instead of SQLite and in-process limits
    traced: bool = False  # OpenTelemetry traces on, exported over OTLP/HTTP to a sink that drops them
    # audit.confirm_before_answer (on by default): an answer waits until its audit record is stored.
    # Off here only to measure what that durability costs (docs/performance.md).
    confirm: bool = True
    # mcp.direct_path (on by default): the pipeline's methods answered without the SDK's server
    # transport. Off here only to measure what the direct paths save (docs/performance.md).
    direct: bool = True


ARBITER_MIN = ArbiterSpec("arbiter-min", governed=False, postgres=False)
ARBITER_GOV = ArbiterSpec("arbiter-gov", governed=True, postgres=False)
ARBITER_PG = ArbiterSpec("arbiter-pg", governed=True, postgres=True)
ARBITER_TRACED = ArbiterSpec("arbiter-traced", governed=True, postgres=False, traced=True)
ARBITER_UNCONFIRMED = ArbiterSpec("arbiter-unconfirmed", governed=True, postgres=False, confirm=False)
ARBITER_SDK = ArbiterSpec("arbiter-sdk", governed=True, postgres=False, direct=False)


def _signing_key() -> str:
    # ARBITER_AUDIT__SIGNING_KEY takes a raw Ed25519 seed: 32 random bytes, base64.
    return base64.b64encode(os.urandom(32)).decode()


async def _pg_admin(sql: str) -> None:
    import asyncpg  # pyright: ignore[reportMissingTypeStubs]

    conn: Any = await asyncpg.connect(f"{PG_BASE}/test", timeout=5)  # pyright: ignore[reportUnknownMemberType]
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_pg_database() -> str:
    """A fresh database for this run (dropped by ``drop_pg_database``), so runs never collide."""
    name = f"arbiter_bench_{uuid.uuid4().hex[:10]}"
    try:
        asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any failure means: no PostgreSQL for this run
        raise Skipped(f"PostgreSQL at {PG_BASE} not usable: {type(exc).__name__}: {exc}") from None
    return name


def drop_pg_database(name: str) -> None:
    with contextlib.suppress(Exception):
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _redis_check() -> None:
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
        client.ping()  # pyright: ignore[reportUnknownMemberType]
        client.close()
    except redis.RedisError as exc:
        raise Skipped(f"Redis at {REDIS_URL} not usable: {exc}") from None


def drop_redis_keys(prefix: str) -> None:
    import redis

    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=2)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))  # pyright: ignore[reportUnknownMemberType, reportUnknownArgumentType]
        if keys:
            client.delete(*keys)  # pyright: ignore[reportUnknownMemberType]
        client.close()


@dataclass
class Cleanup:
    """What a run must undo outside its temporary directory (databases, Redis keys)."""

    actions: list[Callable[[], None]] = field(default_factory=list[Callable[[], None]])

    def run(self) -> None:
        for action in reversed(self.actions):
            action()
        self.actions.clear()


def setup_arbiter(ctx: Ctx, spec: ArbiterSpec, cleanup: Cleanup) -> list[Target]:
    (port,) = free_ports(1)
    base = f"http://{HOST}:{port}"
    resource = f"{base}/mcp"
    admin_token = secrets.token_urlsafe(24)
    env = {
        **ctx.env,
        "ARBITER_LOG_LEVEL": "WARNING",
        "ARBITER_ADMIN_TOKEN": admin_token,
        "ARBITER_AUTH__RESOURCE_URL": resource,
    }
    if spec.postgres:
        _redis_check()
        db = create_pg_database()
        cleanup.actions.append(lambda: drop_pg_database(db))
        prefix = f"arbiter-bench-{uuid.uuid4().hex[:10]}:"
        cleanup.actions.append(lambda: drop_redis_keys(prefix))
        env |= {
            "ARBITER_DATABASE_URL": f"{PG_BASE}/{db}",
            "ARBITER_REDIS_URL": REDIS_URL,
            "ARBITER_LIMITS__REDIS_PREFIX": f"{prefix}limits:",
            "ARBITER_POLICY__REDIS_CHANNEL": f"{prefix}policy",
        }
    else:
        env["ARBITER_DATABASE_URL"] = f"sqlite:///{ctx.workdir / spec.name}.db"
    if spec.governed:
        env |= {
            "ARBITER_AUDIT__SIGNING_KEY": _signing_key(),
            "ARBITER_AUTH__ISSUERS": json.dumps([{"issuer": ctx.jwks.issuer, "jwks_uri": ctx.jwks.url}]),
        }
    if not spec.confirm:
        env["ARBITER_AUDIT__CONFIRM_BEFORE_ANSWER"] = "false"
    if not spec.direct:
        env["ARBITER_MCP__DIRECT_PATH"] = "false"
    if spec.traced:
        (sink_port,) = free_ports(1)
        sink = ctx.fleet.start(
            f"{spec.name}-otlp-sink",
            [sys.executable, str(BENCH_DIR / "otlp_sink.py"), HOST, str(sink_port)],
            {},
            side=True,
        )
        wait_for_http_ok(sink, f"http://{HOST}:{sink_port}/")
        env |= {
            "ARBITER_TELEMETRY__TRACES": "otlp",
            "ARBITER_TELEMETRY__OTLP_ENDPOINT": f"http://{HOST}:{sink_port}/v1/traces",
        }
    run_cli([*venv_tool("arbiter"), "migrate"], env, f"{spec.name}: arbiter migrate")
    proc = ctx.fleet.start(
        spec.name, [*venv_tool("arbiter"), "serve", "--host", HOST, "--port", str(port)], env
    )
    wait_for_http_ok(proc, f"{base}/healthz")
    headers = {"Authorization": f"Bearer {admin_token}"}
    with httpx2.Client(base_url=f"{base}/admin/v1", headers=headers, timeout=30.0) as http:

        def post(path: str, **kw: Any) -> dict[str, Any]:
            resp = http.post(path, **kw)
            if resp.status_code not in (200, 201):
                raise BenchError(f"{spec.name}: POST {path} answered {resp.status_code}: {resp.text[:500]}")
            return resp.json()

        # The bench measures calls, not reviews: its own upstream's tools are approved as discovered.
        up = post("/upstreams", json={"name": UPSTREAM_NAME, "url": ctx.upstream_url, "auto_approve": True})
        if up.get("catalog", {}).get("tools", 0) < 100:
            raise BenchError(f"{spec.name}: the upstream's catalog is {up.get('catalog')}, not 100 tools")
        policy = DEMO_POLICY.read_text(encoding="utf-8") + GOVERNED_RULES if spec.governed else MINIMAL_POLICY
        post("/policies/import", content=policy, headers={"content-type": "text/csv"})
        key = post("/api-keys", json={"owner": "bench-agent", "roles": [AGENT_ROLE], "tenant": TENANT})["key"]
        if spec.governed:
            # Limits that every call passes through but none reaches: a rate rule, a tool cost and a
            # daily budget, all matching the agent's calls.
            rule = {"role": AGENT_ROLE, "upstream": UPSTREAM_NAME, "limit": 1_000_000, "period": "minute"}
            post("/limits", json=rule | {"description": "bench: a rate rule every call passes"})
            post("/tool-costs", json={"tool": f"{UPSTREAM_NAME}/*", "cost": 0.01})
            post(
                "/budgets",
                json={"role": AGENT_ROLE, "period": "day", "limit": 1_000_000_000.0, "description": "bench"},
            )
    tool = f"{UPSTREAM_NAME}__echo"
    admin = (f"{base}/admin/v1", admin_token)
    if not spec.governed:
        label = "Arbiter, minimal (API key, one allow rule, SQLite)"
        return [Target(spec.name, label, resource, tool, proc, key, admin=admin)]
    store = "PostgreSQL + Redis" if spec.postgres else "SQLite"
    label = f"Arbiter, all governance on, API key, {store}"
    if spec.traced:
        label += ", traces exported (OTLP)"
    if not spec.confirm:
        label += ", answers not waiting for their audit record"
    if not spec.direct:
        label += ", every request through the SDK's server transport"
    targets = [Target(spec.name, label, resource, tool, proc, key, admin=admin)]
    if not spec.postgres and not spec.traced and spec.confirm and spec.direct:
        jwt = ctx.jwks.mint(resource, "agent-1", [AGENT_ROLE], TENANT)
        label = f"Arbiter, all governance on, JWT, {store}"
        targets.append(Target(f"{spec.name}-jwt", label, resource, tool, proc, jwt, admin=admin))
    return targets


def governance_evidence(target: Target) -> str | None:
    """What an Arbiter target's admin API says it did: audit records (and whether the chain verifies
    and is signed) and today's usage, so the report shows the governance was really on."""
    if target.admin is None:
        return None
    base, token = target.admin
    with httpx2.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=120.0) as http:
        audit = http.get("/audit/verify")
        usage = http.get("/usage", params={"period": "day", "group_by": "principal"})
    if audit.status_code != 200 or usage.status_code != 200:
        return f"admin API answered {audit.status_code} (audit/verify), {usage.status_code} (usage)"
    a, u = audit.json(), usage.json()["totals"]
    signed = f"signed by key {', '.join(a['key_ids'])}" if a.get("key_ids") else "unsigned"
    return (
        f"audit log: {a.get('head_seq')} records, chain verifies: {a.get('ok')}, checkpoints {signed}; "
        f"usage today: {u['calls']} calls, {u['limited']} refused by limits, cost {u['cost']:g} units"
    )
