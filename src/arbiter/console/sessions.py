"""Console sessions: a random id in a cookie; who it stands for, and its times, in the database.

The credential a person logged in with is checked once and not kept: the session holds the
``Principal`` it resolved to (an API key's principal is re-checked against the key on every request,
so a revoked key ends its sessions; a session opened with the admin token keeps a keyed hash of it, so
rotating or removing the token ends it). Sessions are rows of ``console_sessions`` (migration 0009), so
every replica serves them and a restart keeps them. A row is keyed by the SHA-256 of the id, never the
id: a copy of the table opens no session. The CSRF token is derived from the id, so it is not stored either.

A session ends when unused for ``idle_timeout_s``, ``max_lifetime_s`` after login whatever its use, at
the ``exp`` of the ID token it was opened with (OpenID Connect), and on logout. Expired rows are deleted
at the next login, and the least recently used go beyond ``max_sessions``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from arbiter.auth.principal import AuthMethod, Principal

metadata = sa.MetaData()

rows = sa.Table(
    "console_sessions",
    metadata,
    sa.Column("id_hash", sa.String(64), primary_key=True),
    sa.Column("principal", sa.JSON, nullable=False),
    sa.Column("created_s", sa.Float, nullable=False),
    sa.Column("last_seen_s", sa.Float, nullable=False),
    sa.Column("expires_s", sa.Float, nullable=False),
    sa.Column("flash", sa.JSON, nullable=True),
)


@dataclass
class Session:
    id: str
    principal: Principal
    csrf: str
    last_seen: float
    expires_at: float  # absolute: the maximum lifetime, or the ID token's exp when sooner
    flash: list[str] = field(default_factory=list[str])  # one-time notices for the next page
    stored_flash: list[str] = field(default_factory=list[str])  # as in the database: saved when it differs
    ended: bool = False  # its key was revoked: deleted once the request is answered
    credential: str | None = None  # the admin token's fingerprint, for a break-glass session

    def csrf_ok(self, presented: str | None) -> bool:
        return presented is not None and hmac.compare_digest(presented.encode(), self.csrf.encode())


def _hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def _csrf(session_id: str) -> str:
    return hmac.new(session_id.encode(), b"arbiter console csrf", hashlib.sha256).hexdigest()


def credential_fingerprint(secret: str) -> str:
    """What a session keeps of the admin token it was opened with: a keyed hash, useless without it."""
    return hmac.new(secret.encode(), b"arbiter console session credential", hashlib.sha256).hexdigest()


def principal_json(p: Principal) -> dict[str, Any]:
    return {
        "subject": p.subject,
        "issuer": p.issuer,
        "auth_method": p.auth_method,
        "tenant": p.tenant,
        "roles": sorted(p.roles),
        "scopes": sorted(p.scopes),
        "client_id": p.client_id,
        "api_key_id": p.api_key_id,
    }


def principal_from(data: dict[str, Any]) -> Principal:
    return Principal(
        subject=str(data["subject"]),
        issuer=str(data["issuer"]),
        auth_method=cast(AuthMethod, data["auth_method"]),
        tenant=data.get("tenant"),
        roles=frozenset(cast(list[str], data.get("roles") or [])),
        scopes=frozenset(cast(list[str], data.get("scopes") or [])),
        client_id=data.get("client_id"),
        api_key_id=data.get("api_key_id"),
    )


class SessionStore:
    """Sessions in the database, shared by the replicas."""

    def __init__(
        self,
        engine: AsyncEngine,
        idle_timeout_s: float,
        max_lifetime_s: float,
        max_sessions: int,
        clock: Callable[[], float] = time.time,  # wall clock: replicas compare each other's times
    ) -> None:
        self._engine = engine
        self._idle = idle_timeout_s
        self._lifetime = max_lifetime_s
        self._max = max_sessions
        self._clock = clock
        # A page view does not write when the last recorded use is this recent: idle expiry may come up
        # to this much early, a tenth of the idle time at most.
        self._touch_every = min(60.0, idle_timeout_s / 10)

    async def create(
        self, principal: Principal, not_after: float | None = None, credential: str | None = None
    ) -> Session:
        """A new session; ``not_after`` (an ID token's exp) ends it sooner than the maximum lifetime,
        ``credential`` (``credential_fingerprint``) is what it is checked against on each request."""
        now = self._clock()
        expires = now + self._lifetime if not_after is None else min(now + self._lifetime, not_after)
        session_id = secrets.token_urlsafe(32)
        async with self._engine.begin() as db:
            await self._purge(db, now)
            await db.execute(
                rows.insert().values(
                    id_hash=_hash(session_id),
                    principal={**principal_json(principal), "credential": credential},
                    created_s=now,
                    last_seen_s=now,
                    expires_s=expires,
                    flash=None,
                )
            )
        return Session(session_id, principal, _csrf(session_id), now, expires, credential=credential)

    async def get(self, session_id: str | None) -> Session | None:
        """The live session with this id (its idle timer restarted), or None."""
        if not session_id or len(session_id) > 100:
            return None
        key, now = _hash(session_id), self._clock()
        async with self._engine.connect() as db:
            row = (await db.execute(sa.select(rows).where(rows.c.id_hash == key))).first()
        if row is None:
            return None
        if now >= row.expires_s or now - row.last_seen_s > self._idle:
            await self.end(session_id)
            return None
        if now - row.last_seen_s >= self._touch_every:
            async with self._engine.begin() as db:
                await db.execute(rows.update().where(rows.c.id_hash == key).values(last_seen_s=now))
        flash = list(cast(list[str], row.flash or []))
        data = cast(dict[str, Any], row.principal)
        credential = data.get("credential")
        return Session(
            session_id,
            principal_from(data),
            _csrf(session_id),
            now,
            row.expires_s,
            flash,
            list(flash),
            credential=credential if isinstance(credential, str) else None,
        )

    async def save(self, session: Session) -> None:
        """Record what a request changed: the notices for the next page, or the end of the session."""
        if session.ended:
            await self.end(session.id)
        elif session.flash != session.stored_flash:
            async with self._engine.begin() as db:
                await db.execute(
                    rows.update()
                    .where(rows.c.id_hash == _hash(session.id))
                    .values(flash=list(session.flash) or None)
                )
            session.stored_flash = list(session.flash)

    async def end(self, session_id: str) -> None:
        async with self._engine.begin() as db:
            await db.execute(rows.delete().where(rows.c.id_hash == _hash(session_id)))

    async def _purge(self, db: AsyncConnection, now: float) -> None:
        """Delete expired sessions, then the least recently used beyond room for one more."""
        await db.execute(
            rows.delete().where(sa.or_(rows.c.expires_s <= now, rows.c.last_seen_s < now - self._idle))
        )
        count: int = (await db.execute(sa.select(sa.func.count()).select_from(rows))).scalar_one()
        if count >= self._max:
            oldest = sa.select(rows.c.id_hash).order_by(rows.c.last_seen_s).limit(count - self._max + 1)
            await db.execute(rows.delete().where(rows.c.id_hash.in_(oldest.scalar_subquery())))
