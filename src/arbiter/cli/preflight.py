"""Start-up checks run before ``serve`` (and ``migrate``) do anything slow: each failure is one line
naming what is missing, raised as a ``StartupFailed`` subclass with an exit code of its own (exits.py).

Without them the same failures surface deep inside the lifespan as a long traceback that never names
the URL (and, for ``migrate``, Alembic's even longer one).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from arbiter.cli.config import mask_url
from arbiter.errors import (
    ConfigError,
    DatabaseUnreachable,
    JwksUnreachable,
    PortInUse,
    RedisUnreachable,
    SettingsInvalid,
)
from arbiter.settings import Settings

_CONNECT_TIMEOUT_S = 10.0


def check_port(host: str, port: int) -> None:
    """Bind ``host:port`` once and let go, the way uvicorn will bind it (SO_REUSEADDR)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"port {port} on {host} is already in use; stop what listens there or choose "
                    "another port (--port or ARBITER_PORT)"
                ) from None
            raise PortInUse(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _where(database_url: str) -> str:
    """'database D on host H' (or 'SQLite file F'), for messages; never the password."""
    try:
        url = make_url(database_url)
    except ArgumentError:
        return mask_url(database_url)
    if url.get_backend_name() == "sqlite":
        return f"SQLite file {url.database}"
    return f"database {url.database!r} on {url.host or 'localhost'}:{url.port or 5432} (user {url.username})"


def first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc.__cause__ or exc
    text = str(orig).strip() or type(orig).__name__
    return text.splitlines()[0][:300]


async def _connect(database_url: str, check_schema: bool) -> None:
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from arbiter.store.db import create_engine
    from arbiter.store.schema import require_head

    try:
        engine = create_engine(database_url)
    except (ConfigError, ArgumentError):
        raise SettingsInvalid(
            "ARBITER_DATABASE_URL must be a sqlite:/// or postgresql:// URL (drivers aiosqlite, asyncpg)"
        ) from None
    try:
        async with asyncio.timeout(_CONNECT_TIMEOUT_S):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        if check_schema:
            await require_head(engine)
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        detail = "no answer within 10s" if isinstance(exc, TimeoutError) else first_line(exc)
        if "does not exist" in detail:
            raise DatabaseUnreachable(f"the {_where(database_url)} does not exist: {detail}") from exc
        raise DatabaseUnreachable(f"cannot reach the {_where(database_url)}: {detail}") from exc
    finally:
        await engine.dispose()


def check_database(settings: Settings, *, check_schema: bool = True, create: bool = False) -> None:
    """The database answers (and, with ``check_schema``, is at this code's schema). A SQLite file that
    is not there is reported as missing rather than silently created, unless ``create`` (migrate)."""
    try:
        url = make_url(settings.database_url)
    except ArgumentError:
        raise SettingsInvalid("ARBITER_DATABASE_URL is not a database URL") from None
    path = url.database
    if (
        url.get_backend_name() == "sqlite"
        and path
        and path != ":memory:"
        and not create
        and not os.path.exists(path)
    ):
        raise DatabaseUnreachable(
            f"the SQLite file {path} does not exist; create it with `arbiter migrate` "
            "(or set ARBITER_DATABASE_URL)"
        )
    asyncio.run(_connect(settings.database_url, check_schema and settings.check_schema))


async def _ping_redis(url: str, timeout_s: float) -> None:
    from redis.asyncio import Redis

    client = Redis.from_url(  # pyright: ignore[reportUnknownMemberType]
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
    )
    try:
        await client.ping()  # pyright: ignore[reportUnknownMemberType]
    finally:
        await client.aclose()


def check_redis(settings: Settings) -> None:
    """Redis answers. With ``limits.on_redis_down: fallback`` Arbiter runs without it, so that is a
    warning; otherwise every limited call would be refused, so Arbiter does not start."""
    if not settings.redis_url:
        return
    from redis.exceptions import RedisError

    try:
        asyncio.run(_ping_redis(settings.redis_url, max(settings.limits.redis_timeout_s, 2.0)))
    except (RedisError, OSError, TimeoutError) as exc:
        where = mask_url(settings.redis_url)
        if settings.limits.on_redis_down == "fallback":
            print(
                f"warning: Redis at {where} does not answer ({first_line(exc)}); limits fall back "
                "to this replica until it does",
                file=sys.stderr,
            )
            return
        raise RedisUnreachable(
            f"cannot reach Redis at {where}: {first_line(exc)} (limits.on_redis_down is fail_closed; "
            "set it to fallback to start without Redis)"
        ) from None


async def _fetch_jwks(uris: list[str], timeout_s: float) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=timeout_s) as client:
        for uri in uris:
            try:
                resp = await client.get(uri)
                problem = None if resp.status_code == 200 else f"HTTP {resp.status_code}"
                if problem is None and not isinstance(resp.json().get("keys"), list):
                    problem = "the answer is not a JWKS (no 'keys' list)"
            except (httpx.HTTPError, ValueError, AttributeError) as exc:
                problem = first_line(exc) or type(exc).__name__
            if problem is not None:
                host = urlsplit(uri).netloc or uri
                raise JwksUnreachable(
                    f"cannot fetch the signing keys of issuer at {host} ({uri}): {problem}; tokens from "
                    "it could not be verified"
                )


def check_jwks(settings: Settings) -> None:
    uris = [i.jwks_uri for i in settings.auth.issuers]
    if uris:
        asyncio.run(_fetch_jwks(uris, settings.auth.jwks_timeout_s))
