"""Concurrent admissions share one Redis round trip: the coalescer on its own (a send the test gates),
then the Redis backend on a redis-server of the test's own, whose command counts are exact."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from redis.asyncio import Redis

from arbiter.limits.backend import BucketSpec, CounterSpec, Plan
from arbiter.limits.coalesce import Coalescer
from arbiter.limits.factory import build_redis
from arbiter.limits.failover import FailoverBackend
from arbiter.limits.memory import MemoryBackend
from arbiter.limits.redis_backend import RedisBackend
from arbiter.redis_errors import REDIS_ERRORS
from arbiter.settings import LimitSettings
from tests.limits.conftest import RedisProc, clear_of_period_end


class GatedSend:
    """A send that records each batch and returns only when the test opens its gate."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gates: list[asyncio.Event] = []
        self.fail_with: Exception | None = None
        self._grew = asyncio.Event()

    async def __call__(self, items: list[int]) -> Sequence[str]:
        self.batches.append(list(items))
        self._grew.set()
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return [f"r{i}" for i in items]

    async def sent(self, count: int) -> None:
        while len(self.batches) < count:
            self._grew.clear()
            await self._grew.wait()


async def _settle() -> None:
    """Let every ready task run until each waits on something the test controls."""
    for _ in range(20):
        await asyncio.sleep(0)


async def _first_in_flight() -> tuple[GatedSend, Coalescer[int, str], asyncio.Task[str]]:
    """A coalescer whose first item is on its way (alone) and held there by the test."""
    send = GatedSend()
    batches: Coalescer[int, str] = Coalescer(send, max_batch=64)
    first = asyncio.create_task(batches.submit(0))
    await send.sent(1)
    return send, batches, first


async def _goes_alone(send: GatedSend, batches: Coalescer[int, str], item: int) -> None:
    """With nothing in flight, ``item`` is sent at once, in a round trip of its own."""
    task = asyncio.create_task(batches.submit(item))
    await send.sent(len(send.batches) + 1)
    assert send.batches[-1] == [item]
    send.gates[-1].set()
    assert await task == f"r{item}"


async def test_a_lone_item_goes_at_once_and_items_queued_meanwhile_go_together() -> None:
    send, batches, first = await _first_in_flight()
    assert send.batches == [[0]]  # nothing else waiting: sent alone, without waiting for company
    rest = [asyncio.create_task(batches.submit(i)) for i in range(1, 6)]
    await _settle()
    assert len(send.batches) == 1  # in flight: the others queue
    send.gates[0].set()
    assert await first == "r0"
    await send.sent(2)
    assert send.batches[1] == [1, 2, 3, 4, 5]  # one round trip for all that queued
    send.gates[1].set()
    assert await asyncio.gather(*rest) == ["r1", "r2", "r3", "r4", "r5"]  # each its own result
    await _goes_alone(send, batches, 9)  # idle again


async def test_batches_hold_at_most_max_batch() -> None:
    send = GatedSend()
    batches = Coalescer(send, max_batch=3, max_lanes=1)
    tasks = [asyncio.create_task(batches.submit(i)) for i in range(8)]
    for n in range(1, 5):
        await send.sent(n)
        await _settle()
        send.gates[n - 1].set()
    assert await asyncio.gather(*tasks) == [f"r{i}" for i in range(8)]
    assert send.batches == [[0], [1, 2, 3], [4, 5, 6], [7]]


async def test_a_full_batch_waiting_sends_alongside_up_to_max_lanes() -> None:
    """A slow Redis does not hold every admission behind one round trip."""
    send = GatedSend()
    batches = Coalescer(send, max_batch=2, max_lanes=2)
    tasks = [asyncio.create_task(batches.submit(i)) for i in range(5)]
    await send.sent(2)
    await _settle()
    assert send.batches == [[0], [1, 2]]  # the second went while the first was still in flight
    send.gates[1].set()  # lanes are capped at two: 3 and 4 wait for one to come back
    await send.sent(3)
    assert send.batches[2] == [3, 4]
    send.gates[2].set()
    send.gates[0].set()
    assert await asyncio.gather(*tasks) == [f"r{i}" for i in range(5)]
    await _goes_alone(send, batches, 5)  # every lane came back


