"""Outbound credentials per upstream.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # JSON: kind, non-secret settings, and an environment variable name or a Fernet token for the secret.
    op.add_column("upstreams", sa.Column("credential", sa.JSON, nullable=True))


def downgrade() -> None:
    # Not batch mode: on SQLite that copies the table and drops the old one, and with foreign keys on
    # the drop cascades to catalog_items. SQLite >= 3.35 drops a plain column in place.
    op.drop_column("upstreams", "credential")
