"""The limiter backend protocol: one atomic admission per call, and a refund when the upstream failed.

A ``Plan`` lists everything one call must pass (token buckets, the loop breaker, budget counters) with
keys already derived; a backend checks all of it and, only if everything passes, takes a token from
every bucket, records the call for the loop breaker and charges every budget, as one atomic step.

A plan's request key is charged once and executed at most once: a call whose key is held (its request
is in flight or was committed) is refused as a ``duplicate`` before anything else is checked, and
takes nothing. An admitted call holds its key from the same atomic step on, so two concurrent copies
of one request cannot both pass; a refund (the upstream failed before running it) releases the key,
so a retry after that is a new request.
"""

from __future__ import annotations

import calendar
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, Protocol

import anyio

from arbiter.limits.rules import BudgetPeriod

Outcome = Literal["ok", "duplicate", "rate", "loop", "budget"]
PERIOD_CODES: dict[str, str] = {"hour": "h", "day": "d", "month": "m"}
# Budget counters outlive their period by a day, so a late refund still finds them.
COUNTER_SLACK_S = 86_400


@dataclass(frozen=True)
class BucketSpec:
    key: str
    capacity: int
    rate_per_s: float


@dataclass(frozen=True)
class CounterSpec:
    key: str  # without the period; the backend appends the period it reads from its own clock
    period: BudgetPeriod
    limit_micros: int


@dataclass(frozen=True)
class LoopSpec:
    key: str
    max_repeats: int
    window_s: float


@dataclass(frozen=True)
class Plan:
    buckets: tuple[BucketSpec, ...] = ()
    counters: tuple[CounterSpec, ...] = ()
    cost_micros: int = 0
    loop: LoopSpec | None = None
    request_key: str | None = None
    request_ttl_s: float = 3600.0
    call_id: str = ""  # unique per call: the loop breaker's record of it

    @property
    def empty(self) -> bool:
        return not self.buckets and not self.loop and not (self.counters and self.cost_micros)


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    now: float  # the backend's clock (epoch seconds): Redis's TIME, or the injected clock
    index: int = 0  # which bucket/counter refused (0-based)
    retry_after_s: float = 0.0
    spent_micros: int = 0  # for "budget": what the counter held
    charged: tuple[str, ...] = ()  # counter keys (with period) charged by this call
    # Where the charge was made, when a backend passed the plan on to another (the failover backend's
    # in-process fallback): a refund goes there. None: the backend that answered holds it.
    holder: LimitBackend | None = field(default=None, compare=False, repr=False)


class LimitBackend(Protocol):
    name: str

    async def admit(self, plan: Plan) -> Verdict: ...

    async def refund(self, charged: Sequence[str], cost_micros: int, request_key: str | None) -> None: ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


class ManagedBackend(LimitBackend, Protocol):
    """A backend as the limiter runs it: with its own start-up, background work and health."""

    async def start(self) -> None:
        """Load what the backend keeps across restarts; called once, after the config is loaded."""
        ...

    async def run(self, stopping: anyio.Event) -> None:
        """Background work (syncing, sweeping, watching a server) until ``stopping`` is set."""
        ...

    async def check(self) -> None:
        """Bring the health state up to date now (a ping), without raising."""
        ...

    def health(self) -> tuple[str, dict[str, object]]:
        """``"ok"`` while calls can be limited as configured, else an error; and the state to show."""
        ...


def period_id(period: BudgetPeriod, now: float) -> str:
    """The UTC hour/day/month ``now`` falls in, as a counter key suffix (same as the Lua script's)."""
    seconds = int(now)
    if period == "hour":
        return f"h{seconds // 3600}"
    if period == "day":
        return f"d{seconds // 86400}"
    when = datetime.fromtimestamp(seconds, UTC)
    return f"m{when.year * 12 + when.month - 1}"


def period_bounds(period: BudgetPeriod, now: float) -> tuple[float, float]:
    """Start and end (epoch seconds) of the UTC period ``now`` falls in."""
    seconds = int(now)
    if period == "hour":
        start = seconds - seconds % 3600
        return start, start + 3600
    if period == "day":
        start = seconds - seconds % 86400
        return start, start + 86400
    when = datetime.fromtimestamp(seconds, UTC)
    start_dt = datetime(when.year, when.month, 1, tzinfo=UTC)
    days = calendar.monthrange(when.year, when.month)[1]
    start = start_dt.timestamp()
    return start, start + days * 86400


def counter_ttl_s(period: BudgetPeriod) -> int:
    return {"hour": 3600, "day": 86400, "month": 31 * 86400}[period] + COUNTER_SLACK_S


SWEEP_INTERVAL_S = 60.0  # memory backends also sweep in the background, for a replica whose traffic stopped
