"""``/admin/v1/limits``, ``/budgets``, ``/tool-costs`` and ``/usage``: rate limits, cost budgets, tool costs
(with the loop breaker's per-tool settings) and what callers used.

Every change is validated whole before anything is written, bumps the limits version, is in force on
this replica at once and on the others within ``limits.reload_interval_s``. Each write handler
computes the ``before``/``after`` of its change and hands both to ``_changed``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from arbiter.admin.deps import change, require, runtime
from arbiter.admin.params import RowId
from arbiter.audit.events import Change
from arbiter.auth.principal import Principal
from arbiter.errors import InvalidInput
from arbiter.limits.backend import period_bounds
from arbiter.limits.rules import (
    DIMENSIONS,
    MAX_BUDGET,
    MAX_RATE,
    MICROS,
    BudgetPeriod,
    Dimension,
    RatePeriod,
    check_glob,
    check_rule_tool,
    check_tool_pattern,
    select,
    tool_settings,
)
from arbiter.limits.store import GROUPS
from arbiter.limits.tables import BudgetRow, LimitRuleRow, ToolCostRow
from arbiter.proxy.naming import split_name
from arbiter.runtime import Runtime

log = logging.getLogger(__name__)

LimitsReader = Annotated[Principal, Depends(require("limits", "admin:read"))]
LimitsWriter = Annotated[Principal, Depends(require("limits", "admin:write"))]
BudgetsReader = Annotated[Principal, Depends(require("budgets", "admin:read"))]
BudgetsWriter = Annotated[Principal, Depends(require("budgets", "admin:write"))]
UsageReader = Annotated[Principal, Depends(require("usage", "admin:read"))]
Rt = Annotated[Runtime, Depends(runtime)]

router = APIRouter()


class _Matching(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subject: str = Field(default="*", description="Glob on the caller's subject", examples=["alice"])
    role: str = Field(
        default="*", description="Glob on any of the caller's roles", examples=["support-agent"]
    )
    tenant: str = Field(default="*", description="Glob on the caller's tenant", examples=["acme"])
    upstream: str = Field(default="*", description="Glob on the upstream name", examples=["crm"])
    tool: str = Field(default="*", description="Glob on the upstream's tool name", examples=["delete_*"])
    per: list[Dimension] = Field(
        default_factory=lambda: ["principal"],
        description="Who gets a counter of their own; [] = one counter shared by every matching call",
    )
    description: str = Field(default="", max_length=500)

    @field_validator("subject", "role", "tenant", "upstream")
    @classmethod
    def _globs(cls, v: str, info: Any) -> str:
        return check_glob(str(info.field_name), v)

    @field_validator("tool")
    @classmethod
    def _tool(cls, v: str) -> str:
        return check_rule_tool(v)

    @field_validator("per")
    @classmethod
    def _per(cls, v: list[Dimension]) -> list[Dimension]:
        if len(set(v)) != len(v):
            raise ValueError("per names a dimension more than once")
        return [d for d in DIMENSIONS if d in v]  # one canonical order: the same set is the same group

    def match_fields(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "role": self.role,
            "tenant": self.tenant,
            "upstream": self.upstream,
            "tool": self.tool,
            "per": ",".join(self.per),
            "description": self.description,
        }


class RuleIn(_Matching):
    """A token bucket: ``limit`` calls per ``period``, bursts up to ``burst`` (default: ``limit``)."""

    limit: int = Field(gt=0, le=MAX_RATE, examples=[60])
    period: RatePeriod = Field(examples=["minute"])
    burst: int | None = Field(default=None, gt=0, le=MAX_RATE)

    def values(self) -> dict[str, Any]:
        return {**self.match_fields(), "limit": self.limit, "period": self.period, "burst": self.burst}


class BudgetIn(_Matching):
    """At most ``limit`` cost units per UTC ``period`` for each counter ``per`` names."""

    period: BudgetPeriod = Field(examples=["day"])
    limit: float = Field(ge=0, le=MAX_BUDGET, examples=[100.0])

    def values(self) -> dict[str, Any]:
        return {**self.match_fields(), "limit": self.limit, "period": self.period}


class ToolCostIn(BaseModel):
    """Cost and loop breaker for the tools ``tool`` names; unset fields inherit (see docs/limits.md)."""

    model_config = ConfigDict(extra="forbid")
    tool: str = Field(
        description="<upstream>/<tool> with globs, or *", examples=["crm/*", "crm/delete_customer"]
    )
    cost: float | None = Field(default=None, ge=0, le=1_000_000, description="Units per call")
    loop_max_repeats: int | None = Field(
        default=None, ge=0, le=100_000, description="Identical calls allowed per window (0: off)"
    )
    loop_window_s: float | None = Field(default=None, gt=0, le=86_400)

    @field_validator("tool")
    @classmethod
    def _tool(cls, v: str) -> str:
        return check_tool_pattern(v)

    @model_validator(mode="after")
    def _something(self) -> ToolCostIn:
        if self.cost is None and self.loop_max_repeats is None and self.loop_window_s is None:
            raise ValueError("set at least one of cost, loop_max_repeats, loop_window_s")
        return self

    def values(self) -> dict[str, Any]:
        return self.model_dump()


class ExplainIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subject: str = Field(examples=["alice"])
    roles: list[str] = Field(default_factory=list[str])
    tenant: str = ""
    tool: str = Field(examples=["crm/get_customer", "crm__get_customer"])


def _matching_out(row: LimitRuleRow | BudgetRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "subject": row.subject,
        "role": row.role,
        "tenant": row.tenant,
        "upstream": row.upstream,
        "tool": row.tool,
        "per": [p for p in row.per.split(",") if p],
        "description": row.description,
        "updated_at": row.updated_at.isoformat(),
        "updated_by": row.updated_by,
    }


def rule_out(row: LimitRuleRow) -> dict[str, Any]:
    return {**_matching_out(row), "limit": row.limit, "period": row.period, "burst": row.burst or row.limit}


def budget_out(row: BudgetRow) -> dict[str, Any]:
    return {**_matching_out(row), "limit": row.limit, "period": row.period}


def cost_out(row: ToolCostRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "tool": row.tool,
        "cost": row.cost,
        "loop_max_repeats": row.loop_max_repeats,
        "loop_window_s": row.loop_window_s,
        "updated_at": row.updated_at.isoformat(),
        "updated_by": row.updated_by,
    }


async def _changed(
    rt: Runtime,
    caller: Principal,
    what: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    audit: Change,
) -> None:
    """One change made: recorded in the audit log and taken up on this replica now (the others follow
    within the reload interval)."""
    action = "created" if before is None else "deleted" if after is None else "changed"
    ident = (after or before or {}).get("id")
    log.info("limits: %s %s %s by %s", what, ident, action, caller.key)
    audit.before, audit.after = before, after
    await rt.limits.reload()


# --- rate limit rules --------------------------------------------------------------------------------


@router.get("/limits")
async def list_rules(rt: Rt, _: LimitsReader) -> dict[str, Any]:
    version, rows = await rt.limits.store.list(LimitRuleRow)
    return {"version": version, "rules": [rule_out(r) for r in rows]}


@router.post("/limits", status_code=201)
async def create_rule(body: RuleIn, rt: Rt, caller: LimitsWriter, request: Request) -> dict[str, Any]:
    async with change(request, caller, "limit.create", "new") as audit:
        _, row = await rt.limits.store.create(LimitRuleRow(**body.values()), caller.key)
        after = rule_out(row)
        audit.target = str(after.get("id"))
        await _changed(rt, caller, "rate limit rule", None, after, audit)
    return after


@router.post("/limits/explain")
async def explain(body: ExplainIn, rt: Rt, _: LimitsReader) -> dict[str, Any]:
    """Which rules, budgets, cost and loop breaker apply to a caller calling a tool (live config)."""
    parts = split_name(body.tool) or tuple(body.tool.split("/", 1))
    if len(parts) != 2 or not all(parts):
        raise InvalidInput("tool must be <upstream>/<tool> or <upstream>__<tool>")
    upstream, tool = parts[0], parts[1]
    who = Principal(body.subject, "explain", "api_key", body.tenant or None, frozenset(body.roles))
    config = await rt.limits.reload()
    rules = select(config.rules, who, upstream, tool)
    budgets = select(config.budgets, who, upstream, tool)
    settings = tool_settings(config.costs, upstream, tool, rt.limits.defaults)
    return {
        "version": config.version,
        "rules": [r.id for r in rules],
        "budgets": [b.id for b in budgets],
        "cost": settings.cost,
        "loop": {"max_repeats": settings.loop_max_repeats, "window_s": settings.loop_window_s},
    }


@router.get("/limits/{rule_id}")
async def get_rule(rule_id: RowId, rt: Rt, _: LimitsReader) -> dict[str, Any]:
    return rule_out(await rt.limits.store.get(LimitRuleRow, rule_id))


@router.put("/limits/{rule_id}")
async def replace_rule(
    rule_id: RowId, body: RuleIn, rt: Rt, caller: LimitsWriter, request: Request
) -> dict[str, Any]:
    async with change(request, caller, "limit.replace", str(rule_id)) as audit:
        _, old, row = await rt.limits.store.replace(LimitRuleRow, rule_id, body.values(), caller.key)
        before, after = rule_out(old), rule_out(row)
        await _changed(rt, caller, "rate limit rule", before, after, audit)
    return after


@router.delete("/limits/{rule_id}", status_code=204)
async def delete_rule(rule_id: RowId, rt: Rt, caller: LimitsWriter, request: Request) -> Response:
    async with change(request, caller, "limit.delete", str(rule_id)) as audit:
        _, old = await rt.limits.store.delete(LimitRuleRow, rule_id, caller.key)
        await _changed(rt, caller, "rate limit rule", rule_out(old), None, audit)
    return Response(status_code=204)


# --- budgets ------------------------------------------------------------------------------------------


@router.get("/budgets")
async def list_budgets(rt: Rt, _: BudgetsReader) -> dict[str, Any]:
    version, rows = await rt.limits.store.list(BudgetRow)
    return {"version": version, "budgets": [budget_out(r) for r in rows]}


@router.post("/budgets", status_code=201)
async def create_budget(body: BudgetIn, rt: Rt, caller: BudgetsWriter, request: Request) -> dict[str, Any]:
    async with change(request, caller, "budget.create", "new") as audit:
        _, row = await rt.limits.store.create(BudgetRow(**body.values()), caller.key)
        after = budget_out(row)
        audit.target = str(after.get("id"))
        await _changed(rt, caller, "budget", None, after, audit)
    return after


@router.get("/budgets/{budget_id}")
async def get_budget(budget_id: RowId, rt: Rt, _: BudgetsReader) -> dict[str, Any]:
    return budget_out(await rt.limits.store.get(BudgetRow, budget_id))


@router.put("/budgets/{budget_id}")
async def replace_budget(
    budget_id: RowId, body: BudgetIn, rt: Rt, caller: BudgetsWriter, request: Request
) -> dict[str, Any]:
    async with change(request, caller, "budget.replace", str(budget_id)) as audit:
        _, old, row = await rt.limits.store.replace(BudgetRow, budget_id, body.values(), caller.key)
        before, after = budget_out(old), budget_out(row)
        await _changed(rt, caller, "budget", before, after, audit)
    return after


@router.delete("/budgets/{budget_id}", status_code=204)
async def delete_budget(budget_id: RowId, rt: Rt, caller: BudgetsWriter, request: Request) -> Response:
    async with change(request, caller, "budget.delete", str(budget_id)) as audit:
        _, old = await rt.limits.store.delete(BudgetRow, budget_id, caller.key)
        await _changed(rt, caller, "budget", budget_out(old), None, audit)
    return Response(status_code=204)


# --- tool costs (and the loop breaker per tool) -------------------------------------------------------


@router.get("/tool-costs")
async def list_costs(rt: Rt, _: BudgetsReader) -> dict[str, Any]:
    version, rows = await rt.limits.store.list(ToolCostRow)
    return {"version": version, "default_cost": rt.limits.defaults.cost, "costs": [cost_out(r) for r in rows]}


@router.post("/tool-costs", status_code=201)
async def create_cost(body: ToolCostIn, rt: Rt, caller: BudgetsWriter, request: Request) -> dict[str, Any]:
    async with change(request, caller, "tool_cost.create", "new") as audit:
        _, row = await rt.limits.store.create(ToolCostRow(**body.values()), caller.key)
        after = cost_out(row)
        audit.target = str(after.get("id"))
        await _changed(rt, caller, "tool cost entry", None, after, audit)
    return after


@router.put("/tool-costs/{cost_id}")
async def replace_cost(
    cost_id: RowId, body: ToolCostIn, rt: Rt, caller: BudgetsWriter, request: Request
) -> dict[str, Any]:
    async with change(request, caller, "tool_cost.replace", str(cost_id)) as audit:
        _, old, row = await rt.limits.store.replace(ToolCostRow, cost_id, body.values(), caller.key)
        before, after = cost_out(old), cost_out(row)
        await _changed(rt, caller, "tool cost entry", before, after, audit)
    return after


@router.delete("/tool-costs/{cost_id}", status_code=204)
async def delete_cost(cost_id: RowId, rt: Rt, caller: BudgetsWriter, request: Request) -> Response:
    async with change(request, caller, "tool_cost.delete", str(cost_id)) as audit:
        _, old = await rt.limits.store.delete(ToolCostRow, cost_id, caller.key)
        await _changed(rt, caller, "tool cost entry", cost_out(old), None, audit)
    return Response(status_code=204)


# --- usage --------------------------------------------------------------------------------------------

Group = Literal["principal", "tenant", "upstream", "tool"]


@router.get("/usage")
async def usage(
    rt: Rt,
    _: UsageReader,
    period: BudgetPeriod = "day",
    at: Annotated[datetime | None, Query(description="A time in the period (default: now), UTC")] = None,
    group_by: Annotated[list[Group] | None, Query(description="Default: all four")] = None,
    principal: str | None = None,
    tenant: str | None = None,
    upstream: str | None = None,
    tool: str | None = None,
    limit: Annotated[int, Query(gt=0, le=10_000)] = 1000,
) -> dict[str, Any]:
    """Calls, calls refused by limits, and cost, per principal/tenant/upstream/tool in one UTC period."""
    when = (at.replace(tzinfo=UTC) if at.tzinfo is None else at) if at else datetime.now(UTC)
    start, end = period_bounds(period, when.timestamp())
    groups = [g for g in GROUPS if group_by is None or g in group_by]
    given = {"principal": principal, "tenant": tenant, "upstream": upstream, "tool": tool}
    filters = {k: v for k, v in given.items() if v is not None}
    await rt.limits.usage.flush()  # this replica's latest counts; the others' within their flush interval
    hours = (int(start) // 3600, int(end) // 3600)
    rows = await rt.limits.store.usage(hours, groups, filters, limit)
    (total,) = await rt.limits.store.usage(hours, [], filters, 1)
    return {
        "period": period,
        "start": datetime.fromtimestamp(start, UTC).isoformat(),
        "end": datetime.fromtimestamp(end, UTC).isoformat(),
        "group_by": groups,
        "rows": [_usage_out(r) for r in rows],
        "totals": _usage_out(total),
    }


def _usage_out(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k in GROUPS}
    out["calls"] = int(row.get("calls") or 0)
    out["limited"] = int(row.get("limited") or 0)
    out["cost"] = int(row.get("cost_micros") or 0) / MICROS
    return out