async def test_a_caller_that_gives_up_before_its_item_is_sent_takes_it_out() -> None:
    send, batches, first = await _first_in_flight()
    gone = asyncio.create_task(batches.submit(1))
    kept = asyncio.create_task(batches.submit(2))
    await _settle()
    gone.cancel()
    send.gates[0].set()
    await send.sent(2)
    assert send.batches[1] == [2]  # the cancelled caller's item never reached the send
    send.gates[1].set()
    assert (await first, await kept) == ("r0", "r2")
    assert gone.cancelled()


async def test_a_failed_round_trip_fails_every_caller_in_it_and_the_next_one_runs() -> None:
    send, batches, first = await _first_in_flight()
    queued = [asyncio.create_task(batches.submit(i)) for i in (1, 2)]
    await _settle()
    send.fail_with = ConnectionError("redis went away")
    send.gates[0].set()
    with pytest.raises(ConnectionError):
        await first
    await send.sent(2)
    send.gates[1].set()
    for task in queued:
        with pytest.raises(ConnectionError, match="redis went away"):
            await task
    send.fail_with = None
    await _goes_alone(send, batches, 3)  # not stuck


async def test_closing_fails_callers_still_waiting_and_sends_nothing_more() -> None:
    send, batches, first = await _first_in_flight()
    in_flight = asyncio.create_task(batches.submit(1))
    await _settle()
    send.gates[0].set()
    await send.sent(2)  # item 1 is in a round trip on a lane of its own
    queued = asyncio.create_task(batches.submit(2))
    await _settle()
    await batches.aclose()
    assert await first == "r0"
    for task in (in_flight, queued):  # to the failover backend: Redis unreachable, not a stray cancel
        with pytest.raises(ConnectionError, match="closed"):
            await task
    with pytest.raises(ConnectionError, match="closed"):
        await batches.submit(3)
    assert len(send.batches) == 2


async def test_closing_before_a_new_lane_ran_still_answers_what_it_claimed() -> None:
    send = GatedSend()
    batches = Coalescer(send, max_batch=2)
    tasks = [asyncio.create_task(batches.submit(i)) for i in range(3)]
    await asyncio.sleep(0)  # 0 goes alone; 1 and 2 fill a batch, whose lane is created but not yet run
    await batches.aclose()
    for task in tasks[1:]:
        with pytest.raises(ConnectionError, match="closed"):
            await task
    send.gates[0].set()
    assert await tasks[0] == "r0"
    assert send.batches == [[0]]


async def test_a_lone_sender_cancelled_mid_flight_leaves_the_queue_served() -> None:
    send, batches, first = await _first_in_flight()
    queued = [asyncio.create_task(batches.submit(i)) for i in (1, 2)]
    await _settle()
    first.cancel()
    await send.sent(2)
    assert send.batches[1] == [1, 2]
    send.gates[1].set()
    assert await asyncio.gather(*queued) == ["r1", "r2"]
    await _goes_alone(send, batches, 3)  # no lane left behind


async def _evalsha_calls(client: Redis) -> int:
    stats: dict[str, dict[str, int]] = await client.info("commandstats")  # pyright: ignore[reportUnknownMemberType]
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0)) + int(
        stats.get("cmdstat_eval", {}).get("calls", 0)
    )


