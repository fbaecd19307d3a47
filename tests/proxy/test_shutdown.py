"""SIGTERM to a real ``arbiter serve`` with 20 calls in flight: readiness and new requests are refused at once
(503 + Retry-After) while the process still listens (the drain delay), every call in flight completes and is
audited once, and the process exits."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from arbiter.demo.runner import free_port
from tests.audit.helpers import of_kind, stored
from tests.conftest import ADMIN_TOKEN, ALLOW_ALL, wait_listening
from tests.proxy.held import Held, held_upstream, hold_call

IN_FLIGHT = 20
# Long enough for the checks below to run inside it on a busy machine; the test waits on conditions,
# never for this.
DRAIN_DELAY_S = 10


@pytest.fixture
def held() -> Iterator[Held]:
    with held_upstream() as held:
        yield held


def _serve(database_url: str, port: int, spool: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARBITER_")}
    env.update(
        ARBITER_DATABASE_URL=database_url,
        ARBITER_PORT=str(port),
        ARBITER_ADMIN_TOKEN=ADMIN_TOKEN,
        ARBITER_AUDIT__SPOOL_DIR=str(spool),
        ARBITER_DRAIN_DELAY_S=str(DRAIN_DELAY_S),
        ARBITER_SHUTDOWN_GRACE_S="60",
        ARBITER_LOG_LEVEL="WARNING",
        # About draining, not reviewing: the upstream's tools are used as they come (docs/integrity.md).
        ARBITER_INTEGRITY__AUTO_APPROVE_DEFAULT="true",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "arbiter.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _until(check: object, what: str, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


async def test_sigterm_drains_then_finishes_and_audits_every_call_in_flight(
    sqlite_url: str, tmp_path: Path, held: Held
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _serve(sqlite_url, port, tmp_path / "spool")
    try:
        wait_listening(port, proc)
        admin_headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        async with httpx.AsyncClient(base_url=f"{base}/admin/v1", headers=admin_headers, timeout=30) as admin:
            registered = await admin.post(
                "/upstreams", json={"name": "held", "url": held.url, "call_timeout_s": 90}
            )
            assert registered.status_code == 201, registered.text
            imported = await admin.post(
                "/policies/import", content=ALLOW_ALL, headers={"content-type": "text/csv"}
            )
            assert imported.status_code == 200, imported.text
            key = (await admin.post("/api-keys", json={"owner": "agent", "roles": ["agent"]})).json()["key"]

        limits = httpx.Limits(max_connections=IN_FLIGHT)
        async with httpx.AsyncClient(timeout=120, limits=limits) as agents:

            async def one(n: int) -> httpx.Response:
                body, headers = hold_call(n, key)
                return await agents.post(f"{base}/mcp", json=body, headers=headers)

            calls = [asyncio.create_task(one(n)) for n in range(IN_FLIGHT)]
            await asyncio.to_thread(held.wait_started, IN_FLIGHT)

            proc.send_signal(signal.SIGTERM)
            async with httpx.AsyncClient(base_url=base, timeout=30) as fresh:
                deadline = time.monotonic() + 30
                while (ready := await fresh.get("/readyz")).status_code != 503:
                    assert time.monotonic() < deadline, "readyz never said draining"
                    await asyncio.sleep(0.05)
                assert ready.json() == {"status": "draining"}
                assert (await fresh.get("/healthz")).status_code == 200  # alive: not killed mid-drain

                # Still listening, but a new call is refused at once, with a JSON-RPC body.
                body, headers = hold_call(99, key)
                refused = await fresh.post("/mcp", json=body, headers=headers)
                assert refused.status_code == 503, refused.text
                assert refused.headers["retry-after"] == "1"
                assert refused.json()["error"]["data"] == {"reason": "shutting_down"}
                admin_refused = await fresh.get("/admin/v1/upstreams", headers=admin_headers)
                assert admin_refused.status_code == 503 and admin_refused.headers["retry-after"] == "1"
                assert admin_refused.json()["error"]["code"] == "shutting_down"
            assert held.started == IN_FLIGHT  # the refused call reached nothing

            held.release.set()
            responses = await asyncio.gather(*calls)
        for n, resp in enumerate(responses):
            assert resp.status_code == 200, resp.text
            result = resp.json()["result"]
            assert result["isError"] is False and result["content"][0]["text"] == f"done {n}"

        returncode = await asyncio.to_thread(proc.wait, 120)
        assert returncode in (0, -signal.SIGTERM), proc.stderr.read().decode() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    # The audit queue was flushed before the exit: one record per call in flight, none for the refused one.
    records = [r for r in of_kind(stored(sqlite_url), "mcp") if r["method"] == "tools/call"]
    assert sorted(r["request_id"] for r in records) == list(range(IN_FLIGHT))
    assert all(r["decision"] == "allow" and r["outcome"]["status"] == "ok" for r in records), records[0]
