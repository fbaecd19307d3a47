"""The in-process backend as the only one (no Redis): budget spend survives a restart through the
database, and memory is swept in the background.

Each replica limits on its own here. Budget spend is the one thing worth keeping across a restart (a
restart must not hand every caller a fresh day's budget): what was charged is added to ``limit_spend``
every ``limits.usage_flush_interval_s`` and loaded back at start-up. Buckets and loop windows start
afresh.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio
from sqlalchemy.exc import SQLAlchemyError

from arbiter.limits.backend import SWEEP_INTERVAL_S, Plan, Verdict
from arbiter.limits.memory import MemoryBackend
from arbiter.limits.store import LimitStore, db_error_message
from arbiter.settings import LimitSettings
from arbiter.ticks import Every, ticks

log = logging.getLogger(__name__)


class LocalBackend:
    name = "memory"

    def __init__(self, memory: MemoryBackend, store: LimitStore, settings: LimitSettings) -> None:
        self.memory = memory
        self._store = store
        self._settings = settings

    async def admit(self, plan: Plan) -> Verdict:
        return self.memory.admit_now(plan)

    async def refund(self, charged: Sequence[str], cost_micros: int, request_key: str | None) -> None:
        await self.memory.refund(charged, cost_micros, request_key)

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def start(self) -> None:
        # This period's spend from before a restart.
        self.memory.seed_spend(await self._store.load_spend(self.memory.clock()))

    async def check(self) -> None:
        return None

    def health(self) -> tuple[str, dict[str, object]]:
        return "ok", {"state": "ok"}

    async def flush(self) -> None:
        """Add the spend charged (and refunded) since the last flush to the database."""
        deltas = self.memory.take_spend_deltas()
        try:
            await self._store.add_spend(deltas, self.memory.expiries(deltas))
        except (SQLAlchemyError, OSError) as exc:
            log.warning(
                "limits: could not store spend of %d budget counters (%s); retrying with the next flush",
                len(deltas),
                db_error_message(exc),
            )
            self.memory.restore_spend_deltas(deltas)

    async def run(self, stopping: anyio.Event) -> None:
        """Write spend every ``limits.usage_flush_interval_s`` and sweep; a last flush once stopping."""
        tick = self._settings.usage_flush_interval_s
        sweep = Every(SWEEP_INTERVAL_S, tick)
        async for _ in ticks(tick, stopping):
            await self.flush()
            if sweep.due():
                self.memory.sweep()
        await self.flush()
