"""The in-process backend: the same semantics as the Redis script, in this process's memory.

``admit`` never awaits, so on one event loop it is atomic. It does no I/O; the clock is injected (wall
clock by default) so tests can move it. Memory stays bounded: entries that no longer hold anything (a
full bucket, an empty loop window, a past period, an expired request key) are swept as it grows.
What remains is state that still limits someone, which must not be dropped (that would hand a caller
back its tokens or budget): with very many distinct callers, the Redis backend keeps it instead.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from arbiter.limits.backend import Plan, Verdict, counter_ttl_s, period_bounds, period_id

Clock = Callable[[], float]
# A sweep walks every entry, so sweeps are spaced by work done since the last one, never by a fixed
# count alone: at least _SWEEP_EVERY admits and as many as entries were left, or the table doubled.
# Either way a sweep's cost is paid for by the admits before it, however many callers there are.
_SWEEP_EVERY = 10_000


class MemoryBackend:
    name = "memory"

    def __init__(self, clock: Clock = time.time, *, track_spend: bool = False) -> None:
        self.clock = clock
        self._buckets: dict[str, tuple[float, float, float, float]] = {}  # tokens, at, capacity, rate
        self._loops: dict[str, tuple[deque[float], float]] = {}  # admitted call times, window
        self._spent: dict[str, int] = {}  # "<counter>:<period>" -> micro-units
        self._spent_expiry: dict[str, float] = {}
        self._requests: dict[str, float] = {}  # request key -> expiry
        # Per hold time, the keys in the order they were taken, with the expiry each was taken with
        # (the same float object as in _requests: a pointer, not a copy). With one hold time they
        # expire in that order, so each admit drops the expired ones at the front and the table stays
        # at rate x hold instead of growing until the next sweep (the handshake era takes a key with
        # every call). A key refunded and taken again has a later expiry than its old entry, which
        # then leaves at its own time without touching the key.
        self._request_order: dict[float, tuple[deque[float], deque[str]]] = {}
        self._track_spend = track_spend
        self._spend_deltas: dict[str, int] = {}
        self._admits = 0  # since the last sweep
        self._kept = 0  # entries the last sweep left

    async def admit(self, plan: Plan) -> Verdict:
        return self.admit_now(plan)

    def admit_now(self, plan: Plan) -> Verdict:
        now = self.clock()
        self._admits += 1
        if self._admits >= max(_SWEEP_EVERY, self._kept) or self._size() >= max(_SWEEP_EVERY, 2 * self._kept):
            self.sweep(now)
        self._expire_requests(now)
        if plan.request_key is not None and self._requests.get(plan.request_key, 0.0) > now:
            return Verdict("duplicate", now)  # in flight or committed: refused, takes nothing
        tokens: list[float] = []
        for index, bucket in enumerate(plan.buckets):
            have, at, _, _ = self._buckets.get(bucket.key, (bucket.capacity, now, 0.0, 0.0))
            if now > at:
                have = have + (now - at) * bucket.rate_per_s
            have = min(have, bucket.capacity)
            if have < 1:
                return Verdict("rate", now, index, (1 - have) / bucket.rate_per_s)
            tokens.append(have)
        loop = plan.loop
        if loop is not None:
            times, _ = self._loops.get(loop.key, (deque[float](), loop.window_s))
            while times and times[0] <= now - loop.window_s:
                times.popleft()
            if len(times) >= loop.max_repeats:
                return Verdict("loop", now, 0, max(times[0] + loop.window_s - now, 0.0))
        charged: list[str] = []
        if plan.cost_micros > 0:
            for index, counter in enumerate(plan.counters):
                key = f"{counter.key}:{period_id(counter.period, now)}"
                spent = self._spent.get(key, 0)
                if spent + plan.cost_micros > counter.limit_micros:
                    _, end = period_bounds(counter.period, now)
                    return Verdict("budget", now, index, end - now, spent_micros=spent)
                charged.append(key)
        # Everything passed: apply it all.
        for bucket, have in zip(plan.buckets, tokens, strict=True):
            self._buckets[bucket.key] = (have - 1, now, bucket.capacity, bucket.rate_per_s)
        if loop is not None:
            times, _ = self._loops.setdefault(loop.key, (deque[float](), loop.window_s))
            times.append(now)
        for key, counter in zip(charged, plan.counters, strict=False):
            self._charge(key, plan.cost_micros, now + counter_ttl_s(counter.period))
        if charged and plan.request_key is not None:
            # Held from admission on (not from commit), so a copy arriving while it runs is refused.
            expiry = self._requests[plan.request_key] = now + plan.request_ttl_s
            order = self._request_order.get(plan.request_ttl_s)
            if order is None:
                order = self._request_order[plan.request_ttl_s] = (deque(), deque())
            order[0].append(expiry)
            order[1].append(plan.request_key)
        return Verdict("ok", now, charged=tuple(charged))

    def _expire_requests(self, now: float) -> None:
        # A clock stepped back leaves a later expiry in front of earlier ones: the front then waits
        # for as long as the step, and the sweep drops what expired behind it.
        requests = self._requests
        for expiries, keys in self._request_order.values():
            while expiries and expiries[0] <= now:
                expiry, key = expiries.popleft(), keys.popleft()
                if requests.get(key) == expiry:
                    del requests[key]

    async def refund(self, charged: Sequence[str], cost_micros: int, request_key: str | None) -> None:
        for key in charged:
            if key in self._spent:
                self._charge(key, -cost_micros, self._spent_expiry.get(key, 0.0))
        if request_key is not None:
            self._requests.pop(request_key, None)

    async def ping(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def _charge(self, key: str, micros: int, expiry: float) -> None:
        self._spent[key] = self._spent.get(key, 0) + micros
        self._spent_expiry[key] = expiry
        if self._track_spend:
            self._spend_deltas[key] = self._spend_deltas.get(key, 0) + micros

    # --- persistence of budget spend (only for the primary in-process backend) -----------------------

    def take_spend_deltas(self) -> dict[str, int]:
        """What was charged (and refunded) since the last call, per ``<counter>:<period>`` key."""
        deltas, self._spend_deltas = self._spend_deltas, {}
        return deltas

    def restore_spend_deltas(self, deltas: dict[str, int]) -> None:
        """Put deltas back after a failed write, to be written with the next ones."""
        for key, micros in deltas.items():
            self._spend_deltas[key] = self._spend_deltas.get(key, 0) + micros

    def expiries(self, keys: Iterable[str]) -> dict[str, float]:
        return {key: self._spent_expiry.get(key, 0.0) for key in keys}

    def seed_spend(self, rows: Iterable[tuple[str, int, float]]) -> None:
        """Load spend written before a restart: ``(<counter>:<period>, micro-units, expiry)``."""
        for key, micros, expiry in rows:
            self._spent[key] = self._spent.get(key, 0) + micros
            self._spent_expiry[key] = expiry

    def sweep(self, now: float | None = None) -> None:
        """Drop entries that no longer limit anything."""
        now = self.clock() if now is None else now
        for key, (have, at, capacity, rate) in list(self._buckets.items()):
            if have + (now - at) * rate >= capacity:
                del self._buckets[key]
        for key, (times, window) in list(self._loops.items()):
            if not times or times[-1] <= now - window:
                del self._loops[key]
        for key, expiry in list(self._spent_expiry.items()):
            if expiry <= now:
                self._spent.pop(key, None)
                del self._spent_expiry[key]
        for key, expiry in list(self._requests.items()):
            if expiry <= now:
                del self._requests[key]
        for hold, (expiries, keys) in list(self._request_order.items()):
            # Only entries for keys still held with that expiry (refunded and expired ones go).
            kept = [(e, k) for e, k in zip(expiries, keys, strict=True) if self._requests.get(k) == e]
            if kept:
                self._request_order[hold] = (deque(e for e, _ in kept), deque(k for _, k in kept))
            else:
                del self._request_order[hold]
        self._admits, self._kept = 0, self._size()

    def _size(self) -> int:
        return len(self._buckets) + len(self._loops) + len(self._spent) + len(self._requests)

    def sizes(self) -> dict[str, int]:
        return {
            "buckets": len(self._buckets),
            "loops": len(self._loops),
            "counters": len(self._spent),
            "request_keys": len(self._requests),
        }


def ceil_s(seconds: float) -> float:
    """Retry-after as agents read it: whole milliseconds, never 0 while refusing."""
    return max(math.ceil(seconds * 1000) / 1000, 0.001)
