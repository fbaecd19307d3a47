"""``/admin/v1/policies``: read, change, import/export, explain and dry-run the Casbin policy.

Every change is validated whole before anything is written, bumps the policy version, is taken up by
this replica at once and by the others within ``policy.poll_interval_s`` (or at once through Redis).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from arbiter.admin.access import write_warnings
from arbiter.admin.deps import change, require, runtime
from arbiter.admin.outputs import DryRunOut, ImpactOut, PolicyExplainOut, PolicyOut
from arbiter.admin.params import RowId, Version
from arbiter.audit.impact import MAX_RECORDS, preview, window
from arbiter.auth.principal import Principal
from arbiter.errors import InvalidInput
from arbiter.policies.access import unknown_roles
from arbiter.policies.approvers import END_USER, MAX_VALID_S, ApprovalSpec
from arbiter.policies.engine import PolicyEngine, Subject
from arbiter.policies.rules import ACTIONS, PolicyInvalid, Rule, check, check_roles, parse_csv, to_csv
from arbiter.policies.tables import object_name, parse_rows, run_table
from arbiter.runtime import Runtime

Reader = Annotated[Principal, Depends(require("policies", "admin:read"))]
Writer = Annotated[Principal, Depends(require("policies", "admin:write"))]
AuditReader = Annotated[Principal, Depends(require("audit", "admin:read"))]
Rt = Annotated[Runtime, Depends(runtime)]

router = APIRouter()


class PolicyRuleIn(BaseModel):
    """A ``p`` rule (subject, tenant, object, action, effect, condition) or a ``g`` role link."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["p", "g"] = "p"
    subject: str | None = Field(default=None, examples=["role:support-agent"])
    tenant: str = "*"
    object: str | None = Field(default=None, examples=["crm/get_*"])
    action: str | None = Field(default=None, examples=["call"])
    effect: Literal["allow", "deny", "approve"] = "allow"
    condition: str = Field(default="", examples=["r.args.region == r.sub.tenant"])
    # approve rules only (docs/policies.md#who-approves): "user" (the end user) and/or policy subjects
    approvers: list[str] | None = Field(default=None, examples=[["role:billing-lead"]], max_length=16)
    approval_valid_s: int | None = Field(default=None, ge=1, le=MAX_VALID_S, examples=[14400])
    member: str | None = Field(default=None, examples=["user:alice"])
    role: str | None = Field(default=None, examples=["role:support-agent"])

    def to_rule(self) -> Rule:
        if self.type == "g":
            return Rule("g", (self.member or "", self.role or "", self.tenant))
        effect: str = self.effect
        if self.effect == "approve":
            effect = ApprovalSpec(tuple(self.approvers or (END_USER,)), self.approval_valid_s).effect
        elif self.approvers is not None or self.approval_valid_s is not None:
            effect = f"{self.effect} (approvers and approval_valid_s are for approve rules only)"
        values = (self.subject or "", self.tenant, self.object or "", self.action or "", effect)
        return Rule("p", (*values, self.condition.strip()))


class RulesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: list[PolicyRuleIn]


class PolicyExplainIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subject: str
    roles: list[str] = Field(default_factory=list[str])
    tenant: str = ""
    object: str = Field(examples=["crm/get_customer", "crm__get_customer"])
    action: str = "call"
    args: dict[str, Any] = Field(default_factory=dict[str, Any])


class DryRunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policy: str | None = Field(
        default=None, description="Candidate policy (Casbin CSV); omitted: the live one"
    )
    cases: list[dict[str, Any]] = Field(description="Decision table rows, as in `arbiter policy test`")


class ImpactIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policy: str = Field(
        max_length=1_000_000,
        description="The candidate policy (Casbin CSV): the whole rule set after the change",
    )
    since: str | None = Field(default=None, description="ISO 8601 or epoch ms; default: 24 h before until")
    until: str | None = Field(default=None, description="ISO 8601 or epoch ms (exclusive); default: now")
    limit: int = Field(default=MAX_RECORDS, ge=1, le=MAX_RECORDS, description="Records read at most")


def _validated(items: list[PolicyRuleIn], *, allow_empty: bool = False) -> list[Rule]:
    rules: list[Rule] = []
    errors: list[dict[str, object]] = []
    if not items and not allow_empty:  # an empty replace is legitimate: it denies everything
        raise PolicyInvalid([{"message": "no rules given"}])
    for index, item in enumerate(items):
        rule = item.to_rule()
        try:
            check(rule)
            if rule in rules:
                raise ValueError(f"repeats rule {rules.index(rule) + 1}")
        except ValueError as exc:
            errors.append({"line": index + 1, "message": str(exc)})
        rules.append(rule)
    if errors:
        raise PolicyInvalid(errors)
    return rules


def _snapshot(rt: Runtime) -> dict[str, object]:
    live = rt.policy
    return {
        "version": live.engine.version,
        "rules": [{"id": rule_id, **rule.to_json(), "csv": rule.csv()} for rule_id, rule in live.rule_ids],
    }


@router.get("/policies", response_model=PolicyOut, response_model_exclude_unset=True)
async def list_rules(rt: Rt, _: Reader) -> dict[str, object]:
    await rt.policy.reload()  # answer with what the database holds now, not the last poll
    return _snapshot(rt)


@router.post("/policies", status_code=201, response_model=PolicyOut, response_model_exclude_unset=True)
async def add_rules(
    body: RulesIn | PolicyRuleIn, rt: Rt, caller: Writer, request: Request
) -> dict[str, object]:
    """Add one rule or several (``{"rules": [...]}``), all or none."""
    rules = _validated(body.rules if isinstance(body, RulesIn) else [body])
    async with change(request, caller, "policy.add", "policies"):
        version = await rt.policy.store.add(rules, caller.key)
    await rt.policy.changed(version)
    return {**_snapshot(rt), "warnings": await write_warnings(rt, rules)}


