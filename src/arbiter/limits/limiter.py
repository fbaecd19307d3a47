"""The limiter: turns one call into a plan, has a backend admit it, and handles Redis being down.

The hot path touches no database: rules, budgets and costs live in memory (``LimitConfig``) and are
reloaded when their version in the database moves (polled every ``limits.reload_interval_s``, and at
once on this replica after an admin change). What applies to a (caller, tool) pair is computed once
per config version and cached. A call that nothing applies to costs no backend round trip at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
from sqlalchemy.exc import SQLAlchemyError

from arbiter.auth.principal import Principal
from arbiter.errors import (
    BudgetExceeded,
    ConfigError,
    DuplicateRequest,
    LimitsUnavailable,
    RateLimited,
    RepeatedCall,
)
from arbiter.limits.backend import (
    BucketSpec,
    CounterSpec,
    LimitBackend,
    LoopSpec,
    Plan,
    Verdict,
    period_bounds,
)
from arbiter.limits.memory import Clock, MemoryBackend, ceil_s
from arbiter.limits.redis_backend import RedisBackend
from arbiter.limits.rules import MICROS, Budget, LimitConfig, RateRule, ToolSettings, select, tool_settings
from arbiter.limits.store import LimitStore, db_error_message
from arbiter.limits.usage import UsageCounter
from arbiter.redis_errors import REDIS_ERRORS
from arbiter.settings import LimitSettings

log = logging.getLogger(__name__)
_CACHE_MAX = 20_000
_SWEEP_INTERVAL_S = 60.0


@dataclass(frozen=True)
class _Applicable:
    """What applies to one (caller, upstream, tool), for one config version."""

    rules: tuple[RateRule, ...]
    buckets: tuple[BucketSpec, ...]
    budgets: tuple[Budget, ...]
    counters: tuple[CounterSpec, ...]
    settings: ToolSettings
    cost_micros: int

    @property
    def empty(self) -> bool:
        return (
            not self.buckets
            and not self.settings.loop_max_repeats
            and not (self.counters and self.cost_micros)
        )


@dataclass
class Ticket:
    """An admitted call: what it was charged, and where, so it can be refunded once."""

    principal: Principal
    upstream: str
    tool: str
    now: float
    cost_micros: int = 0
    charged: tuple[str, ...] = ()
    request_key: str | None = None
    backend: LimitBackend | None = None
    settled: bool = field(default=False)

    @property
    def cost(self) -> float:
        """The call's cost in units."""
        return self.cost_micros / MICROS


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def args_digest(arguments: Mapping[str, Any] | None) -> str:
    data = json.dumps(arguments or {}, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(data.encode()).hexdigest()


def _dims(per: tuple[str, ...], principal: Principal, upstream: str, tool: str) -> str:
    values = {
        "principal": principal.key,
        "tenant": principal.tenant or "",
        "upstream": upstream,
        "tool": f"{upstream}/{tool}",  # a tool is only unique within its upstream: kb/search != crm/search
    }
    return _digest(*(f"{d}={values[d]}" for d in per))


class Limiter:
    def __init__(
        self,
        settings: LimitSettings,
        store: LimitStore,
        redis_url: str | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self.defaults = ToolSettings(settings.default_cost, settings.loop_max_repeats, settings.loop_window_s)
        self.config = LimitConfig(defaults=self.defaults)
        use_redis = settings.backend == "redis" or (settings.backend == "auto" and bool(redis_url))
        if use_redis and not redis_url:
            raise ConfigError("limits.backend is 'redis' but ARBITER_REDIS_URL is not set")
        self.memory = MemoryBackend(clock, track_spend=not use_redis)
        self.redis = (
            RedisBackend(redis_url, settings.redis_prefix, settings.redis_timeout_s)
            if use_redis and redis_url
            else None
        )
        self.usage = UsageCounter(store)
        self._cache: dict[tuple[Principal, str, str], _Applicable] = {}
        self._lock = anyio.Lock()
        self._loaded = False
        self._redis_error: str | None = None  # set while Redis is unreachable
        self._retry_at = 0.0

    # --- admission -------------------------------------------------------------------------------

    async def admit(
        self,
        principal: Principal,
        upstream: str,
        tool: str,
        arguments: Mapping[str, Any] | None = None,
        request_key: str | None = None,
    ) -> Ticket:
        """Admit a tool call or raise why not (duplicate_request, rate_limited, repeated_call,
        budget_exceeded, limits_unavailable).

        ``request_key`` names the request (see the limits interceptor): where a budget charges the call,
        a key that is already held (its request is running or ran) is refused with ``DuplicateRequest``,
        so one request is charged once and run at most once."""
        ticket = Ticket(principal, upstream, tool, 0.0)
        if not self.settings.enabled:
            ticket.now = self.clock()
            return ticket
        app = self._applicable(principal, upstream, tool)
        ticket.cost_micros = app.cost_micros  # reported in usage even when no budget applies
        if app.empty:
            ticket.now = self.clock()
            return ticket
        digest = args_digest(arguments) if app.settings.loop_max_repeats or request_key else ""
        loop = None
        if app.settings.loop_max_repeats:
            loop = LoopSpec(
                f"lp:{_digest(principal.key, upstream, tool, digest)}",
                app.settings.loop_max_repeats,
                app.settings.loop_window_s,
            )
        charging = bool(app.counters and app.cost_micros)
        req = (
            f"rq:{_digest(principal.key, request_key, upstream, tool, digest)}"
            if request_key and charging
            else None
        )
        plan = Plan(
            buckets=app.buckets,
            counters=app.counters if charging else (),
            cost_micros=app.cost_micros if charging else 0,
            loop=loop,
            request_key=req,
            request_ttl_s=self.settings.request_key_ttl_s,
            call_id=uuid.uuid4().hex,
        )
        try:
            verdict, backend = await self._admit(plan)
        except LimitsUnavailable:
            self._count(ticket, self.clock(), limited=1)
            raise
        if verdict.outcome != "ok":
            self._count(ticket, verdict.now, limited=1)
            raise self._refusal(verdict, app, plan, upstream, tool)
        ticket.now, ticket.backend, ticket.request_key = verdict.now, backend, req
        ticket.charged = verdict.charged
        return ticket

    def commit(self, ticket: Ticket) -> None:
        """The call went through (or may have): its charge stands. Counts it for usage."""
        if ticket.settled:
            return
        ticket.settled = True
        self._count(ticket, ticket.now, calls=1, cost_micros=ticket.cost_micros)

    async def refund(self, ticket: Ticket) -> None:
        """The upstream failed before running the tool: give the charge back (once)."""
        if ticket.settled:
            return
        ticket.settled = True
        self._count(ticket, ticket.now, calls=1)
        if not ticket.charged or ticket.backend is None:
            return
        try:
            with anyio.fail_after(self.settings.redis_timeout_s * 2):
                await ticket.backend.refund(ticket.charged, ticket.cost_micros, ticket.request_key)
        except REDIS_ERRORS as exc:
            # The charge stays: over-counting a failed call is the safe side of a budget.
            log.warning("limits: could not refund %s units (%s); the charge stands", ticket.cost, exc)
        ticket.charged = ()

    async def _admit(self, plan: Plan) -> tuple[Verdict, LimitBackend]:
        if self.redis is None:
            return await self.memory.admit(plan), self.memory
        if self._redis_error is not None and time.monotonic() < self._retry_at:
            return await self._degraded(plan)
        try:
            with anyio.fail_after(self.settings.redis_timeout_s * 2):
                verdict = await self.redis.admit(plan)
        except REDIS_ERRORS as exc:
            self._redis_down(exc)
            return await self._degraded(plan)
        self._redis_up()
        return verdict, self.redis

    async def _degraded(self, plan: Plan) -> tuple[Verdict, LimitBackend]:
        if self.settings.on_redis_down == "fallback":
            return await self.memory.admit(plan), self.memory
        raise LimitsUnavailable(
            "limits cannot be checked because the limits store (Redis) is unreachable; the call was "
            "not forwarded",
            retry_after_s=self.settings.redis_retry_s,
        )

    def _refusal(
        self, verdict: Verdict, app: _Applicable, plan: Plan, upstream: str, tool: str
    ) -> DuplicateRequest | RateLimited | RepeatedCall | BudgetExceeded:
        name = f"{upstream}__{tool}"
        if verdict.outcome == "duplicate":
            return DuplicateRequest(
                f"this {name} request (same request key, caller and arguments) was already executed or "
                "is still running; it will not be run or charged again. Send a new "
                "arbiter/idempotency-key (or JSON-RPC id) to make a new request"
            )
        if verdict.outcome == "rate":
            rule = app.rules[verdict.index]
            retry = ceil_s(verdict.retry_after_s)
            return RateLimited(
                f"rate limit reached for {name}: {rule.limit} calls per {rule.period}; retry in {retry:g}s",
                retry_after_s=retry,
                limit=rule.limit,
                period=rule.period,
                rule_id=rule.id,
            )
        if verdict.outcome == "loop":
            retry = ceil_s(verdict.retry_after_s)
            return RepeatedCall(
                f"{name} was called with the same arguments {app.settings.loop_max_repeats} times within "
                f"{app.settings.loop_window_s:g}s; change the arguments or retry in {retry:g}s",
                retry_after_s=retry,
                max_repeats=app.settings.loop_max_repeats,
                window_s=app.settings.loop_window_s,
            )
        budget = app.budgets[verdict.index]
        _, end = period_bounds(budget.period, verdict.now)
        cost, spent = plan.cost_micros / MICROS, verdict.spent_micros / MICROS
        return BudgetExceeded(
            f"{name} costs {cost:g} units and the {budget.period} budget of {budget.limit:g} units has "
            f"{max(budget.limit - spent, 0):g} left; nothing was forwarded",
            budget_id=budget.id,
            period=budget.period,
            limit=budget.limit,
            spent=spent,
            cost=cost,
            retry_after_s=ceil_s(end - verdict.now),
        )

    def _applicable(self, principal: Principal, upstream: str, tool: str) -> _Applicable:
        key = (principal, upstream, tool)
        found = self._cache.get(key)
        if found is not None:
            return found
        config = self.config
        rules = tuple(select(config.rules, principal, upstream, tool))
        budgets = tuple(select(config.budgets, principal, upstream, tool))
        settings = tool_settings(config.costs, upstream, tool, self.defaults)
        found = _Applicable(
            rules=rules,
            buckets=tuple(
                BucketSpec(f"rl:{r.id}:{_dims(r.per, principal, upstream, tool)}", r.capacity, r.rate_per_s)
                for r in rules
            ),
            budgets=budgets,
            counters=tuple(
                CounterSpec(f"bg:{b.id}:{_dims(b.per, principal, upstream, tool)}", b.period, b.limit_micros)
                for b in budgets
            ),
            settings=settings,
            cost_micros=round(settings.cost * MICROS),
        )
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[key] = found
        return found

    def _count(self, ticket: Ticket, now: float, **counts: int) -> None:
        tenant = ticket.principal.tenant or ""
        self.usage.add(
            (int(now) // 3600, ticket.principal.key, tenant, ticket.upstream, ticket.tool), **counts
        )

    # --- Redis health ------------------------------------------------------------------------------

    def _redis_down(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + self.settings.redis_retry_s
        if self._redis_error is None:
            what = (
                "falling back to per-replica in-process limits"
                if self.settings.on_redis_down == "fallback"
                else "refusing calls that limits apply to (fail_closed)"
            )
            log.error("limits: Redis is unreachable (%s); %s", type(exc).__name__, what)
        self._redis_error = type(exc).__name__ or "error"

    def _redis_up(self) -> None:
        if self._redis_error is not None:
            log.warning("limits: Redis is reachable again; shared limits are back in force")
            self._redis_error = None

    async def check(self) -> None:
        """Ping Redis (if used) so the health state is current even without traffic."""
        if self.redis is None:
            return
        try:
            with anyio.fail_after(self.settings.redis_timeout_s * 2):
                await self.redis.ping()
        except REDIS_ERRORS as exc:
            self._redis_down(exc)
        else:
            self._redis_up()

    def health(self) -> tuple[str, dict[str, object]]:
        """For /readyz, as information (not a readiness condition): "ok" while calls can be limited as
        configured, else an error, and the state to show."""
        info: dict[str, object] = {
            "backend": "redis" if self.redis is not None else "memory",
            "config_version": self.config.version,
            "enabled": self.settings.enabled,
        }
        if self.redis is None:
            return "ok", {**info, "state": "ok"}
        info["on_redis_down"] = self.settings.on_redis_down
        if self._redis_error is None:
            return "ok", {**info, "state": "ok"}
        info["redis_error"] = self._redis_error
        if self.settings.on_redis_down == "fallback":
            return "ok", {**info, "state": "fallback"}
        return (
            f"error: Redis unreachable ({self._redis_error}); calls with limits are refused",
            {**info, "state": "unavailable"},
        )

    # --- configuration and background work --------------------------------------------------------

    async def reload(self) -> LimitConfig:
        async with self._lock:
            version = await self.store.version()
            if not self._loaded or version != self.config.version:
                self.config = await self.store.load(self.defaults)
                self._cache = {}
                self._loaded = True
                log.info(
                    "limits version %d in force (%d rules, %d budgets, %d cost entries)",
                    version,
                    len(self.config.rules),
                    len(self.config.budgets),
                    len(self.config.costs),
                )
            return self.config

    async def start(self) -> None:
        await self.reload()
        if self.redis is None:  # the in-process backend picks up this period's spend from before a restart
            self.memory.seed_spend(await self.store.load_spend(self.clock()))

    async def flush(self) -> None:
        await self.usage.flush()
        if self.redis is None:
            deltas = self.memory.take_spend_deltas()
            try:
                await self.store.add_spend(deltas, self.memory.expiries(deltas))
            except (SQLAlchemyError, OSError) as exc:
                log.warning(
                    "limits: could not store spend of %d budget counters (%s); retrying with the next flush",
                    len(deltas),
                    db_error_message(exc),
                )
                self.memory.restore_spend_deltas(deltas)

    async def run(self, stopping: anyio.Event) -> None:
        """Follow config changes, write usage, watch Redis; returns after a last flush once stopping."""
        s = self.settings
        tick = min(s.reload_interval_s, s.usage_flush_interval_s, s.redis_retry_s)
        since_reload = since_flush = since_sweep = 0.0
        while not stopping.is_set():
            with anyio.move_on_after(tick):
                await stopping.wait()
            if stopping.is_set():
                break
            since_reload += tick
            since_flush += tick
            since_sweep += tick
            if since_reload >= s.reload_interval_s:
                since_reload = 0.0
                try:
                    await self.reload()
                except (SQLAlchemyError, OSError) as exc:
                    log.warning(
                        "limits: could not check for changes (%s); keeping version %d",
                        db_error_message(exc),
                        self.config.version,
                    )
            if since_flush >= s.usage_flush_interval_s:
                since_flush = 0.0
                await self.flush()
            if self._redis_error is not None:
                await self.check()
            if since_sweep >= _SWEEP_INTERVAL_S:
                since_sweep = 0.0
                self.memory.sweep()
        await self.flush()

    async def aclose(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
