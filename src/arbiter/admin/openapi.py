"""``/admin/v1/openapi.json``: the admin API's description, for security admins and auditors.

FastAPI's generated document is completed once per app: the bearer scheme on every operation, and the
errors every operation can answer (401/403/422, 404 where a path names a row, 409 on writes), all with
the one error body the API really sends (``ErrorBody``, see admin/errors.py) instead of FastAPI's
``HTTPValidationError``, which this API never answers.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from arbiter.admin import docs
from arbiter.admin.deps import require
from arbiter.auth.principal import Principal

router = APIRouter(include_in_schema=False)
router.include_router(docs.router)

SCHEME = "bearer"
ERROR_REF = "#/components/schemas/ErrorBody"
_WRITES = frozenset({"post", "put", "patch", "delete"})
_ERRORS = {
    "401": "No valid credential (missing, malformed, expired or unknown); see WWW-Authenticate",
    "403": "The credential is valid but may not do this",
    "404": "No such row, or no such path",
    "409": "The change conflicts with the current state (e.g. a stale expected_version, a duplicate)",
    "422": "The request is invalid: error.problems names each problem (the input is never echoed)",
}


class ValidationProblem(BaseModel):
    loc: list[str | int] = Field(description="Where: body, query, path or header, then the field path")
    msg: str
    type: str = Field(description="pydantic's error type, e.g. missing, string_too_long")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")  # details of the error, e.g. upstream, deadline_s

    code: str = Field(description="Stable and machine-readable", examples=["not_found"])
    message: str = Field(description="For humans, one line")
    problems: list[ValidationProblem] | None = Field(
        default=None, description="invalid_input from request validation: each problem"
    )


class ErrorBody(BaseModel):
    """Every error of the admin API: ``{"error": {"code", "message", ...details}}``."""

    error: ErrorDetail


def _error_schemas() -> dict[str, Any]:
    schema = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    defs: dict[str, Any] = schema.pop("$defs", {})
    return {**defs, "ErrorBody": schema}


def _complete(spec: dict[str, Any]) -> dict[str, Any]:
    components: dict[str, Any] = spec.setdefault("components", {})
    schemas: dict[str, Any] = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(_error_schemas())
    components["securitySchemes"] = {
        SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "description": "An admin or auditor API key (arb_…), a JWT from the configured issuer, or "
            "the break-glass token",
        }
    }
    for path, items in spec.get("paths", {}).items():
        for method, op in items.items():
            op["security"] = [{SCHEME: []}]
            codes = ["401", "403", "422"]
            if "{" in path:
                codes.append("404")
            if method in _WRITES:
                codes.append("409")
            responses: dict[str, Any] = op.setdefault("responses", {})
            for code in sorted(codes):
                responses[code] = {
                    "description": _ERRORS[code],
                    "content": {"application/json": {"schema": {"$ref": ERROR_REF}}},
                }
    return spec


def admin_openapi(app: FastAPI) -> dict[str, Any]:
    """The completed document, built once per app (routes do not change after start-up)."""
    cached: dict[str, Any] | None = getattr(app.state, "admin_openapi", None)
    if cached is None:
        cached = _complete(copy.deepcopy(app.openapi()))
        app.state.admin_openapi = cached
    return cached


@router.get("/openapi.json")
async def openapi(
    request: Request, _: Annotated[Principal, Depends(require("openapi", "admin:read"))]
) -> dict[str, Any]:
    return admin_openapi(request.app)
