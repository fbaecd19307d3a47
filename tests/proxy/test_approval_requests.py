"""The pending-approval table under races, on SQLite and PostgreSQL: one call has one pending request
whoever commits first or reads the clock first, a caller's cap holds when its requests race, and a
claimed approval given back is approved again (timestamps compared exactly)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.errors import ApprovalQueueFull
from arbiter.proxy.approval_requests import ApprovalRequests, CallFacts, table
from arbiter.store import schema
from arbiter.store.db import create_engine


def _facts(key: str = "k" * 64, caller: str = "iss|agent") -> CallFacts:
    return CallFacts(
        key=key,
        caller=caller,
        subject="agent",
        tenant="",
        tool="pay__refund",
        upstream="pay",
        target="refund",
        arguments={"amount": 500},
        rule="p, role:agent, *, pay/refund, call, approve by role:lead",
        approvers=("role:lead",),
        valid_s=3600,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    if request.param == "sqlite":
        return sqlite_url
    url: str = request.getfixturevalue("postgres_url")
    schema.upgrade(url)
    return url


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    made = create_engine(database_url)
    yield made
    await made.dispose()


async def _pending(engine: AsyncEngine) -> int:
    async with engine.connect() as db:
        query = sa.select(sa.func.count()).select_from(table).where(table.c.status == "pending")
        return (await db.execute(query)).scalar_one()


async def test_the_later_committer_with_the_earlier_clock_still_leaves_one_request(
    engine: AsyncEngine,
) -> None:
    first = ApprovalRequests(engine, pending_ttl_s=3600, clock=lambda: 1000.5)
    second = ApprovalRequests(engine, pending_ttl_s=3600, clock=lambda: 1000.4)  # its clock read earlier
    await first.open(_facts())
    await second.open(_facts())
    assert await _pending(engine) == 1
    assert (await first.current(_facts().key)) == (await second.current(_facts().key))


async def test_racing_first_calls_leave_one_request(engine: AsyncEngine) -> None:
    requests = ApprovalRequests(engine, pending_ttl_s=3600, max_pending=1000)
    opened = await asyncio.gather(*(requests.open(_facts()) for _ in range(20)))
    assert len({r.id for r in opened}) == 1 and await _pending(engine) == 1


async def test_a_callers_cap_holds_when_its_requests_race(engine: AsyncEngine) -> None:
    requests = ApprovalRequests(engine, pending_ttl_s=3600, max_pending=3)
    got = await asyncio.gather(
        *(requests.open(_facts(key=f"{i:064d}")) for i in range(10)), return_exceptions=True
    )
    assert all(isinstance(g, ApprovalQueueFull) for g in got if isinstance(g, BaseException)), got
    assert await _pending(engine) == 3  # the caller's three oldest; the others went, or were never kept


async def test_a_released_claim_is_an_approval_again(engine: AsyncEngine) -> None:
    requests = ApprovalRequests(engine, pending_ttl_s=3600)
    found = await requests.open(_facts())
    await requests.decide(found.id, approve=True, by="user:lena", note=None)
    for _ in range(20):
        claimed = await requests.claim(found.id)
        assert claimed is not None and await requests.claim(found.id) is None  # spent while claimed
        await requests.release(found.id, claimed)
        again = await requests.get(found.id)
        assert again is not None and again.status == "approved" and again.used_s is None
