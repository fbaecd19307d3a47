"""Register, edit, disable/enable and delete upstreams from the console, as ``/admin/v1/upstreams`` does.

Everything here needs ``admin:write`` on ``admin/upstreams``; turning auto-approve on (or pointing an
auto-approving upstream at another server) is for security admins only, the same rule as the API's
(``proxy.definitions.widens_auto_approve``). The changes go through the same registry calls and are
recorded as the same admin changes, attributed to the person. A stored credential's secret is never
shown back: the edit form shows only its kind and header, and a blank secret keeps the stored one.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Form, Request, Response
from pydantic import SecretStr

from arbiter.audit.events import admin_change
from arbiter.auth.outbound import CredentialSpec
from arbiter.console.web import ConsoleRoute, Viewer, form_viewer, redirect, render, viewer
from arbiter.errors import ArbiterError, Conflict, InvalidInput, UpstreamProtocolError, UpstreamUnavailable
from arbiter.proxy.definitions import (
    CredentialInput,
    UpstreamChanges,
    UpstreamDefinition,
    widens_auto_approve,
)
from arbiter.settings import UPSTREAM_NAME_RE
from arbiter.store.models import Upstream

router = APIRouter(route_class=ConsoleRoute)

Who = Annotated[Viewer, Depends(viewer)]
Poster = Annotated[Viewer, Depends(form_viewer)]
Transport = Literal["streamable_http", "sse"]  # stdio runs a command on the host: the operator's only
CredentialKind = Literal["none", "header"]
# What a form can get wrong: shown in the form, with the person's input, not as an error page.
FORM_ERRORS = (InvalidInput, Conflict, UpstreamUnavailable, UpstreamProtocolError)


def _public(row: Upstream) -> dict[str, Any]:
    """The upstream as the page shows it and the audit records it: never a credential's secret."""
    return {
        "id": row.id,
        "name": row.name,
        "transport": row.transport,
        "url": row.url,
        "enabled": row.enabled,
        "auto_approve": row.auto_approve,
        "connect_timeout_s": row.connect_timeout_s,
        "call_timeout_s": row.call_timeout_s,
        "credential": CredentialSpec.from_json(row.credential).public(),
    }


def _credential(kind: str, header: str, value: str, value_env: str) -> CredentialInput:
    if kind == "none":
        return CredentialInput()
    if not header.strip():
        raise InvalidInput("a header credential needs the header's name", field="header")
    secret = SecretStr(value) if value else None
    return CredentialInput(
        CredentialSpec(kind="header", header=header.strip()), secret, value_env.strip() or None
    )


def _form_page(
    request: Request, who: Viewer, given: dict[str, Any], status_code: int = 200, error: str | None = None
) -> Response:
    who.need(request, "upstreams", "admin:write")
    return render(
        request,
        "upstream_form.html",
        who,
        status_code,
        given=given,
        error=error,
        may_auto_approve=who.security_admin,
    )


def _refused(exc: ArbiterError) -> tuple[int, str]:
    if isinstance(exc, UpstreamUnavailable | UpstreamProtocolError):
        return 422, f"the upstream could not be reached or did not answer as an MCP server: {exc.message}"
    return exc.http_status, exc.message


@router.get("/upstreams/new")
async def new_form(request: Request, who: Who) -> Response:
    blank: dict[str, Any] = {
        "id": None,
        "name": "",
        "transport": "streamable_http",
        "url": "",
        "enabled": True,
    }
    blank |= {"auto_approve": False, "credential": {"kind": "none"}, "secret_stored": False}
    return _form_page(request, who, blank)


@router.post("/upstreams/new")
async def register(
    request: Request,
    who: Poster,
    name: Annotated[str, Form(max_length=32)],
    url: Annotated[str, Form(max_length=2048)],
    transport: Annotated[Transport, Form()] = "streamable_http",
    credential_kind: Annotated[CredentialKind, Form()] = "none",
    header: Annotated[str, Form(max_length=200)] = "",
    value: Annotated[str, Form(max_length=8192)] = "",
    value_env: Annotated[str, Form(max_length=200)] = "",
    auto_approve: Annotated[bool, Form()] = False,
) -> Response:
    who.need(request, "upstreams", "admin:write")
    given: dict[str, Any] = {"id": None, "name": name, "transport": transport, "url": url, "enabled": True}
    given |= {"auto_approve": auto_approve, "secret_stored": False}
    given["credential"] = {"kind": credential_kind, "header": header, "value_env": value_env}  # never value
    if auto_approve:
        who.need_security_admin(request)
    try:
        if not UPSTREAM_NAME_RE.match(name):
            raise InvalidInput("the name must match ^[a-z][a-z0-9-]{0,31}$ (lowercase letters, digits, '-')")
        definition = UpstreamDefinition(
            name=name,
            url=url.strip(),
            transport=transport,
            credential=_credential(credential_kind, header, value, value_env),
            auto_approve=auto_approve or who.rt.settings.integrity.auto_approve_default,
        )
        async with admin_change(who.rt.audit, who.principal, request, "upstream.create", name) as ch:
            row = await who.rt.registry.create(definition)
            ch.after = _public(row)
            ch.details["via"] = "console"
    except FORM_ERRORS as exc:
        status_code, message = _refused(exc)
        return _form_page(request, who, given, status_code, message)
    who.session.flash.append(f"Upstream {row.name} registered.")
    return redirect(f"/upstreams/{row.id}")


