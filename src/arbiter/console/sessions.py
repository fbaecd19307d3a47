"""Console sessions: a random id in a cookie, the authenticated principal and a CSRF token in memory.

The credential a person logged in with is checked once and not kept: the session holds the
``Principal`` it resolved to (an API key's principal is re-checked against the key on every request,
so a revoked key ends its sessions). Sessions live in this process only: a restart logs everybody out,
and behind several replicas the load balancer must keep a person on one replica (docs/console.md).
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from arbiter.auth.principal import Principal


@dataclass
class Session:
    id: str
    principal: Principal
    csrf: str
    last_seen: float
    flash: list[str] = field(default_factory=list[str])  # one-time notices for the next page

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf.encode())


class SessionStore:
    """Sessions by id, least recently used first: idle ones expire, the oldest go beyond ``max_sessions``."""

    def __init__(
        self, idle_timeout_s: float, max_sessions: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._idle = idle_timeout_s
        self._max = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def create(self, principal: Principal) -> Session:
        self._expire()
        while len(self._sessions) >= self._max:
            self._sessions.popitem(last=False)
        session = Session(secrets.token_urlsafe(32), principal, secrets.token_urlsafe(32), self._clock())
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id (its idle timer restarted), or None."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        if now - session.last_seen > self._idle:
            del self._sessions[session_id]
            return None
        session.last_seen = now
        self._sessions.move_to_end(session_id)
        return session

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def _expire(self) -> None:
        now = self._clock()
        while self._sessions:
            oldest = next(iter(self._sessions.values()))
            if now - oldest.last_seen <= self._idle:
                return
            del self._sessions[oldest.id]
