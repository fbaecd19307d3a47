"""Upstream registry and discovered catalog.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "upstreams",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(32), nullable=False, unique=True),
        sa.Column("transport", sa.String(20), nullable=False),
        sa.Column("url", sa.String(2048), nullable=True),
        sa.Column("command", sa.JSON, nullable=True),
        sa.Column("connect_timeout_s", sa.Float, nullable=False),
        sa.Column("call_timeout_s", sa.Float, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_refresh_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(1000), nullable=True),
    )
    op.create_table(
        "catalog_items",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "upstream_id", sa.Integer, sa.ForeignKey("upstreams.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("kind", sa.String(20), nullable=False),
        sa.Column("name", sa.String(1024), nullable=False),
        sa.Column("definition", sa.JSON, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("present", sa.Boolean, nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("upstream_id", "kind", "name", "sha256", name="uq_catalog_def"),
    )
    op.create_index("ix_catalog_items_upstream_id", "catalog_items", ["upstream_id"])


def downgrade() -> None:
    op.drop_index("ix_catalog_items_upstream_id", table_name="catalog_items")
    op.drop_table("catalog_items")
    op.drop_table("upstreams")
