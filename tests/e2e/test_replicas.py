"""Production shape (issue 17): ``arbiter serve`` replicas on one PostgreSQL database and one Redis.

Real processes over real sockets: three replicas after ``arbiter migrate``, the demo upstreams, a
LangChain agent and SDK clients of both protocol eras behind a round-robin HTTP proxy (every request may
land on another replica: handshake-era clients rely on ``mcp.stateless_legacy``), admin changes made
through one replica and enforced by all, limits that hold across them, a replica killed with SIGKILL
while calls are in flight, and a fourth replica started late that catches up on its own.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mcp import Client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from arbiter.demo.runner import free_port
from tests.conftest import ALLOW_ALL, UpstreamProc, authed_transport, serve_in_thread, wait_listening
from tests.e2e.test_langchain_agents import EXAMPLES, agent_env, run
from tests.limits.conftest import ADMIN_TOKEN, Reply, clear_of_period_end, redis_prefix, redis_url
from tests.limits.conftest import call as call_server

__all__ = ["redis_prefix", "redis_url"]  # fixtures

PROPAGATION_S = 2.0  # the bound for a change made through one replica to hold on all
SECRET_KEY = (
    "h0WZ1y2v9yqkq1gWm5Qe0Zl0n7Cw0C5bXz2o3V4mJ6k="  # Fernet; shared so replicas open each other's state
)


class Replica:
    """``arbiter serve`` in its own process, logging to a file of its own."""

    def __init__(self, env: dict[str, str], work: Path, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = work / f"{name}.log"
        spool = work / f"{name}-spool"  # a spool is one replica's local disk
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "arbiter.cli", "serve", "--port", str(self.port)],
                env={**env, "ARBITER_AUDIT__SPOOL_DIR": str(spool)},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def ready(self) -> Replica:
        wait_listening(self.port, self.proc, timeout=60)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mcp_url(self) -> str:
        return f"{self.url}/mcp"

    def admin(self) -> httpx.Client:
        headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        return httpx.Client(base_url=f"{self.url}/admin/v1", headers=headers, timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class RoundRobin:
    """A small HTTP reverse proxy: each request goes to the next replica (no affinity of any kind)."""

    def __init__(self, replicas: list[Replica]) -> None:
        self._next = itertools.cycle(replicas)
        self.served: Counter[str] = Counter()
        self.app = Starlette(routes=[Route("/mcp", self._forward, methods=["GET", "POST", "DELETE"])])

    async def _forward(self, request: Request) -> Response:
        replica = next(self._next)
        self.served[replica.name] += 1
        skip = {"host", "content-length", "connection"}
        headers = {k: v for k, v in request.headers.items() if k not in skip}
        async with httpx.AsyncClient(timeout=60) as http:
            resp = await http.request(
                request.method, replica.mcp_url, headers=headers, content=await request.body()
            )
        drop = {"content-length", "transfer-encoding", "connection", "content-encoding"}
        out = {k: v for k, v in resp.headers.items() if k not in drop}
        return Response(resp.content, status_code=resp.status_code, headers=out)


@pytest.fixture
def cluster_env(postgres_url: str, redis_url: str, redis_prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBITER_")}
    env.update(
        {
            "ARBITER_DATABASE_URL": postgres_url,
            "ARBITER_REDIS_URL": redis_url,
            "ARBITER_ADMIN_TOKEN": ADMIN_TOKEN,
            "ARBITER_SECRET_KEY": SECRET_KEY,
            "ARBITER_LOG_LEVEL": "WARNING",
            # Handshake-era clients behind a balancer without affinity (docs/deployment.md).
            "ARBITER_MCP__STATELESS_LEGACY": "true",
            "ARBITER_LIMITS__REDIS_PREFIX": redis_prefix,
            "ARBITER_POLICY__REDIS_CHANNEL": f"{redis_prefix}policy",
            # A busy CI machine may take longer than the default 0.5 s per Redis round trip; this test is
            # about sharing state, not Redis outages.
            "ARBITER_LIMITS__REDIS_TIMEOUT_S": "10",
            # About replicas, not reviewing: the upstreams' tools are used as they come (docs/integrity.md).
            "ARBITER_INTEGRITY__AUTO_APPROVE_DEFAULT": "true",
        }
    )
    migrated = subprocess.run(
        [sys.executable, "-m", "arbiter.cli", "migrate"],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert migrated.returncode == 0, migrated.stderr.decode()
    return env


@pytest.fixture
def replicas(cluster_env: dict[str, str], tmp_path: Path) -> Iterator[list[Replica]]:
    started: list[Replica] = []
    yield started
    for replica in started:
        replica.stop()
    for replica in started:  # for a failure's report
        tail = replica.log_path.read_text(errors="replace")[-3000:]
        if "Traceback" in tail:
            print(f"--- {replica.name} log\n{tail}")


def start(env: dict[str, str], work: Path, names: list[str]) -> list[Replica]:
    """Start replicas side by side (the start-up is what takes time); return once all listen."""
    return [r.ready() for r in [Replica(env, work, name) for name in names]]


async def call(http: httpx.AsyncClient, replica: Replica, key: str, tool: str, args: dict[str, Any]) -> Reply:
    """One stateless-era ``tools/call`` over raw HTTP to ``replica``."""
    return await call_server(http, replica, key, tool, args)  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]


def new_key(admin: httpx.Client, owner: str) -> tuple[str, str]:
    resp = admin.post("/api-keys", json={"owner": owner, "roles": ["agent"], "tenant": "acme"})
    assert resp.status_code == 201, resp.text
    return resp.json()["id"], resp.json()["key"]


async def wait_all(replicas: list[Replica], check: Any, what: str, limit_s: float) -> dict[str, float]:
    """Poll ``check(replica)`` on every replica until it holds; seconds each took. Fails after ``limit_s``."""
    began = time.monotonic()
    took: dict[str, float] = {}
    while len(took) < len(replicas):
        for replica in replicas:
            if replica.name not in took and await check(replica):
                took[replica.name] = time.monotonic() - began
        if len(took) < len(replicas):
            waiting = sorted({r.name for r in replicas} - set(took))
            assert time.monotonic() - began < limit_s, f"{what}: {waiting} not within {limit_s} s"
            await asyncio.sleep(0.05)
    return took


async def test_replicas_share_one_database_and_one_redis(
    cluster_env: dict[str, str],
    replicas: list[Replica],
    kb_upstream: UpstreamProc,
    crm_upstream: UpstreamProc,
    tmp_path: Path,
) -> None:
    replicas.extend(start(cluster_env, tmp_path, ["r0", "r1", "r2"]))
    r0, r1, r2 = replicas
    with r0.admin() as admin:
        for name, up in (("kb", kb_upstream), ("crm", crm_upstream)):
            assert admin.post("/upstreams", json={"name": name, "url": up.url}).status_code == 201
        resp = admin.post("/policies/import", content=ALLOW_ALL, headers={"content-type": "text/csv"})
        assert resp.status_code == 200, resp.text
        _, agent = new_key(admin, "agent")
        doomed_id, doomed = new_key(admin, "doomed")
        _, limited = new_key(admin, "limited")
        _, budgeted = new_key(admin, "budgeted")

    async with httpx.AsyncClient(timeout=60) as http:

        async def serves_both(replica: Replica) -> bool:
            return all([(await call(http, replica, agent, t, a)).ok for t, a in _CALLS])

        # Upstreams, policy and keys reach the other replicas from the database (a maintenance pass).
        await wait_all(replicas, serves_both, "registered upstreams and new keys", 30)
        await _spread(replicas, agent, tmp_path)
        await _admin_changes_hold_everywhere(http, replicas, agent, doomed_id, doomed)
        await _limits_hold_across_replicas(http, replicas, limited, budgeted)
        answered = await _kill_mid_run(http, r2, agent)
        await _every_answered_call_audited(r0, answered)
        late = start(cluster_env, tmp_path, ["r3"])[0]
        replicas.append(late)
        await _late_replica_caught_up(http, late, agent, doomed, limited)
    with r1.admin() as admin:
        report = admin.get("/audit/verify").json()
    assert report["ok"] is True, report
    assert report["head_seq"] > 0


_CALLS = [("kb__search_docs", {"query": "single sign-on"}), ("crm__get_customer", {"customer_id": "C-1001"})]


async def _spread(replicas: list[Replica], agent: str, work: Path) -> None:
    """A LangChain agent and SDK clients of both eras through a round-robin proxy: every call succeeds,
    and every replica served some of them."""
    proxy = RoundRobin(replicas)
    with serve_in_thread(proxy.app) as port:
        url = f"http://127.0.0.1:{port}/mcp"

        async def langchain_agent() -> None:
            script = str(EXAMPLES / "support_agent.py")
            result = await run(
                [sys.executable, script, "--mcp-url", url], limit_s=120, env=agent_env(agent), cwd=work
            )
            assert result.returncode == 0, result.describe()
            _, marker, answer = result.stdout.partition("Answer:\n")
            assert marker and "Acme Logistics" in answer and "single sign-on" in answer, result.describe()

        async def sdk_client(mode: str) -> None:
            async with Client(authed_transport(url, agent), mode=mode, cache=None) as client:  # pyright: ignore[reportArgumentType]
                if mode == "legacy":
                    assert client.protocol_version == "2025-11-25"
                names = {tool.name for tool in (await client.list_tools()).tools}
                assert {"kb__search_docs", "crm__get_customer"} <= names
                for i in range(6):
                    tool, args = _CALLS[i % 2]
                    result = await client.call_tool(tool, args)
                    assert not result.is_error, (mode, result)

        await asyncio.gather(langchain_agent(), sdk_client("2026-07-28"), sdk_client("legacy"))
    assert set(proxy.served) == {r.name for r in replicas}, proxy.served


async def _admin_changes_hold_everywhere(
    http: httpx.AsyncClient, replicas: list[Replica], agent: str, doomed_id: str, doomed: str
) -> None:
    """A policy change through r1 and a key revocation through r2 hold on every replica within 2 s of the
    admin API's answer."""
    r1, r2 = replicas[1], replicas[2]
    deny = {"subject": "*", "object": "crm/get_customer", "action": "call", "effect": "deny"}
    with r1.admin() as admin:
        assert admin.post("/policies", json=deny).status_code == 201

    async def denied(replica: Replica) -> bool:
        reply = await call(http, replica, agent, "crm__get_customer", {"customer_id": "C-1001"})
        return "error" in reply.body  # now hidden: answered exactly as an unknown tool

    took = await wait_all(replicas, denied, "the policy change", PROPAGATION_S)
    assert max(took.values()) <= PROPAGATION_S, took
    # The rest of the policy still holds.
    assert (await call(http, replicas[0], agent, "kb__search_docs", {"query": "sso"})).ok

    with r2.admin() as admin:
        assert admin.delete(f"/api-keys/{doomed_id}").status_code == 204

    async def refused(replica: Replica) -> bool:
        resp = await http.post(replica.mcp_url, headers={"authorization": f"Bearer {doomed}"}, json={})
        return resp.status_code == 401

    took = await wait_all(replicas, refused, "the API key revocation", PROPAGATION_S)
    assert max(took.values()) <= PROPAGATION_S, took


