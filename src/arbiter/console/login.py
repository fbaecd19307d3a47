"""``/console/login`` and ``/console/logout``, and the console's own static files.

A person logs in with an admin-capable API key (or the break-glass admin token), or the key of someone an
approve rule of the live policy names as an approver (``approve by role:billing-lead``: they decide on
``/console/approvals`` and need no admin right for it). The key is checked once, the way ``/admin/v1``
checks it, and not kept: the session holds the principal it stands for.
Login through an identity provider (OpenID Connect) is console/oidc.py's.
"""

from __future__ import annotations

import hmac
import secrets
from functools import cache
from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request, Response

from arbiter.audit.events import admin_change, auth_event, forbidden_event
from arbiter.auth.principal import Principal
from arbiter.console.sessions import credential_fingerprint
from arbiter.console.web import (
    COOKIE,
    LOGIN_COOKIE,
    PREFIX,
    ConsoleRoute,
    LoginRequired,
    Viewer,
    form_viewer,
    redirect,
    render,
    runtime,
    secure_cookie,
    state,
    viewer,
)
from arbiter.errors import ArbiterError, Forbidden, NotFound
from arbiter.policies.admin_rights import may_admin
from arbiter.proxy.approval_desk import names_an_approver

router = APIRouter(route_class=ConsoleRoute)

# The areas a console page shows: a credential with none of them has nothing to do here, unless the
# policy names it as an approver (its work is on /console/approvals: names_an_approver).
CONSOLE_AREAS = ("upstreams", "api-keys", "audit", "policies", "limits", "budgets", "approvals")
# Credentials a session may stand for: ones whose revocation or expiry viewer() notices.
SESSION_METHODS = frozenset({"api_key", "break_glass"})

_STATIC = {
    "console.css": "text/css; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
}


@cache
def _asset(name: str) -> bytes:
    return resources.files("arbiter.console").joinpath("static", name).read_bytes()


@router.get("/static/{name}")
async def static(name: str) -> Response:
    media_type = _STATIC.get(name)
    if media_type is None:
        raise NotFound("no such console file")
    return Response(_asset(name), media_type=media_type)


def login_page(request: Request, status_code: int = 200, error: str | None = None) -> Response:
    token = secrets.token_urlsafe(32)
    oidc = state(request).oidc
    providers = oidc.providers if oidc is not None else []
    response = render(request, "login.html", None, status_code, csrf=token, error=error, providers=providers)
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        httponly=True,
        samesite="strict",
        secure=secure_cookie(request),
        path=PREFIX,
        max_age=3600,
    )
    return response


@router.get("/login")
async def login_form(request: Request) -> Response:
    try:
        viewer(request)
    except LoginRequired:
        return login_page(request)
    return redirect("")


@router.post("/login")
async def login(
    request: Request, key: Annotated[str, Form(max_length=4096)], csrf: Annotated[str, Form(max_length=100)]
) -> Response:
    # Before a session exists, the token is the one the login page set in its own cookie.
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not hmac.compare_digest(csrf.encode(), expected.encode()):
        raise Forbidden("the login form's CSRF token is missing or wrong; reload the page")
    rt = runtime(request)
    authorization = f"Bearer {key.strip()}"
    where = "POST /console/login"
    try:
        caller = rt.authenticator.break_glass(authorization, where) or await rt.authenticator.authenticate(
            authorization
        )
    except ArbiterError as exc:
        rt.audit.offer(auth_event(exc, request.scope, where))
        return login_page(request, 401, "That key was not accepted (unknown, revoked or expired).")
    if caller.auth_method not in SESSION_METHODS:
        # A session keeps the principal, not the credential, and only an API key's principal is
        # re-checked on each page: a session opened with a JWT would outlive the token's exp.
        refused = Forbidden("the console takes an API key or the admin token, not a JWT")
        rt.audit.offer(forbidden_event(refused, caller, request.scope, where))
        return login_page(request, 403, refused.message)
    if not may_use_console(caller, request):
        refused = Forbidden("this credential has no admin rights: the console has nothing to show it")
        rt.audit.offer(forbidden_event(refused, caller, request.scope, where))
        return login_page(request, 403, refused.message)
    # A break-glass session is bound to the token: rotating or removing it ends the session.
    credential = credential_fingerprint(key.strip()) if caller.auth_method == "break_glass" else None
    async with admin_change(rt.audit, caller, request, "console.login", caller.subject):
        session = await state(request).sessions.create(caller, credential=credential)
    response = redirect("")
    set_session_cookie(request, response, session.id)
    response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
    return response


def set_session_cookie(request: Request, response: Response, session_id: str) -> None:
    response.set_cookie(
        COOKIE, session_id, httponly=True, samesite="strict", secure=secure_cookie(request), path=PREFIX
    )


def may_use_console(caller: Principal, request: Request) -> bool:
    if any(_may(rt_caller=caller, request=request, area=a) for a in CONSOLE_AREAS):
        return True
    return names_an_approver(runtime(request).policy.engine, caller)


def _may(*, rt_caller: Principal, request: Request, area: str) -> bool:
    rt = runtime(request)
    return may_admin(rt_caller, area, "admin:read", rt.settings.auth, rt.policy.engine)


@router.post("/logout")
async def logout(request: Request, who: Annotated[Viewer, Depends(form_viewer)]) -> Response:
    async with admin_change(who.rt.audit, who.principal, request, "console.logout", who.principal.subject):
        await state(request).sessions.end(who.session.id)
    response = redirect("/login")
    response.delete_cookie(COOKIE, path=PREFIX)
    return response
