"""Calls waiting for an approver: one row per request, shared by every replica (migration 0013).

A call under an ``approve by role:...`` rule (``policies/approvers.py``) that the end user cannot approve
is recorded here as ``pending``; approvers see it in the admin API, the CLI and the console and approve
or deny it; the agent's retry of the *same* call (same caller, upstream, tool, argument digest and
approve rule) then finds the decision. An approval is spent by the one retry that claims it
(``claim``: a conditional update, so two replicas racing run it once).

Statuses: ``pending`` → ``approved`` → ``used``, or ``pending`` → ``denied``; a pending request lapses
after ``approvals.pending_ttl_s``, an approval or a denial after its validity (``expires_s``), and a
lapsed row is reported as ``expired``. Only one live row exists per call: a retry while one is pending
gets the same id, and a retry after a denial is told so until the denial lapses.

The row holds what approvers are shown (the arguments as the audit log's redaction rules show them,
never more) and the webhook's delivery state (``approval_webhook.py``).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.errors import ApprovalQueueFull, Conflict, NotFound

Status = Literal["pending", "approved", "denied", "used", "expired"]
LIVE = ("pending", "approved", "denied")
RETAIN_S = 30 * 86400  # how long a lapsed or spent request is kept (shown to approvers, listed as such)

metadata = sa.MetaData()

table = sa.Table(
    "approval_requests",
    metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("created_s", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("expires_s", sa.Float, nullable=False),
    sa.Column("call_key", sa.String(64), nullable=False),  # digest of caller, upstream, tool, args, rule
    sa.Column("caller", sa.String(600), nullable=False),  # issuer|subject
    sa.Column("subject", sa.String(256), nullable=False),
    sa.Column("tenant", sa.String(128), nullable=False),
    sa.Column("tool", sa.String(300), nullable=False),  # the exposed name
    sa.Column("upstream", sa.String(64), nullable=False),
    sa.Column("target", sa.String(300), nullable=False),
    sa.Column("arguments", sa.Text, nullable=False),  # JSON, redacted as the audit log shows it
    sa.Column("rule", sa.Text, nullable=False),  # the approve rule, as CSV
    sa.Column("approvers", sa.Text, nullable=False),  # JSON list of policy subjects
    sa.Column("valid_s", sa.Integer, nullable=False),
    sa.Column("trace_id", sa.String(32), nullable=True),
    sa.Column("decided_by", sa.String(600), nullable=True),
    sa.Column("decided_s", sa.Float, nullable=True),
    sa.Column("note", sa.String(1000), nullable=True),
    sa.Column("used_s", sa.Float, nullable=True),
    sa.Column("webhook", sa.String(16), nullable=False),  # none | due | delivered | failed
    sa.Column("webhook_attempts", sa.Integer, nullable=False),
    sa.Column("webhook_next_s", sa.Float, nullable=True),
)

# Which live request of a call counts: a decision over a pending one (a denial first), the oldest first.
_FIRST = sa.case((table.c.status == "denied", 0), (table.c.status == "approved", 1), else_=2)


@dataclass(frozen=True, kw_only=True)
class CallFacts:
    """What a request is for and what approvers are shown; ``key`` binds the retry to it."""

    key: str
    caller: str  # issuer|subject: who made the call (never shown: to_json leaves it out)
    subject: str
    tenant: str
    tool: str
    upstream: str
    target: str
    arguments: Any
    rule: str
    approvers: tuple[str, ...]
    valid_s: int
    trace_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class ApprovalRequest(CallFacts):
    """A stored request: the call, and what became of it."""

    id: str
    status: Status
    created_s: float
    expires_s: float
    decided_by: str | None = None
    decided_s: float | None = None
    note: str | None = None
    used_s: float | None = None
    webhook: str = "none"
    webhook_attempts: int = 0

    def to_json(self) -> dict[str, Any]:
        """The public view (webhook): neither the call's key nor the caller's issuer."""
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _PRIVATE}
        return {**shown, "approvers": list(self.approvers)}


_PRIVATE = frozenset({"key", "caller", "webhook_attempts"})
_JSON = ("arguments", "approvers")  # stored as JSON text


class NotPending(Conflict):
    """A decision on a request that is no longer pending (decided, used or lapsed)."""

    def __init__(self, found: ApprovalRequest) -> None:
        super().__init__(f"approval {found.id} is {found.status}, not pending", status=found.status)


class ApprovalRequests:
    """The pending-approval table: open, find, decide, claim; and the webhook's queue over it."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        pending_ttl_s: float,
        max_pending: int = 20,
        webhook: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._pending_ttl_s = pending_ttl_s
        self._max_pending = max_pending  # per caller (approvals.max_pending_per_caller)
        self._webhook = webhook  # whether new requests are queued for the webhook
        self._clock = clock  # wall clock: expiries are shown to people and shared by replicas

    async def current(self, key: str) -> ApprovalRequest | None:
        """The live request for this call (pending, approved or denied, not lapsed), if any."""
        query = (
            table.select()
            .where(table.c.call_key == key, table.c.status.in_(LIVE), table.c.expires_s > self._clock())
            .order_by(_FIRST, table.c.created_s, table.c.id)
            .limit(1)
        )
        async with self._engine.connect() as db:
            row = (await db.execute(query)).mappings().first()
        return None if row is None else self._request(row)

    async def open(self, facts: CallFacts) -> ApprovalRequest:
        """A pending request for this call: a new one, or the one a racing first call (on this replica or
        another) opened a moment earlier, so that one call has one request. ``ApprovalQueueFull`` when
        the caller already has ``max_pending`` requests waiting."""
        now = self._clock()
        stored = {f.name: getattr(facts, f.name) for f in fields(facts)}
        values: dict[str, Any] = {
            **{("call_key" if name == "key" else name): value for name, value in stored.items()},
            **{name: json.dumps(stored[name], ensure_ascii=False, sort_keys=True) for name in _JSON},
            "id": "apr_" + secrets.token_urlsafe(15),
            "created_s": now,
            "status": "pending",
            "expires_s": now + self._pending_ttl_s,
            "webhook": "due" if self._webhook else "none",
            "webhook_attempts": 0,
            "webhook_next_s": now if self._webhook else None,
        }
        async with self._engine.begin() as db:
            # Rows long past their expiry are no use to anyone: they go as new ones come.
            await db.execute(table.delete().where(table.c.expires_s < now - RETAIN_S))
            await db.execute(table.insert().values(**values))
        # Settle with every other opener of this call (and of this caller): the oldest pending request of
        # a call is kept and the others go, whoever commits last sees them all; a request beyond the
        # caller's first max_pending (oldest first) goes too. The outcome does not depend on who is first.
        found = None if await self._settle(facts, values["id"], now) else await self.current(facts.key)
        if found is None:  # ours went for the cap (now, or when a racing request of the caller settled)
            raise ApprovalQueueFull(
                f"you already have {self._max_pending} approval requests waiting; no more are opened "
                "until some are decided",
                pending_max=self._max_pending,
            )
        return found

    async def _settle(self, facts: CallFacts, own_id: str, now: float) -> bool:
        """Remove what ``open`` must not leave; whether ours went for the caller's cap."""
        live = (table.c.status == "pending", table.c.expires_s > now)
        first = (
            sa.select(table.c.id)
            .where(table.c.call_key == facts.key, *live)
            .order_by(table.c.created_s, table.c.id)
            .limit(1)
        )
        last_kept = (  # the caller's max_pending-th oldest pending request: any younger one goes
            sa.select(table.c.created_s, table.c.id)
            .where(table.c.caller == facts.caller, *live)
            .order_by(table.c.created_s, table.c.id)
            .offset(self._max_pending - 1)
            .limit(1)
        )
        async with self._engine.begin() as db:
            kept = (await db.execute(first)).scalar_one_or_none()
            if kept is not None:
                await db.execute(
                    table.delete().where(table.c.call_key == facts.key, *live, table.c.id != kept)
                )
            edge = (await db.execute(last_kept)).first()
            if edge is not None:
                younger = sa.or_(
                    table.c.created_s > edge.created_s,
                    sa.and_(table.c.created_s == edge.created_s, table.c.id > edge.id),
                )
                await db.execute(table.delete().where(table.c.caller == facts.caller, *live, younger))
            still = (await db.execute(sa.select(table.c.id).where(table.c.id == own_id))).first()
        return kept == own_id and still is None

    async def _found(self, request_id: str) -> ApprovalRequest:
        found = await self.get(request_id)
        if found is None:  # only a row this replica just wrote or read: never deleted under it
            raise LookupError(f"approval request {request_id} vanished")
        return found

    async def get(self, request_id: str) -> ApprovalRequest | None:
        async with self._engine.connect() as db:
            row = (await db.execute(table.select().where(table.c.id == request_id))).mappings().first()
        return None if row is None else self._request(row)

    async def listed(
        self,
        *,
        status: Status | None = None,
        limit: int = 100,
        before_s: float | None = None,
        tenant: str | None = None,
    ) -> list[ApprovalRequest]:
        """Newest first; ``status`` as reported (``expired`` rows are lapsed live ones); ``tenant``: only
        that tenant's ("" for requests made without one)."""
        now = self._clock()
        query = table.select().order_by(table.c.created_s.desc(), table.c.id).limit(limit)
        if tenant is not None:
            query = query.where(table.c.tenant == tenant)
        if before_s is not None:
            query = query.where(table.c.created_s < before_s)
        if status == "expired":
            query = query.where(table.c.status.in_(LIVE), table.c.expires_s <= now)
        elif status in LIVE:
            query = query.where(table.c.status == status, table.c.expires_s > now)
        elif status is not None:
            query = query.where(table.c.status == status)
        async with self._engine.connect() as db:
            rows = (await db.execute(query)).mappings().all()
        return [self._request(row) for row in rows]

    async def decide(self, request_id: str, *, approve: bool, by: str, note: str | None) -> ApprovalRequest:
        """Approve or deny a pending request (``NotPending`` if it is not, ``KeyError`` if unknown). The
        decision holds for the request's validity from now."""
        now = self._clock()
        found = await self.get(request_id)
        if found is None:
            raise NotFound(f"no approval request {request_id}")
        update = (
            table.update()
            .where(table.c.id == request_id, table.c.status == "pending", table.c.expires_s > now)
            .values(
                status="approved" if approve else "denied",
                decided_by=by,
                decided_s=now,
                note=note,
                expires_s=now + found.valid_s,
            )
        )
        async with self._engine.begin() as db:
            changed = (await db.execute(update)).rowcount
        after = await self._found(request_id)
        if changed != 1:
            raise NotPending(after)
        return after

    async def claim(self, request_id: str) -> float | None:
        """Spend an approval: the claim's time for the one retry that gets it, on any replica; else None."""
        now = self._clock()
        update = (
            table.update()
            .where(table.c.id == request_id, table.c.status == "approved", table.c.expires_s > now)
            .values(status="used", used_s=now)
        )
        async with self._engine.begin() as db:
            return now if (await db.execute(update)).rowcount == 1 else None

    async def release(self, request_id: str, claimed_s: float) -> None:
        """Give back a claimed approval whose call a later step refused before it reached the upstream (a
        rate limit, a budget, the argument guard): it did not run, so the approval still holds."""
        update = (
            table.update()
            .where(table.c.id == request_id, table.c.status == "used", table.c.used_s == claimed_s)
            .values(status="approved", used_s=None)
        )
        async with self._engine.begin() as db:
            await db.execute(update)

    # The webhook's queue (approval_webhook.py): rows whose notice is due, leased one at a time.

    async def due_notices(self, limit: int = 20) -> list[ApprovalRequest]:
        query = (
            table.select()
            .where(table.c.webhook == "due", table.c.webhook_next_s <= self._clock())
            .order_by(table.c.webhook_next_s)
            .limit(limit)
        )
        async with self._engine.connect() as db:
            rows = (await db.execute(query)).mappings().all()
        return [self._request(row) for row in rows]

    async def next_notice_s(self) -> float | None:
        """When the earliest due notice may be sent (None: none is due)."""
        query = sa.select(sa.func.min(table.c.webhook_next_s)).where(table.c.webhook == "due")
        async with self._engine.connect() as db:
            return (await db.execute(query)).scalar()

    async def lease_notice(self, found: ApprovalRequest, lease_s: float) -> bool:
        """Take one delivery attempt for this replica (no other sends it meanwhile)."""
        now = self._clock()
        update = (
            table.update()
            .where(
                table.c.id == found.id,
                table.c.webhook == "due",
                table.c.webhook_attempts == found.webhook_attempts,
                table.c.webhook_next_s <= now,
            )
            .values(webhook_attempts=found.webhook_attempts + 1, webhook_next_s=now + lease_s)
        )
        async with self._engine.begin() as db:
            return (await db.execute(update)).rowcount == 1

    async def notice_done(
        self, request_id: str, attempt: int, *, outcome: str, next_s: float | None = None
    ) -> None:
        """``delivered``, ``failed`` (given up), or ``due`` again at ``next_s``: the outcome of attempt
        ``attempt``, recorded only if no later attempt was leased meanwhile (its lease lapsed)."""
        update = table.update().where(table.c.id == request_id, table.c.webhook_attempts == attempt)
        update = update.values(webhook=outcome, webhook_next_s=next_s)
        async with self._engine.begin() as db:
            await db.execute(update)

    def _request(self, row: Any) -> ApprovalRequest:
        data = {f.name: row["call_key" if f.name == "key" else f.name] for f in fields(ApprovalRequest)}
        data.update({name: json.loads(data[name]) for name in _JSON})
        data["approvers"] = tuple(data["approvers"])
        if data["status"] in LIVE and data["expires_s"] <= self._clock():
            data["status"] = "expired"
        return ApprovalRequest(**data)
