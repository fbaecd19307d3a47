"""Console sessions, shared by the replicas: a hash of each session id (never the id), who it stands for,
and its times (idle, absolute and ID-token expiry).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "console_sessions",
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column("principal", sa.JSON, nullable=False),
        sa.Column("created_s", sa.Float, nullable=False),
        sa.Column("last_seen_s", sa.Float, nullable=False),
        sa.Column("expires_s", sa.Float, nullable=False),
        sa.Column("flash", sa.JSON, nullable=True),
    )
    op.create_index("ix_console_sessions_last_seen", "console_sessions", ["last_seen_s"])
    op.create_index("ix_console_sessions_expires", "console_sessions", ["expires_s"])


def downgrade() -> None:
    op.drop_index("ix_console_sessions_expires", "console_sessions")
    op.drop_index("ix_console_sessions_last_seen", "console_sessions")
    op.drop_table("console_sessions")
