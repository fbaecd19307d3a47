"""Circuit breakers, bulkheads and fallbacks (issue 13, items 6-8), against real upstream servers.

Consecutive timeouts open an upstream's circuit (calls are then refused at once, audited as such) and a
recovered upstream closes it through a half-open probe; a hung upstream holds only its own bulkhead
while another upstream stays fast; a fallback upstream serves while the primary is down.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import anyio
import pytest
from mcp.server import MCPServer

from tests.audit.helpers import of_kind, wait_for
from tests.conftest import ArbiterFactory, UpstreamProc, serve_in_thread
from tests.refusals import tool_refusal


@dataclass
class Gate:
    """A real MCP server whose ``work`` tool waits while the gate is closed; it counts what it saw."""

    url: str = ""
    open: threading.Event = field(default_factory=threading.Event)
    started: int = 0
    in_flight: int = 0
    done: int = 0


@pytest.fixture
def gate() -> Iterator[Gate]:
    state = Gate()
    state.open.set()
    server = MCPServer("gate")

    @server.tool()
    async def work(n: int) -> str:
        state.started += 1
        state.in_flight += 1
        try:
            # The gate is a threading.Event (the test opens it from its own loop): wait for it in a thread.
            with anyio.fail_after(60):
                await anyio.to_thread.run_sync(state.open.wait, abandon_on_cancel=True)
        finally:
            state.in_flight -= 1
        state.done += 1
        return f"done {n}"

    with serve_in_thread(server.streamable_http_app(stateless_http=True, json_response=True)) as port:
        state.url = f"http://127.0.0.1:{port}/mcp"
        yield state


async def test_timeouts_open_the_circuit_and_a_recovered_upstream_closes_it(
    arbiter_factory: ArbiterFactory, gate: Gate
) -> None:
    # Open long enough that the checks below all see it open on a busy machine (0.5 s was not: they
    # saw it half-open); the recovery below waits it out.
    server = arbiter_factory(upstream={"breaker_threshold": 5, "breaker_open_s": 5})
    # The short deadline is the tool's own, not the upstream's call_timeout_s: that one also bounds
    # discovery (at registration and at every update), which a busy machine may not finish in 0.3 s.
    created = server.register("gate", gate.url)
    with server.admin() as admin:
        resp = admin.put(f"/upstreams/{created['id']}/tools/work/settings", json={"timeout_s": 0.3})
        assert resp.status_code == 200, resp.text
    gate.open.clear()  # hung: every call runs into its deadline
    async with server.client("2026-07-28") as client:
        for n in range(5):
            refusal = tool_refusal(await client.session.call_tool("gate__work", {"n": n}))
            assert refusal["reason"] == "upstream_timeout", refusal

        async def all_reached_it() -> bool:  # the gate's thread may count a call after Arbiter gave up
            return gate.started == 5

        await _until(all_reached_it)
        with server.admin() as admin:
            assert admin.get(f"/upstreams/{created['id']}").json()["circuit"] == "open"

        refused = tool_refusal(await client.session.call_tool("gate__work", {"n": 99}))
        assert refused["reason"] == "upstream_unavailable" and refused["circuit"] == "open"
        assert refused["retry_after_s"] >= 1
        assert gate.started == 5  # refused in Arbiter: the upstream never saw it
        assert server.app.state.runtime.pool.circuit_states() == {"gate": "open"}

        gate.open.set()  # recovered; once the circuit is half-open, one probe closes it

        async def served() -> bool:
            result = await client.session.call_tool("gate__work", {"n": 100})
            return not result.is_error

        await _until(served, within_s=30)
    with server.admin() as admin:
        assert admin.get(f"/upstreams/{created['id']}").json()["circuit"] == "closed"
    records = wait_for(server, lambda rs: any(r["outcome"].get("circuit") for r in of_kind(rs, "mcp")))
    refusals = [r for r in of_kind(records, "mcp") if r["outcome"].get("circuit")]
    assert refusals[0]["outcome"]["circuit"] == "open"  # the call refused above (and any while it probed)
    assert all(r["reason"] == "upstream_unavailable" for r in refusals)


async def test_a_hung_upstream_holds_only_its_own_bulkhead(
    arbiter_factory: ArbiterFactory, gate: Gate, crm_upstream: UpstreamProc
) -> None:
    server = arbiter_factory(upstream={"max_waiting": 0, "breaker_threshold": 0})
    server.register("gate", gate.url, call_timeout_s=60, max_concurrency=50)
    server.register("crm", crm_upstream.url)
    gate.open.clear()
    hung: list[bool] = []
    try:
        async with server.client("2026-07-28") as agent_a, server.client("2026-07-28") as agent_b:

            async def call_a(n: int) -> None:
                result = await agent_a.session.call_tool("gate__work", {"n": n})
                hung.append(not result.is_error)

            async with anyio.create_task_group() as tg:
                for n in range(50):
                    tg.start_soon(call_a, n)

                async def fifty_waiting() -> bool:
                    return gate.in_flight == 50

                await _until(fifty_waiting, within_s=30)
                # The bulkhead is full: more calls to it are refused at once, without reaching it.
                excess = tool_refusal(await agent_b.session.call_tool("gate__work", {"n": 51}))
                assert excess["reason"] == "upstream_unavailable" and excess["bulkhead"] == "full"
                assert gate.started == 50
                # Upstream B is served all along, while A's 50 calls are still waiting.
                for _ in range(20):
                    result = await agent_b.call_tool("crm__get_customer", {"customer_id": "C-1001"})
                    assert result.is_error is False
                assert gate.in_flight == 50 and gate.done == 0
                gate.open.set()
        assert hung == [True] * 50
    finally:
        gate.open.set()


async def test_a_fallback_serves_while_the_primary_is_down_and_the_record_says_so(
    arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc
) -> None:
    primary = UpstreamProc("arbiter.demo.crm").start()
    try:
        server = arbiter_factory()
        server.register("crm-b", crm_upstream.url)
        created = server.register("crm", primary.url, fallback="crm-b")
        assert created["fallback"] == "crm-b"
        async with server.client("2026-07-28") as client:
            first = await client.call_tool("crm__get_customer", {"customer_id": "C-1001"})
            assert first.is_error is False
            primary.kill()
            for _ in range(3):
                result = await client.call_tool("crm__get_customer", {"customer_id": "C-1001"})
                assert result.is_error is False, result
                assert result.structured_content is not None
                assert result.structured_content["name"] == "Acme Logistics"
        records = wait_for(server, lambda rs: len(of_kind(rs, "mcp")) >= 4)
        calls = [r for r in of_kind(records, "mcp") if r["method"] == "tools/call"]
        assert "fallback" not in calls[0]["outcome"]
        assert [r["outcome"].get("fallback") for r in calls[1:]] == ["crm-b"] * 3
        assert all(r["upstream"] == "crm" and r["outcome"]["status"] == "ok" for r in calls[1:])
    finally:
        primary.kill()


def test_fallback_is_validated_and_can_be_cleared(
    arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc
) -> None:
    server = arbiter_factory()
    with server.admin() as admin:
        own = admin.post("/upstreams", json={"name": "crm", "url": crm_upstream.url, "fallback": "crm"})
        assert own.status_code == 422
    created = server.register("crm", crm_upstream.url, fallback="crm-b", max_concurrency=8)
    assert (created["fallback"], created["max_concurrency"], created["circuit"]) == ("crm-b", 8, "closed")
    with server.admin() as admin:
        assert admin.patch(f"/upstreams/{created['id']}", json={"fallback": "crm"}).status_code == 422
        cleared = admin.patch(f"/upstreams/{created['id']}", json={"fallback": None}).json()
        assert cleared["fallback"] is None and cleared["max_concurrency"] == 8
    assert server.app.state.runtime.pool.get("crm").spec.fallback is None


async def _until(check: Callable[[], Awaitable[bool]], within_s: float = 10, poll_s: float = 0.05) -> None:
    """Poll a condition another thread or timer turns true (its own timing decides when)."""
    with anyio.fail_after(within_s):
        while True:
            if await check():
                return
            await anyio.sleep(poll_s)
