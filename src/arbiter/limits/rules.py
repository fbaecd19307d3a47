"""What limits a call: rate limit rules, budgets and tool costs, matched against the caller and the tool.

Every rule and budget matches on five globs (``*`` any run, ``?`` one character): the caller's subject,
one of its roles, its tenant, the upstream and the tool. Its ``per`` names the dimensions that get a
counter of their own (``principal``, ``tenant``, ``upstream``, ``tool``; none: one counter for every
matching call). Among the matching rules that count per the same dimensions, a rule is overridden only
by a strictly narrower one: one that matches a subset of the calls it matches, field by field (see
``Match.covers``). Rules that are not comparable that way all apply, as do rules counting per
different dimensions. Budgets select the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from arbiter.auth.principal import Principal
from arbiter.globs import glob_match

Dimension = Literal["principal", "tenant", "upstream", "tool"]
DIMENSIONS: tuple[Dimension, ...] = ("principal", "tenant", "upstream", "tool")
RatePeriod = Literal["second", "minute", "hour", "day"]
RATE_PERIOD_S: dict[str, float] = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
BudgetPeriod = Literal["hour", "day", "month"]
BUDGET_PERIODS: tuple[BudgetPeriod, ...] = ("hour", "day", "month")
MAX_RATE = 1_000_000
MAX_BUDGET = 1_000_000_000.0  # units; counters hold micro-units, exact in a double up to 2**53
MICROS = 1_000_000

_UPSTREAM_GLOB_RE = re.compile(r"^[a-z0-9*?-]{1,64}$")


def _literal(pattern: str) -> bool:
    return "*" not in pattern and "?" not in pattern


def pattern_covers(broad: str, narrow: str) -> bool:
    """Does glob ``broad`` match every value glob ``narrow`` matches? Decided only in the clear cases
    (``*``, the same pattern, or a glob matching a literal value); any other pair counts as not."""
    if broad == "*" or broad == narrow:
        return True
    return _literal(narrow) and glob_match(broad, narrow)


def check_glob(name: str, pattern: str, max_length: int = 300) -> str:
    """Raise ValueError with a specific message if ``pattern`` is not a usable glob for ``name``."""
    if not pattern:
        raise ValueError(f"{name} must not be empty (use '*' for any)")
    if len(pattern) > max_length:
        raise ValueError(f"{name} must be at most {max_length} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in pattern):
        raise ValueError(f"{name} must not contain control characters")
    if name == "upstream" and not _UPSTREAM_GLOB_RE.match(pattern):
        raise ValueError("upstream must be an upstream name or a glob of one (a-z, 0-9, '-', '*', '?')")
    return pattern


def check_rule_tool(pattern: str) -> str:
    """A rate limit rule's or budget's ``tool``: a glob on the upstream's own tool name, which never has
    the ``<upstream>/`` of a cost entry's pattern (the upstream is a field of its own)."""
    check_glob("tool", pattern, 1024)
    if "/" in pattern:
        upstream, _, tool = pattern.partition("/")
        raise ValueError(
            "tool must not contain '/': it matches the upstream's own tool name, so "
            f"{pattern!r} can never match; put the upstream in the upstream field "
            f"(e.g. upstream {upstream or '*'!r}, tool {tool or '*'!r})"
        )
    return pattern


def check_tool_pattern(pattern: str) -> str:
    """A tool cost pattern: ``*`` or ``<upstream glob>/<tool glob>``."""
    check_glob("tool", pattern, 1100)
    if pattern == "*":
        return pattern
    upstream, sep, tool = pattern.partition("/")
    if not sep or not tool:
        raise ValueError("tool must be <upstream>/<tool> (globs allowed, e.g. crm/* or */delete_*), or *")
    check_glob("upstream", upstream)
    return pattern


@dataclass(frozen=True)
class Match:
    """The five globs a rule or budget matches on."""

    subject: str = "*"
    role: str = "*"
    tenant: str = "*"
    upstream: str = "*"
    tool: str = "*"

    def matches(self, principal: Principal, upstream: str, tool: str) -> bool:
        if self.role != "*" and not any(glob_match(self.role, r) for r in principal.roles):
            return False
        return (
            glob_match(self.subject, principal.subject)
            and glob_match(self.tenant, principal.tenant or "")
            and glob_match(self.upstream, upstream)
            and glob_match(self.tool, tool)
        )

    @property
    def fields(self) -> tuple[str, str, str, str, str]:
        return (self.subject, self.role, self.tenant, self.upstream, self.tool)

    def covers(self, other: Match) -> bool:
        """Every call ``other`` matches, this matches too (field by field; see ``pattern_covers``)."""
        return all(
            pattern_covers(mine, theirs) for mine, theirs in zip(self.fields, other.fields, strict=True)
        )

    def overridden_by(self, other: Match) -> bool:
        """``other`` is strictly narrower: it matches a subset of this one's calls, and is not the same."""
        return other != self and self.covers(other)


