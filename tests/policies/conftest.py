"""Helpers for the policy tests: fixture files, API keys with chosen roles, the CLI, Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ArbiterServer, service_unavailable

FIXTURES = Path(__file__).parent / "fixtures"
POLICY_FILE = FIXTURES / "policy.csv"
YAML_TABLE = FIXTURES / "truth_table.yaml"
CSV_TABLE = FIXTURES / "truth_table.csv"
REDIS_URL = os.environ.get("ARBITER_TEST_REDIS", "redis://127.0.0.1:6379/0")
ARBITER_BIN = Path(sys.executable).parent / "arbiter"
# Headers for one stateless-era (2026-07-28) JSON-RPC request over raw HTTP.
MODERN = {
    "accept": "application/json, text/event-stream",
    "content-type": "application/json",
    "mcp-protocol-version": "2026-07-28",
}
MODERN_META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


def new_key(server: ArbiterServer, owner: str, roles: list[str], tenant: str = "acme") -> str:
    """An API key for ``owner`` with ``roles`` in ``tenant``, created with the break-glass token."""
    with server.admin() as admin:
        resp = admin.post("/api-keys", json={"owner": owner, "roles": roles, "tenant": tenant})
    assert resp.status_code == 201, resp.text
    key: str = resp.json()["key"]
    return key


def policy_version(server: ArbiterServer) -> int:
    with server.admin() as admin:
        version: int = admin.get("/policies").json()["version"]
    return version


def rpc(server: ArbiterServer, token: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """One stateless-era JSON-RPC request over raw HTTP; the parsed JSON-RPC response."""
    return rpc_http(server, token, method, params)[1]


def rpc_http(
    server: ArbiterServer, token: str, method: str, params: dict[str, Any]
) -> tuple[httpx.Response, dict[str, Any]]:
    """One stateless-era JSON-RPC request over raw HTTP: the HTTP response and its JSON-RPC message."""
    body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": {**params, "_meta": MODERN_META}}
    headers = {**MODERN, "mcp-method": method, "authorization": f"Bearer {token}"}
    name = params.get("name") or params.get("uri")
    if isinstance(name, str):
        headers["mcp-name"] = name
    with httpx.Client(timeout=30) as http:
        resp = http.post(server.mcp_url, content=json.dumps(body), headers=headers)
    if resp.headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[5:].strip() for line in resp.text.splitlines() if line.startswith("data:")]
        parsed: dict[str, Any] = json.loads(data[-1])
        return resp, parsed
    out: dict[str, Any] = resp.json()
    return resp, out


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``arbiter <args>`` as a user runs it, without the test run's ARBITER_* settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ARBITER_")}
    return subprocess.run(
        [str(ARBITER_BIN), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        check=False,
    )


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The Redis that pub/sub tests use (skipped, or failed under ARBITER_REQUIRE_SERVICES=1, if absent)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        service_unavailable(f"Redis at {REDIS_URL} ({exc})")
    finally:
        client.close()
    yield REDIS_URL
