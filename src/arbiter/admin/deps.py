"""Admin API dependencies: who is calling (same credentials as /mcp, plus break-glass) and may they."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request

from arbiter.auth.principal import Principal
from arbiter.errors import Forbidden
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


def require(kind: str) -> Callable[..., Awaitable[Principal]]:
    """``admin``: security admins only; ``read``: security admins and auditors."""

    async def check(
        caller: Annotated[Principal, Depends(principal)], rt: Annotated[Runtime, Depends(runtime)]
    ) -> Principal:
        auth = rt.settings.auth
        allowed = set(auth.admin_roles) | (set(auth.auditor_roles) if kind == "read" else set[str]())
        if not caller.roles & allowed:
            raise Forbidden(f"this needs one of the roles: {', '.join(sorted(allowed))}")
        return caller

    return check


def registry(rt: Annotated[Runtime, Depends(runtime)]) -> UpstreamRegistry:
    return rt.registry


Registry = Annotated[UpstreamRegistry, Depends(registry)]
Admin = Annotated[Principal, Depends(require("admin"))]
Reader = Annotated[Principal, Depends(require("read"))]
