"""Limits that hold across replicas: three ``arbiter serve`` processes on one Redis and one PostgreSQL,
and two replicas whose clocks disagree by five minutes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from arbiter.demo.runner import free_port
from arbiter.store import schema
from tests.conftest import ALLOW_ALL, ArbiterFactory, ArbiterServer, UpstreamProc, wait_listening
from tests.limits.conftest import ADMIN_TOKEN, Reply, admin_post, call, clear_of_period_end

LIMIT = 20  # per hour for the whole tenant: at most one refill (every 3 min) can land during the test
CALLERS = 50
CALLS_EACH = 3


class Replica:
    """``arbiter serve`` in its own process."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "arbiter.cli", "serve", "--port", str(self.port)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_listening(self.port, self.proc, timeout=60)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"{self.url}/admin/v1", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def replicas_env(postgres_url: str, redis_url: str, redis_prefix: str, tmp_path: Path) -> dict[str, str]:
    schema.upgrade(postgres_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBITER_")}
    env.update(
        {
            "ARBITER_DATABASE_URL": postgres_url,
            "ARBITER_REDIS_URL": redis_url,
            "ARBITER_ADMIN_TOKEN": ADMIN_TOKEN,
            "ARBITER_LOG_LEVEL": "WARNING",
            "ARBITER_LIMITS__REDIS_PREFIX": redis_prefix,
            "ARBITER_LIMITS__USAGE_FLUSH_INTERVAL_S": "0.5",
            # These tests count admissions, not outages: on a busy machine a Redis round trip may take
            # longer than the default 0.5 s, which would (rightly) refuse calls as limits_unavailable.
            "ARBITER_LIMITS__REDIS_TIMEOUT_S": "10",
            "ARBITER_POLICY__REDIS_CHANNEL": f"{redis_prefix}policy",
            "ARBITER_AUDIT__SPOOL_DIR": str(tmp_path / "spool"),
            # About limits, not reviewing: the upstream's tools are used as they come.
            "ARBITER_INTEGRITY__AUTO_APPROVE_DEFAULT": "true",
        }
    )
    return env


@pytest.fixture
def replicas(replicas_env: dict[str, str], tmp_path: Path) -> Iterator[list[Replica]]:
    started: list[Replica] = []
    yield started
    for replica in started:
        replica.stop()


async def test_three_processes_on_one_redis_admit_at_most_the_limit_plus_one(
    replicas_env: dict[str, str], replicas: list[Replica], kb_upstream: UpstreamProc, tmp_path: Path
) -> None:
    first = Replica(replicas_env, tmp_path / "r0.log")
    replicas.append(first)
    with first.admin() as admin:
        assert admin.post("/upstreams", json={"name": "kb", "url": kb_upstream.url}).status_code == 201
        resp = admin.post("/policies/import", content=ALLOW_ALL, headers={"content-type": "text/csv"})
        assert resp.status_code == 200, resp.text
        keys = [
            admin.post(
                "/api-keys", json={"owner": f"agent-{i}", "roles": ["agent"], "tenant": "acme"}
            ).json()["key"]
            for i in range(5)
        ]
        rule = {"tenant": "acme", "per": ["tenant"], "limit": LIMIT, "period": "hour"}
        assert admin.post("/limits", json=rule).status_code == 201
    # The other two start on the same database: they load the upstream, policy, keys and limits.
    replicas.extend(Replica(replicas_env, tmp_path / f"r{i}.log") for i in (1, 2))
    await clear_of_period_end("day")  # the usage totals below are one day's
    servers = [_Target(r.url) for r in replicas]

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as http:

        async def caller(n: int) -> list[Reply]:
            out: list[Reply] = []
            for k in range(CALLS_EACH):
                target = servers[(n + k) % 3]
                out.append(await call(http, target, keys[n % 5], "kb__search_docs", {"query": f"{n}-{k}"}))  # type: ignore[arg-type]
            return out

        replies = [r for batch in await asyncio.gather(*(caller(n) for n in range(CALLERS))) for r in batch]
    admitted = sum(r.ok for r in replies)
    reasons = {r.reason for r in replies if not r.ok}
    assert reasons == {"rate_limited"}, [r.body for r in replies if not r.ok][:3]
    assert LIMIT <= admitted <= LIMIT + 1
    # Usage is summed over the three processes (each writes its counts every 0.5 s).
    deadline = time.monotonic() + 20
    totals: dict[str, Any] = {}
    while time.monotonic() < deadline:
        with first.admin() as admin:
            totals = admin.get("/usage", params={"period": "day"}).json()["totals"]
        if totals.get("calls") == admitted and totals.get("limited") == len(replies) - admitted:
            break
        await asyncio.sleep(0.2)
    assert totals == {"calls": admitted, "limited": len(replies) - admitted, "cost": float(admitted)}


class _Target:
    """Just enough of ArbiterServer for ``call``: where /mcp is."""

    def __init__(self, base: str) -> None:
        self.mcp_url = f"{base}/mcp"


async def test_a_replica_whose_clock_is_five_minutes_off_changes_nothing(
    arbiter_factory: ArbiterFactory,
    kb_upstream: UpstreamProc,
    redis_url: str,
    redis_prefix: str,
    http: httpx.AsyncClient,
) -> None:
    common: dict[str, Any] = {"redis_url": redis_url, "limits": {"redis_prefix": redis_prefix}}
    on_time = arbiter_factory(**common)
    on_time.register("kb", kb_upstream.url)
    # 10 per minute refills a token every 6 s: a replica refilling by its own clock, 5 minutes ahead,
    # would find the bucket full on every call.
    admin_post(on_time, "/limits", {"tool": "search_docs", "limit": 10, "period": "minute"})
    admin_post(on_time, "/budgets", {"tool": "get_doc", "period": "day", "limit": 6})
    await clear_of_period_end("day")  # one budget period for the whole test
    skewed = arbiter_factory(
        clock=lambda: time.time() + 300, database_url=on_time.settings.database_url, **common
    )
    replies: list[Reply] = []
    for i in range(16):
        server: ArbiterServer = skewed if i % 2 else on_time
        replies.append(await call(http, server, on_time.agent_key, "kb__search_docs", {"query": str(i)}))
    assert sum(r.ok for r in replies) == 10
    for refused in (r for r in replies if not r.ok):
        assert refused.reason == "rate_limited"
        assert 0 < refused.refusal["retry_after_s"] <= 6.001
    budget = [
        await call(
            http, skewed if i % 2 else on_time, on_time.agent_key, "kb__get_doc", {"doc_id": "sso-setup"}
        )
        for i in range(8)
    ]
    assert [r.ok for r in budget] == [True] * 6 + [False] * 2
    assert budget[-1].refusal["spent"] == 6
