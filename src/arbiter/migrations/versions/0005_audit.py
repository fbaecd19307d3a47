"""The audit log: hash-chained events, the chain head, and signed checkpoints.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

GENESIS = "0" * 64


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("id", sa.String(36), nullable=False, unique=True),
        sa.Column("ts_ms", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("subject", sa.String(300), nullable=True),
        sa.Column("tenant", sa.String(200), nullable=True),
        sa.Column("method", sa.String(64), nullable=True),
        sa.Column("tool", sa.String(1100), nullable=True),
        sa.Column("upstream", sa.String(64), nullable=True),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("trace_id", sa.String(32), nullable=True),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    # Auditors page by time (ts_ms, seq); each filter has an index led by its column, then time.
    op.create_index("ix_audit_time", "audit_events", ["ts_ms", "seq"])
    for column in ("subject", "tenant", "tool", "upstream", "decision", "reason"):
        op.create_index(f"ix_audit_{column}_time", "audit_events", [column, "ts_ms", "seq"])
    op.create_index("ix_audit_trace", "audit_events", ["trace_id"])
    chain = op.create_table(
        "audit_chain",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        # Records before anchor_seq were purged; the chain restarts from anchor_hash.
        sa.Column("anchor_seq", sa.BigInteger, nullable=False),
        sa.Column("anchor_hash", sa.String(64), nullable=False),
        sa.Column("checkpoint_seq", sa.BigInteger, nullable=False),
        sa.Column("checkpoint_ms", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(
        chain,
        [
            {
                "id": 1,
                "seq": 0,
                "hash": GENESIS,
                "anchor_seq": 0,
                "anchor_hash": GENESIS,
                "checkpoint_seq": 0,
                "checkpoint_ms": 0,
            }
        ],
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False, index=True),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("ts_ms", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("signature", sa.String(200), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_chain")
    op.drop_index("ix_audit_trace", "audit_events")
    for column in ("subject", "tenant", "tool", "upstream", "decision", "reason"):
        op.drop_index(f"ix_audit_{column}_time", "audit_events")
    op.drop_index("ix_audit_time", "audit_events")
    op.drop_table("audit_events")
