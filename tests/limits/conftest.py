"""Helpers for the limits tests: Redis (shared, or a redis-server of the test's own), raw MCP calls."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
from redis.asyncio import Redis

from arbiter.limits.backend import period_bounds
from arbiter.limits.factory import build_redis
from arbiter.limits.rules import BudgetPeriod
from tests.conftest import ADMIN_TOKEN, ArbiterServer, ServerProc, service_unavailable
from tests.policies.conftest import MODERN, MODERN_META, redis_url
from tests.refusals import refusal_of

__all__ = ["ADMIN_TOKEN", "redis_url"]

AGENT = "p, *, *, *, call, allow\n"


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own, so parallel runs never share a bucket; its keys are removed after."""
    prefix = f"arbiter:test:{uuid.uuid4().hex}:"
    yield prefix
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    """A Redis client as ``create_app`` builds one (here with 2 s timeouts). Backends borrow it: the
    test owns it and closes it."""
    client = build_redis(redis_url, 2.0)
    try:
        yield client
    finally:
        await client.aclose()


async def clear_of_period_end(period: BudgetPeriod, margin_s: float = 60.0) -> None:
    """Wait out the end of the current UTC ``period`` if it is less than ``margin_s`` away, so a test that
    counts one budget period (or one usage period) cannot straddle two. Redis's clock is this machine's."""
    _, end = period_bounds(period, time.time())
    if end - time.time() < margin_s:
        await asyncio.sleep(max(end - time.time(), 0.0) + 1.0)


@dataclass
class RedisProc(ServerProc):
    """A redis-server of the test's own, which the test may kill and restart."""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        binary = shutil.which("redis-server")
        assert binary is not None
        return [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]


@pytest.fixture
def own_redis() -> Iterator[RedisProc]:
    if shutil.which("redis-server") is None:
        service_unavailable("redis-server (to start a Redis this test may kill)")
    server = RedisProc().start()
    yield server
    server.kill()


@dataclass(frozen=True)
class Reply:
    """One JSON-RPC response: the result, or the error's code/reason/data."""

    body: dict[str, Any]

    @property
    def ok(self) -> bool:
        return "result" in self.body and not self.body["result"].get("isError")

    @property
    def reason(self) -> str | None:
        refusal = refusal_of(self.body)
        return refusal.get("reason") if refusal is not None else None

    @property
    def refusal(self) -> dict[str, Any]:
        """The refusal's details, from a tool result with isError (the default) or a JSON-RPC error."""
        refusal = refusal_of(self.body)
        assert refusal is not None, self.body
        return refusal

    @property
    def tool_error(self) -> bool:
        """Refused as a tool result the model reads (mcp.tool_errors: result), not a JSON-RPC error."""
        return bool(self.body.get("result", {}).get("isError")) and self.reason is not None

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = self.body["error"]
        return error


async def call(
    http: httpx.AsyncClient,
    server: ArbiterServer,
    token: str,
    tool: str,
    arguments: dict[str, Any],
    *,
    meta: dict[str, Any] | None = None,
    request_id: int = 7,
    session: str | None = None,
) -> Reply:
    """``tools/call`` over raw HTTP: stateless era (2026-07-28), or a handshake-era ``session``."""
    params: dict[str, Any] = {"name": tool, "arguments": arguments}
    headers = {"authorization": f"Bearer {token}"}
    if session is None:
        params["_meta"] = {**MODERN_META, **(meta or {})}
        headers.update(MODERN)
        headers.update({"mcp-method": "tools/call", "mcp-name": tool})
    else:
        if meta:
            params["_meta"] = meta
        headers.update(
            {
                "accept": "application/json, text/event-stream",
                "content-type": "application/json",
                "mcp-session-id": session,
                "mcp-protocol-version": "2025-11-25",
            }
        )
    body = {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}
    resp = await http.post(server.mcp_url, content=json.dumps(body), headers=headers)
    return Reply(_parse(resp))


async def open_session(http: httpx.AsyncClient, server: ArbiterServer, token: str) -> str:
    """A handshake-era (2025-11-25) session: initialize + initialized; its Mcp-Session-Id."""
    headers = {
        "authorization": f"Bearer {token}",
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
    }
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    resp = await http.post(server.mcp_url, content=json.dumps(init), headers=headers)
    assert resp.status_code == 200, resp.text
    session = resp.headers["mcp-session-id"]
    headers.update({"mcp-session-id": session, "mcp-protocol-version": "2025-11-25"})
    done = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    resp = await http.post(server.mcp_url, content=json.dumps(done), headers=headers)
    assert resp.status_code == 202, resp.text
    return session


def _parse(resp: httpx.Response) -> dict[str, Any]:
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[5:].strip() for line in resp.text.splitlines() if line.startswith("data:")]
        parsed: dict[str, Any] = json.loads(data[-1])
        return parsed
    out: dict[str, Any] = resp.json()
    return out


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        yield client


def admin_post(server: ArbiterServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    with server.admin() as admin:
        resp = admin.post(path, json=body)
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out
