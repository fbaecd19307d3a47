"""Limits in the database: versioned rules, budgets and tool costs; usage and in-process spend counters.

Every change to rules, budgets or costs bumps ``limit_state.version`` in the same transaction, so a
replica that sees a version sees the rows written with it (the same scheme as policies). Usage and
spend are written as deltas (``INSERT … ON CONFLICT DO UPDATE SET x = x + excluded.x``), so any
number of replicas can add to the same row. A flush may hold many thousands of rows: they are written
in statements of at most ``UPSERT_CHUNK_ROWS`` rows (asyncpg takes at most 32,767 parameters per
statement, SQLite 32,766), all in one transaction, so a flush is written whole or not at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from arbiter.errors import Conflict, NotFound
from arbiter.limits.rules import (
    Budget,
    BudgetPeriod,
    Dimension,
    LimitConfig,
    Match,
    RatePeriod,
    RateRule,
    ToolCost,
    ToolSettings,
)
from arbiter.limits.tables import (
    BudgetRow,
    LimitRuleRow,
    LimitStateRow,
    SpendRow,
    ToolCostRow,
)
from arbiter.store.models import utcnow

Row = TypeVar("Row", LimitRuleRow, BudgetRow, ToolCostRow)
USAGE_KEYS = ("hour", "principal", "tenant", "upstream", "tool")
GROUPS = ("principal", "tenant", "upstream", "tool")
_USAGE = SQLModel.metadata.tables["limit_usage"]
_SPEND = SQLModel.metadata.tables["limit_spend"]
UPSERT_CHUNK_ROWS = 1000  # 8 parameters a usage row: 8,000 a statement, far below either driver's limit
_ERROR_CHARS = 300


def db_error_message(exc: BaseException) -> str:
    """What went wrong writing or reading, for a log line: the error's class and the driver's own
    message, truncated. Never SQLAlchemy's rendering, which carries the SQL text and every parameter
    (caller names; for a large flush, hundreds of kilobytes)."""
    if isinstance(exc, DBAPIError):
        detail = str(exc.orig)
    elif isinstance(exc, SQLAlchemyError):
        detail = ""  # not from the driver: its text may embed the statement too
    else:
        detail = str(exc)
    detail = " ".join(detail.split())
    if len(detail) > _ERROR_CHARS:
        detail = detail[: _ERROR_CHARS - 1] + "…"
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def per_of(text: str) -> tuple[Dimension, ...]:
    return tuple(cast(Dimension, p) for p in text.split(",") if p)


def _match(row: LimitRuleRow | BudgetRow) -> Match:
    return Match(row.subject, row.role, row.tenant, row.upstream, row.tool)


def rule_of(row: LimitRuleRow) -> RateRule:
    assert row.id is not None
    period = cast(RatePeriod, row.period)
    return RateRule(row.id, _match(row), per_of(row.per), row.limit, period, row.burst, row.description)


def budget_of(row: BudgetRow) -> Budget:
    assert row.id is not None
    period = cast(BudgetPeriod, row.period)
    return Budget(row.id, _match(row), per_of(row.per), period, row.limit, row.description)


def cost_of(row: ToolCostRow) -> ToolCost:
    assert row.id is not None
    return ToolCost(row.id, row.tool, row.cost, row.loop_max_repeats, row.loop_window_s)


@dataclass(frozen=True)
class UsageDelta:
    hour: int
    principal: str
    tenant: str
    upstream: str
    tool: str
    calls: int
    limited: int
    cost_micros: int


class LimitStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def version(self) -> int:
        async with self._sessions() as session:
            state = await session.get(LimitStateRow, 1)
            return state.version if state else 0

    async def load(self, defaults: ToolSettings) -> LimitConfig:
        async with self._sessions() as session:
            state = await session.get(LimitStateRow, 1)
            rules = (await session.exec(select(LimitRuleRow).order_by(col(LimitRuleRow.id)))).all()
            budgets = (await session.exec(select(BudgetRow).order_by(col(BudgetRow.id)))).all()
            costs = (await session.exec(select(ToolCostRow).order_by(col(ToolCostRow.id)))).all()
        return LimitConfig(
            version=state.version if state else 0,
            rules=tuple(rule_of(r) for r in rules),
            budgets=tuple(budget_of(b) for b in budgets),
            costs=tuple(cost_of(c) for c in costs),
            defaults=defaults,
        )

    # --- rules, budgets, costs: each change bumps the version ---------------------------------------

    async def list(self, model: type[Row]) -> tuple[int, list[Row]]:
        async with self._sessions() as session:
            state = await session.get(LimitStateRow, 1)
            rows = (await session.exec(select(model).order_by(col(model.id)))).all()
        return (state.version if state else 0), list(rows)

    async def get(self, model: type[Row], row_id: int) -> Row:
        async with self._sessions() as session:
            row = await session.get(model, row_id)
        if row is None:
            raise NotFound(f"no {_noun(model)} with id {row_id}")
        return row

    async def create(self, row: Row, actor: str) -> tuple[int, Row]:
        row.updated_at, row.updated_by = utcnow(), actor[:200]
        try:
            async with self._sessions() as session, session.begin():
                session.add(row)
                version = await _bump(session, actor)
        except IntegrityError:
            raise Conflict(f"a {_noun(type(row))} for {getattr(row, 'tool', '')!r} exists already") from None
        return version, row

    async def replace(
        self, model: type[Row], row_id: int, values: Mapping[str, Any], actor: str
    ) -> tuple[int, Row, Row]:
        """Overwrite a row's fields; returns the new version, the row before and the row after."""
        try:
            async with self._sessions() as session, session.begin():
                row = await session.get(model, row_id, with_for_update=True)
                if row is None:
                    raise NotFound(f"no {_noun(model)} with id {row_id}")
                before = model.model_validate(row.model_dump())
                for key, value in values.items():
                    setattr(row, key, value)
                row.updated_at, row.updated_by = utcnow(), actor[:200]
                version = await _bump(session, actor)
        except IntegrityError:
            raise Conflict(f"a {_noun(model)} for {values.get('tool')!r} exists already") from None
        return version, before, row

    async def delete(self, model: type[Row], row_id: int, actor: str) -> tuple[int, Row]:
        async with self._sessions() as session, session.begin():
            row = await session.get(model, row_id)
            if row is None:
                raise NotFound(f"no {_noun(model)} with id {row_id}")
            await session.delete(row)
            version = await _bump(session, actor)
        return version, row

    # --- usage -------------------------------------------------------------------------------------

    async def add_usage(self, deltas: Sequence[UsageDelta]) -> None:
        if not deltas:
            return
        rows = [
            {
                "hour": d.hour,
                "principal": _text(d.principal, 300),
                "tenant": _text(d.tenant, 200),
                "upstream": _text(d.upstream, 64),
                "tool": _text(d.tool, 1024),
                "calls": d.calls,
                "limited": d.limited,
                "cost_micros": d.cost_micros,
            }
            for d in deltas
        ]
        async with self._sessions() as session, session.begin():
            await _upsert_add(session, _USAGE, rows, USAGE_KEYS, ("calls", "limited", "cost_micros"))

    async def usage(
        self,
        hours: tuple[int, int],
        group_by: Sequence[str],
        filters: Mapping[str, str],
        limit: int,
    ) -> list[dict[str, Any]]:
        """Summed calls/limited/cost per group for ``hours`` [start, end), largest cost first."""
        table = _USAGE
        groups = [table.c[g] for g in group_by]
        cost = sa.func.sum(table.c.cost_micros).label("cost_micros")
        query = (
            sa.select(
                *groups,
                sa.func.sum(table.c.calls).label("calls"),
                sa.func.sum(table.c.limited).label("limited"),
                cost,
            )
            .where(table.c.hour >= hours[0], table.c.hour < hours[1])
            .order_by(cost.desc(), *groups)
            .limit(limit)
        )
        for name, value in filters.items():
            query = query.where(table.c[name] == value)
        if groups:
            query = query.group_by(*groups)
        async with self._sessions() as session:
            result = await session.connection()
            rows = (await result.execute(query)).mappings().all()
        return [dict(r) for r in rows]

    # --- spend of the in-process backend (survives a restart) ---------------------------------------

    async def add_spend(self, deltas: Mapping[str, int], expiry: Mapping[str, float]) -> None:
        if not deltas:
            return
        rows: list[dict[str, Any]] = []
        for key, micros in deltas.items():
            counter, _, period = key.rpartition(":")
            rows.append(
                {
                    "counter": counter[:200],
                    "period": period,
                    "spent_micros": micros,
                    "expires_at": int(expiry.get(key, 0.0)),
                }
            )
        async with self._sessions() as session, session.begin():
            await _upsert_add(session, _SPEND, rows, ("counter", "period"), ("spent_micros",))

    async def load_spend(self, now: float) -> list[tuple[str, int, float]]:
        async with self._sessions() as session, session.begin():
            await session.exec(sa.delete(SpendRow).where(col(SpendRow.expires_at) <= int(now)))  # type: ignore[call-overload]
            rows = (await session.exec(select(SpendRow))).all()
        return [(f"{r.counter}:{r.period}", r.spent_micros, float(r.expires_at)) for r in rows]


