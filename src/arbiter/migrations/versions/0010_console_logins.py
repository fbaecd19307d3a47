"""Console logins through an identity provider under way: a hash of the browser's random id, and what the
callback must match (state, nonce, PKCE verifier), kept server-side and taken once.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "console_logins",
        sa.Column("id_hash", sa.String(64), primary_key=True),
        sa.Column("provider", sa.Integer, nullable=False),
        sa.Column("state", sa.String(200), nullable=False),
        sa.Column("nonce", sa.String(200), nullable=False),
        sa.Column("verifier", sa.String(200), nullable=False),
        sa.Column("started_s", sa.Float, nullable=False),
    )
    op.create_index("ix_console_logins_started", "console_logins", ["started_s"])


def downgrade() -> None:
    op.drop_index("ix_console_logins_started", "console_logins")
    op.drop_table("console_logins")
