"""Writing the audit log under pressure: the store going away (fail closed, or spool and replay),
1,000 concurrent calls, and two Arbiter processes extending one chain on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from arbiter.store import schema
from tests.audit.helpers import execute, of_kind, stored, verify, wait_for
from tests.conftest import (
    ADMIN_TOKEN,
    ALLOW_ALL,
    ArbiterFactory,
    ArbiterServer,
    UpstreamProc,
    free_port,
    wait_listening,
)
from tests.policies.conftest import MODERN, MODERN_META

CALL = "kb__search_docs"


def _body(n: int) -> str:
    params = {"name": CALL, "arguments": {"query": f"sso {n}"}, "_meta": MODERN_META}
    return json.dumps({"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": params})


def _headers(key: str) -> dict[str, str]:
    return {**MODERN, "mcp-method": "tools/call", "mcp-name": CALL, "authorization": f"Bearer {key}"}


async def _calls(url: str, key: str, ids: range, concurrency: int = 50) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        return await asyncio.gather(*(http.post(url, content=_body(n), headers=_headers(key)) for n in ids))


def _ok(resp: httpx.Response) -> bool:
    return resp.status_code == 200 and "result" in resp.json()


def _calls_recorded(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in of_kind(records, "mcp") if r["method"] == "tools/call"]


def _take_store_away(server: ArbiterServer) -> None:
    # The real store really failing: its table is gone (as after a botched restore), until put back.
    execute(server.settings.database_url, "ALTER TABLE audit_events RENAME TO audit_events_away")


def _bring_store_back(server: ArbiterServer) -> None:
    execute(server.settings.database_url, "ALTER TABLE audit_events_away RENAME TO audit_events")


def _call_until_refused(server: ArbiterServer, start: int) -> tuple[int, httpx.Response]:
    """Calls until the writer has noticed the store is gone; returns (calls answered, the refusal)."""
    answered = 0
    deadline = time.monotonic() + 20
    with httpx.Client(timeout=30) as http:
        while time.monotonic() < deadline:
            resp = http.post(
                server.mcp_url, content=_body(start + answered), headers=_headers(server.agent_key)
            )
            if resp.status_code == 503:
                return answered, resp
            assert _ok(resp), resp.text
            answered += 1
            time.sleep(0.05)
    raise AssertionError("calls were never refused while the audit store was gone")


def test_fail_closed_refuses_calls_while_the_store_is_gone_and_loses_nothing(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc
) -> None:
    server = arbiter_factory(audit={"retry_interval_s": 0.2})
    server.register("kb", kb_upstream.url)
    before = asyncio.run(_calls(server.mcp_url, server.agent_key, range(5)))
    assert all(_ok(r) for r in before)
    wait_for(server, lambda rs: len(_calls_recorded(rs)) == 5)

    _take_store_away(server)
    answered, refusal = _call_until_refused(server, 100)
    assert refusal.json()["error"]["data"]["reason"] == "audit_unavailable"
    assert refusal.headers["retry-after"] == "1"
    with httpx.Client() as http:
        ready = http.get(f"{server.base_url}/readyz")
    assert ready.status_code == 503 and ready.json()["audit"]["state"] == "unavailable"

    _bring_store_back(server)
    deadline = time.monotonic() + 20
    while True:  # the held records go in at the next retry, then calls are accepted again
        resp = asyncio.run(_calls(server.mcp_url, server.agent_key, range(500, 501)))[0]
        if _ok(resp):
            break
        assert time.monotonic() < deadline, "calls never resumed after the store came back"
        time.sleep(0.1)
    # Every call that was answered has its record; the refused ones ran nothing and have none.
    records = wait_for(server, lambda rs: len(_calls_recorded(rs)) >= 5 + answered + 1)
    assert len(_calls_recorded(records)) == 5 + answered + 1
    assert verify(server.settings.database_url).ok


def test_spool_mode_keeps_answering_and_replays_everything(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    server = arbiter_factory(
        audit={"on_store_failure": "spool", "spool_dir": str(spool), "retry_interval_s": 0.3}
    )
    server.register("kb", kb_upstream.url)
    _take_store_away(server)
    answered = asyncio.run(_calls(server.mcp_url, server.agent_key, range(60), concurrency=10))
    assert all(_ok(r) for r in answered)  # nobody is refused while records go to the spool
    deadline = time.monotonic() + 10
    while not list(spool.glob("spool-*.jsonl")):
        assert time.monotonic() < deadline, "nothing was spooled"
        time.sleep(0.05)
    with httpx.Client() as http:
        assert http.get(f"{server.base_url}/readyz").json()["audit"]["state"] == "spooling"
    more = asyncio.run(_calls(server.mcp_url, server.agent_key, range(60, 80), concurrency=10))
    assert all(_ok(r) for r in more)

    _bring_store_back(server)
    records = wait_for(server, lambda rs: len(_calls_recorded(rs)) >= 80, timeout=20)
    calls = _calls_recorded(records)
    assert sorted(r["request_id"] for r in calls) == list(range(80))  # each exactly once
    assert verify(server.settings.database_url).ok
    deadline = time.monotonic() + 10
    while list(spool.glob("spool-*.jsonl")):
        assert time.monotonic() < deadline, "the replayed spool file was not removed"
        time.sleep(0.05)


def test_records_queued_at_shutdown_while_the_store_is_gone_reach_it_after_restart(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc, sqlite_url: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool-at-exit"
    cfg = {"spool_dir": str(spool), "retry_interval_s": 5, "drain_timeout_s": 1, "flush_interval_s": 1.0}
    server = arbiter_factory(audit=cfg)
    server.register("kb", kb_upstream.url)
    _take_store_away(server)
    # Answered while the writer has not yet found the store gone (it gathers a batch for a second).
    responses = asyncio.run(_calls(server.mcp_url, server.agent_key, range(3)))
    answered = [n for n, r in enumerate(responses) if _ok(r)]
    assert answered
    server.stop()
    assert list(spool.glob("spool-*.jsonl")), "the records were not spooled at shutdown"
    _bring_store_back(server)
    again = arbiter_factory(audit=cfg)
    records = wait_for(again, lambda rs: len(_calls_recorded(rs)) >= len(answered))
    assert sorted(r["request_id"] for r in _calls_recorded(records)) == answered
    assert verify(sqlite_url).ok


def test_a_thousand_concurrent_calls_leave_a_thousand_records_and_a_valid_chain(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc
) -> None:
    server = arbiter_factory()
    server.register("kb", kb_upstream.url)
    responses = asyncio.run(_calls(server.mcp_url, server.agent_key, range(1000), concurrency=100))
    assert all(_ok(r) for r in responses)
    records = wait_for(server, lambda rs: len(_calls_recorded(rs)) >= 1000, timeout=30)
    calls = _calls_recorded(records)
    assert sorted(r["request_id"] for r in calls) == list(range(1000))
    report = verify(server.settings.database_url)
    assert report.ok and report.records == len(records), report.to_json()


def _serve(database_url: str, port: int, spool: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBITER_")}
    env.update(
        ARBITER_DATABASE_URL=database_url,
        ARBITER_PORT=str(port),
        ARBITER_ADMIN_TOKEN=ADMIN_TOKEN,
        ARBITER_AUDIT__SPOOL_DIR=str(spool),
        ARBITER_UPSTREAM__MAINTAIN_INTERVAL_S="0.3",
        ARBITER_LOG_LEVEL="WARNING",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "arbiter.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.fixture
def two_processes(postgres_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    schema.upgrade(postgres_url)
    ports = [free_port(), free_port()]
    procs = [_serve(postgres_url, port, tmp_path / f"spool-{port}") for port in ports]
    try:
        for port, proc in zip(ports, procs, strict=True):
            wait_listening(port, proc)
        yield f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_two_processes_on_one_postgres_extend_one_valid_chain(
    two_processes: tuple[str, str], kb_upstream: UpstreamProc, postgres_url: str
) -> None:
    first, second = two_processes
    admin = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=f"{first}/admin/v1", headers=admin, timeout=30) as http:
        assert http.post("/upstreams", json={"name": "kb", "url": kb_upstream.url}).status_code == 201
        imported = http.post("/policies/import", content=ALLOW_ALL, headers={"content-type": "text/csv"})
        assert imported.status_code == 200
        created = http.post("/api-keys", json={"owner": "agent", "roles": ["agent"]})
        key = created.json()["key"]

    async def both() -> list[httpx.Response]:
        # The second process learns of the upstream, key and policy from the database.
        deadline = time.monotonic() + 20
        while not _ok((await _calls(f"{second}/mcp", key, range(1)))[0]):
            assert time.monotonic() < deadline, "the second process never picked up the shared state"
            await asyncio.sleep(0.2)
        a, b = await asyncio.gather(
            _calls(f"{first}/mcp", key, range(1000, 1200), 25),
            _calls(f"{second}/mcp", key, range(2000, 2200), 25),
        )
        return a + b

    responses = asyncio.run(both())
    assert all(_ok(r) for r in responses)
    deadline = time.monotonic() + 20
    while True:
        records = stored(postgres_url)
        ids = {r["request_id"] for r in _calls_recorded(records)}
        if set(range(1000, 1200)) | set(range(2000, 2200)) <= ids:
            break
        assert time.monotonic() < deadline, f"only {len(ids)} call records arrived"
        time.sleep(0.2)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    report = verify(postgres_url)
    assert report.ok and report.records == len(records), report.to_json()
