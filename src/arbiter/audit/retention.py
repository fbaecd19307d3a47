"""Retention: records older than ``audit.retention_days`` are purged behind a signed checkpoint.

Every replica runs this loop; the purge itself takes the chain-head lock, so concurrent purges
serialise and the second finds nothing left to do.
"""

from __future__ import annotations

import logging

import anyio
from sqlalchemy.exc import SQLAlchemyError

from arbiter.audit.record import now_ms
from arbiter.audit.store import AuditStore
from arbiter.errors import AuditChainBroken
from arbiter.settings import AuditSettings

log = logging.getLogger(__name__)

SYSTEM_ACTOR = {"subject": "arbiter:retention", "auth_method": "system", "source_ip": None}


async def purge_expired(
    store: AuditStore, settings: AuditSettings, actor: dict[str, object] | None = None
) -> int:
    if settings.retention_days is None:
        return 0
    cutoff = now_ms() - settings.retention_days * 86_400_000
    return await store.purge(cutoff, dict(actor or SYSTEM_ACTOR))


async def run_retention(store: AuditStore, settings: AuditSettings, stopping: anyio.Event) -> None:
    if settings.retention_days is None:
        return
    while not stopping.is_set():
        try:
            await purge_expired(store, settings)
        except AuditChainBroken as exc:
            log.error("audit retention: %s", exc.message)
        except (SQLAlchemyError, OSError, TimeoutError):
            log.exception("audit retention purge failed; retrying at the next interval")
        with anyio.move_on_after(settings.purge_interval_s):
            await stopping.wait()