async def _limits_hold_across_replicas(
    http: httpx.AsyncClient, replicas: list[Replica], limited: str, budgeted: str
) -> None:
    """A rate limit of 4 a day and a budget of 3 units a day, each counted once across the replicas."""
    await clear_of_period_end("day", margin_s=30)
    with replicas[0].admin() as admin:
        rule = {"subject": "limited", "limit": 4, "period": "day"}
        assert admin.post("/limits", json=rule).status_code == 201
        budget = {"subject": "budgeted", "period": "day", "limit": 3}
        assert admin.post("/budgets", json=budget).status_code == 201
        version = admin.get("/limits").json()["version"]

    async def has_version(replica: Replica) -> bool:
        limits = (await http.get(f"{replica.url}/readyz")).json()["limits"]
        return limits["config_version"] >= version

    await wait_all(replicas, has_version, "the limits", 30)
    for key, allowed, reason in ((limited, 4, "rate_limited"), (budgeted, 3, "budget_exceeded")):
        replies: list[Reply] = []
        for i in range(9):
            replies.append(await call(http, replicas[i % 3], key, "kb__search_docs", {"query": f"q{i}"}))
        assert [r.ok for r in replies] == [True] * allowed + [False] * (9 - allowed), [
            r.body for r in replies
        ]
        assert {r.reason for r in replies[allowed:]} == {reason}


