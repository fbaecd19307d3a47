"""``/admin/v1/openapi.json``: the admin API's description, for security admins and auditors."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from arbiter.admin.deps import require
from arbiter.auth.principal import Principal

router = APIRouter(include_in_schema=False)


@router.get("/openapi.json")
async def openapi(
    request: Request, _: Annotated[Principal, Depends(require("openapi", "admin:read"))]
) -> dict[str, Any]:
    spec: dict[str, Any] = request.app.openapi()
    return spec
