"""Resilience: per-upstream bulkhead and fallback, per-tool settings (idempotent, deadline).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("upstreams", sa.Column("max_concurrency", sa.Integer, nullable=True))
    op.add_column("upstreams", sa.Column("fallback", sa.String(32), nullable=True))
    op.create_table(
        "tool_settings",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("upstream", sa.String(32), nullable=False),
        sa.Column("tool", sa.String(1024), nullable=False),
        sa.Column("idempotent", sa.Boolean, nullable=False),
        sa.Column("timeout_s", sa.Float, nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(200), nullable=False),
        sa.UniqueConstraint("upstream", "tool", name="uq_tool_settings"),
    )


def downgrade() -> None:
    op.drop_table("tool_settings")
    # Not batch mode (see 0003): SQLite >= 3.35 drops a plain column in place.
    op.drop_column("upstreams", "fallback")
    op.drop_column("upstreams", "max_concurrency")
