"""Usage counting: each replica sums calls, refusals and cost in memory and adds them to the database
every ``limits.usage_flush_interval_s``; ``GET /admin/v1/usage`` reads the sums over all replicas."""

from __future__ import annotations

import logging

from sqlalchemy.exc import SQLAlchemyError

from arbiter.limits.store import LimitStore, UsageDelta, db_error_message

log = logging.getLogger(__name__)
_MAX_KEYS = 200_000  # a flood of distinct caller/tool pairs between two flushes: stop counting new ones

UsageKey = tuple[int, str, str, str, str]  # hour, principal, tenant, upstream, tool


class UsageCounter:
    def __init__(self, store: LimitStore) -> None:
        self._store = store
        self._pending: dict[UsageKey, list[int]] = {}  # calls, limited, cost micro-units
        self._overflow_logged = False

    def add(self, key: UsageKey, *, calls: int = 0, limited: int = 0, cost_micros: int = 0) -> None:
        entry = self._pending.get(key)
        if entry is None:
            if len(self._pending) >= _MAX_KEYS:
                if not self._overflow_logged:
                    log.warning("usage: more than %d distinct counters pending; dropping new ones", _MAX_KEYS)
                    self._overflow_logged = True
                return
            entry = self._pending[key] = [0, 0, 0]
        entry[0] += calls
        entry[1] += limited
        entry[2] += cost_micros

    async def flush(self) -> None:
        """Add what was counted since the last flush to the database; on failure keep it for the next."""
        pending, self._pending = self._pending, {}
        self._overflow_logged = False
        if not pending:
            return
        deltas = [UsageDelta(*key, *values) for key, values in pending.items()]
        try:
            await self._store.add_usage(deltas)
        except (SQLAlchemyError, OSError) as exc:
            log.warning(
                "usage: could not write %d counters (%s); retrying with the next flush",
                len(deltas),
                db_error_message(exc),
            )
            for key, (calls, limited, cost) in pending.items():
                self.add(key, calls=calls, limited=limited, cost_micros=cost)
