"""Cost of the limits step per call: nothing configured, in-process limits, and Redis (one round trip).

Run: ``.venv/bin/python bench/limits_cost.py [--redis redis://127.0.0.1:6379/0]``. Drives the limiter
directly (no HTTP), with a rate rule, a budget and the loop breaker applying to every call, so each
admitted call runs the full check. Reports CPU µs per call (process time) and, for Redis, wall µs
per call, sequentially and with 32 calls in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from pathlib import Path

from redis.asyncio import Redis

from arbiter.auth.principal import Principal
from arbiter.limits.factory import build_limiter, build_redis
from arbiter.limits.limiter import Limiter
from arbiter.limits.store import LimitStore
from arbiter.limits.tables import BudgetRow, LimitRuleRow, ToolCostRow
from arbiter.settings import LimitSettings
from arbiter.store import schema
from arbiter.store.db import create_engine, session_factory

WHO = Principal("alice", "arbiter", "api_key", tenant="acme", roles=frozenset({"agent"}))


async def measure(limiter: Limiter, n: int, concurrency: int) -> tuple[float, float]:
    async def one(i: int) -> None:
        ticket = await limiter.admit(WHO, "kb", "search_docs", {"query": str(i)}, None)
        limiter.commit(ticket)

    cpu, wall = time.process_time(), time.perf_counter()
    if concurrency == 1:  # awaited directly: gather's task per call would dominate the figure
        for i in range(n):
            await one(i)
        return (time.process_time() - cpu) / n * 1e6, (time.perf_counter() - wall) / n * 1e6

    async def worker(w: int) -> None:  # each keeps one call in flight: arrivals stagger, as in a proxy
        for i in range(w, n, concurrency):
            await one(i)

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return (time.process_time() - cpu) / n * 1e6, (time.perf_counter() - wall) / n * 1e6


async def limiter_on(db: str, redis: Redis | None, configured: bool) -> Limiter:
    prefix = f"arbiter:bench:{uuid.uuid4().hex}:"
    limiter = build_limiter(
        LimitSettings(redis_prefix=prefix), LimitStore(session_factory(create_engine(db))), redis
    )
    if configured:
        store = limiter.store
        await store.create(LimitRuleRow(limit=1_000_000, period="second"), "bench")
        await store.create(BudgetRow(period="day", limit=1e9), "bench")
        await store.create(
            ToolCostRow(tool="kb/*", cost=0.01, loop_max_repeats=1000, loop_window_s=60), "bench"
        )
    await limiter.start()
    return limiter


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for label, redis_url, configured in (
            ("nothing configured", None, False),
            ("in-process: rule + budget + loop breaker", None, True),
            ("redis: rule + budget + loop breaker", args.redis, True),
        ):
            db = f"sqlite+aiosqlite:///{Path(tmp) / f'{uuid.uuid4().hex}.db'}"
            await asyncio.to_thread(schema.upgrade, db)  # Alembic runs its own event loop
            redis = build_redis(redis_url, 0.5) if redis_url else None
            limiter = await limiter_on(db, redis, configured)
            try:
                await measure(limiter, 500, 32)  # warm up: imports, caches, the script cached in Redis
                for concurrency in (1, 32):
                    cpu, wall = await measure(limiter, args.calls, concurrency)
                    print(f"{label:45s} x{concurrency:2d}: {cpu:7.1f} CPU µs/call {wall:8.1f} wall µs/call")
            finally:
                await limiter.aclose()
                if redis is not None:
                    await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