@router.get("/upstreams/{upstream_id}/edit")
async def edit_form(request: Request, who: Who, upstream_id: int) -> Response:
    who.need(request, "upstreams", "admin:write")
    row = await who.rt.registry.get(upstream_id)
    return _form_page(request, who, _given(row))


def _given(row: Upstream) -> dict[str, Any]:
    shown = _public(row)
    spec = CredentialSpec.from_json(row.credential).public()
    shown["secret_stored"] = spec.get("secret_source") == "stored"
    return shown


@router.post("/upstreams/{upstream_id}/edit")
async def edit(
    request: Request,
    who: Poster,
    upstream_id: int,
    url: Annotated[str, Form(max_length=2048)],
    transport: Annotated[Transport, Form()] = "streamable_http",
    credential_kind: Annotated[CredentialKind, Form()] = "none",
    header: Annotated[str, Form(max_length=200)] = "",
    value: Annotated[str, Form(max_length=8192)] = "",
    value_env: Annotated[str, Form(max_length=200)] = "",
    auto_approve: Annotated[bool, Form()] = False,
) -> Response:
    who.need(request, "upstreams", "admin:write")
    reg = who.rt.registry
    row = await reg.get(upstream_id)
    given = _given(row) | {"url": url, "transport": transport, "auto_approve": auto_approve}
    given["credential"] = {"kind": credential_kind, "header": header, "value_env": value_env}
    try:
        stored = CredentialSpec.from_json(row.credential)
        # Only a changed credential is sent: a blank secret with the same header keeps the stored one.
        changed = credential_kind != stored.kind or (
            credential_kind == "header" and header.strip() != stored.header
        )
        credential = (
            _credential(credential_kind, header, value, value_env) if changed or value or value_env else None
        )
        changes = UpstreamChanges(
            transport=transport if transport != row.transport else None,
            url=url.strip() if url.strip() != row.url else None,
            credential=credential,
            auto_approve=auto_approve if auto_approve != row.auto_approve else None,
        )

        async def currently() -> bool:
            return row.auto_approve

        if await widens_auto_approve(changes, currently):
            who.need_security_admin(request)
        async with admin_change(
            who.rt.audit, who.principal, request, "upstream.update", str(upstream_id)
        ) as ch:
            ch.before = _public(row)
            ch.after = _public(await reg.update(upstream_id, changes))
            ch.details["via"] = "console"
    except FORM_ERRORS as exc:
        status_code, message = _refused(exc)
        return _form_page(request, who, given, status_code, message)
    who.session.flash.append(f"Upstream {row.name} saved.")
    return redirect(f"/upstreams/{upstream_id}")


@router.post("/upstreams/{upstream_id}/enabled")
async def set_enabled(
    request: Request,
    who: Poster,
    upstream_id: int,
    enabled: Annotated[bool, Form()],
    confirm: Annotated[bool, Form()] = False,
) -> Response:
    """Disable (its tools leave every agent's list at once) or enable again (it must connect)."""
    who.need(request, "upstreams", "admin:write")
    if not enabled and not confirm:
        raise InvalidInput("tick the confirmation to disable the upstream", field="confirm")
    reg = who.rt.registry
    try:
        async with admin_change(
            who.rt.audit, who.principal, request, "upstream.update", str(upstream_id)
        ) as ch:
            ch.before = _public(await reg.get(upstream_id))
            row = await reg.update(upstream_id, UpstreamChanges(enabled=enabled))
            ch.after = _public(row)
            ch.details["via"] = "console"
    except (UpstreamUnavailable, UpstreamProtocolError) as exc:
        who.session.flash.append(_refused(exc)[1])
        return redirect(f"/upstreams/{upstream_id}")
    who.session.flash.append(f"Upstream {row.name} {'enabled' if enabled else 'disabled'}.")
    return redirect(f"/upstreams/{upstream_id}")


@router.post("/upstreams/{upstream_id}/delete")
async def delete(
    request: Request, who: Poster, upstream_id: int, confirm: Annotated[bool, Form()] = False
) -> Response:
    who.need(request, "upstreams", "admin:write")
    if not confirm:
        raise InvalidInput("tick the confirmation to delete the upstream", field="confirm")
    reg = who.rt.registry
    async with admin_change(who.rt.audit, who.principal, request, "upstream.delete", str(upstream_id)) as ch:
        before = _public(await reg.get(upstream_id))
        ch.before = before
        await reg.delete(upstream_id)
        ch.details["via"] = "console"
    who.session.flash.append(f"Upstream {before['name']} deleted.")
    return redirect("/upstreams")
