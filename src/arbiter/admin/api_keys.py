"""``/admin/v1/api-keys``: keys for service agents. The key is shown once, at creation."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field

from arbiter.admin.deps import change, require, runtime
from arbiter.admin.types import UtcDateTime
from arbiter.audit.events import forbidden_event
from arbiter.auth.apikeys import ApiKeys
from arbiter.auth.principal import Principal
from arbiter.errors import Forbidden
from arbiter.runtime import Runtime
from arbiter.store.models import ApiKey, utcnow

Admin = Annotated[Principal, Depends(require("api-keys", "admin:write"))]
Reader = Annotated[Principal, Depends(require("api-keys", "admin:read"))]

router = APIRouter()


def keys(rt: Runtime = Depends(runtime)) -> ApiKeys:  # noqa: B008 - FastAPI's dependency idiom
    return rt.keys


class ApiKeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    owner: str = Field(min_length=1, max_length=200, description="The agent or service the key is for")
    roles: list[str] = Field(default_factory=list[str], max_length=50)
    tenant: str | None = Field(default=None, max_length=200)
    description: str | None = Field(default=None, max_length=500)
    expires_in_s: int | None = Field(
        default=None, gt=0, le=5 * 365 * 86400, description="Lifetime; none: no expiry"
    )


class ApiKeyOut(BaseModel):
    id: str
    owner: str
    roles: list[str]
    tenant: str | None
    description: str | None
    created_at: UtcDateTime
    created_by: str
    expires_at: UtcDateTime | None
    revoked_at: UtcDateTime | None
    last_used_at: UtcDateTime | None


class ApiKeyCreated(ApiKeyOut):
    key: str = Field(description="The secret key. It is shown this once and cannot be recovered.")


def _out(row: ApiKey) -> ApiKeyOut:
    return ApiKeyOut.model_validate(row, from_attributes=True)


@router.post("/api-keys", response_model=ApiKeyCreated, status_code=status.HTTP_201_CREATED)
async def create_key(
    body: ApiKeyCreate,
    caller: Admin,
    request: Request,
    rt: Runtime = Depends(runtime),  # noqa: B008
    store: ApiKeys = Depends(keys),  # noqa: B008
) -> ApiKeyCreated:
    # A policy may delegate key management; it must not become a way to mint built-in admin roles.
    built_in = set(rt.settings.auth.admin_roles) | set(rt.settings.auth.auditor_roles)
    escalating = (set(body.roles) & built_in) - set(caller.roles)
    if (
        escalating
        and caller.auth_method != "break_glass"
        and not caller.roles & set(rt.settings.auth.admin_roles)
    ):
        refused = Forbidden(f"only a security admin may create keys with the roles {sorted(escalating)}")
        rt.audit.offer(forbidden_event(refused, caller, request.scope, "POST /admin/v1/api-keys"))
        raise refused
    expires = utcnow() + timedelta(seconds=body.expires_in_s) if body.expires_in_s else None
    async with change(request, caller, "api_key.create", body.owner) as audit:
        row, secret = await store.create(
            owner=body.owner,
            roles=body.roles,
            tenant=body.tenant,
            description=body.description,
            expires_at=expires,
            created_by=caller.subject,
        )
        audit.after = _out(row).model_dump(mode="json")  # the key's public fields, never the key
    return ApiKeyCreated(**_out(row).model_dump(), key=secret)


@router.get("/api-keys", response_model=list[ApiKeyOut])
async def list_keys(_: Reader, store: ApiKeys = Depends(keys)) -> list[ApiKeyOut]:  # noqa: B008
    return [_out(row) for row in await store.list()]


@router.get("/api-keys/{key_id}", response_model=ApiKeyOut)
async def get_key(key_id: str, _: Reader, store: ApiKeys = Depends(keys)) -> ApiKeyOut:  # noqa: B008
    return _out(await store.get(key_id))


@router.delete("/api-keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT)
async def revoke_key(
    key_id: str,
    caller: Admin,
    request: Request,
    store: ApiKeys = Depends(keys),  # noqa: B008
) -> Response:
    """Revoke a key: refused at once by this replica, by the others when Redis tells them (at once) or
    within the maintenance interval without Redis."""
    async with change(request, caller, "api_key.revoke", key_id):
        await store.revoke(key_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
