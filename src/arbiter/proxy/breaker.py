"""A circuit breaker per upstream: after ``threshold`` consecutive transport failures or timeouts, calls
are refused at once for ``open_s``; then one probe call goes through (half-open), and its outcome closes
or re-opens the circuit.

Only failures that say something about the upstream's reachability count: a failed connect, a request
cut off, a deadline passed. The upstream's own answers (``isError`` results, JSON-RPC errors, even a
malformed answer) prove it is there and close the circuit. The closed path costs one attribute test.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Literal

from arbiter.errors import UpstreamUnavailable

State = Literal["closed", "open", "half_open"]


class Breaker:
    __slots__ = ("_clock", "_probing", "failures", "name", "open_s", "opened_at", "threshold")

    def __init__(
        self, name: str, *, threshold: int, open_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name
        self.threshold = threshold  # 0: never opens
        self.open_s = open_s
        self.failures = 0  # consecutive
        self.opened_at: float | None = None
        self._probing = False
        self._clock = clock

    @property
    def state(self) -> State:
        if self.opened_at is None:
            return "closed"
        return "open" if self._clock() - self.opened_at < self.open_s else "half_open"

    def admit(self) -> bool:
        """Let a call through, or refuse it with ``UpstreamUnavailable`` (``circuit`` in its details).

        True when the call is the half-open probe: its outcome must be reported (``success``,
        ``failure`` or ``release``)."""
        if self.opened_at is None:
            return False
        waited = self._clock() - self.opened_at
        if waited < self.open_s:
            raise self._refusal("open", self.open_s - waited)
        if self._probing:  # one probe at a time; the others are refused as if it were open
            raise self._refusal("half_open", 1.0)
        self._probing = True
        return True

    def success(self) -> None:
        self.failures = 0
        self.opened_at = None
        self._probing = False

    def failure(self) -> None:
        self.failures += 1
        if self._probing or (self.threshold and self.failures >= self.threshold):
            self.opened_at = self._clock()
        self._probing = False

    def release(self) -> None:
        """The probe ended without an outcome (cancelled, or refused before it reached the upstream)."""
        self._probing = False

    def reset(self) -> None:
        """The upstream proved reachable outside a call (a new connection, a discovery)."""
        if self.opened_at is not None or self.failures:
            self.success()

    def _refusal(self, circuit: State, retry_after: float) -> UpstreamUnavailable:
        return UpstreamUnavailable(
            f"upstream {self.name!r} is unavailable (circuit {circuit.replace('_', '-')}); "
            f"try again in {max(1, math.ceil(retry_after))} s",
            upstream=self.name,
            retry_after_s=max(1, math.ceil(retry_after)),
            circuit=circuit,
        )
