"""Calls waiting for an approver (proxy/approval_requests.py), and room in the policy's effect column for
who approves and for how long (``approve by role:billing-lead for 4h``, policies/approvers.py).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("policy_rules") as batch:
        batch.alter_column("v4", type_=sa.String(1000), existing_type=sa.String(16), existing_nullable=False)
    op.create_table(
        "approval_requests",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("created_s", sa.Float, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("expires_s", sa.Float, nullable=False),
        sa.Column("call_key", sa.String(64), nullable=False),
        sa.Column("caller", sa.String(600), nullable=False),
        sa.Column("subject", sa.String(256), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("tool", sa.String(300), nullable=False),
        sa.Column("upstream", sa.String(64), nullable=False),
        sa.Column("target", sa.String(300), nullable=False),
        sa.Column("arguments", sa.Text, nullable=False),
        sa.Column("rule", sa.Text, nullable=False),
        sa.Column("approvers", sa.Text, nullable=False),
        sa.Column("valid_s", sa.Integer, nullable=False),
        sa.Column("trace_id", sa.String(32), nullable=True),
        sa.Column("decided_by", sa.String(600), nullable=True),
        sa.Column("decided_s", sa.Float, nullable=True),
        sa.Column("note", sa.String(1000), nullable=True),
        sa.Column("used_s", sa.Float, nullable=True),
        sa.Column("webhook", sa.String(16), nullable=False),
        sa.Column("webhook_attempts", sa.Integer, nullable=False),
        sa.Column("webhook_next_s", sa.Float, nullable=True),
    )
    op.create_index("ix_approval_requests_call", "approval_requests", ["call_key", "created_s"])
    op.create_index("ix_approval_requests_status", "approval_requests", ["status", "created_s"])
    op.create_index("ix_approval_requests_tenant", "approval_requests", ["tenant", "created_s"])
    op.create_index("ix_approval_requests_caller", "approval_requests", ["caller", "status"])
    op.create_index("ix_approval_requests_webhook", "approval_requests", ["webhook", "webhook_next_s"])


def downgrade() -> None:
    op.drop_index("ix_approval_requests_webhook", "approval_requests")
    op.drop_index("ix_approval_requests_caller", "approval_requests")
    op.drop_index("ix_approval_requests_tenant", "approval_requests")
    op.drop_index("ix_approval_requests_status", "approval_requests")
    op.drop_index("ix_approval_requests_call", "approval_requests")
    op.drop_table("approval_requests")
    with op.batch_alter_table("policy_rules") as batch:
        batch.alter_column("v4", type_=sa.String(16), existing_type=sa.String(1000), existing_nullable=False)
