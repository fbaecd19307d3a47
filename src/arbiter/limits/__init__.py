"""Rate limits, cost budgets and the loop breaker, on an in-process or a Redis backend (docs/limits.md)."""
