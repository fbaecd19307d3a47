"""Logins through an identity provider under way, kept server-side: the browser holds only a random id.

What the callback must match (state, nonce, PKCE verifier) never leaves the server, so a browser cannot
be handed a login someone else made up (login CSRF: a made-up state and verifier for a code the attacker
got for their own account), and the verifier is not exposed with the cookie. Rows of ``console_logins``
(migration 0010) are keyed by the SHA-256 of the id, like sessions, so any replica finishes a login another
started; a login is taken once, and is gone after ``PENDING_MAX_AGE_S``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.console.oidc_client import PENDING_MAX_AGE_S, Pending

# Logins started and not finished: beyond this many the oldest go (an unauthenticated client can start
# logins, so the table must not grow with its request rate).
MAX_PENDING = 10_000

metadata = sa.MetaData()

rows = sa.Table(
    "console_logins",
    metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),
    sa.Column("provider", sa.Integer, nullable=False),
    sa.Column("state", sa.String(200), nullable=False),
    sa.Column("nonce", sa.String(200), nullable=False),
    sa.Column("verifier", sa.String(200), nullable=False),
    sa.Column("started_s", sa.Float, nullable=False),
)


def _hash(login_id: str) -> str:
    return hashlib.sha256(login_id.encode()).hexdigest()


class PendingLogins:
    def __init__(
        self, engine: AsyncEngine, clock: Callable[[], float] = time.time, max_pending: int = MAX_PENDING
    ) -> None:
        self._engine = engine
        self._clock = clock
        self._max = max_pending

    async def put(self, pending: Pending) -> str:
        """Keep ``pending``; the id for the browser's cookie."""
        login_id = secrets.token_urlsafe(32)
        async with self._engine.begin() as db:
            await db.execute(rows.delete().where(rows.c.started_s < self._clock() - PENDING_MAX_AGE_S))
            count: int = (await db.execute(sa.select(sa.func.count()).select_from(rows))).scalar_one()
            if count >= self._max:
                oldest = sa.select(rows.c.id_hash).order_by(rows.c.started_s).limit(count - self._max + 1)
                await db.execute(rows.delete().where(rows.c.id_hash.in_(oldest.scalar_subquery())))
            await db.execute(
                rows.insert().values(
                    id_hash=_hash(login_id),
                    provider=pending.provider,
                    state=pending.state,
                    nonce=pending.nonce,
                    verifier=pending.verifier,
                    started_s=pending.started,
                )
            )
        return login_id

    async def take(self, login_id: str | None, state: str) -> Pending | None:
        """The login this id stands for. When the answer's ``state`` is its own it is removed, so a second
        callback (a replay, or a race between replicas) finds nothing; a wrong state leaves it (the caller
        refuses that answer, and the browser's own may still come)."""
        if not login_id or len(login_id) > 100:
            return None
        key = _hash(login_id)
        async with self._engine.begin() as db:
            row = (await db.execute(sa.select(rows).where(rows.c.id_hash == key))).first()
            if row is None:
                return None
            if hmac.compare_digest(state.encode(), str(row.state).encode()):
                gone = await db.execute(rows.delete().where(rows.c.id_hash == key))
                if gone.rowcount != 1:  # another request took it first
                    return None
        return Pending(row.provider, row.state, row.nonce, row.verifier, row.started_s)