@dataclass(frozen=True)
class RateRule:
    id: int
    match: Match
    per: tuple[Dimension, ...]
    limit: int
    period: RatePeriod
    burst: int | None = None
    description: str = ""

    @property
    def capacity(self) -> int:
        return self.burst or self.limit

    @property
    def rate_per_s(self) -> float:
        return self.limit / RATE_PERIOD_S[self.period]


@dataclass(frozen=True)
class Budget:
    id: int
    match: Match
    per: tuple[Dimension, ...]
    period: BudgetPeriod
    limit: float
    description: str = ""

    @property
    def limit_micros(self) -> int:
        return round(self.limit * MICROS)


@dataclass(frozen=True)
class ToolCost:
    """Cost and loop-breaker settings for the tools ``tool`` (``<upstream>/<tool>`` glob) names."""

    id: int
    tool: str
    cost: float | None = None
    loop_max_repeats: int | None = None
    loop_window_s: float | None = None

    @property
    def rank(self) -> tuple[int, bool]:
        # The longest literal match wins; on a tie, a pattern without wildcards.
        literal = sum(1 for c in self.tool if c not in "*?")
        return literal, "*" not in self.tool and "?" not in self.tool

    def matches(self, upstream: str, tool: str) -> bool:
        return glob_match(self.tool, f"{upstream}/{tool}")


_Selectable = TypeVar("_Selectable", RateRule, Budget)


def select(items: Iterable[_Selectable], principal: Principal, upstream: str, tool: str) -> list[_Selectable]:
    """The matching items that apply: within each ``per`` group, every matching item that no other
    matching item of the group is strictly narrower than.

    Narrower means a subset, field by field, not a higher sum of field weights: "crm ``delete_*``" and
    "role support-agent on crm" are not comparable (each matches calls the other does not), so both
    apply, and a rule for a role never lifts a cap on a tool.
    """
    groups: dict[tuple[Dimension, ...], list[_Selectable]] = {}
    for item in items:
        if item.match.matches(principal, upstream, tool):
            groups.setdefault(item.per, []).append(item)
    return [
        item
        for group in groups.values()
        for item in group
        if not any(item.match.overridden_by(other.match) for other in group)
    ]


@dataclass(frozen=True)
class ToolSettings:
    cost: float
    loop_max_repeats: int
    loop_window_s: float


def tool_settings(costs: Sequence[ToolCost], upstream: str, tool: str, default: ToolSettings) -> ToolSettings:
    """Each setting from the most specific matching entry that sets it, else the default."""
    matching = sorted((c for c in costs if c.matches(upstream, tool)), key=lambda c: c.rank, reverse=True)
    cost = next((c.cost for c in matching if c.cost is not None), default.cost)
    repeats = next((c.loop_max_repeats for c in matching if c.loop_max_repeats is not None), None)
    window = next((c.loop_window_s for c in matching if c.loop_window_s is not None), None)
    return ToolSettings(
        cost=cost,
        loop_max_repeats=default.loop_max_repeats if repeats is None else repeats,
        loop_window_s=default.loop_window_s if window is None else window,
    )


@dataclass(frozen=True)
class LimitConfig:
    """One version of everything that limits calls, loaded whole from the database."""

    version: int = 0
    rules: tuple[RateRule, ...] = ()
    budgets: tuple[Budget, ...] = ()
    costs: tuple[ToolCost, ...] = ()
    defaults: ToolSettings = field(default_factory=lambda: ToolSettings(1.0, 0, 60.0))

    @property
    def empty(self) -> bool:
        """Nothing could limit a call: no rules, no budgets, no loop breaker anywhere."""
        return (
            not self.rules
            and not self.budgets
            and self.defaults.loop_max_repeats == 0
            and not any(c.loop_max_repeats for c in self.costs)
        )
