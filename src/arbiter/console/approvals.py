"""``/console/approvals``: calls waiting for an approver, and the approver's Approve and Deny.

What a person sees and may decide is ``proxy/approval_desk.py``'s to say, as for ``/admin/v1/approvals``:
the requests they may decide (and their own), or all of them with ``admin:read`` on ``admin/approvals``.
A decision is recorded by the same helper as the API's (``decide_recorded``: ``approval.approve`` or
``approval.deny``, naming the request), marked ``via: console`` like the console's other changes. A
refused decision (their own request, no longer pending) is shown on the request's page, not as an error.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args

from fastapi import APIRouter, Depends, Form, Request, Response

from arbiter.console.web import ConsoleRoute, Viewer, form_viewer, query_text, redirect, render, viewer
from arbiter.errors import Conflict, Forbidden
from arbiter.proxy.approval_desk import decide_recorded, made
from arbiter.proxy.approval_requests import ApprovalRequest, Status

router = APIRouter(route_class=ConsoleRoute)

Who = Annotated[Viewer, Depends(viewer)]
Poster = Annotated[Viewer, Depends(form_viewer)]
STATUSES: tuple[Status, ...] = get_args(Status)
PAGE = 100


def _at(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _sees_all(who: Viewer) -> bool:
    return who.may("approvals", "admin:read")


def _shown(who: Viewer, found: ApprovalRequest) -> dict[str, Any]:
    """A request as the pages show it: the API's fields, with times as text and the arguments as JSON."""
    return {
        **found.to_json(),
        "created": _at(found.created_s),
        "expires": _at(found.expires_s),
        "decided": _at(found.decided_s),
        "used": _at(found.used_s),
        "arguments_json": json.dumps(found.arguments, indent=2, ensure_ascii=False, sort_keys=True),
        "mine": made(who.principal, found),
        "may_decide": who.rt.approvals.may_decide(who.rt.policy.engine, who.principal, found),
    }


@router.get("/approvals")
async def listed(request: Request, who: Who) -> Response:
    params = request.query_params
    given = query_text(params, "status") or "pending"
    status: Status | None = next((s for s in STATUSES if s == given), None)  # "all" or unknown: every one
    before = query_text(params, "before")
    try:
        before_s = float(before) if before else None
    except ValueError:
        before_s = None  # a bad cursor: the first page, not an error
    engine = who.rt.policy.engine
    found = await who.rt.approvals.listed(
        engine, who.principal, see_all=_sees_all(who), status=status, limit=PAGE, before_s=before_s
    )
    return render(
        request,
        "approvals.html",
        who,
        approvals=[_shown(who, f) for f in found],
        status=status or "all",
        statuses=STATUSES,
        sees_all=_sees_all(who),
        older=repr(found[-1].created_s) if len(found) == PAGE else None,
    )


def _page(
    request: Request, who: Viewer, found: ApprovalRequest, status_code: int = 200, error: str | None = None
) -> Response:
    return render(request, "approval.html", who, status_code, a=_shown(who, found), error=error)


@router.get("/approvals/{approval_id}")
async def detail(request: Request, who: Who, approval_id: str) -> Response:
    found = await who.rt.approvals.get(
        who.rt.policy.engine, who.principal, approval_id, see_all=_sees_all(who)
    )
    return _page(request, who, found)


@router.post("/approvals/{approval_id}")
async def decide(
    request: Request,
    who: Poster,
    approval_id: str,
    decision: Annotated[Literal["approve", "deny"], Form()],
    note: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    """Approve or deny; a refusal is shown on the request's page with its reason (and audited)."""
    rt, see_all = who.rt, _sees_all(who)
    try:
        found = await decide_recorded(
            rt.approvals,
            rt.audit,
            rt.policy.engine,
            who.principal,
            request,
            approval_id,
            approve=decision == "approve",
            note=note.strip() or None,
            see_all=see_all,
            via="console",
        )
    except (Forbidden, Conflict) as exc:
        current = await rt.approvals.get(rt.policy.engine, who.principal, approval_id, see_all=see_all)
        return _page(request, who, current, exc.http_status, exc.message)
    who.session.flash.append(f"Approval {found.id} {found.status}.")
    return redirect(f"/approvals/{found.id}")
