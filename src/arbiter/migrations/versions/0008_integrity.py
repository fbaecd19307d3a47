"""Tool integrity: each discovered definition's review status and scan findings; upstream auto-approve.

Definitions already in the catalog were being served to agents before this revision, so they start
approved: an upgrade must not hide every tool until someone reviews them. Definitions seen from now on
start pending (or approved, on an auto-approving upstream, when the scans find nothing).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "catalog_items", sa.Column("status", sa.String(16), nullable=False, server_default="approved")
    )
    op.add_column(
        "catalog_items", sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false())
    )
    # Only what was being served: the history (rows no longer present) was not, and approving it would
    # let an upstream flip back to any definition it ever offered without a review. Once approved and
    # since replaced is what ``superseded`` means (a change when offered again).
    items = sa.table(
        "catalog_items", sa.column("status"), sa.column("present", sa.Boolean), sa.column("kind")
    )
    op.execute(
        items.update()
        .where(items.c.present == sa.false(), items.c.kind.in_(("tool", "prompt", "resource_template")))
        .values(status="superseded")
    )
    op.add_column("catalog_items", sa.Column("findings", sa.JSON, nullable=True))
    op.add_column("catalog_items", sa.Column("reviewed_by", sa.String(200), nullable=True))
    op.add_column("catalog_items", sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "upstreams", sa.Column("auto_approve", sa.Boolean, nullable=False, server_default=sa.false())
    )


def downgrade() -> None:
    # Not batch mode (see 0003): SQLite >= 3.35 drops a plain column in place.
    op.drop_column("upstreams", "auto_approve")
    for column in ("reviewed_at", "reviewed_by", "findings", "disabled", "status"):
        op.drop_column("catalog_items", column)
