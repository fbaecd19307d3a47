"""The audit tables (created by migration 0005), as SQLAlchemy Core tables: the writer inserts in bulk
and queries stream rows, so no ORM objects are built. Also the statements every chain write starts with
(lock and read the head) and those of an append, whatever the driver."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Generator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

import aiosqlite
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, IntegrityError, NoResultFound
from sqlalchemy.ext.asyncio import AsyncConnection

from arbiter.audit.record import ROW_COLUMNS, Row

metadata = sa.MetaData()

events = sa.Table(
    "audit_events",
    metadata,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("id", sa.String(36), nullable=False, unique=True),
    sa.Column("ts_ms", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("subject", sa.String(300)),
    sa.Column("tenant", sa.String(200)),
    sa.Column("method", sa.String(64)),
    sa.Column("tool", sa.String(1100)),
    sa.Column("upstream", sa.String(64)),
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Column("trace_id", sa.String(32)),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
)

chain = sa.Table(
    "audit_chain",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("anchor_seq", sa.BigInteger, nullable=False),
    sa.Column("anchor_hash", sa.String(64), nullable=False),
    sa.Column("checkpoint_seq", sa.BigInteger, nullable=False),
    sa.Column("checkpoint_ms", sa.BigInteger, nullable=False),
)

checkpoints = sa.Table(
    "audit_checkpoints",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("ts_ms", sa.BigInteger, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("key_id", sa.String(64), nullable=False),
    sa.Column("signature", sa.String(200), nullable=False),
)


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str
    anchor_seq: int
    anchor_hash: str
    checkpoint_seq: int
    checkpoint_ms: int


def head_of(row: Any) -> Head:
    return Head(row.seq, row.hash, row.anchor_seq, row.anchor_hash, row.checkpoint_seq, row.checkpoint_ms)


async def lock_head(conn: AsyncConnection) -> Head:
    # A no-op UPDATE takes the write lock on both SQLite and PostgreSQL before the head is read, so two
    # writers can never both extend the chain from the same head. With RETURNING it reads the head too.
    lock = sa.update(chain).where(chain.c.id == 1).values(seq=chain.c.seq)
    if conn.dialect.update_returning:
        return head_of((await conn.execute(lock.returning(*(chain.c[name] for name in _HEAD_COLUMNS)))).one())
    await conn.execute(lock)
    return head_of((await conn.execute(sa.select(chain).where(chain.c.id == 1))).one())


class Append:
    """The statements of one append, through SQLAlchemy (PostgreSQL): the rows go to the driver as the
    tuples they are, in one ``executemany`` of a prepared statement (asyncpg sends it in one round
    trip), without SQLAlchemy's processing of every row's parameters."""

    # Whether ``after()`` can store a batch sealed after a head the caller already knows in one trip
    # to the database (or its driver's thread), outside any transaction of SQLAlchemy's.
    one_trip: bool = False

    def __init__(self, conn: AsyncConnection, insert: tuple[str, bool]) -> None:
        self._conn = conn
        self._insert = insert

    async def lock_head(self) -> Head:
        return await lock_head(self._conn)

    async def insert(self, rows: list[Row]) -> None:
        sql, positional = self._insert
        if positional:
            await self._conn.exec_driver_sql(sql, rows)
        else:
            await self._conn.execute(
                sa.insert(events), [dict(zip(ROW_COLUMNS, r, strict=True)) for r in rows]
            )

    async def move_head(self, values: dict[str, int | str]) -> None:
        await self._conn.execute(sa.update(chain).where(chain.c.id == 1).values(**values))

    async def after(self, head: Head, rows: list[Row], seq: int, last: str) -> Head | None:
        """Store ``rows`` (sealed after ``head``) and move the head to ``(seq, last)`` if the head is
        still ``head``; the new head, or None when another writer moved it first (nothing stored)."""
        raise NotImplementedError


class _PgAppend(Append):
    """On asyncpg a whole append is one statement sent straight to the driver, so one round trip: a
    batch sealed after the head this writer last saw moves the head only if it is still there (an
    UPDATE of the head row with that seq and hash in its WHERE), and the rows, sent as one array per
    column, are inserted only if it moved. Outside a transaction the statement is its own, so there is
    no BEGIN or COMMIT to wait for; it commits whole or not at all.

    Concurrency as with the locked path: the UPDATE waits for another writer's lock on the head row
    and then re-reads the row (READ COMMITTED), so if that writer moved the head this one updates
    nothing and inserts nothing, and the store takes the locked path from the new head."""

    one_trip = True

    def __init__(self, conn: AsyncConnection, driver: Any) -> None:
        super().__init__(conn, _insert_statement(conn.dialect))
        self._driver = driver

    async def after(self, head: Head, rows: list[Row], seq: int, last: str) -> Head | None:
        values = [list(column) for column in zip(*rows, strict=True)]
        try:
            found = await self._driver.fetchrow(_PG_APPEND, seq, last, head.seq, head.hash, *values)
        except Exception as exc:
            raise await self._translated(exc) from exc
        return None if found is None else Head(*found)

    async def _translated(self, exc: Exception) -> BaseException:
        """The driver's errors as SQLAlchemy's (what it raises for them on its own path), so the
        writer treats a failed write the same whichever way it was sent. Any failure other than the
        server refusing the statement leaves the connection unusable (closed by the server, or its
        protocol state broken): it is invalidated, and the store retries once on a fresh one."""
        import asyncpg  # pyright: ignore[reportMissingTypeStubs]

        if not (isinstance(exc, OSError) or type(exc).__module__.startswith("asyncpg")):
            return exc
        refused = isinstance(exc, asyncpg.PostgresError) and not self._driver.is_closed()
        if not refused:
            await self._conn.invalidate()
            return DBAPIError(_PG_APPEND, None, exc, hide_parameters=True, connection_invalidated=True)
        if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
            return IntegrityError(_PG_APPEND, None, exc, hide_parameters=True)
        return DBAPIError(_PG_APPEND, None, exc, hide_parameters=True)


class _SqliteAppend(Append):
    """On aiosqlite each statement run through SQLAlchemy is three or four hand-offs to the driver's
    thread (cursor, execute, fetch, close), each waking a thread and the event loop; the driver's own
    calls are one each. The transaction stays SQLAlchemy's: the sqlite3 module opens it implicitly at
    the first UPDATE, and leaving ``conn.begin()`` commits or rolls it back."""

    def __init__(self, conn: AsyncConnection, driver: aiosqlite.Connection) -> None:
        super().__init__(conn, (_SQLITE_INSERT, True))
        self._driver = driver

    async def lock_head(self) -> Head:
        with _sqlite_errors(_SQLITE_LOCK):
            rows = list(await self._driver.execute_fetchall(_SQLITE_LOCK))
        if len(rows) != 1:
            raise NoResultFound("the audit chain has no head row: run `arbiter migrate`")
        return Head(*rows[0])

    async def insert(self, rows: list[Row]) -> None:
        with _sqlite_errors(_SQLITE_INSERT):
            await self._driver.executemany(_SQLITE_INSERT, rows)

    one_trip = True

    async def after(self, head: Head, rows: list[Row], seq: int, last: str) -> Head | None:
        # The whole transaction in one hand-off to the driver's thread instead of five. aiosqlite's
        # _execute (run a function in its thread) is private: the version is pinned in pyproject.
        execute = self._driver._execute  # pyright: ignore[reportPrivateUsage, reportUnknownMemberType, reportUnknownVariableType]
        run = cast("Callable[..., Awaitable[Head | None]]", execute)
        with _sqlite_errors(_SQLITE_AFTER):
            return await run(_sqlite_after, self._driver._conn, head, rows, seq, last)  # pyright: ignore[reportPrivateUsage]

    async def move_head(self, values: dict[str, int | str]) -> None:
        # The keys are this module's own column names, never input.
        sql = f"UPDATE {chain.name} SET {', '.join(f'{k} = ?' for k in values)} WHERE id = 1"
        with _sqlite_errors(sql):
            await self._driver.execute(sql, tuple(values.values()))


_HEAD_COLUMNS = ("seq", "hash", "anchor_seq", "anchor_hash", "checkpoint_seq", "checkpoint_ms")
_SQLITE_LOCK = f"UPDATE {chain.name} SET seq = seq WHERE id = 1 RETURNING {', '.join(_HEAD_COLUMNS)}"
_SQLITE_INSERT = (
    f"INSERT INTO {events.name} ({', '.join(ROW_COLUMNS)}) VALUES ({', '.join('?' * len(ROW_COLUMNS))})"
)


_SQLITE_AFTER = (
    f"UPDATE {chain.name} SET seq = ?, hash = ? WHERE id = 1 AND seq = ? AND hash = ?"
    f" RETURNING {', '.join(_HEAD_COLUMNS)}"
)


def _sqlite_after(db: sqlite3.Connection, head: Head, rows: list[Row], seq: int, last: str) -> Head | None:
    """In aiosqlite's thread: move the head from ``head`` (the UPDATE takes the database's write
    lock, as the locked path's does), insert the rows if it moved, commit; roll back otherwise."""
    try:
        found = db.execute(_SQLITE_AFTER, (seq, last, head.seq, head.hash)).fetchall()
        if not found:
            db.rollback()
            return None
        db.executemany(_SQLITE_INSERT, rows)
        db.commit()
    except BaseException:
        db.rollback()
        raise
    return Head(*found[0])


