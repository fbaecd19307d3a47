"""SQLModel tables of the limits package: rules, budgets, tool costs, their version, and usage."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from arbiter.store.models import utcnow


def _glob(length: int = 300) -> sa.Column[str]:
    return sa.Column(sa.String(length), nullable=False, server_default="*")


class LimitRuleRow(SQLModel, table=True):
    """A token-bucket rate limit: who and what it matches, and how many calls per period."""

    __tablename__ = "limit_rules"  # pyright: ignore[reportAssignmentType]

    id: int | None = Field(default=None, primary_key=True)
    subject: str = Field(default="*", sa_column=_glob())
    role: str = Field(default="*", sa_column=_glob())
    tenant: str = Field(default="*", sa_column=_glob())
    upstream: str = Field(default="*", sa_column=_glob(64))
    tool: str = Field(default="*", sa_column=_glob(1024))
    # Comma-separated dimensions that get a bucket each (principal, tenant, upstream, tool); "" = one.
    per: str = Field(default="principal", sa_column=sa.Column(sa.String(64), nullable=False))
    limit: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    period: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    burst: int | None = Field(default=None, sa_column=sa.Column(sa.Integer, nullable=True))
    description: str = Field(default="", sa_column=sa.Column(sa.String(500), nullable=False))
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )
    updated_by: str = Field(default="", sa_column=sa.Column(sa.String(200), nullable=False))


class BudgetRow(SQLModel, table=True):
    """A cost budget: who and what it matches, whose spending counts together, per which period."""

    __tablename__ = "limit_budgets"  # pyright: ignore[reportAssignmentType]

    id: int | None = Field(default=None, primary_key=True)
    subject: str = Field(default="*", sa_column=_glob())
    role: str = Field(default="*", sa_column=_glob())
    tenant: str = Field(default="*", sa_column=_glob())
    upstream: str = Field(default="*", sa_column=_glob(64))
    tool: str = Field(default="*", sa_column=_glob(1024))
    per: str = Field(default="principal", sa_column=sa.Column(sa.String(64), nullable=False))
    period: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    limit: float = Field(sa_column=sa.Column(sa.Float, nullable=False))
    description: str = Field(default="", sa_column=sa.Column(sa.String(500), nullable=False))
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )
    updated_by: str = Field(default="", sa_column=sa.Column(sa.String(200), nullable=False))


class ToolCostRow(SQLModel, table=True):
    """Cost and loop-breaker settings for the tools a ``<upstream>/<tool>`` pattern names."""

    __tablename__ = "limit_tool_costs"  # pyright: ignore[reportAssignmentType]

    id: int | None = Field(default=None, primary_key=True)
    tool: str = Field(sa_column=sa.Column(sa.String(1100), nullable=False, unique=True))
    cost: float | None = Field(default=None, sa_column=sa.Column(sa.Float, nullable=True))
    loop_max_repeats: int | None = Field(default=None, sa_column=sa.Column(sa.Integer, nullable=True))
    loop_window_s: float | None = Field(default=None, sa_column=sa.Column(sa.Float, nullable=True))
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )
    updated_by: str = Field(default="", sa_column=sa.Column(sa.String(200), nullable=False))


class LimitStateRow(SQLModel, table=True):
    """The version of rules + budgets + costs: one row, bumped in the same transaction as every change."""

    __tablename__ = "limit_state"  # pyright: ignore[reportAssignmentType]

    id: int = Field(default=1, sa_column=sa.Column(sa.Integer, primary_key=True, autoincrement=False))
    version: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False))
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )
    updated_by: str = Field(default="", sa_column=sa.Column(sa.String(200), nullable=False))


class UsageRow(SQLModel, table=True):
    """Calls and cost of one caller on one tool in one UTC hour, summed over all replicas."""

    __tablename__ = "limit_usage"  # pyright: ignore[reportAssignmentType]
    __table_args__ = (
        sa.UniqueConstraint("hour", "principal", "tenant", "upstream", "tool", name="uq_limit_usage"),
    )

    id: int | None = Field(default=None, primary_key=True)
    hour: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False, index=True))  # epoch s // 3600
    principal: str = Field(sa_column=sa.Column(sa.String(300), nullable=False))
    tenant: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    upstream: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    tool: str = Field(sa_column=sa.Column(sa.String(1024), nullable=False))
    calls: int = Field(default=0, sa_column=sa.Column(sa.BigInteger, nullable=False))
    limited: int = Field(default=0, sa_column=sa.Column(sa.BigInteger, nullable=False))
    cost_micros: int = Field(default=0, sa_column=sa.Column(sa.BigInteger, nullable=False))


class SpendRow(SQLModel, table=True):
    """What the in-process backend has charged to one budget counter in one period.

    Only the in-process backend writes it (Redis keeps its own counters), so a single replica's monthly
    budget survives a restart.
    """

    __tablename__ = "limit_spend"  # pyright: ignore[reportAssignmentType]
    __table_args__ = (sa.UniqueConstraint("counter", "period", name="uq_limit_spend"),)

    id: int | None = Field(default=None, primary_key=True)
    counter: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    period: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    spent_micros: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    expires_at: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False, index=True))  # epoch s
