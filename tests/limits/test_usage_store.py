"""Usage and in-process budget spend written to the database: flushes of many thousands of counters on
real PostgreSQL, and failures logged without SQL text or caller names."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import sqlalchemy as sa

from arbiter.limits.store import LimitStore
from arbiter.limits.usage import UsageCounter
from arbiter.store import schema
from arbiter.store.db import create_engine, session_factory

KEYS = 5_001  # more than asyncpg's 32,767 parameters would take in one statement (8 a row)
HOUR = 497_000


async def _count(url: str, table: str) -> tuple[int, int]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            column = "calls" if table == "limit_usage" else "spent_micros"
            row = (await conn.execute(sa.text(f"SELECT count(*), sum({column}) FROM {table}"))).one()
    finally:
        await engine.dispose()
    return int(row[0]), int(row[1] or 0)


async def test_a_flush_of_thousands_of_counters_is_written_on_postgresql(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    await asyncio.to_thread(schema.upgrade, postgres_url)
    engine = create_engine(postgres_url)
    store = LimitStore(session_factory(engine))
    usage = UsageCounter(store)
    try:
        for i in range(KEYS):
            usage.add((HOUR, f"arbiter|agent-{i}", "acme", "kb", "search_docs"), calls=1, cost_micros=10)
        with caplog.at_level(logging.WARNING):
            await usage.flush()
            for i in range(KEYS):  # the same rows again: added to, across statements
                usage.add((HOUR, f"arbiter|agent-{i}", "acme", "kb", "search_docs"), calls=1)
            await usage.flush()
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
        assert await _count(postgres_url, "limit_usage") == (KEYS, 2 * KEYS)

        spend = {f"bg:1:{i:032x}:d20000": 1_000_000 for i in range(KEYS)}
        await store.add_spend(spend, dict.fromkeys(spend, 2e9))
        await store.add_spend(spend, dict.fromkeys(spend, 2e9))
        assert await _count(postgres_url, "limit_spend") == (KEYS, 2 * KEYS * 1_000_000)
        loaded = await store.load_spend(1e9)
        assert len(loaded) == KEYS and {micros for _, micros, _ in loaded} == {2_000_000}
    finally:
        await engine.dispose()


async def test_a_failed_flush_is_logged_briefly_and_written_with_the_next(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'not-migrated.db'}"  # no tables yet: every write fails
    engine = create_engine(url)
    usage = UsageCounter(LimitStore(session_factory(engine)))
    try:
        for i in range(2_000):
            usage.add((HOUR, f"arbiter|secret-agent-{i}", "acme", "kb", "search_docs"), calls=1)
        with caplog.at_level(logging.WARNING):
            await usage.flush()
        (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
        message = record.getMessage()
        assert "could not write 2000 counters" in message and "no such table" in message
        # The driver's message only: no SQL text, no parameters (caller names), and short.
        assert "INSERT" not in message and "secret-agent" not in message and len(message) < 500
        await asyncio.to_thread(schema.upgrade, url)
        await usage.flush()  # kept, and written whole once the database takes it
        assert await _count(url, "limit_usage") == (2_000, 2_000)
    finally:
        await engine.dispose()
