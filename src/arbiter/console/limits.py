"""``/console/limits``: rate limits, cost budgets with what has been spent against each, and tool costs.

Read-only: changes go through ``/admin/v1/limits``, ``/budgets`` and ``/tool-costs`` (or the CLI). Each
part needs what its API needs: ``admin:read`` on ``admin/limits`` for the rate limits, on
``admin/budgets`` for budgets and costs, and on ``admin/usage`` for the spending bars.

The bars come from the recorded usage (the ``/admin/v1/usage`` table, hourly per principal, tenant,
upstream and tool), not from the live counters, which are keyed by digests: this replica's latest
counts and the others' as of their last flush. Usage holds no roles, so for a budget limited to a role
the bar counts every matching call whatever the caller's role: an upper bound, and the page says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Request, Response

from arbiter.console.web import ConsoleRoute, Viewer, render, viewer
from arbiter.errors import Forbidden
from arbiter.globs import glob_match
from arbiter.limits.backend import period_bounds
from arbiter.limits.rules import MICROS, BudgetPeriod
from arbiter.limits.store import GROUPS
from arbiter.limits.tables import BudgetRow, LimitRuleRow, ToolCostRow

router = APIRouter(route_class=ConsoleRoute)
Who = Annotated[Viewer, Depends(viewer)]

BARS_PER_BUDGET = 20  # the biggest spenders of a budget shared per principal (or tenant, ...)
_USAGE_ROWS = 10_000  # usage groups read per period: beyond that, the smallest spenders are left out


@dataclass(frozen=True)
class Bar:
    label: str  # whose spending: "principal=…, tool=…", or "everyone" for a shared budget
    spent: float
    limit: float

    @property
    def percent(self) -> int:
        return min(100, round(100 * self.spent / self.limit)) if self.limit > 0 else 100


def _per(row: LimitRuleRow | BudgetRow) -> list[str]:
    return [p for p in row.per.split(",") if p]


def _matches(row: BudgetRow, usage: dict[str, Any]) -> bool:
    subject = str(usage["principal"]).partition("|")[2]  # usage keeps the principal as issuer|subject
    return (
        glob_match(row.subject, subject)
        and glob_match(row.tenant, str(usage["tenant"]))
        and glob_match(row.upstream, str(usage["upstream"]))
        and glob_match(row.tool, str(usage["tool"]))
    )


def bars(row: BudgetRow, usage: list[dict[str, Any]]) -> list[Bar]:
    """What each counter of ``row`` has spent in its current period, biggest first."""
    per = _per(row)
    spent: dict[tuple[str, ...], int] = {}
    for u in usage:
        if _matches(row, u):
            key = tuple(str(u[p]) for p in per)
            spent[key] = spent.get(key, 0) + int(u.get("cost_micros") or 0)
    if not per and not spent:
        spent[()] = 0  # a shared budget has one bar, spent or not
    ranked = sorted(spent.items(), key=lambda kv: (-kv[1], kv[0]))[:BARS_PER_BUDGET]
    return [
        Bar(
            ", ".join(f"{p}={v}" for p, v in zip(per, key, strict=True)) or "everyone",
            micros / MICROS,
            row.limit,
        )
        for key, micros in ranked
    ]


async def _usage_by_period(
    who: Viewer, periods: set[BudgetPeriod], now: float
) -> dict[str, list[dict[str, Any]]]:
    store = who.rt.limits.store
    await who.rt.limits.usage.flush()  # this replica's latest counts
    found: dict[str, list[dict[str, Any]]] = {}
    for period in periods:
        start, end = period_bounds(period, now)
        found[period] = await store.usage(
            (int(start) // 3600, int(end) // 3600), list(GROUPS), {}, _USAGE_ROWS
        )
    return found


@router.get("/limits")
async def limits_page(request: Request, who: Who) -> Response:
    may_rules, may_budgets, may_usage = who.may("limits"), who.may("budgets"), who.may("usage")
    if not (may_rules or may_budgets):
        who.refuse(
            request, Forbidden("the policy does not allow admin:read on admin/limits or admin/budgets")
        )
    store = who.rt.limits.store
    rules = (await store.list(LimitRuleRow))[1] if may_rules else []
    budgets = (await store.list(BudgetRow))[1] if may_budgets else []
    costs = (await store.list(ToolCostRow))[1] if may_budgets else []
    now = time.time()
    spending: dict[int, list[Bar]] = {}
    if may_usage and budgets:
        usage = await _usage_by_period(who, {cast(BudgetPeriod, b.period) for b in budgets}, now)
        spending = {b.id or 0: bars(b, usage.get(b.period, [])) for b in budgets}
    return render(
        request,
        "limits.html",
        who,
        rules=rules,
        budgets=budgets,
        costs=costs,
        spending=spending,
        per=_per,
        may_rules=may_rules,
        may_budgets=may_budgets,
        may_usage=may_usage,
        default_cost=who.rt.limits.defaults.cost,
    )
