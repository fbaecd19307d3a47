"""Pooled upstream connections that the upstream closed while idle: no call fails because of one.

Agents pause between tool calls (the model thinks); servers close idle keep-alive connections after a few
seconds. A request that meets a connection the upstream is closing is never answered; Arbiter cannot tell
that from an upstream that ran it and then reset the connection, so it sends it again on a fresh
connection only when that is safe (a read, or a tool a security admin marked idempotent: here
``get_customer``), and neither the session, the upstream's health nor its circuit suffers. A tool nobody
marked runs at most once (tests/proxy/test_guard_review.py); Arbiter's own idle expiry
(``upstream.idle_connection_s``, 4 s) keeps the stale case away from servers closing after 5 s.
"""

from __future__ import annotations

import anyio
import pytest

from arbiter.demo.crm import build_server
from tests.conftest import ArbiterFactory, ArbiterServer, UpstreamProc, serve_in_thread
from tests.proxy.stale import StaleAfterIdle, until_all_idle
from tests.refusals import tool_refusal

CALL = ("crm__get_customer", {"customer_id": "C-1001"})


def _mark_idempotent(server: ArbiterServer, upstream: dict[str, object]) -> None:
    """A security admin says ``get_customer`` may run twice (it reads): safe to send again."""
    with server.admin() as admin:
        url = f"/upstreams/{upstream['id']}/tools/get_customer/settings"
        assert admin.put(url, json={"idempotent": True}).status_code == 200


async def _burst(server: ArbiterServer, calls: int) -> list[str]:
    """``calls`` concurrent tool calls on one agent session; the failures' texts."""
    failures: list[str] = []
    async with server.client() as client:

        async def one() -> None:
            result = await client.call_tool(*CALL)
            if result.is_error:
                failures.append(str(result.content)[:200])

        async with anyio.create_task_group() as tg:
            for _ in range(calls):
                tg.start_soon(one)
    return failures


async def test_requests_on_connections_the_upstream_closed_are_sent_again(
    arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc
) -> None:
    # Arbiter's own idle expiry far beyond the upstream's: every stale connection is offered for reuse.
    # No list-change watcher: its listen stream through this relay (dropped, reopened with backoff) keeps
    # connections busy at moments the test cannot see, so "every connection idle" may never come; this
    # test is about tool calls on stale pooled connections.
    server = arbiter_factory(upstream={"idle_connection_s": 0.5}, notifications={"enabled": False})
    with StaleAfterIdle(crm_upstream.port, idle_s=0.2) as stale:
        _mark_idempotent(server, server.register("crm", f"http://127.0.0.1:{stale.port}/mcp"))
        failures: list[str] = []
        for _ in range(4):
            failures += await _burst(server, 20)
            await until_all_idle(stale)
        assert failures == []
        assert stale.dropped > 0, "no request met a stale connection: the test proved nothing"
        with server.admin() as admin:
            (row,) = admin.get("/upstreams").json()
        assert row["status"] == "connected", row  # never marked down, never reconnected


async def test_calls_meeting_connections_the_upstream_closed_never_open_its_circuit(
    arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc
) -> None:
    # A server closing idle connections sooner than Arbiter expires them (Arbiter's expiry far beyond;
    # a circuit that opens after a single failure): the calls that meet a closed connection fail, since
    # nobody marked the tool idempotent and it may have run, but each one says nothing about the
    # upstream's health. Its circuit stays closed, it stays connected, and the next call goes through.
    server = arbiter_factory(
        upstream={"idle_connection_s": 600, "breaker_threshold": 1}, notifications={"enabled": False}
    )
    with StaleAfterIdle(crm_upstream.port, idle_s=0.2) as stale:
        created = server.register("crm", f"http://127.0.0.1:{stale.port}/mcp")
        assert await _burst(server, 20) == []  # leaves pooled connections behind
        await until_all_idle(stale)
        failed: list[str] = []
        async with server.client() as client:
            for _ in range(40):  # one at a time: each takes the next stale connection from the pool
                result = await client.call_tool(*CALL)
                if not result.is_error:
                    break
                failed.append(tool_refusal(result)["reason"])
            else:
                pytest.fail(f"no call succeeded: {failed}")
        assert failed and set(failed) == {"upstream_unavailable"}, "no call met a stale connection"
        assert stale.dropped >= len(failed)
        with server.admin() as admin:
            row = admin.get(f"/upstreams/{created['id']}").json()
        assert (row["circuit"], row["status"]) == ("closed", "connected"), row


async def test_connections_idle_past_arbiters_expiry_are_not_reused(
    arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc
) -> None:
    # The server drops any request on a connection idle for 1 s; Arbiter expires its pooled connections
    # after 0.5 s, so after every pause the calls (to a tool nobody marked idempotent, which would fail
    # on a stale connection) go out on fresh connections, and none fails.
    server = arbiter_factory(upstream={"idle_connection_s": 0.5}, notifications={"enabled": False})
    with StaleAfterIdle(crm_upstream.port, idle_s=1.0) as stale:
        server.register("crm", f"http://127.0.0.1:{stale.port}/mcp")
        failures: list[str] = []
        for _ in range(3):
            failures += await _burst(server, 20)
            # The agent thinks for longer than the server keeps a connection: the scenario's gap itself
            # (a connection Arbiter kept would now be dropped), not a wait for anything.
            await anyio.sleep(1.2)
        failures += await _burst(server, 20)
        assert failures == []
        assert stale.dropped == 0  # never offered a connection the server would have dropped


async def test_bursts_around_the_servers_keep_alive_to_an_unmarked_tool_all_succeed(
    arbiter_factory: ArbiterFactory,
) -> None:
    # The reported failure at its own proportions: a real server closing idle connections after 1 s
    # (uvicorn's default is 5 s), Arbiter expiring its own after 0.8 s (its default is 4 s), bursts of
    # calls to a tool nobody marked idempotent separated by gaps around the server's timeout.
    server = arbiter_factory(upstream={"idle_connection_s": 0.8})
    app = build_server().streamable_http_app(stateless_http=True, json_response=True)
    with serve_in_thread(app, timeout_keep_alive=1) as port:
        server.register("crm", f"http://127.0.0.1:{port}/mcp")
        failures: list[str] = []
        for gap_s in (0.9, 1.0, 1.1):
            failures += await _burst(server, 40)
            await anyio.sleep(gap_s)  # the scenario's idle gap itself, not a wait for anything
        failures += await _burst(server, 40)
        assert failures == []


@pytest.mark.parametrize("gap_s", [0.9, 1.0, 1.1])
async def test_bursts_separated_by_the_upstreams_idle_timeout_all_succeed(
    arbiter_factory: ArbiterFactory, gap_s: float
) -> None:
    # The reported failure, at its own timing: a real server closing idle connections after 1 s and
    # bursts of calls separated by gaps around it (the agent thinking between turns).
    server = arbiter_factory()
    app = build_server().streamable_http_app(stateless_http=True, json_response=True)
    with serve_in_thread(app, timeout_keep_alive=1) as port:
        _mark_idempotent(server, server.register("crm", f"http://127.0.0.1:{port}/mcp"))
        failures: list[str] = []
        for _ in range(3):
            failures += await _burst(server, 40)
            await anyio.sleep(gap_s)  # the scenario's idle gap itself, not a wait for anything
        assert failures == []