@router.delete("/policies/{rule_id}", response_model=PolicyOut, response_model_exclude_unset=True)
async def remove_rule(rule_id: RowId, rt: Rt, caller: Writer, request: Request) -> dict[str, object]:
    async with change(request, caller, "policy.remove", str(rule_id)):
        version = await rt.policy.store.remove(rule_id, caller.key)
    await rt.policy.changed(version)
    return _snapshot(rt)


@router.put("/policies", response_model=PolicyOut, response_model_exclude_unset=True)
async def replace_rules(
    body: RulesIn,
    rt: Rt,
    caller: Writer,
    request: Request,
    expected_version: Version = None,
) -> dict[str, object]:
    """Replace the whole policy atomically; ``expected_version`` guards against a concurrent change."""
    rules = _validated(body.rules, allow_empty=True)
    check_roles(rules)
    async with change(request, caller, "policy.replace", "policies"):
        version = await rt.policy.store.replace(rules, caller.key, expected_version)
    await rt.policy.changed(version)
    return {**_snapshot(rt), "warnings": await write_warnings(rt, rules)}


@router.get(
    "/policies/export",
    response_class=Response,
    responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}}, "description": "Casbin CSV"}},
)
async def export_csv(rt: Rt, _: Reader) -> Response:
    engine = await rt.policy.reload()
    return Response(
        to_csv(engine.rules),
        media_type="text/csv",
        headers={
            "x-policy-version": str(engine.version),
            "content-disposition": "attachment; filename=policy.csv",
        },
    )


@router.post(
    "/policies/import",
    response_model=PolicyOut,
    response_model_exclude_unset=True,
    openapi_extra={
        "requestBody": {"required": True, "content": {"text/csv": {"schema": {"type": "string"}}}}
    },
)
async def import_csv(
    request: Request, rt: Rt, caller: Writer, expected_version: Version = None
) -> dict[str, object]:
    """Replace the whole policy with a Casbin CSV file; one bad line rejects the file, changing nothing."""
    rules = parse_csv(await _text(request))
    async with change(request, caller, "policy.import", "policies"):
        version = await rt.policy.store.replace(rules, caller.key, expected_version)
    await rt.policy.changed(version)
    return {**_snapshot(rt), "warnings": await write_warnings(rt, rules)}


@router.post("/policies/explain", response_model=PolicyExplainOut)
async def explain(body: PolicyExplainIn, rt: Rt, _: Reader) -> dict[str, object]:
    """Allow or deny, and the rule that decided, for a caller, object, action and arguments."""
    if body.action not in ACTIONS:
        raise InvalidInput(f"unknown action {body.action!r}; actions are: {', '.join(ACTIONS)}")
    engine = rt.policy.engine
    sub = Subject(body.subject, body.tenant, tuple(sorted(body.roles)))
    obj = object_name(body.object)
    decision = engine.decide(sub, obj, body.action, body.args)
    use = body.action if body.action in ("call", "read", "get") else None
    return {
        **decision.to_json(),
        "object": obj,
        "visible": engine.visible(sub, obj, use) if use else None,
        "warnings": unknown_roles(engine.rules, body.roles),
    }


@router.post("/policies/dry-run", response_model=DryRunOut)
async def dry_run(body: DryRunIn, rt: Rt, _: Reader) -> dict[str, object]:
    """Run a decision table against a candidate policy (or the live one) without changing anything."""
    engine = PolicyEngine(parse_csv(body.policy), -1) if body.policy is not None else rt.policy.engine
    cases = parse_rows(body.cases)
    outcomes = run_table(engine, cases)
    failed = [o for o in outcomes if not o.ok]
    return {
        "policy": "live" if body.policy is None else "candidate",
        "policy_version": engine.version,  # -1 for a candidate: it has no version until applied
        "passed": len(outcomes) - len(failed),
        "failed": len(failed),
        "results": [o.to_json() for o in outcomes],
    }


@router.post("/policies/impact", response_model=ImpactOut)
async def impact(body: ImpactIn, rt: Rt, _: Reader, __: AuditReader) -> dict[str, object]:
    """Replay the decisions the audit log recorded in a window against a candidate policy: which would
    change outcome (allow, approve, deny: allow→deny, allow→approve, …), per agent and tool; a decision
    that depended on an argument the record redacted is counted as undecidable, not guessed. Needs read
    on policies and on audit."""
    since_ms, until_ms = window(body.since, body.until)
    # Off the event loop: a megabyte of rules takes seconds to parse and load, agents wait on it.
    candidate = await anyio.to_thread.run_sync(_engine, body.policy, limiter=rt.previews)
    found = await preview(
        rt.engine,
        candidate,
        since_ms,
        until_ms,
        limit=body.limit,
        definitions=lambda up, name: _tool(rt, up, name),
        limiter=rt.previews,
    )
    return found.to_json()


def _engine(policy: str) -> PolicyEngine:
    return PolicyEngine(parse_csv(policy), -1)


def _tool(rt: Runtime, upstream: str, name: str) -> dict[str, Any] | None:
    snap = rt.catalog.get(upstream)
    return snap.tools.get(name) if snap is not None else None


async def _text(request: Request) -> str:
    raw = await request.body()
    if len(raw) > 1_000_000:
        raise InvalidInput("a policy file may be at most 1 MB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("the policy file must be UTF-8 text") from None
