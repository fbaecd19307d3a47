"""``/admin/v1/limits``, ``/budgets``, ``/tool-costs`` and ``/usage``: rate limits, cost budgets, tool costs
(with the loop breaker's per-tool settings) and what callers used.

Every change is validated whole before anything is written, bumps the limits version, is in force on
this replica at once and on the others within ``limits.reload_interval_s``. Each write handler
computes the ``before``/``after`` of its change and hands both to ``_changed``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Protocol, cast

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from arbiter.admin.deps import change, require, runtime
from arbiter.admin.outputs import (
    BudgetRuleOut,
    BudgetsOut,
    LimitRuleOut,
    LimitsExplainOut,
    RateLimitsOut,
    ToolCostOut,
    ToolCostsOut,
    UsageOut,
)
from arbiter.admin.params import RowId
from arbiter.admin.types import utc_text
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
from arbiter.limits.store import GROUPS, Row
from arbiter.limits.tables import BudgetRow, LimitRuleRow, ToolCostRow
from arbiter.naming import split_name
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


class RateLimitIn(_Matching):
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


class LimitsExplainIn(BaseModel):
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
        "updated_at": utc_text(row.updated_at),
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
        "updated_at": utc_text(row.updated_at),
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


# --- the three kinds of row: one set of routes each ------------------------------------------------


class _Values(Protocol):
    def values(self) -> dict[str, Any]: ...


def _sign(handler: Callable[..., Any], returns: object = dict[str, Any], **params: object) -> None:
    """Give ``handler`` the parameters FastAPI should see: names and types differ per kind of row."""
    kw = inspect.Parameter.KEYWORD_ONLY
    handler.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(name, kw, annotation=kind) for name, kind in params.items()],
        return_annotation=returns,
    )


def _routes(
    path: str,
    *,
    model: type[Row],
    body: type[BaseModel],
    out: Callable[[Row], dict[str, Any]],
    item_out: type[BaseModel],
    list_out: type[BaseModel],
    noun: str,
    action: str,
    id_name: str,
    names: tuple[str, str, str, str, str],
    reader: object,
    writer: object,
    listed: Callable[[Runtime], dict[str, Any]] = lambda rt: {},
    with_get: bool = True,
) -> None:
    """List, create, (get,) replace and delete for one kind of limits row: ``GET``/``POST path``,
    ``GET``/``PUT``/``DELETE path/{id_name}``; each change audited as ``<action>.create|replace|delete``."""
    list_name, create_name, get_name, replace_name, delete_name = names
    key = list_name.removeprefix("list_")
    item = f"{path}/{{{id_name}}}"

    async def list_rows(**kw: Any) -> dict[str, Any]:
        rt: Runtime = kw["rt"]
        version, rows = await rt.limits.store.list(model)
        return {"version": version, **listed(rt), key: [out(r) for r in rows]}

    async def create(**kw: Any) -> dict[str, Any]:
        rt, caller, values = kw["rt"], kw["caller"], cast(_Values, kw["body"]).values()
        async with change(kw["request"], caller, f"{action}.create", "new") as audit:
            _, row = await rt.limits.store.create(model(**values), caller.key)
            after = out(row)
            audit.target = str(after.get("id"))
            await _changed(rt, caller, noun, None, after, audit)
        return after

    async def get(**kw: Any) -> dict[str, Any]:
        return out(await kw["rt"].limits.store.get(model, kw[id_name]))

    async def replace(**kw: Any) -> dict[str, Any]:
        rt, caller, row_id = kw["rt"], kw["caller"], kw[id_name]
        values = cast(_Values, kw["body"]).values()
        async with change(kw["request"], caller, f"{action}.replace", str(row_id)) as audit:
            _, old, row = await rt.limits.store.replace(model, row_id, values, caller.key)
            before, after = out(old), out(row)
            await _changed(rt, caller, noun, before, after, audit)
        return after

    async def delete(**kw: Any) -> Response:
        rt, caller, row_id = kw["rt"], kw["caller"], kw[id_name]
        async with change(kw["request"], caller, f"{action}.delete", str(row_id)) as audit:
            _, old = await rt.limits.store.delete(model, row_id, caller.key)
            await _changed(rt, caller, noun, out(old), None, audit)
        return Response(status_code=204)

    row_id: dict[str, object] = {id_name: RowId}
    _sign(list_rows, list_out, rt=Rt, _=reader)
    _sign(create, item_out, body=body, rt=Rt, caller=writer, request=Request)
    _sign(get, item_out, **row_id, rt=Rt, _=reader)
    _sign(replace, item_out, **row_id, body=body, rt=Rt, caller=writer, request=Request)
    _sign(delete, Response, **row_id, rt=Rt, caller=writer, request=Request)

    router.add_api_route(path, list_rows, methods=["GET"], name=list_name)
    router.add_api_route(path, create, methods=["POST"], status_code=201, name=create_name)
    if with_get:
        router.add_api_route(item, get, methods=["GET"], name=get_name)
    router.add_api_route(item, replace, methods=["PUT"], name=replace_name)
    router.add_api_route(item, delete, methods=["DELETE"], status_code=204, name=delete_name)


_routes(
    "/limits",
    model=LimitRuleRow,
    body=RateLimitIn,
    out=rule_out,
    item_out=LimitRuleOut,
    list_out=RateLimitsOut,
    noun="rate limit rule",
    action="limit",
    id_name="rule_id",
    names=("list_rules", "create_rule", "get_rule", "replace_rule", "delete_rule"),
    reader=LimitsReader,
    writer=LimitsWriter,
)
_routes(
    "/budgets",
    model=BudgetRow,
    body=BudgetIn,
    out=budget_out,
    item_out=BudgetRuleOut,
    list_out=BudgetsOut,
    noun="budget",
    action="budget",
    id_name="budget_id",
    names=("list_budgets", "create_budget", "get_budget", "replace_budget", "delete_budget"),
    reader=BudgetsReader,
    writer=BudgetsWriter,
)
# Tool costs (and the loop breaker per tool): the budgets' permissions, no GET of one entry.
_routes(
    "/tool-costs",
    model=ToolCostRow,
    body=ToolCostIn,
    out=cost_out,
    item_out=ToolCostOut,
    list_out=ToolCostsOut,
    noun="tool cost entry",
    action="tool_cost",
    id_name="cost_id",
    names=("list_costs", "create_cost", "get_cost", "replace_cost", "delete_cost"),
    reader=BudgetsReader,
    writer=BudgetsWriter,
    listed=lambda rt: {"default_cost": rt.limits.defaults.cost},
    with_get=False,
)


@router.post("/limits/explain", response_model=LimitsExplainOut)
async def explain(body: LimitsExplainIn, rt: Rt, _: LimitsReader) -> dict[str, Any]:
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


# --- usage --------------------------------------------------------------------------------------------

Group = Literal["principal", "tenant", "upstream", "tool"]


# exclude_unset: a usage row holds only the dimensions it is grouped by.
@router.get("/usage", response_model=UsageOut, response_model_exclude_unset=True)
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
        "start": utc_text(datetime.fromtimestamp(start, UTC)),
        "end": utc_text(datetime.fromtimestamp(end, UTC)),
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
