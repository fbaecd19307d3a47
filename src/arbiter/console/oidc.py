"""``/console/oidc/login/{n}`` and ``/console/oidc/callback``: logging in through an identity provider.

The login link sends the browser to the provider with a fresh state, nonce and PKCE challenge, which
the server keeps (console/oidc_pending.py) under a random id that only this browser holds, in a
short-lived cookie: a login nobody started here (login CSRF) finds nothing, and each is finished once.
The callback redeems the code and opens a session for the ID token's subject, with the roles the
issuer's claim mapping gives (as on ``/mcp``). The session ends at the ID token's ``exp`` at the latest.
Every way the answer can be wrong is a login page saying why (4xx, audited), never a 500.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from arbiter.audit.events import admin_change, auth_event, forbidden_event
from arbiter.console.login import login_page, may_use_console, set_session_cookie
from arbiter.console.oidc_client import PENDING_MAX_AGE_S, OidcClient
from arbiter.console.oidc_pending import PendingLogins
from arbiter.console.web import PREFIX, ConsoleRoute, render, runtime, secure_cookie, state
from arbiter.errors import ArbiterError, Forbidden, NotFound

router = APIRouter(route_class=ConsoleRoute)

PENDING_COOKIE = "arbiter_console_oidc"
_PENDING_PATH = f"{PREFIX}/oidc"
_MAX_PARAM_CHARS = 4096  # a code or state longer than this is no answer of an identity provider


def _client(request: Request) -> tuple[OidcClient, PendingLogins]:
    console = state(request)
    oidc, logins = console.oidc, console.logins
    if oidc is None or not oidc.providers or logins is None:
        raise NotFound("no identity provider is configured for the console (docs/console.md)")
    return oidc, logins


@router.get("/oidc/login/{index}")
async def start(request: Request, index: int) -> Response:
    oidc, logins = _client(request)
    url, pending = await oidc.start(oidc.provider(index))
    login_id = await logins.put(pending)
    response = RedirectResponse(url, status_code=303)
    # Lax, not Strict: the provider's redirect back is a cross-site navigation, and must carry it.
    response.set_cookie(
        PENDING_COOKIE,
        login_id,
        httponly=True,
        samesite="lax",
        secure=secure_cookie(request),
        path=_PENDING_PATH,
        max_age=PENDING_MAX_AGE_S,
    )
    return response


@router.get("/oidc/callback")
async def callback(request: Request) -> Response:
    (oidc, logins), rt = _client(request), runtime(request)
    where = "GET /console/oidc/callback"
    params = {k: v[:_MAX_PARAM_CHARS] for k, v in request.query_params.items()}
    try:
        pending = await logins.take(request.cookies.get(PENDING_COOKIE), params.get("state", ""))
        logged_in = await oidc.finish(pending, params)
    except ArbiterError as exc:
        rt.audit.offer(auth_event(exc, request.scope, where))
        return _forget_pending(login_page(request, exc.http_status, f"Single sign-on failed: {exc.message}."))
    caller = logged_in.principal
    if not may_use_console(caller, request):
        refused = Forbidden("this person has no admin rights: the console has nothing to show them")
        rt.audit.offer(forbidden_event(refused, caller, request.scope, where))
        return _forget_pending(login_page(request, 403, refused.message))
    async with admin_change(rt.audit, caller, request, "console.login", caller.subject):
        session = await state(request).sessions.create(caller, not_after=logged_in.expires_at)
    # The session cookie is SameSite=Strict, and this request came from the provider's site: a browser
    # would not send the cookie on a redirect from here. A page of our own navigates on instead.
    response = render(request, "signed_in.html", None)
    set_session_cookie(request, response, session.id)
    return _forget_pending(response)


def _forget_pending(response: Response) -> Response:
    response.delete_cookie(PENDING_COOKIE, path=_PENDING_PATH)
    return response