async def _kill_mid_run(http: httpx.AsyncClient, victim: Replica, agent: str) -> set[str]:
    """Callers keep calls in flight on ``victim`` until it is killed with SIGKILL; the marks of the calls
    that were answered."""
    answered: set[str] = set()
    enough = asyncio.Event()

    async def caller() -> None:
        while True:
            mark = f"m{uuid.uuid4().hex[:12]}"
            try:
                reply = await call(http, victim, agent, "kb__search_docs", {"query": mark})
            except httpx.TransportError:
                return  # killed under this call: it got no answer
            assert reply.ok, reply.body
            answered.add(mark)
            if len(answered) >= 40:
                enough.set()

    tasks = [asyncio.create_task(caller()) for _ in range(8)]
    await asyncio.wait_for(enough.wait(), 60)
    victim.proc.send_signal(signal.SIGKILL)
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    victim.proc.wait(timeout=10)
    return answered


async def _every_answered_call_audited(auditor: Replica, answered: set[str]) -> None:
    with auditor.admin() as admin:
        params = {"tool": "kb__search_docs", "format": "jsonl"}
        lines = admin.get("/audit/events", params=params).text.splitlines()
    audited = {record["args"]["query"] for record in map(json.loads, lines) if record.get("args")}
    missing = answered - audited
    assert not missing, f"{len(missing)} of {len(answered)} answered calls have no audit record"


async def _late_replica_caught_up(
    http: httpx.AsyncClient, late: Replica, agent: str, doomed: str, limited: str
) -> None:
    """Started after everything above, without restarting the others: upstreams, policy, keys, limits."""
    assert (await call(http, late, agent, "kb__search_docs", {"query": "sso"})).ok
    hidden = await call(http, late, agent, "crm__get_customer", {"customer_id": "C-1001"})
    assert "error" in hidden.body, hidden.body
    resp = await http.post(late.mcp_url, headers={"authorization": f"Bearer {doomed}"}, json={})
    assert resp.status_code == 401
    assert (await call(http, late, limited, "kb__search_docs", {"query": "late"})).reason == "rate_limited"
