"""What every console page shares: the signed-in viewer, rights, CSRF, templates and security headers."""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from jinja2 import Environment, PackageLoader, StrictUndefined

from arbiter.audit.events import forbidden_event
from arbiter.auth.principal import Principal
from arbiter.console.oidc_client import OidcClient
from arbiter.console.oidc_pending import PendingLogins
from arbiter.console.sessions import Session, SessionStore, credential_fingerprint
from arbiter.errors import ArbiterError, Forbidden
from arbiter.policies.admin_rights import is_security_admin, may_admin
from arbiter.runtime import Runtime

log = logging.getLogger(__name__)

PREFIX = "/console"
COOKIE = "arbiter_console"
LOGIN_COOKIE = "arbiter_console_login"  # the login form's CSRF token, before there is a session

CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "base-uri 'none'",
        "object-src 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ]
)
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    # Pages show audit records and key metadata: never kept by a shared cache or the back button.
    "cache-control": "no-store",
}


class LoginRequired(Exception):
    """No live session: the route answers with a redirect to the login page (not an error)."""


def _environment() -> Environment:
    # Autoescaping everywhere: tool names, descriptions and schemas are attacker-controlled text.
    env = Environment(
        loader=PackageLoader("arbiter.console", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env


@dataclass
class ConsoleState:
    sessions: SessionStore
    templates: Environment
    oidc: OidcClient | None = None  # login through identity providers (console/oidc.py), when configured
    logins: PendingLogins | None = None  # those logins under way


def state(request: Request) -> ConsoleState:
    found: ConsoleState = request.app.state.console
    return found


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def new_state(
    sessions: SessionStore, oidc: OidcClient | None = None, logins: PendingLogins | None = None
) -> ConsoleState:
    return ConsoleState(sessions, _environment(), oidc, logins)


@dataclass(frozen=True)
class Viewer:
    """The signed-in person, and what they may do (the same decision as /admin/v1's)."""

    session: Session
    rt: Runtime

    @property
    def principal(self) -> Principal:
        return self.session.principal

    def may(self, area: str, action: str = "admin:read") -> bool:
        return may_admin(self.principal, area, action, self.rt.settings.auth, self.rt.policy.engine)

    @property
    def security_admin(self) -> bool:
        return is_security_admin(self.principal, self.rt.settings.auth)

    def need(self, request: Request, area: str, action: str = "admin:read") -> None:
        if not self.may(area, action):
            self.refuse(request, Forbidden(f"the policy does not allow {action} on admin/{area}"))

    def need_security_admin(self, request: Request) -> None:
        if not self.security_admin:
            self.refuse(request, Forbidden("only a security admin may do this"))

    def refuse(self, request: Request, refused: Forbidden) -> None:
        where = f"{request.method} {request.url.path}"
        self.rt.audit.offer(forbidden_event(refused, self.principal, request.scope, where))
        raise refused


def viewer(request: Request) -> Viewer:
    """The live session's viewer; ``LoginRequired`` without one, or once its API key is revoked."""
    rt = runtime(request)
    session: Session | None = getattr(request.state, "console_session", None)  # ConsoleRoute loaded it
    if session is None or session.ended:
        raise LoginRequired
    current = rt.keys.current(session.principal)  # a revoked or expired key ends its sessions
    if current is None or (current.auth_method == "break_glass" and not _admin_token_still(rt, session)):
        session.ended = True
        raise LoginRequired
    session.principal = current
    return Viewer(session, rt)


def _admin_token_still(rt: Runtime, session: Session) -> bool:
    """Is the admin token the session was opened with still the configured one? Sessions outlive a
    restart; a rotated or removed token must end them."""
    configured = rt.settings.admin_token
    if configured is None or session.credential is None:
        return False
    expected = credential_fingerprint(configured.get_secret_value())
    return hmac.compare_digest(session.credential.encode(), expected.encode())


async def form_viewer(request: Request) -> Viewer:
    """The viewer of a form post, whose CSRF token must match the session's (403 otherwise)."""
    who = viewer(request)
    form = await request.form()
    token = form.get("csrf")
    if not who.session.csrf_ok(token if isinstance(token, str) else None):
        who.refuse(request, Forbidden("the form's CSRF token is missing or wrong; reload the page"))
    return who


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def secure_cookie(request: Request) -> bool:
    """Secure cookies, except over plain HTTP between a browser and a server both on loopback (a local
    demo has no TLS).

    The peer address alone does not say where the browser is: a TLS terminator on the same host connects
    from loopback (and uvicorn takes the address from X-Forwarded-For when the peer is loopback, a value
    a client may have written). So the host the browser asked for (Host) must be loopback too.
    """
    if request.url.scheme == "https" or request.client is None:
        return True
    if runtime(request).settings.console.secure_cookies == "always":
        return True
    return not (_is_loopback(request.client.host) and _is_loopback(request.url.hostname))


def render(
    request: Request,
    template: str,
    who: Viewer | None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    env = state(request).templates
    flash = list(who.session.flash) if who is not None else []
    if who is not None:
        who.session.flash.clear()
    html = env.get_template(template).render(
        viewer=who, prefix=PREFIX, flash=flash, path=request.url.path, **context
    )
    return HTMLResponse(html, status_code=status_code)


def redirect(path: str) -> RedirectResponse:
    return RedirectResponse(f"{PREFIX}{path}", status_code=303)


class ConsoleRoute(APIRoute):
    """Every console response gets the security headers; errors become pages, not JSON."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            sessions = state(request).sessions
            # The stylesheet and script need no session: no database read for them.
            static = request.url.path.startswith(f"{PREFIX}/static/")
            session = None if static else await sessions.get(request.cookies.get(COOKIE))
            request.state.console_session = session
            try:
                response = await handler(request)
            except LoginRequired:
                response = redirect("/login")
            except ArbiterError as exc:
                response = _error_page(request, exc.http_status, exc.message)
            except RequestValidationError as exc:
                # Without the input: a mistyped key pasted into a form would be echoed.
                fields = ", ".join(str(e.get("loc", ("?",))[-1]) for e in exc.errors())
                response = _error_page(request, 400, f"the form is not valid ({fields})")
            if session is not None:
                await sessions.save(session)  # notices for the next page; a revoked key's session ends
            response.headers.update(HEADERS)
            return response

        return route


def _error_page(request: Request, status_code: int, message: str) -> HTMLResponse:
    try:
        who: Viewer | None = viewer(request)
    except LoginRequired:
        who = None
    return render(request, "error.html", who, status_code, code=status_code, message=message)


def query_text(params: Mapping[str, str], name: str) -> str:
    return params.get(name, "").strip()
