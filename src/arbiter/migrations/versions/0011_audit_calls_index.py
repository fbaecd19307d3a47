"""The console's activity charts: a partial index of the tool calls in the audit log by time, with the
columns the charts count by, so counting a window's calls reads the index alone (audit/activity.py).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

CALLS = sa.text("kind = 'mcp' AND method = 'tools/call'")


def upgrade() -> None:
    columns = ["ts_ms", "upstream", "tool", "decision", "reason", "seq"]
    if op.get_bind().dialect.name == "sqlite":
        # SQLite reads a partial index alone only if the columns of its WHERE are in it too.
        columns += ["kind", "method"]
    op.create_index(
        "ix_audit_calls",
        "audit_events",
        columns,
        sqlite_where=CALLS,
        postgresql_where=CALLS,
    )


def downgrade() -> None:
    op.drop_index("ix_audit_calls", "audit_events")
