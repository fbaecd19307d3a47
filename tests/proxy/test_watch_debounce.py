"""A resource subscription the upstream refuses is asked for again after its backoff: never in a tight loop,
never given up.

The watcher parks a refused URI (``_Resources``) for ``listen_backoff_s``, doubling to
``listen_backoff_max_s``, and subscribes to it again when it is due. Here the watcher runs on a clock the
test drives, against a real upstream (in both eras) that refuses the URI and counts each refusal: while
the clock stands still the watcher goes round many times (it reads the clock each time) and must not ask
again; moved past the backoff, it must ask exactly once more; moved by less than the doubled backoff, not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import anyio
import pytest

from arbiter.auth.principal import Principal
from arbiter.policies.engine import PolicyEngine
from arbiter.proxy.pool import UpstreamPool
from arbiter.proxy.upstream import UpstreamSpec
from arbiter.proxy.upstream_watch import UpstreamWatch
from arbiter.settings import NotificationSettings
from tests.conftest import serve_in_thread
from tests.proxy.test_notifications import (
    BOGUS,
    POLICY_RULES,
    UPSTREAM_ERAS,
    ChangingUpstream,
    HandshakeOnly,
    Up,
    _hub,  # pyright: ignore[reportPrivateUsage]
)

FIRST_S, MOST_S = 1.0, 8.0  # listen_backoff_s, listen_backoff_max_s: in the test's clock only
ROUNDS = 20  # clock reads that make a window: the watcher went round that often meanwhile


class Clock:
    """The watcher's clock: moves only when the test says so, and counts how often it is read."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now


@pytest.fixture(params=UPSTREAM_ERAS)
def refusing(request: pytest.FixtureRequest) -> Iterator[Up]:
    upstream = ChangingUpstream(templates=("mem://{name}",), refuse=frozenset({BOGUS}))
    app = upstream.app()
    with serve_in_thread(HandshakeOnly(app) if request.param == "handshake" else app) as port:
        yield Up(upstream, f"http://127.0.0.1:{port}")


async def _until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(20):
        while not condition():  # noqa: ASYNC110 - the upstream's thread and the watcher feed it
            await anyio.sleep(0.01)


async def _window(clock: Clock) -> None:
    """Until the watcher has looked at the clock ``ROUNDS`` more times: long enough to see a tight loop."""
    seen = clock.reads
    await _until(lambda: clock.reads >= seen + ROUNDS)


async def test_a_refused_subscription_is_asked_again_after_its_backoff_only(refusing: Up) -> None:
    up = refusing.upstream
    clock = Clock()
    settings = NotificationSettings(
        watch_interval_s=0.02,  # rounds come quickly, in real time
        listen_backoff_s=FIRST_S,
        listen_backoff_max_s=MOST_S,
        resubscribe_debounce_s=0,
    )
    catalog, hub = _hub(PolicyEngine(POLICY_RULES, 1), [])
    stopping = anyio.Event()
    async with (
        UpstreamPool(max_connections=4, reconnect_backoff_s=0.1) as pool,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(hub.run, stopping)
        client = await pool.put(UpstreamSpec(name="up", transport="streamable_http", url=refusing.url))
        catalog.put(await client.discover())  # opens the connection the watcher rides
        listener, _ = hub.open(Principal("a", "arbiter", "api_key", roles=frozenset({"agent"})), frozenset())
        hub.subscribe(listener, f"arbiter://up/{BOGUS}")
        tg.start_soon(UpstreamWatch(pool, hub, settings, clock=clock).run, stopping)

        await _until(lambda: up.refused >= 1)
        await _window(clock)
        assert up.refused == 1  # parked: not asked again while the clock stands still

        clock.now += FIRST_S
        await _until(lambda: up.refused >= 2)  # due: asked again (never given up)
        await _window(clock)
        assert up.refused == 2

        clock.now += FIRST_S  # the backoff doubled: not due yet
        await _window(clock)
        assert up.refused == 2
        clock.now += FIRST_S
        await _until(lambda: up.refused >= 3)
        await _window(clock)
        assert up.refused == 3
        assert not up.watched(BOGUS)

        stopping.set()
        tg.cancel_scope.cancel()
