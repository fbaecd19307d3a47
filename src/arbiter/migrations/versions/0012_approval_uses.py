"""Approvals are single use: the id of each approval state Arbiter accepted, until the state expires
(proxy/approval_uses.py).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "approval_uses",
        sa.Column("state_id", sa.String(64), primary_key=True),
        sa.Column("used_s", sa.Float, nullable=False),
        sa.Column("expires_s", sa.Float, nullable=False),
    )
    op.create_index("ix_approval_uses_expires", "approval_uses", ["expires_s"])


def downgrade() -> None:
    op.drop_index("ix_approval_uses_expires", "approval_uses")
    op.drop_table("approval_uses")
