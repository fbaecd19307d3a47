"""API keys: ``arb_<id>_<secret>``. The id finds the key, the secret proves it; only sha256(secret) is stored.

Verification never touches the database: active keys are cached in memory and the cache is reloaded
after every change here and on every maintenance pass (so a revocation on another replica lands within
``upstream.maintain_interval_s``; with Redis, at once: see key_feed.py). ``last_used_at`` is recorded in
memory and written in batches.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from arbiter.auth.principal import Principal
from arbiter.errors import InvalidToken, NotFound
from arbiter.store.models import ApiKey, utcnow

log = logging.getLogger(__name__)

PREFIX = "arb_"
ISSUER = "arbiter"


@dataclass(frozen=True)
class _Cached:
    secret_sha256: bytes
    principal: Principal
    expires_at: datetime | None


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> tuple[str, str, str]:
    """(key id, secret, full key to hand out once)."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{PREFIX}{key_id}_{secret}"


def parse(token: str) -> tuple[str, str] | None:
    if not token.startswith(PREFIX):
        return None
    key_id, sep, secret = token[len(PREFIX) :].partition("_")
    if not sep or len(key_id) != 16 or not secret:
        return None
    return key_id, secret


class ApiKeys:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], clock: type[datetime] = datetime) -> None:
        self._sessions = sessions
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self._used: dict[str, datetime] = {}
        self._lock = anyio.Lock()
        # Told after a key was created or revoked here, to tell the other replicas (key_feed.py).
        self.on_change: Callable[[], Awaitable[None]] | None = None

    def verify(self, token: str) -> Principal:
        """The principal of a valid, unexpired, unrevoked key; ``InvalidToken`` otherwise."""
        parsed = parse(token)
        if parsed is None:
            raise InvalidToken("malformed API key")
        key_id, secret = parsed
        cached = self._cache.get(key_id)
        # Hash and compare even for an unknown id, so timing does not tell which ids exist.
        presented = hashlib.sha256(secret.encode()).digest()
        expected = cached.secret_sha256 if cached else b"\0" * 32
        if not hmac.compare_digest(presented, expected) or cached is None:
            raise InvalidToken("unknown or revoked API key")
        now = self._clock.now(UTC)
        if cached.expires_at is not None and cached.expires_at <= now:
            raise InvalidToken("API key expired")
        self._used[key_id] = now
        return cached.principal

    def current(self, principal: Principal) -> Principal | None:
        """``principal`` as its API key now stands: None once the key is revoked or expired (revoked on
        another replica: after this one's next reload). Any other principal is returned as it is."""
        if principal.auth_method != "api_key" or principal.api_key_id is None:
            return principal
        cached = self._cache.get(principal.api_key_id)
        if cached is None or (cached.expires_at is not None and cached.expires_at <= self._clock.now(UTC)):
            return None
        return cached.principal

    async def reload(self) -> None:
        """Reload the active keys from the database (this process's cache of them)."""
        async with self._sessions() as db:
            rows = (await db.exec(select(ApiKey).where(col(ApiKey.revoked_at).is_(None)))).all()
        self._cache = {row.id: _cached(row) for row in rows}

    async def flush_usage(self) -> None:
        """Write the batched last-used times."""
        used, self._used = self._used, {}
        if not used:
            return
        async with self._sessions() as db:
            for key_id, when in used.items():
                await db.exec(  # pyright: ignore[reportCallIssue, reportArgumentType]
                    sa.update(ApiKey).where(col(ApiKey.id) == key_id).values(last_used_at=when)
                )
            await db.commit()

    async def create(
        self,
        *,
        owner: str,
        roles: list[str],
        created_by: str,
        tenant: str | None = None,
        description: str | None = None,
        expires_at: datetime | None = None,
    ) -> tuple[ApiKey, str]:
        """Store a new key; the returned secret is shown once and never again."""
        key_id, secret, full = new_key()
        row = ApiKey(
            id=key_id,
            secret_sha256=_sha256(secret),
            owner=owner,
            roles=sorted(set(roles)),
            tenant=tenant,
            description=description,
            expires_at=expires_at,
            created_by=created_by,
        )
        async with self._lock, self._sessions() as db:
            db.add(row)
            await db.commit()
            await db.refresh(row)
        await self.reload()
        if self.on_change is not None:
            await self.on_change()
        return row, full

    async def list(self) -> list[ApiKey]:
        async with self._sessions() as db:
            return list((await db.exec(select(ApiKey).order_by(col(ApiKey.created_at)))).all())

    async def get(self, key_id: str) -> ApiKey:
        async with self._sessions() as db:
            row = await db.get(ApiKey, key_id)
        if row is None:
            raise NotFound(f"no API key with id {key_id}")
        return row

    async def revoke(self, key_id: str) -> ApiKey:
        async with self._lock, self._sessions() as db:
            row = await db.get(ApiKey, key_id)
            if row is None:
                raise NotFound(f"no API key with id {key_id}")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
                await db.commit()
                await db.refresh(row)
        self._cache.pop(key_id, None)  # at once here; other replicas when told, or on their next reload
        if self.on_change is not None:
            await self.on_change()
        log.info("API key %s revoked", key_id)
        return row


def _cached(row: ApiKey) -> _Cached:
    principal = Principal(
        subject=row.owner,
        issuer=ISSUER,
        auth_method="api_key",
        tenant=row.tenant,
        roles=frozenset(row.roles),
        client_id=row.id,
        api_key_id=row.id,
    )
    expires = row.expires_at
    if expires is not None and expires.tzinfo is None:  # SQLite hands back naive datetimes
        expires = expires.replace(tzinfo=UTC)
    return _Cached(bytes.fromhex(row.secret_sha256), principal, expires)
