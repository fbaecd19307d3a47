"""``/admin/v1/upstreams`` and ``/admin/v1/catalog``: register upstreams and read what they offer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from arbiter.admin.credentials import credential_input
from arbiter.admin.deps import Registry, change, require, runtime, security_admin
from arbiter.admin.params import RowId
from arbiter.admin.schemas import (
    CatalogCounts,
    CatalogEntryOut,
    CredentialOut,
    ToolSettingsIn,
    ToolSettingsOut,
    UpstreamCreate,
    UpstreamOut,
    UpstreamUpdate,
)
from arbiter.auth.outbound import CredentialSpec
from arbiter.auth.principal import Principal
from arbiter.naming import exposed_target
from arbiter.proxy.catalog import KIND_FIELDS
from arbiter.proxy.definitions import UpstreamChanges, UpstreamDefinition, widens_auto_approve
from arbiter.proxy.registry import UpstreamRegistry
from arbiter.proxy.retries import ToolSetting
from arbiter.runtime import Runtime
from arbiter.store.models import CatalogItem, ToolSettingRow, Upstream
from arbiter.store.upstreams import served


class _NoEchoRoute(APIRoute):
    """Validation errors without the offending input: a malformed credential would echo its secret."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                errors = [{k: v for k, v in e.items() if k != "input"} for e in exc.errors()]
                raise RequestValidationError(errors) from None

        return route


Reader = Annotated[Principal, Depends(require("upstreams", "admin:read"))]
Admin = Annotated[Principal, Depends(require("upstreams", "admin:write"))]
SecurityAdmin = Annotated[Principal, Depends(security_admin)]

router = APIRouter(route_class=_NoEchoRoute)


def _out(reg: UpstreamRegistry, row: Upstream, counts: dict[int, Counter[str]]) -> UpstreamOut:
    assert row.id is not None
    per_kind = counts.get(row.id, Counter[str]())
    status = reg.status(row)
    return UpstreamOut(
        id=row.id,
        name=row.name,
        transport=row.transport,
        url=row.url,
        command=row.command,
        connect_timeout_s=row.connect_timeout_s,
        call_timeout_s=row.call_timeout_s,
        enabled=row.enabled,
        source="config" if row.source == "config" else "api",
        status=status,  # pyright: ignore[reportArgumentType]
        listed=status in ("connected", "idle"),
        last_error=row.last_error,
        created_at=row.created_at,
        updated_at=row.updated_at,
        last_refresh_at=row.last_refresh_at,
        catalog=CatalogCounts(**{field: per_kind[kind] for kind, field in KIND_FIELDS.items()}),
        credential=CredentialOut.model_validate(CredentialSpec.from_json(row.credential).public()),
        max_concurrency=row.max_concurrency,
        fallback=row.fallback,
        auto_approve=row.auto_approve,
        circuit=reg.circuit(row.name),
    )


async def _one(reg: UpstreamRegistry, row: Upstream) -> UpstreamOut:
    return _out(reg, row, await reg.counts())


def _definition(body: UpstreamCreate, auto_approve_default: bool) -> UpstreamDefinition:
    return UpstreamDefinition(
        name=body.name,
        url=body.url,
        transport=body.transport,
        connect_timeout_s=body.connect_timeout_s,
        call_timeout_s=body.call_timeout_s,
        enabled=body.enabled,
        credential=credential_input(body.credential),
        max_concurrency=body.max_concurrency,
        fallback=body.fallback,
        auto_approve=body.auto_approve if body.auto_approve is not None else auto_approve_default,
    )


def _changes(body: UpstreamUpdate) -> UpstreamChanges:
    return UpstreamChanges(
        transport=body.transport,
        url=body.url,
        connect_timeout_s=body.connect_timeout_s,
        call_timeout_s=body.call_timeout_s,
        enabled=body.enabled,
        credential=credential_input(body.credential) if body.credential is not None else None,
        max_concurrency=body.max_concurrency,
        fallback=body.fallback,
        auto_approve=body.auto_approve,
        # An explicit null sets it back to none.
        clear=frozenset(
            f
            for f in ("max_concurrency", "fallback")
            if f in body.model_fields_set and getattr(body, f) is None
        ),
    )


async def _may_auto_approve(request: Request, caller: Principal, rt: Runtime) -> None:
    """Turning auto-approve on approves definitions nobody reviewed: only security admins may (the
    operator's integrity.auto_approve_default is the operator's own decision)."""
    await security_admin(request, caller, rt)


def _entry(upstream: str, item: CatalogItem) -> CatalogEntryOut:
    return CatalogEntryOut(
        upstream=upstream,
        kind=item.kind,  # pyright: ignore[reportArgumentType]
        name=item.name,
        exposed_name=exposed_target(item.kind, upstream, item.name),
        sha256=item.sha256,
        first_seen=item.first_seen,
        last_seen=item.last_seen,
        definition=item.definition,
        status=served(item),  # pyright: ignore[reportArgumentType]
    )


@router.get("/upstreams", response_model=list[UpstreamOut])
async def list_upstreams(reg: Registry, _: Reader) -> list[UpstreamOut]:
    rows, counts = await reg.list(), await reg.counts()
    return [_out(reg, row, counts) for row in rows]


