"""Audit events that do not come from the MCP pipeline: refused credentials and admin changes."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from arbiter.audit.record import Event, Kind, actor_of
from arbiter.audit.writer import AuditWriter
from arbiter.auth.principal import Principal
from arbiter.errors import ArbiterError
from arbiter.http_scope import client_ip, trace_id
from arbiter.policies.store import PolicyChange, log_change


def auth_event(exc: ArbiterError, scope: Mapping[str, Any], what: str) -> Event:
    """A credential refused (401/403) before anything ran: who tried is only a source address."""
    return _refusal("auth", exc, None, scope, what)


def forbidden_event(
    exc: ArbiterError, caller: Principal | None, scope: Mapping[str, Any], what: str
) -> Event:
    """An authenticated admin request the policy refused."""
    return _refusal("admin", exc, caller, scope, what)


def _refusal(
    kind: Kind, exc: ArbiterError, caller: Principal | None, scope: Mapping[str, Any], what: str
) -> Event:
    return Event(
        kind=kind,
        decision="deny",
        reason=exc.code,
        actor=actor_of(caller, client_ip(scope)),
        method=what,
        outcome={"status": "refused", "http_status": exc.http_status, "message": exc.message},
        trace_id=trace_id(scope),
    )


@dataclass
class Change:
    """What an admin change did; the handler fills ``before``/``after`` (never with a secret)."""

    before: Any = None
    after: Any = None
    details: dict[str, Any] = field(default_factory=dict[str, Any])
    target: str | None = None  # known only once the change is made (e.g. a new row's id)


_CURRENT: ContextVar[Change | None] = ContextVar("arbiter_admin_change", default=None)


async def record_policy_change(change: PolicyChange) -> None:
    """``PolicyStore``'s sink: the rules before and after go into the admin change being recorded."""
    current = _CURRENT.get()
    if current is None:  # a change made outside the admin API (none today): still leave a trace
        await log_change(change)
        return
    current.before = change.before
    current.after = change.after
    current.details.update(kind=change.kind, policy_version=change.version)


@asynccontextmanager
async def admin_change(
    writer: AuditWriter, caller: Principal, request: Request, action: str, target: str
) -> AsyncGenerator[Change]:
    """Record one admin change. The queue slot is taken first: if the change could not be recorded,
    it is refused (503 ``audit_unavailable``) before anything is changed."""
    writer.reserve()
    change = Change()
    token = _CURRENT.set(change)
    error: BaseException | None = None
    try:
        yield change
    except BaseException as exc:
        error = exc
        raise
    finally:
        _CURRENT.reset(token)
        target = change.target or target
        outcome: dict[str, Any] = {"status": "ok"}
        reason = "changed"
        if isinstance(error, ArbiterError):
            outcome = {"status": "error", "http_status": error.http_status, "message": error.message}
            reason = error.code
        elif error is not None:
            outcome = {"status": "error"}
            reason = "internal_error"
        writer.submit(
            Event(
                kind="admin",
                decision="allow",
                reason=reason,
                actor=actor_of(caller, client_ip(request.scope)),
                method=action,
                tool=target,
                outcome=outcome,
                trace_id=trace_id(request.scope),
                admin={
                    "action": action,
                    "target": target,
                    "before": change.before,
                    "after": change.after,
                    **change.details,
                },
            )
        )
