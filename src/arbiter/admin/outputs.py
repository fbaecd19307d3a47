"""Response bodies of the policies, limits, usage and audit endpoints, so the OpenAPI document (and
clients generated from it) know their shape. The handlers build plain dicts (they also go into the
audit log as a change's before/after); FastAPI checks them against these models on the way out.

The audit models allow extra fields: their content comes from the audit package, which may add one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from arbiter.admin.types import UtcDateTime
from arbiter.audit.replay import Change, Verdict
from arbiter.limits.rules import BudgetPeriod, Dimension, RatePeriod
from arbiter.policies.engine import Reason

# --- policies -----------------------------------------------------------------------------------------


class PolicyRuleOut(BaseModel):
    """A stored rule: ``p`` rules have subject…condition, ``g`` role links member, role and tenant."""

    id: int
    type: Literal["p", "g"]
    subject: str | None = None
    tenant: str
    object: str | None = None
    action: str | None = None
    effect: Literal["allow", "deny", "approve"] | None = None
    condition: str | None = None
    approvers: list[str] | None = Field(
        default=None, description="approve rules: who approves (user: the end user; role:…/user:…)"
    )
    approval_valid_s: int | None = Field(
        default=None, description="approve rules: how long an approval holds (null: the default)"
    )
    member: str | None = None
    role: str | None = None
    csv: str = Field(description="The rule as a line of the Casbin CSV")


class PolicyOut(BaseModel):
    version: int = Field(description="Bumped by every change; give it as expected_version to replace")
    rules: list[PolicyRuleOut]
    warnings: list[str] | None = Field(
        default=None,
        description="Changes only: rules naming an upstream, tool, prompt or admin area that does not "
        "exist (accepted all the same: it may come later)",
    )


class PolicyDecisionOut(BaseModel):
    allowed: bool
    decision: Literal["allow", "deny", "approve"]
    reason: Reason
    rule: str | None = Field(description="The rule that decided, as CSV")
    policy_version: int


class PolicyExplainOut(PolicyDecisionOut):
    object: str
    visible: bool | None = Field(description="Whether the caller would see it listed (call/read/get)")
    warnings: list[str] = Field(
        default_factory=list[str], description="Roles no rule mentions, with the nearest one that is"
    )


class DryRunCaseOut(PolicyDecisionOut):
    line: int
    ok: bool
    expected: str


class DryRunOut(BaseModel):
    policy: Literal["live", "candidate"]
    policy_version: int = Field(description="-1 for a candidate: it has no version until applied")
    passed: int
    failed: int
    results: list[DryRunCaseOut]


class ImpactCountsOut(BaseModel):
    allow_to_deny: int = Field(description="Ran unattended then, denied by the candidate")
    deny_to_allow: int = Field(description="Denied then, run unattended by the candidate")
    allow_to_approve: int = Field(description="Ran unattended then, needs a person's approval now")
    approve_to_allow: int = Field(description="Needed approval then, runs unattended now")
    approve_to_deny: int = Field(description="Needed approval then, denied now")
    deny_to_approve: int = Field(description="Denied then, runs once a person approves now")
    undecidable: int = Field(description="Decided on an argument the record redacted: not guessed")


class ImpactAgentOut(ImpactCountsOut):
    subject: str
    tenant: str


class ImpactToolOut(ImpactCountsOut):
    tool: str


class ImpactSampleOut(BaseModel):
    seq: int = Field(description="The audit record's seq")
    ts: str
    subject: str
    tenant: str
    tool: str
    action: str
    outcome: Change
    before: Verdict = Field(description="The policy's outcome then, as recorded")
    after: Verdict | None = Field(description="The candidate's outcome (null when undecidable)")
    rule_before: str | None = Field(description="The rule that decided then, as recorded")
    rule_after: str | None = Field(description="The candidate's deciding rule")
    why: str = Field(description="For undecidable: the rule and the redacted field it reads")


class ImpactOut(ImpactCountsOut):
    since: str
    until: str
    limit: int
    read: int = Field(description="Agent requests read from the window, newest first")
    replayed: int = Field(description="Of those, the ones holding a policy decision (calls, reads, gets)")
    capped: bool = Field(description="The window holds more than limit records: the oldest were not read")
    out_of_time: bool = Field(description="Stopped at the time budget: the older records were not read")
    oldest: str | None = Field(description="The oldest record read")
    unchanged: int
    agents: list[ImpactAgentOut] = Field(description="Per subject and tenant, most changes first")
    tools: list[ImpactToolOut]
    samples: list[ImpactSampleOut] = Field(description="The first 50 changed or undecidable records")


# --- limits, budgets, tool costs ---------------------------------------------------------------------


class _MatchingOut(BaseModel):
    id: int
    subject: str
    role: str
    tenant: str
    upstream: str
    tool: str
    per: list[Dimension]
    description: str
    updated_at: UtcDateTime
    updated_by: str | None


class LimitRuleOut(_MatchingOut):
    limit: int
    period: RatePeriod
    burst: int


class BudgetRuleOut(_MatchingOut):
    limit: float
    period: BudgetPeriod


class ToolCostOut(BaseModel):
    id: int
    tool: str
    cost: float | None
    loop_max_repeats: int | None
    loop_window_s: float | None
    updated_at: UtcDateTime
    updated_by: str | None


class RateLimitsOut(BaseModel):
    version: int
    rules: list[LimitRuleOut]


class BudgetsOut(BaseModel):
    version: int
    budgets: list[BudgetRuleOut]


class ToolCostsOut(BaseModel):
    version: int
    default_cost: float
    costs: list[ToolCostOut]


class LoopOut(BaseModel):
    max_repeats: int | None
    window_s: float | None


class LimitsExplainOut(BaseModel):
    version: int
    rules: list[int] = Field(description="Ids of the rate limit rules that apply")
    budgets: list[int] = Field(description="Ids of the budgets that apply")
    cost: float
    loop: LoopOut


class UsageRowOut(BaseModel):
    """One group's use; only the grouped dimensions are present."""

    principal: str | None = None
    tenant: str | None = None
    upstream: str | None = None
    tool: str | None = None
    calls: int
    limited: int
    cost: float


class UsageOut(BaseModel):
    period: BudgetPeriod
    start: UtcDateTime
    end: UtcDateTime
    group_by: list[Dimension]
    rows: list[UsageRowOut]
    totals: UsageRowOut


# --- audit --------------------------------------------------------------------------------------------


class VerifyProblemOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    seq: int | None
    kind: str
    message: str


class CheckpointCountsOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    valid: int
    unsigned: int
    invalid: int
    unchecked: int
    last_signed_seq: int | None


class AuditVerifyOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    ok: bool
    records: int
    first_seq: int | None
    last_seq: int | None
    first_broken: VerifyProblemOut | None
    problems: list[VerifyProblemOut]
    problem_count: int
    checkpoints: CheckpointCountsOut
    signatures_checked: bool
    head_seq: int
    anchor_seq: int | None
    key_ids: list[str]
    verified_at: str = Field(description="RFC 3339 UTC, milliseconds, Z")


class CheckpointOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    seq: int
    hash: str
    ts_ms: int
    ts: str = Field(description="RFC 3339 UTC, milliseconds, Z")
    kind: str
    key_id: str
    signature: str
    signature_valid: bool


class CheckpointsPage(BaseModel):
    model_config = ConfigDict(extra="allow")
    checkpoints: list[CheckpointOut]
    next_cursor: str | None
    key_ids: list[str]
