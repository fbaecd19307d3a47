"""``/admin/v1/access``: what a caller can see and use, and who can use a tool ("what can this agent do?").

Read from the live policy, catalog and limits of the replica asked: every tool, prompt, resource and
resource template the caller sees (definitions not approved for agents are left out, as agents never
see them), with the decision, the rule that decides, the conditions on arguments and, for tools, the
rate limits and budgets that apply. Needs ``admin:read`` on ``admin/policies``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field

from arbiter.admin.deps import ADMIN_AREAS, require, runtime
from arbiter.audit.events import forbidden_event
from arbiter.auth.apikeys import ISSUER
from arbiter.auth.principal import Principal
from arbiter.errors import Forbidden, InvalidInput
from arbiter.limits.rules import Budget, RateRule, select, tool_settings
from arbiter.naming import exposed_name, exposed_target
from arbiter.policies.access import KIND_ACTION, Access, access, key_active, key_grants, unknown_roles, who
from arbiter.policies.admin_rights import may_admin
from arbiter.policies.engine import Subject
from arbiter.policies.lint import Known, object_warnings
from arbiter.policies.rules import Rule
from arbiter.policies.tables import object_name
from arbiter.runtime import Runtime

Reader = Annotated[Principal, Depends(require("policies", "admin:read"))]
Rt = Annotated[Runtime, Depends(runtime)]

router = APIRouter()


class ConditionOut(BaseModel):
    effect: Literal["allow", "deny", "approve"] = Field(
        description="allow: usable when it holds; deny: refused when it holds; approve: a person is asked"
    )
    condition: str
    rule: str


class AccessOut(BaseModel):
    visible: bool = Field(description="Listed to the caller")
    decision: Literal["allow", "approve", "conditional", "deny"]
    reason: str = Field(
        description="allowed, approval_required, conditional, denied_by_rule or no_matching_rule"
    )
    rule: str | None = Field(description="The rule that decides, when one rule does")
    conditions: list[ConditionOut] = Field(description="For conditional: the conditions that decide")
    rules: list[str] = Field(description="Every rule that applies, conditions not evaluated")

    @classmethod
    def of(cls, a: Access) -> AccessOut:
        return cls.model_validate(a.to_json())


class RateLimitOut(BaseModel):
    id: int
    limit: int
    period: str
    burst: int
    per: list[str]
    match: dict[str, str] = Field(description="subject, role, tenant, upstream and tool globs")
    description: str


class BudgetOut(BaseModel):
    id: int
    limit: float
    period: str
    per: list[str]
    match: dict[str, str]
    description: str


class LimitsOut(BaseModel):
    rate_limits: list[RateLimitOut]
    budgets: list[BudgetOut]
    cost: float = Field(description="Budget units one call costs")


class ItemOut(AccessOut):
    name: str = Field(description="As agents see it: crm__get_customer, arbiter://kb/kb://index")
    object: str = Field(description="As rules name it: crm/get_customer, kb/kb://index")
    upstream: str
    available: bool = Field(description="False while the upstream is disabled or down")
    limits: LimitsOut | None = Field(default=None, description="Tools only")


class PrincipalOut(BaseModel):
    subject: str
    roles: list[str]
    tenant: str | None
    key_id: str | None = None
    active: bool = Field(default=True, description="False for a revoked or expired API key")


class AccessReport(BaseModel):
    principal: PrincipalOut
    policy_version: int
    limits_version: int
    tools: list[ItemOut]
    prompts: list[ItemOut]
    resources: list[ItemOut]
    resource_templates: list[ItemOut]
    warnings: list[str]


class GrantOut(AccessOut):
    kind: Literal["anyone", "role", "user"]
    name: str = Field(description="The role or user subject; * for anyone")
    tenant: str = Field(description='* every tenant; a name: that tenant only; "": tenants no rule names')


class KeyGrantOut(AccessOut):
    id: str
    owner: str
    roles: list[str]
    tenant: str | None


class WhoReport(BaseModel):
    tool: str
    object: str
    policy_version: int
    grants: list[GrantOut] = Field(description="Roles, users named in the policy, and anyone")
    api_keys: list[KeyGrantOut] = Field(description="Active API keys that may use the tool")
    warnings: list[str]


# --- what exists, for write warnings -----------------------------------------------------------------


async def known(rt: Runtime) -> Known:
    """The registered upstreams (enabled or not), their catalog names (held ones too), the admin areas."""
    upstreams = frozenset(row.name for row in await rt.registry.list()) | frozenset(rt.catalog.upstreams())
    entries: dict[str, dict[str, frozenset[str]]] = {}
    for name in rt.catalog.upstreams():
        snap = rt.catalog.get(name)
        if snap is None:
            continue
        by_kind: dict[str, set[str]] = {}
        for kind, entry, _ in snap.items():
            by_kind.setdefault(kind, set()).add(entry)
        for kind, entry in snap.held:
            by_kind.setdefault(kind, set()).add(entry)
        entries[name] = {kind: frozenset(names) for kind, names in by_kind.items()}
    return Known(upstreams, ADMIN_AREAS, entries)


async def write_warnings(rt: Runtime, rules: list[Rule]) -> list[str]:
    return object_warnings(rules, await known(rt))


# --- GET /access ---------------------------------------------------------------------------------------


def _may_read_keys(rt: Runtime, caller: Principal) -> bool:
    # The key inventory (ids, owners, roles, tenants) is admin/api-keys' to show, not admin/policies'.
    return may_admin(caller, "api-keys", "admin:read", rt.settings.auth, rt.policy.engine)


def _need_key_reader(request: Request, rt: Runtime, caller: Principal) -> None:
    if not _may_read_keys(rt, caller):
        refused = Forbidden("the policy does not allow admin:read on admin/api-keys (needed for key_id)")
        where = f"{request.method} {request.url.path}"
        rt.audit.offer(forbidden_event(refused, caller, request.scope, where))
        raise refused


def _rate(rule: RateRule) -> RateLimitOut:
    return RateLimitOut(
        id=rule.id,
        limit=rule.limit,
        period=rule.period,
        burst=rule.capacity,
        per=list(rule.per),
        match=asdict(rule.match),
        description=rule.description,
    )


def _budget(budget: Budget) -> BudgetOut:
    return BudgetOut(
        id=budget.id,
        limit=budget.limit,
        period=budget.period,
        per=list(budget.per),
        match=asdict(budget.match),
        description=budget.description,
    )


@router.get("/access", response_model=AccessReport)
async def show_access(
    request: Request,
    rt: Rt,
    caller: Reader,
    key_id: Annotated[str | None, Query(max_length=64, description="An API key's id")] = None,
    role: Annotated[list[str] | None, Query(description="A role (repeatable)")] = None,
    subject: Annotated[str | None, Query(max_length=256, description="The caller's subject")] = None,
    tenant: Annotated[str | None, Query(max_length=200, description="The caller's tenant")] = None,
) -> AccessReport:
    """Every tool, prompt, resource and template a caller (an API key, roles, or a subject) sees."""
    roles = sorted({r.removeprefix("role:") for r in role or []})
    active = True
    if key_id is not None:
        if roles or subject is not None or tenant is not None:
            raise InvalidInput("give key_id alone, or role/subject/tenant, not both")
        _need_key_reader(request, rt, caller)
        row = await rt.keys.get(key_id)
        active = key_active(row)
        who_ = Principal(
            row.owner,
            ISSUER,
            "api_key",
            row.tenant,
            frozenset(row.roles),
            client_id=row.id,
            api_key_id=row.id,
        )
    elif roles or subject is not None:
        who_ = Principal(subject or "", ISSUER, "api_key", tenant or None, frozenset(roles))
    else:
        raise InvalidInput("give key_id, or at least one role or a subject (with tenant if it has one)")
    engine = rt.policy.engine
    config = await rt.limits.reload()
    sub = Subject.of(who_)
    warnings = unknown_roles(engine.rules, sub.roles)
    if not active:
        warnings.append(f"API key {key_id} is revoked or expired: it can do nothing")
    lists: dict[str, list[ItemOut]] = {"tool": [], "prompt": [], "resource": [], "resource_template": []}
    hidden = set(rt.catalog.hidden())
    for upstream in rt.catalog.upstreams() if active else []:
        snap = rt.catalog.get(upstream)
        if snap is None:
            continue
        for kind, name, _definition in snap.items():  # approved entries only: held ones are never served
            obj, action = f"{upstream}/{name}", KIND_ACTION[kind]
            report = access(engine, sub, obj, action)
            if not report.visible:
                continue
            limits = None
            if kind == "tool":
                cost = tool_settings(config.costs, upstream, name, rt.limits.defaults).cost
                limits = LimitsOut(
                    rate_limits=[_rate(r) for r in select(config.rules, who_, upstream, name)],
                    budgets=[_budget(b) for b in select(config.budgets, who_, upstream, name)],
                    cost=cost,
                )
            item = ItemOut(
                **AccessOut.of(report).model_dump(),
                name=exposed_target(kind, upstream, name),
                object=obj,
                upstream=upstream,
                available=upstream not in hidden,
                limits=limits,
            )
            lists[kind].append(item)
    return AccessReport(
        principal=PrincipalOut(
            subject=who_.subject, roles=sorted(who_.roles), tenant=who_.tenant, key_id=key_id, active=active
        ),
        policy_version=engine.version,
        limits_version=config.version,
        tools=lists["tool"],
        prompts=lists["prompt"],
        resources=lists["resource"],
        resource_templates=lists["resource_template"],
        warnings=warnings,
    )


# --- GET /access/who -----------------------------------------------------------------------------------


@router.get("/access/who", response_model=WhoReport)
async def show_who(
    rt: Rt,
    caller: Reader,
    tool: Annotated[
        str, Query(min_length=3, max_length=1100, description="crm__get_customer or crm/get_customer")
    ],
) -> WhoReport:
    """Which roles, users named in the policy and API keys (never their secrets) may use a tool."""
    obj = object_name(tool)
    upstream, sep, name = obj.partition("/")
    if not sep or not upstream or not name:
        raise InvalidInput("tool must be <upstream>__<tool> or <upstream>/<tool>")
    engine = rt.policy.engine
    notice = rt.catalog.tool_notice(upstream, name)
    warnings: list[str] = [notice] if notice is not None else []
    grants = [
        GrantOut(**AccessOut.of(g.access).model_dump(), kind=g.kind, name=g.name, tenant=g.tenant)
        for g in who(engine, obj, "call")
    ]
    keys: list[KeyGrantOut] = []
    rows = await rt.keys.list() if _may_read_keys(rt, caller) else None
    if rows is None:
        warnings.append("api_keys is left empty: listing API keys needs admin:read on admin/api-keys")
    for row, report in key_grants(engine, rows or [], obj, "call"):
        keys.append(
            KeyGrantOut(
                **AccessOut.of(report).model_dump(),
                id=row.id,
                owner=row.owner,
                roles=sorted(row.roles),
                tenant=row.tenant,
            )
        )
    return WhoReport(
        tool=exposed_name(upstream, name),
        object=obj,
        policy_version=engine.version,
        grants=grants,
        api_keys=keys,
        warnings=warnings,
    )
