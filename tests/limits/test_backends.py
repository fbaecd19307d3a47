"""The backends and the limiter on their own: refill by the injected clock, skewed clocks on Redis,
budget periods, and memory that stays bounded."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest

from arbiter.auth.principal import Principal
from arbiter.errors import BudgetExceeded, RateLimited
from arbiter.limits.backend import BucketSpec, CounterSpec, LoopSpec, Plan, period_bounds, period_id
from arbiter.limits.limiter import Limiter
from arbiter.limits.memory import MemoryBackend
from arbiter.limits.redis_backend import RedisBackend
from arbiter.limits.store import LimitStore
from arbiter.limits.tables import BudgetRow, LimitRuleRow
from arbiter.settings import LimitSettings
from arbiter.store.db import create_engine, session_factory

ALICE = Principal("alice", "arbiter", "api_key", tenant="acme", roles=frozenset({"agent"}))


class FakeClock:
    def __init__(self, now: float = 1_790_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_memory_bucket_refills_by_the_injected_clock_only() -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock)
    plan = Plan(buckets=(BucketSpec("b", 3, 1 / 60),))  # 3 per minute
    assert [(await backend.admit(plan)).outcome for _ in range(4)] == ["ok", "ok", "ok", "rate"]
    refused = await backend.admit(plan)
    assert refused.retry_after_s == pytest.approx(60)
    clock.now += 30
    refused = await backend.admit(plan)
    assert refused.outcome == "rate" and refused.retry_after_s == pytest.approx(30)
    clock.now += 30
    assert (await backend.admit(plan)).outcome == "ok"
    # A clock that jumps back mints nothing and breaks nothing.
    clock.now -= 3600
    assert (await backend.admit(plan)).outcome == "rate"


async def test_memory_loop_window_slides_and_memory_is_swept() -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock)
    plan = Plan(buckets=(BucketSpec("b", 100, 1.0),), loop=LoopSpec("l", 2, 10.0))
    assert [(await backend.admit(plan)).outcome for _ in range(3)] == ["ok", "ok", "loop"]
    clock.now += 10.001
    assert (await backend.admit(plan)).outcome == "ok"
    clock.now += 3600
    backend.sweep()
    assert backend.sizes() == {"buckets": 0, "loops": 0, "counters": 0, "request_keys": 0}


def test_budget_periods_are_utc_hours_days_and_calendar_months() -> None:
    leap = datetime(2028, 2, 29, 23, 59, 59, tzinfo=UTC).timestamp()
    assert period_id("month", leap) == f"m{2028 * 12 + 1}"
    start, end = period_bounds("month", leap)
    assert datetime.fromtimestamp(start, UTC) == datetime(2028, 2, 1, tzinfo=UTC)
    assert datetime.fromtimestamp(end, UTC) == datetime(2028, 3, 1, tzinfo=UTC)
    assert period_id("day", leap) != period_id("day", leap + 1)
    assert period_bounds("hour", leap) == (leap - 3599, leap + 1)


async def test_redis_counts_budget_periods_like_the_in_process_backend(
    redis_url: str, redis_prefix: str
) -> None:
    backend = RedisBackend(redis_url, redis_prefix, 2.0)
    try:
        counters = tuple(CounterSpec(f"c-{p}", p, 10_000_000) for p in ("hour", "day", "month"))
        verdict = await backend.admit(Plan(counters=counters, cost_micros=1_000_000))
        assert verdict.outcome == "ok"
        # The script's period suffixes (Redis's clock, Lua arithmetic) match Python's for the same time.
        expected = tuple(f"c-{p}:{period_id(p, verdict.now)}" for p in ("hour", "day", "month"))
        assert verdict.charged == expected
    finally:
        await backend.aclose()


async def _limiter(
    db: str, settings: LimitSettings, redis_url: str | None, clock: FakeClock | None = None
) -> Limiter:
    engine = create_engine(db)
    limiter = Limiter(settings, LimitStore(session_factory(engine)), redis_url, clock or FakeClock())
    await limiter.start()
    return limiter


@pytest.fixture
def limits_db(sqlite_url: str) -> str:
    return sqlite_url


async def _seed(db: str, *rows: LimitRuleRow | BudgetRow) -> None:
    store = LimitStore(session_factory(create_engine(db)))
    for row in rows:
        await store.create(row, "test")


async def test_replicas_with_clocks_five_minutes_apart_share_exact_limits_on_redis(
    limits_db: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    import time

    await _seed(
        limits_db,
        LimitRuleRow(
            limit=10, period="minute", tool="search_docs"
        ),  # refills 1 token per 6 s: a 5-minute skew would refill all
        BudgetRow(period="hour", limit=12.0, tool="get_doc"),
    )
    settings = LimitSettings(redis_prefix=redis_prefix)
    ahead = await _limiter(limits_db, settings, redis_url, FakeClock(time.time() + 300))
    behind = await _limiter(limits_db, settings, redis_url, FakeClock(time.time() - 300))
    try:
        admitted = 0
        for i in range(16):
            replica = ahead if i % 2 else behind
            try:
                await replica.admit(ALICE, "kb", "search_docs")
                admitted += 1
            except RateLimited as exc:
                assert 0 < float(exc.details["retry_after_s"]) <= 6.001  # about one refill, by Redis's clock
        assert admitted == 10
        tickets = [await (ahead if i % 2 else behind).admit(ALICE, "kb2", "get_doc") for i in range(10)]
        # Both replicas charged the same counter of the same (Redis-clock) hour.
        assert len({t.charged for t in tickets}) == 1
        with pytest.raises(BudgetExceeded):
            for i in range(3):
                await (ahead if i % 2 else behind).admit(ALICE, "kb2", "get_doc")
    finally:
        await ahead.aclose()
        await behind.aclose()


async def test_memory_backend_budget_counts_a_burst_of_concurrent_admits_exactly(limits_db: str) -> None:
    await _seed(limits_db, BudgetRow(period="day", limit=10.0, per="tenant"))
    limiter = await _limiter(limits_db, LimitSettings(), None)
    results = await asyncio.gather(
        *(limiter.admit(ALICE, "kb", "search_docs", {"i": i}) for i in range(100)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 10
    assert all(isinstance(r, BudgetExceeded) for r in results if isinstance(r, BaseException))