async def test_concurrent_admissions_share_round_trips_and_stay_exact(own_redis: RedisProc) -> None:
    """40 calls at once against a budget of 10: exactly 10 pass, in far fewer than 40 scripts; two copies
    of one request in one batch are one admission and one duplicate."""
    await clear_of_period_end("day")
    client = build_redis(own_redis.url, 5.0)
    backend = RedisBackend(client, "t:")
    try:
        budget = (CounterSpec("spend", "day", 10_000_000),)
        before = await _evalsha_calls(client)
        verdicts = await asyncio.gather(
            *(
                backend.admit(Plan(counters=budget, cost_micros=1_000_000, request_key=f"req-{i}"))
                for i in range(40)
            )
        )
        scripts = await _evalsha_calls(client) - before
        assert sorted(v.outcome for v in verdicts).count("ok") == 10
        assert {v.outcome for v in verdicts} == {"ok", "budget"}
        assert scripts < 10, scripts  # the first alone, the rest together (plus a script load, if any)
        assert int(await client.get(f"t:{verdicts[0].charged[0]}") or 0) == 10_000_000  # pyright: ignore[reportUnknownMemberType]

        twice = Plan(counters=(CounterSpec("other", "day", 10_000_000),), cost_micros=1, request_key="same")
        # The first call goes alone; the two copies queue behind it and share the next script.
        before = await _evalsha_calls(client)
        opener, *pair = await asyncio.gather(
            backend.admit(Plan(counters=budget, cost_micros=0)), backend.admit(twice), backend.admit(twice)
        )
        assert opener.outcome == "ok" and sorted(v.outcome for v in pair) == ["duplicate", "ok"]
        assert await _evalsha_calls(client) - before == 2

        # One at a time, each call is its own round trip, as before.
        before = await _evalsha_calls(client)
        for i in range(3):
            await backend.admit(Plan(counters=budget, cost_micros=0, request_key=f"alone-{i}"))
        assert await _evalsha_calls(client) - before == 3
    finally:
        await backend.aclose()
        await client.aclose()


async def test_a_hung_redis_sends_every_waiting_admission_to_the_fallback_and_then_recovers(
    own_redis: RedisProc,
) -> None:
    """Admissions queued behind a round trip that never comes back are not held past their own
    deadline: each takes the on_redis_down path, and Redis is used again once it answers."""
    settings = LimitSettings(redis_prefix="t:", redis_timeout_s=1.0, on_redis_down="fallback")
    client = build_redis(own_redis.url, settings.redis_timeout_s)
    backend = FailoverBackend(RedisBackend(client, "t:"), MemoryBackend(), settings)
    pauser = Redis.from_url(own_redis.url)  # pyright: ignore[reportUnknownMemberType]
    plan = Plan(buckets=(BucketSpec("b", 1000, 1000.0),))
    try:
        assert (await backend.admit(plan)).holder is None  # on Redis
        # WRITE holds every script (EVALSHA) and leaves this client free to unpause
        await pauser.execute_command("CLIENT", "PAUSE", "60000", "WRITE")  # pyright: ignore[reportUnknownMemberType]
        verdicts = await asyncio.gather(*(backend.admit(plan) for _ in range(20)))
        assert [v.outcome for v in verdicts] == ["ok"] * 20
        assert all(v.holder is backend.fallback for v in verdicts)
        assert backend.down
        await pauser.execute_command("CLIENT", "UNPAUSE")  # pyright: ignore[reportUnknownMemberType]
        await backend.check()  # what the background ping does every limits.redis_retry_s
        assert not backend.down
        again = await asyncio.gather(*(backend.admit(plan) for _ in range(5)))
        assert all(v.holder is None for v in again)
    finally:
        await pauser.execute_command("CLIENT", "UNPAUSE")  # pyright: ignore[reportUnknownMemberType]
        await pauser.aclose()
        await backend.aclose()
        await client.aclose()


async def test_a_reply_that_does_not_match_its_batch_is_an_error_for_its_callers() -> None:
    """What the failover backend counts as Redis misbehaving (RuntimeError), never an IndexError."""

    async def short(items: list[int]) -> list[str]:
        return [f"r{i}" for i in items][1:]

    batches = Coalescer(short, max_batch=64)
    with pytest.raises(RuntimeError, match="0 results for 1 item"):
        await batches.submit(0)
    with pytest.raises(RuntimeError, match="results for"):
        await asyncio.gather(*(batches.submit(i) for i in range(3)))
    assert isinstance(RuntimeError(), REDIS_ERRORS)
