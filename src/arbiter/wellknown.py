"""RFC 9728 protected resource metadata: where agents learn which authorization servers Arbiter trusts."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from arbiter.auth.authenticator import WELL_KNOWN
from arbiter.runtime import Runtime

router = APIRouter(include_in_schema=False)


def _metadata(request: Request) -> dict[str, Any]:
    runtime: Runtime = request.app.state.runtime
    auth = runtime.settings.auth
    body: dict[str, Any] = {
        "resource": runtime.authenticator.resource,
        "authorization_servers": [issuer.issuer for issuer in auth.issuers],
        "bearer_methods_supported": ["header"],
        "resource_name": "Arbiter MCP gateway",
    }
    if auth.required_scopes:
        body["scopes_supported"] = auth.required_scopes
    return body


@router.get(WELL_KNOWN)
async def protected_resource(request: Request) -> dict[str, Any]:
    return _metadata(request)


@router.get(WELL_KNOWN + "/mcp")
async def protected_resource_mcp(request: Request) -> dict[str, Any]:
    return _metadata(request)
