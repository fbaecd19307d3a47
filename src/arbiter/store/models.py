"""SQLModel tables: upstream servers and the tool/resource/prompt definitions discovered on them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class Upstream(SQLModel, table=True):
    """A registered upstream MCP server. ``source`` is ``api`` or ``config`` (operator-defined)."""

    __tablename__ = "upstreams"  # pyright: ignore[reportAssignmentType]

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=sa.Column(sa.String(32), nullable=False, unique=True))
    transport: str = Field(sa_column=sa.Column(sa.String(20), nullable=False))
    url: str | None = Field(default=None, sa_column=sa.Column(sa.String(2048), nullable=True))
    command: list[str] | None = Field(default=None, sa_column=sa.Column(sa.JSON, nullable=True))
    connect_timeout_s: float = Field(default=10.0, sa_column=sa.Column(sa.Float, nullable=False))
    call_timeout_s: float = Field(default=30.0, sa_column=sa.Column(sa.Float, nullable=False))
    enabled: bool = Field(default=True, sa_column=sa.Column(sa.Boolean, nullable=False))
    source: str = Field(default="api", sa_column=sa.Column(sa.String(16), nullable=False))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )
    last_refresh_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True)
    )
    last_error: str | None = Field(default=None, sa_column=sa.Column(sa.String(1000), nullable=True))
    # Arbiter's outbound credential (auth/outbound.py ``CredentialSpec.to_json``): non-secret settings,
    # and for its secret either an environment variable's name or a Fernet token, never the value.
    credential: dict[str, Any] | None = Field(default=None, sa_column=sa.Column(sa.JSON, nullable=True))
    # Resilience (proxy/pool.py): its bulkhead (None: upstream.max_concurrency) and its fallback's name.
    max_concurrency: int | None = Field(default=None, sa_column=sa.Column(sa.Integer, nullable=True))
    fallback: str | None = Field(default=None, sa_column=sa.Column(sa.String(32), nullable=True))
    # Integrity: whether new, unflagged definitions it offers are approved without a review.
    auto_approve: bool = Field(default=False, sa_column=sa.Column(sa.Boolean, nullable=False))


class ToolSettingRow(SQLModel, table=True):
    """What a security admin decided about one upstream tool: whether a call that reached the upstream may
    be sent again (``idempotent``), and its own deadline. Keyed by names, so it outlives re-registration."""

    __tablename__ = "tool_settings"  # pyright: ignore[reportAssignmentType]
    __table_args__ = (sa.UniqueConstraint("upstream", "tool", name="uq_tool_settings"),)

    id: int | None = Field(default=None, primary_key=True)
    upstream: str = Field(sa_column=sa.Column(sa.String(32), nullable=False))
    tool: str = Field(sa_column=sa.Column(sa.String(1024), nullable=False))
    idempotent: bool = Field(default=False, sa_column=sa.Column(sa.Boolean, nullable=False))
    timeout_s: float | None = Field(default=None, sa_column=sa.Column(sa.Float, nullable=True))
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )
    updated_by: str = Field(default="", sa_column=sa.Column(sa.String(200), nullable=False))


class CatalogItem(SQLModel, table=True):
    """One distinct definition of a tool, resource, resource template or prompt on an upstream.

    A changed definition is a new row (new sha256), so the history of what an upstream offered stays
    queryable; ``present`` marks the rows seen in the latest discovery.
    """

    __tablename__ = "catalog_items"  # pyright: ignore[reportAssignmentType]
    __table_args__ = (sa.UniqueConstraint("upstream_id", "kind", "name", "sha256", name="uq_catalog_def"),)

    id: int | None = Field(default=None, primary_key=True)
    upstream_id: int = Field(
        sa_column=sa.Column(
            sa.Integer, sa.ForeignKey("upstreams.id", ondelete="CASCADE"), nullable=False, index=True
        )
    )
    kind: str = Field(sa_column=sa.Column(sa.String(20), nullable=False))
    name: str = Field(sa_column=sa.Column(sa.String(1024), nullable=False))
    definition: dict[str, Any] = Field(sa_column=sa.Column(sa.JSON, nullable=False))
    sha256: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    present: bool = Field(default=True, sa_column=sa.Column(sa.Boolean, nullable=False))
    first_seen: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )
    last_seen: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )
    # Integrity (proxy/pins.py): whether agents may see and use this exact definition (see Status there),
    # what the poisoning and shadowing scans found in it when it was first seen, and who decided.
    status: str = Field(default="pending", sa_column=sa.Column(sa.String(16), nullable=False))
    disabled: bool = Field(default=False, sa_column=sa.Column(sa.Boolean, nullable=False))
    findings: list[dict[str, Any]] | None = Field(default=None, sa_column=sa.Column(sa.JSON, nullable=True))
    reviewed_by: str | None = Field(default=None, sa_column=sa.Column(sa.String(200), nullable=True))
    reviewed_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True)
    )


class ApiKey(SQLModel, table=True):
    """An Arbiter API key for a service agent. Only a hash of the secret is stored."""

    __tablename__ = "api_keys"  # pyright: ignore[reportAssignmentType]

    id: str = Field(sa_column=sa.Column(sa.String(32), primary_key=True))  # public: the key's lookup id
    secret_sha256: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    owner: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    description: str | None = Field(default=None, sa_column=sa.Column(sa.String(500), nullable=True))
    tenant: str | None = Field(default=None, sa_column=sa.Column(sa.String(200), nullable=True))
    roles: list[str] = Field(default_factory=list[str], sa_column=sa.Column(sa.JSON, nullable=False))
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )
    created_by: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    expires_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True)
    )
    revoked_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True)
    )
    last_used_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True)
    )


class PolicyRuleRow(SQLModel, table=True):
    """One Casbin policy line (``p`` or ``g``), in Casbin's usual ptype/v0..v5 columns."""

    __tablename__ = "policy_rules"  # pyright: ignore[reportAssignmentType]

    id: int | None = Field(default=None, primary_key=True)
    ptype: str = Field(sa_column=sa.Column(sa.String(8), nullable=False))
    v0: str = Field(default="", sa_column=sa.Column(sa.String(300), nullable=False))
    v1: str = Field(default="", sa_column=sa.Column(sa.String(300), nullable=False))
    v2: str = Field(default="", sa_column=sa.Column(sa.String(1100), nullable=False))
    v3: str = Field(default="", sa_column=sa.Column(sa.String(32), nullable=False))
    v4: str = Field(default="", sa_column=sa.Column(sa.String(1000), nullable=False))
    v5: str = Field(default="", sa_column=sa.Column(sa.String(1000), nullable=False))


class PolicyState(SQLModel, table=True):
    """The policy's version: one row, bumped in the same transaction as every change to the rules."""

    __tablename__ = "policy_state"  # pyright: ignore[reportAssignmentType]

    id: int = Field(default=1, sa_column=sa.Column(sa.Integer, primary_key=True, autoincrement=False))
    version: int = Field(default=0, sa_column=sa.Column(sa.Integer, nullable=False))
    updated_at: datetime = Field(
        default_factory=utcnow, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False)
    )
    updated_by: str = Field(default="", sa_column=sa.Column(sa.String(200), nullable=False))
