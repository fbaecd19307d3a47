"""The console's session store: idle expiry, the session cap, CSRF comparison."""

from __future__ import annotations

from arbiter.auth.principal import Principal
from arbiter.console.sessions import SessionStore

ALICE = Principal(subject="alice", issuer="arbiter", auth_method="api_key")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_expires_after_idle_time_and_use_keeps_it_alive() -> None:
    clock = Clock()
    store = SessionStore(idle_timeout_s=60, max_sessions=10, clock=clock)
    session = store.create(ALICE)
    clock.now += 59
    assert store.get(session.id) is session  # used: the idle timer starts again
    clock.now += 59
    assert store.get(session.id) is session
    clock.now += 61
    assert store.get(session.id) is None
    assert store.get(session.id) is None  # gone for good, not revived by the clock


def test_sessions_are_capped_oldest_first_and_ended_on_logout() -> None:
    store = SessionStore(idle_timeout_s=60, max_sessions=2, clock=Clock())
    first, second = store.create(ALICE), store.create(ALICE)
    assert first.id != second.id and first.csrf != second.csrf
    third = store.create(ALICE)
    assert store.get(first.id) is None and store.get(second.id) is second and store.get(third.id) is third
    store.end(third.id)
    assert store.get(third.id) is None
    assert store.get(None) is None and store.get("") is None


def test_csrf_tokens_compare_exactly() -> None:
    session = SessionStore(60, 2, Clock()).create(ALICE)
    assert session.csrf_ok(session.csrf)
    assert not session.csrf_ok(None) and not session.csrf_ok("") and not session.csrf_ok(session.csrf + "x")
