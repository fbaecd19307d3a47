"""Redis as the limits backend, and what happens while it is down.

Every replica admits on the one Redis. When a round trip fails (or takes longer than
``limits.redis_timeout_s``), Redis counts as down and ``limits.on_redis_down`` decides: ``fail_closed``
refuses the call with ``limits_unavailable``, ``fallback`` admits it on an in-process backend of this
replica's own. Calls do not wait for a dead Redis: after a failure they skip it for
``limits.redis_retry_s``, then the next call (or the background ping) tries again. The first failure is
logged at ERROR and the recovery at WARNING, once each. On recovery the shared state is used again;
the fallback's counts are not merged into it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence

import anyio

from arbiter.errors import LimitsUnavailable
from arbiter.limits.backend import SWEEP_INTERVAL_S, Plan, Verdict
from arbiter.limits.memory import MemoryBackend
from arbiter.limits.redis_backend import RedisBackend
from arbiter.redis_errors import REDIS_ERRORS
from arbiter.settings import LimitSettings
from arbiter.ticks import Every, ticks

log = logging.getLogger(__name__)


class FailoverBackend:
    """Admits on Redis; while Redis is down, refuses (``fail_closed``) or admits on ``fallback``.

    A verdict the fallback gave names it as its ``holder``, so a refund goes back where the charge
    was made; a refund without one goes to Redis."""

    name = "redis"

    def __init__(self, redis: RedisBackend, fallback: MemoryBackend, settings: LimitSettings) -> None:
        self.redis = redis
        self.fallback = fallback
        self._settings = settings
        self._timeout_s = settings.redis_timeout_s * 2
        self._error: str | None = None  # set while Redis is unreachable
        self._retry_at = 0.0

    @property
    def down(self) -> bool:
        return self._error is not None

    async def admit(self, plan: Plan) -> Verdict:
        if self._error is not None and time.monotonic() < self._retry_at:
            return self._degraded(plan)
        try:
            # asyncio's own timeout: anyio's fail_after looks up the running library on every entry
            async with asyncio.timeout(self._timeout_s):
                verdict = await self.redis.admit(plan)
        except REDIS_ERRORS as exc:
            self._redis_down(exc)
            return self._degraded(plan)
        self._redis_up()
        return verdict

    def _degraded(self, plan: Plan) -> Verdict:
        if self._settings.on_redis_down == "fallback":
            return dataclasses.replace(self.fallback.admit_now(plan), holder=self.fallback)
        raise LimitsUnavailable(
            "limits cannot be checked because the limits store (Redis) is unreachable; the call was "
            "not forwarded",
            retry_after_s=self._settings.redis_retry_s,
        )

    async def refund(self, charged: Sequence[str], cost_micros: int, request_key: str | None) -> None:
        await self.redis.refund(charged, cost_micros, request_key)

    async def ping(self) -> None:
        await self.redis.ping()

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def start(self) -> None:
        return None  # Redis keeps its own state; the fallback starts empty

    # --- Redis health ------------------------------------------------------------------------------

    def _redis_down(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + self._settings.redis_retry_s
        if self._error is None:
            what = (
                "falling back to per-replica in-process limits"
                if self._settings.on_redis_down == "fallback"
                else "refusing calls that limits apply to (fail_closed)"
            )
            log.error("limits: Redis is unreachable (%s); %s", type(exc).__name__, what)
        self._error = type(exc).__name__ or "error"

    def _redis_up(self) -> None:
        if self._error is not None:
            log.warning("limits: Redis is reachable again; shared limits are back in force")
            self._error = None

    async def check(self) -> None:
        """Ping Redis so the health state is current even without traffic."""
        try:
            with anyio.fail_after(self._timeout_s):
                await self.redis.ping()
        except REDIS_ERRORS as exc:
            self._redis_down(exc)
        else:
            self._redis_up()

    def health(self) -> tuple[str, dict[str, object]]:
        info: dict[str, object] = {"on_redis_down": self._settings.on_redis_down}
        if self._error is None:
            return "ok", {**info, "state": "ok"}
        info["redis_error"] = self._error
        if self._settings.on_redis_down == "fallback":
            return "ok", {**info, "state": "fallback"}
        return (
            f"error: Redis unreachable ({self._error}); calls with limits are refused",
            {**info, "state": "unavailable"},
        )

    async def run(self, stopping: anyio.Event) -> None:
        """While Redis is down, ping it every ``limits.redis_retry_s``; sweep the fallback's memory."""
        tick = self._settings.redis_retry_s
        sweep = Every(SWEEP_INTERVAL_S, tick)
        async for _ in ticks(tick, stopping):
            if self._error is not None:
                await self.check()
            if sweep.due():
                self.fallback.sweep()
