"""``/console/keys``: list, create (the key shown once) and revoke API keys, as ``/admin/v1/api-keys``.

Listing needs ``admin:read`` on ``admin/api-keys``, creating and revoking ``admin:write``; the same
rule keeps a delegated key manager from minting built-in admin or auditor roles.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request, Response

from arbiter.audit.events import admin_change
from arbiter.console.paging import paginate
from arbiter.console.web import ConsoleRoute, Viewer, form_viewer, redirect, render, viewer
from arbiter.errors import Forbidden, InvalidInput
from arbiter.policies.admin_rights import escalating_roles
from arbiter.store.models import ApiKey, utcnow

router = APIRouter(route_class=ConsoleRoute)
PAGE = 50


def _public(row: ApiKey) -> dict[str, Any]:
    """The key's public fields (never its secret or hash): what the page shows and the audit records."""
    return {
        "id": row.id,
        "owner": row.owner,
        "roles": list(row.roles),
        "tenant": row.tenant,
        "description": row.description,
        "created_at": row.created_at.isoformat(),
        "created_by": row.created_by,
        "expires_at": row.expires_at.isoformat() if row.expires_at else None,
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
        "last_used_at": row.last_used_at.isoformat() if row.last_used_at else None,
    }


async def _page(
    request: Request,
    who: Viewer,
    page: int,
    created: dict[str, Any] | None = None,
    secret: str | None = None,
) -> Response:
    who.need(request, "api-keys")
    rows = sorted(await who.rt.keys.list(), key=lambda r: r.created_at, reverse=True)
    pager = paginate(rows, page, PAGE)
    return render(
        request,
        "keys.html",
        who,
        keys=[_public(r) for r in pager.items],
        pager=pager,
        may_write=who.may("api-keys", "admin:write"),
        created=created,
        secret=secret,
    )


@router.get("/keys")
async def keys(request: Request, who: Annotated[Viewer, Depends(viewer)], page: int = 1) -> Response:
    return await _page(request, who, page)


def _roles(text: str) -> list[str]:
    roles = [r.strip() for r in text.replace("\n", ",").split(",") if r.strip()]
    if len(roles) > 50 or any(len(r) > 200 for r in roles):
        raise InvalidInput("at most 50 roles of at most 200 characters each")
    return list(dict.fromkeys(roles))


@router.post("/keys")
async def create(
    request: Request,
    who: Annotated[Viewer, Depends(form_viewer)],
    owner: Annotated[str, Form(min_length=1, max_length=200)],
    roles: Annotated[str, Form(max_length=12_000)] = "",
    tenant: Annotated[str, Form(max_length=200)] = "",
    description: Annotated[str, Form(max_length=500)] = "",
    expires_in_days: Annotated[int | None, Form(gt=0, le=5 * 365)] = None,
) -> Response:
    who.need(request, "api-keys", "admin:write")
    wanted = _roles(roles)
    escalating = escalating_roles(who.principal, set(wanted), who.rt.settings.auth)
    if escalating:
        who.refuse(
            request, Forbidden(f"only a security admin may create keys with the roles {sorted(escalating)}")
        )
    expires = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
    async with admin_change(who.rt.audit, who.principal, request, "api_key.create", owner.strip()) as ch:
        row, secret = await who.rt.keys.create(
            owner=owner.strip(),
            roles=wanted,
            tenant=tenant.strip() or None,
            description=description.strip() or None,
            expires_at=expires,
            created_by=who.principal.subject,
        )
        ch.after = _public(row)  # never the key
        ch.details["via"] = "console"
    # Rendered, not redirected: the key is shown this once and kept nowhere (the page is no-store).
    return await _page(request, who, 1, created=_public(row), secret=secret)


@router.post("/keys/{key_id}/revoke")
async def revoke(request: Request, who: Annotated[Viewer, Depends(form_viewer)], key_id: str) -> Response:
    who.need(request, "api-keys", "admin:write")
    async with admin_change(who.rt.audit, who.principal, request, "api_key.revoke", key_id) as ch:
        await who.rt.keys.revoke(key_id)
        ch.details["via"] = "console"
    who.session.flash.append(f"Key {key_id} revoked.")
    return redirect("/keys")
