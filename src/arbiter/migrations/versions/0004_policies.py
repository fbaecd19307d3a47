"""Casbin policy rules and the policy version.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "policy_rules",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("ptype", sa.String(8), nullable=False),
        sa.Column("v0", sa.String(300), nullable=False, server_default=""),
        sa.Column("v1", sa.String(300), nullable=False, server_default=""),
        sa.Column("v2", sa.String(1100), nullable=False, server_default=""),
        sa.Column("v3", sa.String(32), nullable=False, server_default=""),
        sa.Column("v4", sa.String(16), nullable=False, server_default=""),
        sa.Column("v5", sa.String(1000), nullable=False, server_default=""),
    )
    state = op.create_table(
        "policy_state",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=False),
    )
    # Version 0 is the empty policy, which denies everything.
    op.bulk_insert(state, [{"id": 1, "version": 0, "updated_at": datetime.now(UTC), "updated_by": ""}])


def downgrade() -> None:
    op.drop_table("policy_state")
    op.drop_table("policy_rules")
