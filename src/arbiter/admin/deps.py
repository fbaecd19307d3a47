"""Admin API dependencies: who is calling (same credentials as /mcp, plus break-glass) and may they."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Annotated

from fastapi import Depends, Request

from arbiter.audit.events import Change, admin_change, forbidden_event
from arbiter.auth.principal import Principal
from arbiter.errors import Forbidden
from arbiter.policies.admin_rights import is_security_admin, may_admin
from arbiter.proxy.registry import UpstreamRegistry
from arbiter.runtime import Runtime


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


async def principal(request: Request, rt: Annotated[Runtime, Depends(runtime)]) -> Principal:
    """The caller: the break-glass token (if enabled, logged), an API key or a JWT."""
    authorization = request.headers.get("authorization")
    where = f"{request.method} {request.url.path}"
    glass = rt.authenticator.break_glass(authorization, where)
    if glass is not None:
        return glass
    return await rt.authenticator.authenticate(authorization, request.scope.get("query_string", b""))


# Every admin area an endpoint guards: policy writes naming another area get a warning (policies/lint.py).
ADMIN_AREAS = frozenset(
    {"api-keys", "approvals", "audit", "budgets", "limits", "openapi", "policies", "upstreams", "usage"}
)


def require(area: str, action: str) -> Callable[..., Awaitable[Principal]]:
    """May the caller do ``action`` (``admin:read``/``admin:write``) on ``admin/<area>``?

    The policy decides, except for two built-in grants that a bad policy cannot take away (so nobody
    locks themselves out): roles in ``auth.admin_roles`` (and the break-glass token) may do
    everything, roles in ``auth.auditor_roles`` may read the audit log (and this API's description).
    """
    if area not in ADMIN_AREAS:  # at import: an area the list (and so the write warnings) does not know
        raise ValueError(f"admin area {area!r} is missing from ADMIN_AREAS")
    obj = f"admin/{area}"

    async def check(
        request: Request,
        caller: Annotated[Principal, Depends(principal)],
        rt: Annotated[Runtime, Depends(runtime)],
    ) -> Principal:
        # The same decision as the console's (policies/admin_rights.py).
        if may_admin(caller, area, action, rt.settings.auth, rt.policy.engine):
            return caller
        refused = Forbidden(f"the policy does not allow {action} on {obj}")
        rt.audit.offer(
            forbidden_event(refused, caller, request.scope, f"{request.method} {request.url.path}")
        )
        raise refused

    return check


async def security_admin(
    request: Request,
    caller: Annotated[Principal, Depends(principal)],
    rt: Annotated[Runtime, Depends(runtime)],
) -> Principal:
    """Only a security admin (a role in ``auth.admin_roles``, or the break-glass token): for changes no
    policy may delegate, such as marking a tool safe to run twice."""
    if is_security_admin(caller, rt.settings.auth):
        return caller
    refused = Forbidden("only a security admin may do this")
    rt.audit.offer(forbidden_event(refused, caller, request.scope, f"{request.method} {request.url.path}"))
    raise refused


def registry(rt: Annotated[Runtime, Depends(runtime)]) -> UpstreamRegistry:
    return rt.registry


Registry = Annotated[UpstreamRegistry, Depends(registry)]


def change(
    request: Request, caller: Principal, action: str, target: str
) -> AbstractAsyncContextManager[Change]:
    """Record one admin change in the audit log (refused with 503 first if it could not be recorded)."""
    rt: Runtime = request.app.state.runtime
    return admin_change(rt.audit, caller, request, action, target)