def _pg_append() -> str:
    arrays = ", ".join(
        f"${i}::{'bigint' if isinstance(events.c[name].type, sa.BigInteger) else 'text'}[]"
        for i, name in enumerate(ROW_COLUMNS, start=5)
    )
    head = ", ".join(_HEAD_COLUMNS)
    return (
        f"WITH moved AS (UPDATE {chain.name} SET seq = $1, hash = $2 WHERE id = 1 AND seq = $3 AND hash = $4"
        f" RETURNING {head}), stored AS (INSERT INTO {events.name} ({', '.join(ROW_COLUMNS)})"
        f" SELECT * FROM unnest({arrays}) WHERE EXISTS (SELECT FROM moved)) SELECT {head} FROM moved"
    )


_PG_APPEND = _pg_append()


@lru_cache(maxsize=4)  # one per engine's dialect, compiled once
def _insert_statement(dialect: sa.Dialect) -> tuple[str, bool]:
    """The INSERT of one sealed row in the driver's own parameter style, and whether it takes the
    row's tuple as it is (a positional style with the columns in ``ROW_COLUMNS`` order)."""
    binds = {name: sa.bindparam(name, type_=events.c[name].type) for name in ROW_COLUMNS}
    compiled = sa.insert(events).values(binds).compile(dialect=dialect)
    order = compiled.positiontup
    return str(compiled), order is not None and tuple(order) == ROW_COLUMNS


@contextmanager
def _sqlite_errors(statement: str) -> Generator[None]:
    """The driver's errors as SQLAlchemy's (what SQLAlchemy itself raises for them), so the writer
    treats a failed write the same whichever way it was sent."""
    try:
        yield
    except sqlite3.Error as exc:
        raise DBAPIError.instance(statement, None, exc, sqlite3.Error, hide_parameters=True) from exc


async def appender(conn: AsyncConnection) -> Append:
    """The statements of an append on ``conn``, for its driver."""
    driver = (await conn.get_raw_connection()).driver_connection
    if (
        isinstance(driver, aiosqlite.Connection)
        and driver.isolation_level is not None  # the sqlite3 module opens the transaction
        and sqlite3.sqlite_version_info >= (3, 35)  # RETURNING
    ):
        return _SqliteAppend(conn, driver)
    if type(driver).__module__.startswith("asyncpg"):
        return _PgAppend(conn, driver)
    return Append(conn, _insert_statement(conn.dialect))
