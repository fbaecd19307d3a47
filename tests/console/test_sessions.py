"""The console's session store in a real database: idle expiry, the maximum lifetime and an ID token's
exp, the cap on sessions, CSRF, sessions shared by replicas; and the Secure cookie setting."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.auth.principal import Principal
from arbiter.console.sessions import SessionStore, rows
from arbiter.store import schema
from arbiter.store.db import create_engine
from tests.conftest import ADMIN_TOKEN, ArbiterFactory
from tests.console.test_console_review import is_secure, log_in, set_cookies

ALICE = Principal(
    subject="alice", issuer="arbiter", auth_method="api_key", roles=frozenset({"auditor"}), api_key_id="k1"
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def engine(sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(sqlite_url)
    yield engine
    await engine.dispose()


def store(
    engine: AsyncEngine, clock: Clock, *, idle: float = 60, lifetime: float = 3600, cap: int = 10
) -> SessionStore:
    return SessionStore(engine, idle_timeout_s=idle, max_lifetime_s=lifetime, max_sessions=cap, clock=clock)


async def test_a_session_expires_after_idle_time_and_use_keeps_it_alive(engine: AsyncEngine) -> None:
    clock = Clock()
    sessions = store(engine, clock)
    session = await sessions.create(ALICE)
    for _ in range(3):
        clock.now += 59
        found = await sessions.get(session.id)  # used: the idle timer starts again
        assert found is not None and found.principal == ALICE and found.csrf == session.csrf
    clock.now += 61
    assert await sessions.get(session.id) is None
    clock.now -= 61
    assert await sessions.get(session.id) is None  # gone for good, not revived by the clock


async def test_a_busy_session_still_ends_at_its_maximum_lifetime_or_its_id_tokens_exp(
    engine: AsyncEngine,
) -> None:
    clock = Clock()
    sessions = store(engine, clock, idle=600, lifetime=1000)
    busy = await sessions.create(ALICE)
    capped = await sessions.create(ALICE, not_after=clock.now + 300)  # an ID token's exp
    later = await sessions.create(ALICE, not_after=clock.now + 5000)  # later than the lifetime: no help
    for _ in range(3):
        clock.now += 200
        assert await sessions.get(busy.id) is not None and await sessions.get(later.id) is not None
    assert await sessions.get(capped.id) is None
    clock.now += 399
    assert await sessions.get(busy.id) is not None and await sessions.get(later.id) is not None
    clock.now += 1
    assert await sessions.get(busy.id) is None and await sessions.get(later.id) is None


async def test_sessions_are_capped_least_recently_used_first_and_ended_on_logout(engine: AsyncEngine) -> None:
    clock = Clock()
    sessions = store(engine, clock, cap=2)
    first = await sessions.create(ALICE)
    clock.now += 10
    second = await sessions.create(ALICE)
    clock.now += 10
    assert await sessions.get(first.id) is not None  # first is now the more recently used
    assert first.id != second.id and first.csrf != second.csrf
    third = await sessions.create(ALICE)
    assert await sessions.get(second.id) is None
    assert await sessions.get(first.id) is not None and await sessions.get(third.id) is not None
    await sessions.end(third.id)
    assert await sessions.get(third.id) is None
    assert await sessions.get(None) is None and await sessions.get("") is None


async def test_only_a_hash_of_the_session_id_is_stored_and_notices_outlive_the_request(
    engine: AsyncEngine,
) -> None:
    sessions = store(engine, Clock())
    session = await sessions.create(ALICE)
    session.flash.append("Key k1 revoked.")
    await sessions.save(session)
    async with engine.connect() as db:
        [row] = (await db.execute(rows.select())).all()
    assert session.id not in str(tuple(row)) and session.csrf not in str(tuple(row))
    found = await sessions.get(session.id)
    assert found is not None and found.flash == ["Key k1 revoked."]
    found.flash.clear()
    await sessions.save(found)
    again = await sessions.get(session.id)
    assert again is not None and again.flash == []


async def test_csrf_tokens_compare_exactly(engine: AsyncEngine) -> None:
    session = await store(engine, Clock()).create(ALICE)
    assert session.csrf_ok(session.csrf)
    assert not session.csrf_ok(None) and not session.csrf_ok("") and not session.csrf_ok(session.csrf + "x")


async def test_replicas_on_one_postgresql_database_share_sessions(postgres_url: str) -> None:
    await asyncio.to_thread(schema.upgrade, postgres_url)
    one, two = create_engine(postgres_url), create_engine(postgres_url)
    try:
        clock = Clock()
        a, b = store(one, clock), store(two, clock)
        session = await a.create(ALICE)
        found = await b.get(session.id)
        assert found is not None and found.principal == ALICE
        await b.end(session.id)
        assert await a.get(session.id) is None
    finally:
        await one.dispose()
        await two.dispose()


LOGOUT_CSRF = re.compile(r'action="/console/logout">\s*<input type="hidden" name="csrf" value="([^"]+)"')


def test_a_session_opened_on_one_replica_works_on_another_and_logging_out_there_ends_it(
    arbiter_factory: ArbiterFactory,
) -> None:
    first, second = arbiter_factory(), arbiter_factory()  # the same database
    resp = log_in(first, ADMIN_TOKEN)
    assert resp.status_code == 303, resp.text
    cookie = set_cookies(resp)["arbiter_console"].split(";", 1)[0]
    with httpx.Client(timeout=30, headers={"cookie": cookie}) as http:
        page = http.get(f"{second.base_url}/console/keys")
        assert page.status_code == 200, page.text
        match = LOGOUT_CSRF.search(page.text)
        assert match is not None
        out = http.post(f"{second.base_url}/console/logout", data={"csrf": match.group(1)})
        assert out.status_code == 303 and out.headers["location"] == "/console/login"
        after = http.get(f"{first.base_url}/console/keys")
    assert after.status_code == 303 and after.headers["location"] == "/console/login"


def test_secure_cookies_always_marks_them_secure_even_on_loopback(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory(console={"secure_cookies": "always"})
    resp = log_in(server, ADMIN_TOKEN)
    assert resp.status_code == 303, resp.text
    assert is_secure(set_cookies(resp)["arbiter_console"])
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        assert is_secure(set_cookies(http.get("/console/login"))["arbiter_console_login"])
