"""``/admin/v1/…/definitions``: review pinned tool, prompt and resource-template definitions.

Reading is an ``upstreams`` admin:read right; deciding (approve, reject, disable, enable) is for security
admins only (``auth.admin_roles``), whatever the policy grants: an approval is what lets a definition
reach agents. Every decision is an audited admin change.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request

from arbiter.admin.deps import change, require, runtime, security_admin
from arbiter.admin.params import RowId
from arbiter.admin.schemas import (
    DefinitionDecisionIn,
    DefinitionDetailOut,
    DefinitionOut,
    DefinitionVersionOut,
    FindingOut,
    ReviewStatus,
)
from arbiter.auth.principal import Principal
from arbiter.naming import exposed_target
from arbiter.proxy.reviews import Review, ReviewDetail, Reviews, Selector
from arbiter.runtime import Runtime

Reader = Annotated[Principal, Depends(require("upstreams", "admin:read"))]
SecurityAdmin = Annotated[Principal, Depends(security_admin)]

router = APIRouter()


def reviews(rt: Annotated[Runtime, Depends(runtime)]) -> Reviews:
    return Reviews(rt.sessions, rt.registry)


ReviewsDep = Annotated[Reviews, Depends(reviews)]


def _out(review: Review) -> DefinitionOut:
    item = review.item
    approved = review.approved
    return DefinitionOut(
        upstream=review.upstream,
        kind=item.kind,  # pyright: ignore[reportArgumentType]
        name=item.name,
        exposed_name=exposed_target(item.kind, review.upstream, item.name),
        status=review.status,  # pyright: ignore[reportArgumentType]
        sha256=item.sha256,
        approved_sha256=approved.sha256 if approved is not None and approved is not item else None,
        findings=[FindingOut.model_validate(f) for f in item.findings or []],
        first_seen=item.first_seen,
        last_seen=item.last_seen,
        reviewed_by=item.reviewed_by,
        reviewed_at=item.reviewed_at,
    )


def _detail(review: ReviewDetail) -> DefinitionDetailOut:
    approved = review.approved
    return DefinitionDetailOut(
        **_out(review).model_dump(),
        definition=review.item.definition,
        approved_definition=approved.definition if approved is not None else None,
        diff=review.diff,
        changed_fields=list(review.changed_fields),
        history=[
            DefinitionVersionOut(
                sha256=i.sha256,
                status=i.status,  # pyright: ignore[reportArgumentType]
                present=i.present,
                first_seen=i.first_seen,
                last_seen=i.last_seen,
                reviewed_by=i.reviewed_by,
                reviewed_at=i.reviewed_at,
            )
            for i in review.history
        ],
    )


@router.get("/definitions", response_model=list[DefinitionOut])
async def all_definitions(
    revs: ReviewsDep, _: Reader, status: ReviewStatus | None = None
) -> list[DefinitionOut]:
    """Every upstream's tools, prompts and resource templates with their review status: the review
    queue is ``?status=pending`` and ``?status=quarantined``."""
    return [_out(r) for r in await revs.list(status=status)]


@router.get("/upstreams/{upstream_id}/definitions", response_model=list[DefinitionOut])
async def upstream_definitions(
    upstream_id: RowId, revs: ReviewsDep, _: Reader, status: ReviewStatus | None = None
) -> list[DefinitionOut]:
    return [_out(r) for r in await revs.list(upstream_id, status)]


@router.get("/upstreams/{upstream_id}/definitions/{kind}/{name:path}", response_model=DefinitionDetailOut)
async def definition(
    upstream_id: RowId,
    kind: Literal["tool", "prompt", "resource_template"],
    name: str,
    revs: ReviewsDep,
    _: Reader,
) -> DefinitionDetailOut:
    """One entry: its present and approved definitions, the diff between them, scan findings, history."""
    return _detail(await revs.detail(upstream_id, kind, name))


@router.post("/upstreams/{upstream_id}/definitions/{action}", response_model=list[DefinitionOut])
async def decide(
    upstream_id: RowId,
    action: Literal["approve", "reject", "disable", "enable"],
    body: DefinitionDecisionIn,
    revs: ReviewsDep,
    caller: SecurityAdmin,
    request: Request,
) -> list[DefinitionOut]:
    """Approve or reject the exact definitions named by their sha256, or disable / re-enable entries
    (whatever their definition), one or many at once. All are applied or none; in force on this replica
    at once, on the others at their next reconcile."""
    selectors = [Selector(i.kind, i.name, i.sha256) for i in body.items]
    async with change(request, caller, f"definition.{action}", str(upstream_id)) as audit:
        audit.before = [r.summary() for r in await _current(revs, upstream_id, selectors)]
        done = await revs.decide(
            upstream_id, action, selectors, caller.subject, acknowledge_findings=body.acknowledge_findings
        )
        audit.after = [r.summary() for r in done]
    return [_out(r) for r in done]


async def _current(revs: Reviews, upstream_id: int, selectors: list[Selector]) -> list[Review]:
    return [await revs.detail(upstream_id, s.kind, s.name) for s in selectors]
