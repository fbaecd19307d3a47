"""What an approver may see and decide: one set of rules for the admin API, the CLI (through the API)
and the console.

- An approver of a request is someone the approve rule names (``approve by role:billing-lead``): the
  live policy decides whether the person holds that role (or is that user), in the request's tenant,
  through their credentials' roles and the policy's role links.
- Nobody approves (or denies) their own request: the caller who made the call cannot decide it, whatever
  roles they hold, by any credential of the same subject (compared without case: ``Test-Agent`` is
  ``test-agent``). Separation of duties is the point of an approver.
- A request is decided by someone of its tenant (a request made without a tenant, by someone without one).
- ``admin:read`` on ``admin/approvals`` shows every request (security teams watch the queue); without it
  a person sees the requests of their tenant they may decide, and their own.
"""

from __future__ import annotations

from starlette.requests import Request

from arbiter.audit.events import admin_change
from arbiter.audit.writer import AuditWriter
from arbiter.auth.principal import Principal
from arbiter.errors import Forbidden, NotFound
from arbiter.policies.approvers import is_approve, parse
from arbiter.policies.engine import PolicyEngine
from arbiter.proxy.approval_requests import ApprovalRequest, ApprovalRequests, Status


def made(person: Principal, found: ApprovalRequest) -> bool:
    """Did ``person`` make this request (the same credential's subject, in the same tenant)?"""
    return found.caller == person.key and (person.tenant or "") == found.tenant


def _shown(engine: PolicyEngine, person: Principal, found: ApprovalRequest, see_all: bool) -> bool:
    return see_all or made(person, found) or refusal(engine, person, found) is None


def refusal(engine: PolicyEngine, person: Principal, found: ApprovalRequest) -> str | None:
    """Why ``person`` may not decide ``found`` (None: they may)."""
    if person.key == found.caller or person.subject.casefold() == found.subject.casefold():
        return "nobody may approve or deny their own request"  # the same person, by any of their keys
    if (person.tenant or "") != found.tenant:
        return f"the request is of tenant {found.tenant!r}" if found.tenant else "the request has no tenant"
    if not any(engine.names(person, subject) for subject in found.approvers):
        return f"only {' or '.join(found.approvers)} may decide it"
    return None


class ApprovalDesk:
    def __init__(self, requests: ApprovalRequests) -> None:
        self.requests = requests

    def may_decide(self, engine: PolicyEngine, person: Principal, found: ApprovalRequest) -> bool:
        """May ``person`` approve or deny ``found`` now (it is pending, and nothing refuses them)?"""
        return found.status == "pending" and refusal(engine, person, found) is None

    async def listed(
        self,
        engine: PolicyEngine,
        person: Principal,
        *,
        see_all: bool,
        status: Status | None = None,
        limit: int = 100,
        before_s: float | None = None,
    ) -> list[ApprovalRequest]:
        """Newest first: all of them with ``see_all``, else those ``person`` may decide or made."""
        shown: list[ApprovalRequest] = []
        cursor = before_s
        while len(shown) < limit:
            # Without see_all only the person's tenant can hold what they may see: the database says so.
            tenant = None if see_all else person.tenant or ""
            page = await self.requests.listed(status=status, limit=limit * 4, before_s=cursor, tenant=tenant)
            shown += (found for found in page if _shown(engine, person, found, see_all))
            if len(page) < limit * 4:
                break
            cursor = page[-1].created_s
        return shown[:limit]

    async def get(
        self, engine: PolicyEngine, person: Principal, request_id: str, *, see_all: bool
    ) -> ApprovalRequest:
        found = await self.requests.get(request_id)
        if found is None or not _shown(engine, person, found, see_all):
            raise NotFound(f"no approval request {request_id}")  # the same whether hidden or missing
        return found

    async def decide(
        self,
        engine: PolicyEngine,
        person: Principal,
        request_id: str,
        *,
        approve: bool,
        note: str | None = None,
        see_all: bool = False,
    ) -> ApprovalRequest:
        """Approve or deny; ``Forbidden`` names why not, ``Conflict`` if it is no longer pending."""
        found = await self.get(engine, person, request_id, see_all=see_all)
        why = refusal(engine, person, found)
        if why is not None:
            raise Forbidden(f"you may not decide approval {request_id}: {why}")
        return await self.requests.decide(request_id, approve=approve, by=_who(person), note=note)


async def decide_recorded(
    desk: ApprovalDesk,
    writer: AuditWriter,
    engine: PolicyEngine,
    person: Principal,
    request: Request,
    request_id: str,
    *,
    approve: bool,
    note: str | None,
    see_all: bool,
    via: str | None = None,
) -> ApprovalRequest:
    """``ApprovalDesk.decide`` recorded as an admin change (``approval.approve``/``approval.deny``), the
    same record whether the admin API or the console decided; a refused attempt is recorded too (and
    raised). ``via`` names the surface when it is not the API (the console's changes say ``console``)."""
    verb = "approve" if approve else "deny"
    async with admin_change(writer, person, request, f"approval.{verb}", request_id) as audit:
        audit.details["approval_id"] = request_id  # refused attempts are linked to the request too
        if via is not None:
            audit.details["via"] = via
        found = await desk.decide(engine, person, request_id, approve=approve, note=note, see_all=see_all)
        audit.after = {"status": found.status, "decided_by": found.decided_by, "note": found.note}
        audit.details.update(tool=found.tool, subject=found.subject, rule=found.rule)
    return found


def names_an_approver(engine: PolicyEngine, person: Principal) -> bool:
    """Does an approve rule of the live policy name ``person`` as an approver (``approve by role:…``)?
    The console admits such a person, whatever admin rights they lack: deciding is their work there."""
    for rule in engine.rules:
        if rule.ptype != "p" or not is_approve(rule.values[4]):
            continue
        try:
            spec = parse(rule.values[4])
        except ValueError:  # the live policy was validated; a malformed rule names nobody
            continue
        if spec is not None and any(engine.names(person, subject) for subject in spec.subjects):
            return True
    return False


def _who(person: Principal) -> str:
    """How a decision names its maker (shown to approvers and in the audit log)."""
    return f"user:{person.subject}"
