"""The limiter: turns one call into a plan, has its backend admit it, and refuses, refunds and counts.

The hot path touches no database: rules, budgets and costs live in memory (``LimitConfig``) and are
reloaded when their version in the database moves (polled every ``limits.reload_interval_s``, and at
once on this replica after an admin change). What applies to a (caller, tool) pair is computed once
per config version and kept in a small LRU cache, so memory does not grow with the number of callers
seen. A call that nothing applies to costs no backend round trip at all.

The backend (``limits.factory`` picks it from settings) owns everything about where counts live: the
in-process one (``limits.local``), or Redis with its failover (``limits.failover``).
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
from cachetools import LRUCache
from sqlalchemy.exc import SQLAlchemyError

from arbiter.auth.principal import Principal
from arbiter.errors import (
    BudgetExceeded,
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
    ManagedBackend,
    Plan,
    Verdict,
    period_bounds,
)
from arbiter.limits.memory import Clock, ceil_s
from arbiter.limits.rules import MICROS, Budget, LimitConfig, RateRule, ToolSettings, select, tool_settings
from arbiter.limits.store import LimitStore, db_error_message
from arbiter.limits.usage import UsageCounter
from arbiter.redis_errors import REDIS_ERRORS
from arbiter.settings import LimitSettings
from arbiter.ticks import Every, ticks

log = logging.getLogger(__name__)
# Entries are per (caller, tool): enough for the callers active at once; a flood of new callers only
# costs recomputing what applies to them, never memory.
_CACHE_MAX = 4096
# What selection (subject, roles, tenant) and bucket keys (issuer|subject, tenant) depend on, and the
# tool: not the whole Principal, whose scopes and client id vary per token of the same caller.
_CacheKey = tuple[str, str, str | None, frozenset[str], str, str]
# Request keys made from a handshake-era session id and JSON-RPC id start so (the limits interceptor
# makes them); they are held for ``session_request_key_ttl_s``, not ``request_key_ttl_s``: one is taken
# per call, so their hold bounds how much memory (or Redis) the keys take at a given call rate.
SESSION_KEY_PREFIX = "s:"


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
    """Admission, refusals, refunds and usage for every tool call, on ``backend`` (see
    ``limits.factory.build_limiter``); ``clock`` dates calls that no backend sees."""

    def __init__(
        self,
        settings: LimitSettings,
        store: LimitStore,
        backend: ManagedBackend,
        clock: Clock = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.backend = backend
        self.clock = clock
        self.defaults = ToolSettings(settings.default_cost, settings.loop_max_repeats, settings.loop_window_s)
        self.config = LimitConfig(defaults=self.defaults)
        self.usage = UsageCounter(store)
        self._cache: LRUCache[_CacheKey, _Applicable] = LRUCache(_CACHE_MAX)
        self._lock = anyio.Lock()
        self._loaded = False

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
            request_ttl_s=self._request_ttl_s(request_key),
            call_id=uuid.uuid4().hex,
        )
        try:
            verdict = await self.backend.admit(plan)
        except LimitsUnavailable:
            self._count(ticket, self.clock(), limited=1)
            raise
        if verdict.outcome != "ok":
            self._count(ticket, verdict.now, limited=1)
            raise self._refusal(verdict, app, plan, upstream, tool)
        ticket.now, ticket.request_key = verdict.now, req
        ticket.backend = verdict.holder or self.backend
        ticket.charged = verdict.charged
        return ticket

    def _request_ttl_s(self, request_key: str | None) -> float:
        if request_key is not None and request_key.startswith(SESSION_KEY_PREFIX):
            return self.settings.session_request_key_ttl_s
        return self.settings.request_key_ttl_s

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
        key = (principal.issuer, principal.subject, principal.tenant, principal.roles, upstream, tool)
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
        self._cache[key] = found
        return found

    def _count(self, ticket: Ticket, now: float, **counts: int) -> None:
        tenant = ticket.principal.tenant or ""
        self.usage.add(
            (int(now) // 3600, ticket.principal.key, tenant, ticket.upstream, ticket.tool), **counts
        )

    # --- health ------------------------------------------------------------------------------------

    async def check(self) -> None:
        """Bring the backend's health up to date (a Redis ping) even without traffic."""
        await self.backend.check()

    def health(self) -> tuple[str, dict[str, object]]:
        """For /readyz, as information (not a readiness condition): "ok" while calls can be limited as
        configured, else an error, and the state to show."""
        check, state = self.backend.health()
        info: dict[str, object] = {
            "backend": self.backend.name,
            "config_version": self.config.version,
            "enabled": self.settings.enabled,
        }
        return check, {**info, **state}

    # --- configuration and background work --------------------------------------------------------

    async def reload(self) -> LimitConfig:
        async with self._lock:
            version = await self.store.version()
            if not self._loaded or version != self.config.version:
                self.config = await self.store.load(self.defaults)
                self._cache = LRUCache(_CACHE_MAX)
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
        await self.backend.start()

    async def run(self, stopping: anyio.Event) -> None:
        """Follow config changes, write usage, and run the backend's own background work; returns after
        a last flush once stopping."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.backend.run, stopping)
            await self._follow(stopping)

    async def _follow(self, stopping: anyio.Event) -> None:
        s = self.settings
        tick = min(s.reload_interval_s, s.usage_flush_interval_s)
        reload, flush = Every(s.reload_interval_s, tick), Every(s.usage_flush_interval_s, tick)
        async for _ in ticks(tick, stopping):
            if reload.due():
                try:
                    await self.reload()
                except (SQLAlchemyError, OSError) as exc:
                    log.warning(
                        "limits: could not check for changes (%s); keeping version %d",
                        db_error_message(exc),
                        self.config.version,
                    )
            if flush.due():
                await self.usage.flush()
        await self.usage.flush()

    async def aclose(self) -> None:
        await self.backend.aclose()
