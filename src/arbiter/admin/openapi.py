"""``/admin/v1/openapi.json``: the admin API's description, for security admins and auditors."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from arbiter.admin.deps import Reader

router = APIRouter(include_in_schema=False)


@router.get("/openapi.json")
async def openapi(request: Request, _: Reader) -> dict[str, Any]:
    spec: dict[str, Any] = request.app.openapi()
    return spec
