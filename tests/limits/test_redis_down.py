"""Redis killed mid-run: limits fail closed (the default) or fall back to per-replica limits, as
configured; either way /readyz shows it, nothing crashes, and shared limits return with Redis."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.conftest import ArbiterFactory, ArbiterServer, UpstreamProc
from tests.limits.conftest import RedisProc, Reply, admin_post, call

SEARCH = "kb__search_docs"


def _ready(server: ArbiterServer) -> tuple[int, dict[str, Any]]:
    resp = httpx.get(f"{server.base_url}/readyz", timeout=10)
    body: dict[str, Any] = resp.json()
    return resp.status_code, body


async def _until_ok(http: httpx.AsyncClient, server: ArbiterServer, tool: str, args: dict[str, Any]) -> Reply:
    deadline = time.monotonic() + 20
    while True:
        reply = await call(http, server, server.agent_key, tool, args)
        if reply.ok or time.monotonic() > deadline:
            return reply


def _start(factory: ArbiterFactory, kb: UpstreamProc, redis: RedisProc, mode: str) -> ArbiterServer:
    """An Arbiter whose only Redis outage is the one the test makes.

    A round trip longer than ``limits.redis_timeout_s`` counts as Redis down (docs/limits.md), and on a
    busy machine the server thread can wait longer than the default 0.5 s for Redis's answer: the call
    then takes the ``on_redis_down`` path (a late answer may even have spent its token on Redis), and
    the counts below no longer add up. A killed Redis refuses or resets connections at once, so a
    generous bound changes nothing in what the test shows."""
    limits = {"on_redis_down": mode, "redis_retry_s": 0.2, "redis_timeout_s": 5.0}
    server = factory(redis_url=redis.url, limits=limits)
    server.register("kb", kb.url)
    admin_post(server, "/limits", {"tool": "search_docs", "limit": 3, "period": "day"})
    return server


async def test_fail_closed_refuses_limited_calls_while_redis_is_down(
    arbiter_factory: ArbiterFactory,
    kb_upstream: UpstreamProc,
    own_redis: RedisProc,
    http: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = _start(arbiter_factory, kb_upstream, own_redis, "fail_closed")
    assert (await call(http, server, server.agent_key, SEARCH, {"query": "a"})).ok
    assert _ready(server)[0] == 200

    own_redis.kill()
    refused = await call(http, server, server.agent_key, SEARCH, {"query": "b"})
    assert refused.reason == "limits_unavailable" and refused.tool_error
    status, ready = _ready(server)
    # Shown, and logged, but not a readiness failure: every replica shares this Redis.
    assert status == 200 and ready["limits"]["check"].startswith("error: Redis unreachable")
    assert ready["limits"]["state"] == "unavailable" and ready["checks"]["database"] == "ok"
    # Calls that no limit applies to still run; the process is alive and answers everything else.
    assert (await call(http, server, server.agent_key, "kb__get_doc", {"doc_id": "sso-setup"})).ok
    assert (await http.get(f"{server.base_url}/healthz")).status_code == 200
    assert server.thread.is_alive()
    down = [r for r in caplog.records if "Redis is unreachable" in r.getMessage()]
    assert len(down) == 1 and "fail_closed" in down[0].getMessage()  # logged once, not once per call

    own_redis.start()  # same port: the shared bucket (fresh, Redis kept nothing) is back in force
    assert (await _until_ok(http, server, SEARCH, {"query": "c"})).ok
    assert _ready(server)[0] == 200
    replies = [await call(http, server, server.agent_key, SEARCH, {"query": str(i)}) for i in range(3)]
    assert [r.ok for r in replies] == [True, True, False]


async def test_fallback_limits_each_replica_on_its_own_while_redis_is_down(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc, own_redis: RedisProc, http: httpx.AsyncClient
) -> None:
    server = _start(arbiter_factory, kb_upstream, own_redis, "fallback")
    assert (await call(http, server, server.agent_key, SEARCH, {"query": "a"})).ok  # Redis's bucket: 2 left

    own_redis.kill()
    replies = [await call(http, server, server.agent_key, SEARCH, {"query": str(i)}) for i in range(5)]
    # The in-process bucket of this replica starts full: 3 calls, then refused as usual.
    assert [r.ok for r in replies] == [True, True, True, False, False]
    assert replies[-1].reason == "rate_limited"
    status, ready = _ready(server)
    assert status == 200 and ready["limits"]["check"] == "ok"
    assert ready["limits"]["state"] == "fallback" and ready["limits"]["on_redis_down"] == "fallback"
    assert server.thread.is_alive()

    own_redis.start()
    deadline = time.monotonic() + 20
    while _ready(server)[1]["limits"]["state"] != "ok":
        assert time.monotonic() < deadline, "limits did not return to Redis"
        await asyncio.sleep(0.1)
    # Back on Redis (which kept nothing across its restart): a full shared bucket again.
    replies = [await call(http, server, server.agent_key, SEARCH, {"query": f"x{i}"}) for i in range(4)]
    assert [r.ok for r in replies] == [True, True, True, False]
