"""The change-notification watcher on pooled connections the upstream closed while idle.

Arbiter's own subscriptions upstream ride the SDK session's pooled connections. A ``resources/subscribe``
or ``subscriptions/listen`` of the watcher that meets a connection the upstream had closed while it sat
idle gets no answer; before, that ended the SDK session (the SDK's transport logged an ERROR, the
subscription was refused and parked, and nothing was watched until some call reconnected). Now it is
sent once more on a fresh connection, quietly: no ERROR, no backoff, the session kept and the upstream
not marked down (as tool calls, tests/proxy/test_idle_connections.py).

The upstream answers in JSON (``json_response`` mode), in both eras: an answer streamed as events ends
with its connection closed, so only JSON answers leave pooled connections to go stale; in the 2026-07-28
era the request meeting one is the ``subscriptions/listen`` for the agent's resource.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import anyio
import pytest

from tests.conftest import ArbiterFactory, serve_in_thread
from tests.proxy.stale import StaleAfterIdle, until_all_idle
from tests.proxy.test_notifications import (
    FAST,
    OPEN,
    POLICY,
    UPSTREAM_ERAS,
    ChangingUpstream,
    HandshakeOnly,
    Up,
    agent,
    until,
)

EXPOSED = f"arbiter://up/{OPEN}"


@pytest.fixture(params=UPSTREAM_ERAS)
def stale_up(request: pytest.FixtureRequest) -> Iterator[tuple[Up, StaleAfterIdle]]:
    """An upstream answering JSON, behind a front dropping requests on idle connections."""
    upstream = ChangingUpstream()
    app = upstream.app(json_response=True)
    with (
        serve_in_thread(HandshakeOnly(app) if request.param == "handshake" else app) as port,
        StaleAfterIdle(port, idle_s=0.2) as stale,
    ):
        yield Up(upstream, f"http://127.0.0.1:{stale.port}"), stale


@pytest.mark.filterwarnings("ignore::mcp.shared.exceptions.MCPDeprecationWarning")  # resources/subscribe
@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_a_subscription_on_a_stale_connection_is_sent_again_quietly(
    arbiter_factory: ArbiterFactory,
    stale_up: tuple[Up, StaleAfterIdle],
    mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    up, stale = stale_up
    # Arbiter's idle expiry far beyond the front's: every idle pooled connection is offered for reuse.
    server = arbiter_factory(
        policy=POLICY, **{**FAST, "upstream": {**FAST["upstream"], "idle_connection_s": 600}}
    )
    server.register("up", up.url)
    # A list change re-discovers the upstream on the SDK session, once Arbiter hears it (on the GET stream,
    # or the list-change listen that took the first pooled connection): its answers leave one idle.
    await until(up.upstream.heard)
    lists = up.upstream.lists
    await anyio.to_thread.run_sync(up.add_tool, "open_later")
    await until(lambda: up.upstream.lists > lists)
    with caplog.at_level(logging.INFO, "arbiter"):
        await until_all_idle(stale)  # the agent thinks; the upstream closes what sat idle
        async with agent(server, server.agent_key, mode, (EXPOSED,)) as (_, told):
            await until(lambda: up.upstream.watched(OPEN))
            await anyio.to_thread.run_sync(up.touch, OPEN)
            await until(lambda: told.updates == [EXPOSED])
    assert stale.dropped > 0, "no request met a stale connection: the test proved nothing"
    # No refusal parked, no session lost (the SDK's transport logged an ERROR as it died), no backoff.
    told_operator = [
        r for r in caplog.records if r.name.startswith("arbiter.proxy") or r.levelno >= logging.ERROR
    ]
    assert [r.getMessage() for r in told_operator] == []
    with server.admin() as admin:
        (row,) = admin.get("/upstreams").json()
    assert row["status"] == "connected", row  # never marked down
