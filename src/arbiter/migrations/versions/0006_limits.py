"""Rate limit rules, cost budgets, tool costs, their version, usage, and in-process budget spend.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-24
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _match_columns() -> list[sa.Column[str]]:
    return [
        sa.Column("subject", sa.String(300), nullable=False, server_default="*"),
        sa.Column("role", sa.String(300), nullable=False, server_default="*"),
        sa.Column("tenant", sa.String(300), nullable=False, server_default="*"),
        sa.Column("upstream", sa.String(64), nullable=False, server_default="*"),
        sa.Column("tool", sa.String(1024), nullable=False, server_default="*"),
    ]


def _stamp_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "limit_rules",
        sa.Column("id", sa.Integer, primary_key=True),
        *_match_columns(),
        sa.Column("per", sa.String(64), nullable=False),
        sa.Column("limit", sa.Integer, nullable=False),
        sa.Column("period", sa.String(16), nullable=False),
        sa.Column("burst", sa.Integer, nullable=True),
        sa.Column("description", sa.String(500), nullable=False),
        *_stamp_columns(),
    )
    op.create_table(
        "limit_budgets",
        sa.Column("id", sa.Integer, primary_key=True),
        *_match_columns(),
        sa.Column("per", sa.String(64), nullable=False),
        sa.Column("period", sa.String(16), nullable=False),
        sa.Column("limit", sa.Float, nullable=False),
        sa.Column("description", sa.String(500), nullable=False),
        *_stamp_columns(),
    )
    op.create_table(
        "limit_tool_costs",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("tool", sa.String(1100), nullable=False, unique=True),
        sa.Column("cost", sa.Float, nullable=True),
        sa.Column("loop_max_repeats", sa.Integer, nullable=True),
        sa.Column("loop_window_s", sa.Float, nullable=True),
        *_stamp_columns(),
    )
    state = op.create_table(
        "limit_state",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version", sa.Integer, nullable=False),
        *_stamp_columns(),
    )
    op.bulk_insert(state, [{"id": 1, "version": 0, "updated_at": datetime.now(UTC), "updated_by": ""}])
    op.create_table(
        "limit_usage",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("hour", sa.BigInteger, nullable=False, index=True),
        sa.Column("principal", sa.String(300), nullable=False),
        sa.Column("tenant", sa.String(200), nullable=False),
        sa.Column("upstream", sa.String(64), nullable=False),
        sa.Column("tool", sa.String(1024), nullable=False),
        sa.Column("calls", sa.BigInteger, nullable=False),
        sa.Column("limited", sa.BigInteger, nullable=False),
        sa.Column("cost_micros", sa.BigInteger, nullable=False),
        sa.UniqueConstraint("hour", "principal", "tenant", "upstream", "tool", name="uq_limit_usage"),
    )
    op.create_table(
        "limit_spend",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("counter", sa.String(200), nullable=False),
        sa.Column("period", sa.String(16), nullable=False),
        sa.Column("spent_micros", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=False, index=True),
        sa.UniqueConstraint("counter", "period", name="uq_limit_spend"),
    )


def downgrade() -> None:
    op.drop_table("limit_spend")
    op.drop_table("limit_usage")
    op.drop_table("limit_state")
    op.drop_table("limit_tool_costs")
    op.drop_table("limit_budgets")
    op.drop_table("limit_rules")
