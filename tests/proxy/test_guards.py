"""The pieces of an upstream's guard on their own: breaker states, bulkhead hand-over, retry budget."""

from __future__ import annotations

import anyio
import pytest

from arbiter.errors import UpstreamUnavailable
from arbiter.proxy.breaker import Breaker
from arbiter.proxy.bulkhead import Bulkhead
from arbiter.proxy.retries import RetryBudget


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_a_probe_decides() -> None:
    clock = Clock()
    breaker = Breaker("crm", threshold=3, open_s=10, clock=clock)
    for _ in range(2):
        assert breaker.admit() is False
        breaker.failure()
    breaker.success()  # not consecutive: starts over
    for _ in range(3):
        breaker.admit()
        breaker.failure()
    assert breaker.state == "open"
    with pytest.raises(UpstreamUnavailable) as refused:
        breaker.admit()
    assert refused.value.details == {"upstream": "crm", "retry_after_s": 10, "circuit": "open"}
    clock.now += 9.5
    with pytest.raises(UpstreamUnavailable) as soon:
        breaker.admit()
    assert soon.value.details["retry_after_s"] == 1  # whole seconds, at least one
    clock.now += 1
    assert breaker.state == "half_open"
    assert breaker.admit() is True  # the probe
    with pytest.raises(UpstreamUnavailable) as others:
        breaker.admit()
    assert others.value.details["circuit"] == "half_open"
    breaker.failure()  # the probe failed: open again, for a whole interval
    assert breaker.state == "open"
    clock.now += 10
    assert breaker.admit() is True
    breaker.success()
    assert breaker.state == "closed" and breaker.admit() is False


def test_breaker_probe_without_an_outcome_lets_the_next_one_probe() -> None:
    clock = Clock()
    breaker = Breaker("crm", threshold=1, open_s=1, clock=clock)
    breaker.failure()
    clock.now += 1
    assert breaker.admit() is True
    breaker.release()
    assert breaker.admit() is True


async def test_bulkhead_refuses_beyond_its_wait_and_hands_slots_over() -> None:
    bulkhead = Bulkhead("crm", limit=1, max_waiting=1, wait_s=5)
    far = anyio.current_time() + 60
    await bulkhead.acquire(far)
    with pytest.raises(UpstreamUnavailable):  # nobody may wait past the deadline
        await bulkhead.acquire(anyio.current_time())
    got: list[str] = []

    async def waiter() -> None:
        await bulkhead.acquire(far)
        got.append("slot")

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        assert bulkhead.waiting == 1
        with pytest.raises(UpstreamUnavailable) as full:  # one running, one waiting: the rest at once
            await bulkhead.acquire(far)
        assert full.value.details["bulkhead"] == "full"
        bulkhead.release()  # handed to the waiter, not freed
    assert got == ["slot"] and bulkhead.in_use == 1
    bulkhead.release()
    assert bulkhead.in_use == 0 and bulkhead.try_acquire()


def test_retry_budget_is_a_share_of_requests_plus_a_floor() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=0, clock=clock)
    while budget.spend():
        pass  # the initial reserve
    for _ in range(10):
        budget.earn()
    assert [budget.spend() for _ in range(3)] == [True, True, False]  # 20% of 10 requests
    floor = RetryBudget(ratio=0, min_per_s=2, clock=clock)
    while floor.spend():
        pass
    clock.now += 1
    assert [floor.spend() for _ in range(3)] == [True, True, False]