@router.post("/upstreams", response_model=UpstreamOut, status_code=status.HTTP_201_CREATED)
async def create_upstream(
    body: UpstreamCreate, reg: Registry, caller: Admin, request: Request
) -> UpstreamOut:
    """Register an upstream: Arbiter connects, discovers its tools/resources/prompts and stores them."""
    rt = runtime(request)
    default = rt.settings.integrity.auto_approve_default
    if body.auto_approve:
        await _may_auto_approve(request, caller, rt)
    async with change(request, caller, "upstream.create", body.name) as audit:
        out = await _one(reg, await reg.create(_definition(body, default)))
        audit.after = out.model_dump(mode="json")
    return out


@router.get("/upstreams/{upstream_id}", response_model=UpstreamOut)
async def get_upstream(upstream_id: RowId, reg: Registry, _: Reader) -> UpstreamOut:
    return await _one(reg, await reg.get(upstream_id))


@router.patch("/upstreams/{upstream_id}", response_model=UpstreamOut)
async def update_upstream(
    upstream_id: RowId, body: UpstreamUpdate, reg: Registry, caller: Admin, request: Request
) -> UpstreamOut:
    changes = _changes(body)

    async def currently() -> bool:
        return (await reg.get(upstream_id)).auto_approve

    if await widens_auto_approve(changes, currently):
        await _may_auto_approve(request, caller, runtime(request))
    async with change(request, caller, "upstream.update", str(upstream_id)) as audit:
        audit.before = (await _one(reg, await reg.get(upstream_id))).model_dump(mode="json")
        out = await _one(reg, await reg.update(upstream_id, changes))
        audit.after = out.model_dump(mode="json")
    return out


@router.delete("/upstreams/{upstream_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_upstream(upstream_id: RowId, reg: Registry, caller: Admin, request: Request) -> Response:
    async with change(request, caller, "upstream.delete", str(upstream_id)) as audit:
        audit.before = (await _one(reg, await reg.get(upstream_id))).model_dump(mode="json")
        await reg.delete(upstream_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/upstreams/{upstream_id}/refresh", response_model=UpstreamOut)
async def refresh_upstream(upstream_id: RowId, reg: Registry, caller: Admin, request: Request) -> UpstreamOut:
    """Re-discover an upstream's catalog now."""
    async with change(request, caller, "upstream.refresh", str(upstream_id)) as audit:
        out = await _one(reg, await reg.refresh(upstream_id))
        audit.after = {"catalog": out.catalog.model_dump(mode="json"), "status": out.status}
    return out


@router.get("/upstreams/{upstream_id}/catalog", response_model=list[CatalogEntryOut])
async def upstream_catalog(upstream_id: RowId, reg: Registry, _: Reader) -> list[CatalogEntryOut]:
    return [_entry(name, item) for name, item in await reg.catalog_items(upstream_id)]


@router.get("/catalog", response_model=list[CatalogEntryOut])
async def catalog(
    reg: Registry, _: Reader, kind: Literal["tool", "resource", "resource_template", "prompt"] | None = None
) -> list[CatalogEntryOut]:
    """Everything the enabled and disabled upstreams currently offer, as last discovered."""
    return [
        _entry(name, item) for name, item in await reg.catalog_items() if kind is None or item.kind == kind
    ]


def _tool_out(upstream: str, tool: str, stored: ToolSettingRow | None) -> ToolSettingsOut:
    if stored is None:
        return ToolSettingsOut(upstream=upstream, tool=tool)
    return ToolSettingsOut(
        upstream=upstream,
        tool=tool,
        idempotent=stored.idempotent,
        timeout_s=stored.timeout_s,
        updated_at=stored.updated_at,
        updated_by=stored.updated_by,
    )


@router.get("/upstreams/{upstream_id}/tools/{tool}/settings", response_model=ToolSettingsOut)
async def get_tool_settings(upstream_id: RowId, tool: str, reg: Registry, _: Reader) -> ToolSettingsOut:
    """What is set for one of the upstream's tools (its own name, not the exposed one)."""
    row, stored = await reg.tool_setting(upstream_id, tool)
    return _tool_out(row.name, tool, stored)


@router.put("/upstreams/{upstream_id}/tools/{tool}/settings", response_model=ToolSettingsOut)
async def put_tool_settings(
    upstream_id: RowId,
    tool: str,
    body: ToolSettingsIn,
    reg: Registry,
    caller: SecurityAdmin,
    request: Request,
) -> ToolSettingsOut:
    """Mark a tool idempotent (calls that reached the upstream and failed may then be retried) or give
    it a deadline of its own; security admins only (``auth.admin_roles``), whatever the policy grants.
    In force on this replica at once, on the others at their next reconcile. Deleted with the upstream,
    and when its URL changes (another server)."""
    async with change(request, caller, "upstream.tool_settings", f"{upstream_id}/{tool}") as audit:
        row, stored = await reg.tool_setting(upstream_id, tool)
        audit.before = _tool_out(row.name, tool, stored).model_dump(mode="json")
        setting = ToolSetting(idempotent=body.idempotent, timeout_s=body.timeout_s)
        out = _tool_out(
            row.name, tool, await reg.put_tool_setting(upstream_id, tool, setting, caller.subject)
        )
        audit.after = out.model_dump(mode="json")
    return out
