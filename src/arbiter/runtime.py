"""The services one Arbiter process runs, built by ``create_app`` and shared by its routers."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from arbiter.audit.writer import AuditWriter
from arbiter.auth.apikeys import ApiKeys
from arbiter.auth.authenticator import Authenticator
from arbiter.limits.limiter import Limiter
from arbiter.policies.live import LivePolicy
from arbiter.proxy.approval_desk import ApprovalDesk
from arbiter.proxy.catalog import Catalog
from arbiter.proxy.pipeline import Pipeline
from arbiter.proxy.pool import UpstreamPool
from arbiter.proxy.registry import UpstreamRegistry
from arbiter.settings import Settings


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    catalog: Catalog
    pool: UpstreamPool
    registry: UpstreamRegistry
    pipeline: Pipeline
    sessions_manager: StreamableHTTPSessionManager
    keys: ApiKeys
    authenticator: Authenticator
    policy: LivePolicy
    audit: AuditWriter
    limits: Limiter
    approvals: ApprovalDesk  # calls waiting for an approver (docs/approvals.md)
    # Impact previews (audit/impact.py) replay on worker threads one at a time per process: however many
    # are asked for at once they use one core, and a waiting one spends its time budget waiting.
    previews: anyio.CapacityLimiter = field(default_factory=lambda: anyio.CapacityLimiter(1))