def _text(value: str, length: int) -> str:
    # PostgreSQL text cannot hold NUL: one such name (a token's subject, an upstream's tool) would make
    # every later flush fail with it.
    return value.replace("\x00", "")[:length]


async def _upsert_add(
    session: AsyncSession,
    table: sa.Table,
    rows: list[dict[str, Any]],
    keys: Sequence[str],
    sums: Sequence[str],
) -> None:
    # Rows whose keys became equal when truncated are summed first: one statement must not touch a row
    # twice (PostgreSQL refuses that, and the flush would fail again every time).
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        key = tuple(row[k] for k in keys)
        found = merged.get(key)
        if found is None:
            merged[key] = dict(row)
        else:
            for name in sums:
                found[name] += row[name]
    rows = list(merged.values())
    conn = await session.connection()
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    for start in range(0, len(rows), UPSERT_CHUNK_ROWS):
        stmt = dialect.insert(table).values(rows[start : start + UPSERT_CHUNK_ROWS])
        stmt = stmt.on_conflict_do_update(
            index_elements=list(keys),
            set_={name: table.c[name] + getattr(stmt.excluded, name) for name in sums},
        )
        await conn.execute(stmt)


async def _bump(session: AsyncSession, actor: str) -> int:
    await session.exec(  # type: ignore[call-overload]
        sa.update(LimitStateRow)
        .where(col(LimitStateRow.id) == 1)
        .values(version=LimitStateRow.version + 1, updated_at=utcnow(), updated_by=actor[:200])
    )
    state = await session.get(LimitStateRow, 1, populate_existing=True)
    if state is None:
        raise NotFound("limit_state is missing its row; run `arbiter migrate`")
    return state.version


_NOUNS: dict[type[SQLModel], str] = {
    LimitRuleRow: "rate limit rule",
    BudgetRow: "budget",
    ToolCostRow: "tool cost entry",
}


def _noun(model: type[SQLModel]) -> str:
    return _NOUNS.get(model, "row")
