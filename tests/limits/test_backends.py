"""The backends and the limiter on their own: refill by the injected clock, skewed clocks on Redis,
budget periods, and memory that stays bounded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import pytest
from redis.asyncio import Redis

from arbiter.auth.principal import Principal
from arbiter.errors import BudgetExceeded, DuplicateRequest, RateLimited
from arbiter.limits.backend import (
    BucketSpec,
    CounterSpec,
    LimitBackend,
    LoopSpec,
    Plan,
    Verdict,
    period_bounds,
    period_id,
)
from arbiter.limits.factory import build_limiter, build_redis
from arbiter.limits.limiter import SESSION_KEY_PREFIX, Limiter
from arbiter.limits.local import LocalBackend
from arbiter.limits.memory import MemoryBackend
from arbiter.limits.redis_backend import RedisBackend
from arbiter.limits.store import LimitStore
from arbiter.limits.tables import BudgetRow, LimitRuleRow
from arbiter.settings import LimitSettings
from arbiter.store.db import create_engine, session_factory
from tests.limits.conftest import clear_of_period_end

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
    redis_client: Redis, redis_prefix: str
) -> None:
    backend = RedisBackend(redis_client, redis_prefix)
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
    db: str, settings: LimitSettings, redis: Redis | None, clock: FakeClock | None = None
) -> Limiter:
    engine = create_engine(db)
    limiter = build_limiter(settings, LimitStore(session_factory(engine)), redis, clock or FakeClock())
    await limiter.start()
    return limiter


@pytest.fixture
def limits_db(sqlite_url: str) -> str:
    return sqlite_url


async def _seed(db: str, *rows: LimitRuleRow | BudgetRow) -> None:
    store = LimitStore(session_factory(create_engine(db)))
    for row in rows:
        if isinstance(row, LimitRuleRow):
            await store.create(row, "test")
        else:
            await store.create(row, "test")


async def test_replicas_with_clocks_five_minutes_apart_share_exact_limits_on_redis(
    limits_db: str, redis_client: Redis, redis_prefix: str, tmp_path: Path
) -> None:
    import time

    await _seed(
        limits_db,
        LimitRuleRow(
            limit=10, period="minute", tool="search_docs"
        ),  # refills 1 token per 6 s: a 5-minute skew would refill all
        BudgetRow(period="day", limit=12.0, tool="get_doc"),
    )
    await clear_of_period_end("day")  # the budget's counter must be one day's for the whole test
    settings = LimitSettings(redis_prefix=redis_prefix)
    ahead = await _limiter(limits_db, settings, redis_client, FakeClock(time.time() + 300))
    behind = await _limiter(limits_db, settings, redis_client, FakeClock(time.time() - 300))
    try:
        admitted = 0
        for i in range(16):
            replica = ahead if i % 2 else behind
            try:
                await replica.admit(ALICE, "kb", "search_docs")
                admitted += 1
            except RateLimited as exc:
                assert (
                    0 < float(cast(float, exc.details["retry_after_s"])) <= 6.001
                )  # about one refill, by Redis's clock
        assert admitted == 10
        tickets = [await (ahead if i % 2 else behind).admit(ALICE, "kb2", "get_doc") for i in range(10)]
        # Both replicas charged the same counter of the same (Redis-clock) day.
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


@pytest.fixture(params=["memory", "redis"])
async def any_backend(request: pytest.FixtureRequest) -> AsyncIterator[LimitBackend]:
    if request.param == "memory":
        yield MemoryBackend(FakeClock())
        return
    client = build_redis(request.getfixturevalue("redis_url"), 2.0)
    backend = RedisBackend(client, request.getfixturevalue("redis_prefix"))
    try:
        yield backend
    finally:
        await backend.aclose()
        await client.aclose()


async def test_concurrent_copies_of_one_request_admit_one_and_the_rest_take_nothing(
    any_backend: LimitBackend,
) -> None:
    counter = CounterSpec("c", "day", 10_000_000)
    bucket = BucketSpec("b", 2, 1 / 86400)
    loop = LoopSpec("l", 2, 600.0)

    def plan(request_key: str) -> Plan:
        return Plan(
            buckets=(bucket,), counters=(counter,), cost_micros=1_000_000, loop=loop, request_key=request_key
        )

    verdicts = await asyncio.gather(*(any_backend.admit(plan("rq:same")) for _ in range(50)))
    outcomes = [v.outcome for v in verdicts]
    assert outcomes.count("ok") == 1 and outcomes.count("duplicate") == 49
    charged = next(v.charged for v in verdicts if v.outcome == "ok")
    # The 49 copies took no rate token, no loop slot and no budget: a new request still has one of each.
    other = await any_backend.admit(plan("rq:other"))
    assert other.outcome == "ok" and other.charged == charged
    assert (await any_backend.admit(plan("rq:third"))).outcome == "rate"
    # A refund releases the key: the same request may come again, and is charged again.
    await any_backend.refund(charged, 1_000_000, "rq:same")
    assert (
        await any_backend.admit(Plan(counters=(counter,), cost_micros=1_000_000, request_key="rq:same"))
    ).outcome == "ok"
    assert (
        await any_backend.admit(Plan(counters=(counter,), cost_micros=1_000_000, request_key="rq:same"))
    ).outcome == "duplicate"


async def test_a_request_key_refunded_and_taken_again_does_not_hold_back_the_expiry_of_others() -> None:
    # A refunded call retried with the same key is held again, until later than its first entry in
    # the expiry queue: that entry must leave at its own time, not wait for the key's new expiry with
    # every key taken after it (keys rotated that way would keep the whole queue forever).
    clock = FakeClock()
    backend = MemoryBackend(clock)
    counter = CounterSpec("c", "day", 10**12)

    async def take(key: str) -> Verdict:
        plan = Plan(counters=(counter,), cost_micros=1, request_key=key, request_ttl_s=120.0)
        return await backend.admit(plan)

    assert (await take("rq:0")).outcome == "ok"  # ahead of the retried key's first entry
    for second in range(1, 300):
        clock.now += 1
        if second == 1:
            first = await take("rq:retried")
            await backend.refund(first.charged, 1, "rq:retried")
        if second == 100:
            assert (await take("rq:retried")).outcome == "ok"  # held again, until second 220
        assert (await take(f"rq:{second}")).outcome == "ok"
        if second == 200:
            # Keys 81-200 are within their 120 s, and the retried one: nothing older is left.
            assert backend.sizes()["request_keys"] == 120 + 1
    assert backend.sizes()["request_keys"] == 120  # 180-299; the retried key expired at 220
    assert (await take("rq:retried")).outcome == "ok"


@pytest.mark.parametrize("on_redis", [False, True], ids=["memory", "redis"])
async def test_a_request_is_refused_while_in_flight_and_after_commit_but_not_after_a_refund(
    limits_db: str, on_redis: bool, request: pytest.FixtureRequest
) -> None:
    await _seed(limits_db, BudgetRow(period="day", limit=3.0))
    client = build_redis(request.getfixturevalue("redis_url"), 2.0) if on_redis else None
    prefix = request.getfixturevalue("redis_prefix") if on_redis else "arbiter:limits:"
    limiter = await _limiter(limits_db, LimitSettings(redis_prefix=prefix), client)
    try:
        args = {"query": "vat"}
        first = await limiter.admit(ALICE, "kb", "search_docs", args, "k:req-1")
        assert first.cost == 1.0 and first.charged
        with pytest.raises(DuplicateRequest) as in_flight:  # the original has not finished
            await limiter.admit(ALICE, "kb", "search_docs", args, "k:req-1")
        assert in_flight.value.code == "duplicate_request" and in_flight.value.jsonrpc_code == -31009
        assert (
            in_flight.value.http_status == 409
            and "will not be run or charged again" in in_flight.value.message
        )
        await limiter.refund(first)  # its upstream failed before running it: the key is released
        retry = await limiter.admit(ALICE, "kb", "search_docs", args, "k:req-1")
        assert retry.cost == 1.0 and retry.charged
        limiter.commit(retry)
        with pytest.raises(DuplicateRequest):  # it ran: never again, whatever happens
            await limiter.admit(ALICE, "kb", "search_docs", args, "k:req-1")
        # Other arguments, or another caller, with the same key are other requests: charged.
        await limiter.admit(ALICE, "kb", "search_docs", {"query": "sso"}, "k:req-1")
        bob = Principal("bob", "arbiter", "api_key", tenant="acme")
        await limiter.admit(bob, "kb", "search_docs", args, "k:req-1")
        # Alice has spent 2 of 3 (the refunded attempt gave its unit back): one more fits, then none.
        await limiter.admit(ALICE, "kb", "search_docs", {"query": "x"})
        with pytest.raises(BudgetExceeded) as over:
            await limiter.admit(ALICE, "kb", "search_docs", {"query": "y"})
        assert over.value.details["spent"] == 3
    finally:
        await limiter.aclose()
        if client is not None:
            await client.aclose()


async def test_session_request_keys_are_held_briefly_so_a_long_session_keeps_memory_bounded(
    limits_db: str,
) -> None:
    # Every handshake-era call takes a key (session id + JSON-RPC id). Held for the hour an explicit
    # idempotency key is, a session calling at a steady rate grew the table for an hour: the soak's
    # memory creep. Held for session_request_key_ttl_s, it stays near rate x that, however long it runs.
    await _seed(limits_db, BudgetRow(period="day", limit=1_000_000.0))
    clock = FakeClock()
    limiter = await _limiter(limits_db, LimitSettings(session_request_key_ttl_s=60.0), None, clock)
    memory = cast(LocalBackend, limiter.backend).memory
    args = {"text": "hello"}

    async def call(key: str) -> None:
        limiter.commit(await limiter.admit(ALICE, "kb", "echo", args, key))

    try:
        await call(f"{SESSION_KEY_PREFIX}s1:int:0")
        with pytest.raises(DuplicateRequest):  # a copy while the key is held: refused, as before
            await call(f"{SESSION_KEY_PREFIX}s1:int:0")
        await call("k:agent-chosen")
        for i in range(1, 60_001):  # 100 calls a second for ten minutes, each with a new JSON-RPC id
            clock.now += 0.01
            await call(f"{SESSION_KEY_PREFIX}s1:int:{i}")
        # The keys within their minute (about 6,000: the fake clock's steps round at this magnitude)
        # and the explicit one, expired keys dropped as they expire rather than at the next sweep; an
        # hour's hold would keep all 60,000.
        assert 6_000 <= memory.sizes()["request_keys"] <= 6_000 + 5
        await call(f"{SESSION_KEY_PREFIX}s1:int:0")  # long expired: a new request
        with pytest.raises(DuplicateRequest):  # an explicit key is still held for its hour
            await call("k:agent-chosen")
    finally:
        await limiter.aclose()


async def test_per_tool_counts_each_upstreams_tool_on_its_own(limits_db: str) -> None:
    await _seed(limits_db, LimitRuleRow(limit=1, period="day", per="tool"))
    limiter = await _limiter(limits_db, LimitSettings(), None)
    await limiter.admit(ALICE, "kb", "search")
    await limiter.admit(ALICE, "crm", "search")  # another upstream's "search": a counter of its own
    with pytest.raises(RateLimited):
        await limiter.admit(ALICE, "kb", "search")
    with pytest.raises(RateLimited):
        await limiter.admit(ALICE, "crm", "search")


async def test_more_calls_in_flight_than_redis_connections_wait_for_one_instead_of_failing(
    limits_db: str, redis_url: str, redis_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from arbiter.limits import factory

    # Past the pool's cap redis-py used to raise at once; the limits took that for Redis being down and
    # (failing closed) refused every limited call. A small cap makes the crowd easy to reach here.
    monkeypatch.setattr(factory, "MAX_CONNECTIONS", 4)
    await _seed(limits_db, LimitRuleRow(limit=1000, period="minute"))
    client = build_redis(redis_url, 2.0)
    limiter = await _limiter(limits_db, LimitSettings(redis_prefix=redis_prefix), client)
    try:
        tickets = await asyncio.gather(*(limiter.admit(ALICE, "kb", "search_docs") for _ in range(60)))
        assert len(tickets) == 60  # none refused with limits_unavailable
        assert limiter.health()[0] == "ok"
    finally:
        await limiter.aclose()
        await client.aclose()
