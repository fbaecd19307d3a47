"""When a failed upstream request may be sent again, and how many retries an upstream may take.

Safe means the upstream cannot have run it twice: the request never reached it (a connect failed, the
upstream forgot our session), or it is a read (``resources/read``, ``prompts/get``), or a security admin
marked the tool idempotent (``tool_settings``); the pool then sets ``UpstreamRequest.may_resend``, which
the relay reads too. An upstream's own ``idempotentHint`` is a claim by the party being protected
against, so it is never enough.

The budget keeps retries from multiplying load on an upstream that is failing: every request earns
``ratio`` of a retry, and ``min_per_s`` retries per second are always allowed; a retry spends one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

READS = frozenset({"resources/read", "prompts/get"})


@dataclass(frozen=True, slots=True)
class ToolSetting:
    """What a security admin said about one upstream tool (``None``: the upstream's defaults)."""

    idempotent: bool = False
    timeout_s: float | None = None


class RetryBudget:
    __slots__ = ("_clock", "_last", "cap", "min_per_s", "ratio", "tokens")

    def __init__(
        self, *, ratio: float, min_per_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.cap = max(10.0, min_per_s * 10)  # at most ten seconds' worth saved up
        self.tokens = self.cap
        self._clock = clock
        self._last = clock()

    def earn(self) -> None:
        """One request was made (cheap: called on every request)."""
        tokens = self.tokens + self.ratio
        self.tokens = tokens if tokens < self.cap else self.cap

    def spend(self) -> bool:
        """Whether one retry may be made now (and take it from the budget)."""
        now = self._clock()
        self.tokens = min(self.cap, self.tokens + (now - self._last) * self.min_per_s)
        self._last = now
        if self.tokens < 1.0 - 1e-9:  # five requests earn one retry at 0.2, float sums notwithstanding
            return False
        self.tokens -= 1.0
        return True


def backoff(attempt: int, base_s: float = 0.05, cap_s: float = 1.0) -> float:
    """Full jitter: a random wait up to ``base_s * 2**attempt`` (``cap_s`` at most)."""
    return random.uniform(0, min(cap_s, base_s * (2**attempt)))  # jitter, not security
