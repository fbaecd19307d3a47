"""A policy change made through one replica is enforced by another on the same database within 2 s."""

from __future__ import annotations

import time
import uuid
from typing import Any

import anyio
import pytest
import redis
from mcp.shared.exceptions import MCPError

from arbiter.store import schema
from tests.conftest import ArbiterFactory, ArbiterServer, UpstreamProc
from tests.policies.conftest import policy_version
from tests.refusals import tool_refusal

POLICY = """\
p, role:agent, *, crm/get_customer, call, allow
p, role:agent, *, crm/*, list, allow
"""
ALLOWING = "p, role:agent, *, crm/get_customer, call, allow"
DEADLINE_S = 2.0  # issue 4: a revoke is in force on every replica within 2 s
CALL = ("crm__get_customer", {"customer_id": "C-1001"})


async def _wait_allowed(server: ArbiterServer, token: str) -> None:
    """Until ``server`` lets the agent call the tool (it has loaded the policy and the upstream)."""
    async with server.client("2026-07-28", token) as client:  # pyright: ignore[reportArgumentType]
        with anyio.fail_after(30):
            while True:
                try:
                    result = await client.call_tool(*CALL)
                except MCPError:  # not listed yet: unknown tool
                    await anyio.sleep(0.1)
                    continue
                if result.is_error:  # listed, not allowed yet
                    await anyio.sleep(0.1)
                    continue
                assert result.structured_content is not None
                assert result.structured_content["name"] == "Acme Logistics"
                return


async def _revoke_and_time_denial(a: ArbiterServer, b: ArbiterServer, token: str) -> None:
    with a.admin() as admin:
        rules = admin.get("/policies").json()["rules"]
    (rule_id,) = [r["id"] for r in rules if r["csv"] == ALLOWING]
    async with b.client("2026-07-28", token) as client:  # pyright: ignore[reportArgumentType]
        assert (await client.call_tool(*CALL)).is_error is False  # B allows it right before the revoke
        started = time.monotonic()
        with a.admin() as admin:
            removed = admin.delete(f"/policies/{rule_id}")
        assert removed.status_code == 200, removed.text
        new_version = removed.json()["version"]
        denied: dict[str, Any] | None = None
        while denied is None and time.monotonic() - started < DEADLINE_S:
            result = await client.call_tool(*CALL)
            if result.is_error:
                denied = tool_refusal(result)
            else:
                await anyio.sleep(0.05)
        elapsed = time.monotonic() - started
    assert denied is not None, f"replica B still allowed the call {elapsed:.2f}s after the revoke on A"
    assert elapsed < DEADLINE_S
    # Still listed (the list rule stays), so the refusal is the policy's, naming the new version.
    assert denied["reason"] == "policy_denied" and denied["policy_version"] == new_version
    assert policy_version(b) == new_version


async def test_revoke_reaches_another_replica_by_polling_sqlite(
    arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ARBITER_POLICY__POLL_INTERVAL_S", "0.5")
    a = arbiter_factory(policy=POLICY)
    a.register("crm", crm_upstream.url)
    b = arbiter_factory(policy=POLICY, database_url=a.settings.database_url)
    assert b.settings.redis_url is None and b.settings.policy.poll_interval_s == 0.5
    await _wait_allowed(b, a.agent_key)
    await _revoke_and_time_denial(a, b, a.agent_key)


@pytest.fixture
def migrated_postgres(postgres_url: str) -> str:
    schema.upgrade(postgres_url)
    return postgres_url


def _wait_subscribers(url: str, channel: str, count: int) -> None:
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        deadline = time.monotonic() + 15
        while dict(client.pubsub_numsub(channel)).get(channel.encode(), 0) < count:
            assert time.monotonic() < deadline, f"fewer than {count} replicas subscribed to {channel}"
            time.sleep(0.05)
    finally:
        client.close()


async def test_revoke_reaches_another_replica_through_redis_at_once(
    migrated_postgres: str,  # first: set up before the Arbiters, so it is dropped only after they stop
    redis_url: str,
    arbiter_factory: ArbiterFactory,
    crm_upstream: UpstreamProc,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Polling only every 60 s: only the pub/sub message can bring the change within the deadline.
    channel = f"arbiter:policy:test-{uuid.uuid4().hex}"
    monkeypatch.setenv("ARBITER_POLICY__POLL_INTERVAL_WITH_REDIS_S", "60")
    monkeypatch.setenv("ARBITER_POLICY__REDIS_CHANNEL", channel)
    a = arbiter_factory(policy=POLICY, database_url=migrated_postgres, redis_url=redis_url)
    a.register("crm", crm_upstream.url)
    b = arbiter_factory(policy=POLICY, database_url=migrated_postgres, redis_url=redis_url)
    assert b.settings.policy.poll_interval_with_redis_s == 60 and b.settings.policy.redis_channel == channel
    _wait_subscribers(redis_url, channel, 2)
    await _wait_allowed(b, a.agent_key)
    await _revoke_and_time_denial(a, b, a.agent_key)
