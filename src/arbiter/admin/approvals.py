"""``/admin/v1/approvals``: calls waiting for an approver (docs/approvals.md).

Any authenticated admin API caller may use these endpoints; what they see and may decide is
``proxy/approval_desk.py``'s to say: an approver named by the request's rule decides it (never their
own), and ``admin:read`` on ``admin/approvals`` shows every request. Each decision, and each refused
attempt, is an admin change in the audit log (``approval.approve``/``approval.deny``) naming the request,
so the call's first record, the decision and the call that finally ran are linked by the approval id.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from arbiter.admin.deps import principal, runtime
from arbiter.admin.types import UtcDateTime
from arbiter.auth.principal import Principal
from arbiter.policies.admin_rights import may_admin
from arbiter.proxy.approval_desk import decide_recorded
from arbiter.proxy.approval_requests import ApprovalRequest
from arbiter.runtime import Runtime

Caller = Annotated[Principal, Depends(principal)]
Rt = Annotated[Runtime, Depends(runtime)]

router = APIRouter()

StatusName = Literal["pending", "approved", "denied", "used", "expired"]


class ApprovalOut(BaseModel):
    """One request: the call (tool, upstream, arguments as the audit log shows them), who made it, who may
    decide it, and what became of it."""

    id: str = Field(examples=["apr_3q2Zr8kVhN1xTc0bYw5e"])
    status: StatusName
    created: UtcDateTime
    expires: UtcDateTime = Field(description="pending: when it lapses; decided: until when it holds")
    subject: str = Field(description="the caller who made the call")
    tenant: str
    tool: str = Field(description="the tool as the agent calls it")
    upstream: str
    target: str = Field(description="the upstream's own tool name")
    arguments: Any = Field(description="the call's arguments, redacted as the audit log shows them")
    rule: str = Field(description="the approve rule that asked, as a line of the policy")
    approvers: list[str]
    valid_s: int = Field(description="how long an approval holds for the agent's retry")
    decided_by: str | None = None
    decided: UtcDateTime | None = None
    note: str | None = None
    used: UtcDateTime | None = Field(default=None, description="when the approved call ran")
    webhook: Literal["none", "due", "delivered", "failed"]
    may_decide: bool = Field(description="whether the caller of this API may approve or deny it now")


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str | None = Field(default=None, max_length=1000, description="why; shown with the decision")


_NO_NOTE = DecisionIn()
Note = Annotated[DecisionIn, Body(description="optional: a note on the decision")]


def _at(seconds: float | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


def out(found: ApprovalRequest, may_decide: bool) -> ApprovalOut:
    """The request's public fields (``ApprovalRequest.to_json``), with its times as timestamps."""
    times = {
        "created": found.created_s,
        "expires": found.expires_s,
        "decided": found.decided_s,
        "used": found.used_s,
    }
    stamped = {name: _at(at) for name, at in times.items()}
    return ApprovalOut.model_validate({**found.to_json(), **stamped, "may_decide": may_decide})


def _may(rt: Runtime, caller: Principal, found: ApprovalRequest) -> bool:
    return rt.approvals.may_decide(rt.policy.engine, caller, found)


def _sees_all(rt: Runtime, caller: Principal) -> bool:
    return may_admin(caller, "approvals", "admin:read", rt.settings.auth, rt.policy.engine)


@router.get("/approvals", response_model=list[ApprovalOut])
async def list_approvals(
    caller: Caller,
    rt: Rt,
    status: Annotated[
        StatusName | Literal["all"], Query(description="only requests in this state")
    ] = "pending",
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[ApprovalOut]:
    """Newest first: the requests the caller may decide (and their own), or all of them with
    ``admin:read`` on ``admin/approvals``. ``status`` defaults to ``pending``; ``all`` lists every state."""
    engine = rt.policy.engine
    state = None if status == "all" else status
    found = await rt.approvals.listed(
        engine, caller, see_all=_sees_all(rt, caller), status=state, limit=limit
    )
    return [out(f, _may(rt, caller, f)) for f in found]


@router.get("/approvals/{approval_id}", response_model=ApprovalOut)
async def get_approval(approval_id: str, caller: Caller, rt: Rt) -> ApprovalOut:
    found = await rt.approvals.get(rt.policy.engine, caller, approval_id, see_all=_sees_all(rt, caller))
    return out(found, _may(rt, caller, found))


async def _decide(
    approval_id: str, caller: Principal, rt: Runtime, request: Request, body: DecisionIn, approve: bool
) -> ApprovalOut:
    # Recorded as the console records it (approval_desk.decide_recorded: approval.approve/deny, linked by id).
    found = await decide_recorded(
        rt.approvals,
        rt.audit,
        rt.policy.engine,
        caller,
        request,
        approval_id,
        approve=approve,
        note=body.note,
        see_all=_sees_all(rt, caller),
    )
    return out(found, False)


@router.post("/approvals/{approval_id}/approve", response_model=ApprovalOut)
async def approve(
    approval_id: str, caller: Caller, rt: Rt, request: Request, body: Note = _NO_NOTE
) -> ApprovalOut:
    """Approve: the agent's retry of the same call runs it, once, within ``valid_s``. Refused (403) to
    anyone the rule does not name as an approver, and to the caller who made the call; 409 once it is
    no longer pending."""
    return await _decide(approval_id, caller, rt, request, body, True)


@router.post("/approvals/{approval_id}/deny", response_model=ApprovalOut)
async def deny(
    approval_id: str, caller: Caller, rt: Rt, request: Request, body: Note = _NO_NOTE
) -> ApprovalOut:
    """Deny: the agent's retry is told so (``approval_declined``) until the denial lapses."""
    return await _decide(approval_id, caller, rt, request, body, False)
