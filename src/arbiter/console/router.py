"""Mount the console: its routers under ``/console``, its session store and OpenID Connect client in
``app.state``."""

from __future__ import annotations

import logging

from fastapi import APIRouter, FastAPI, Response
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.auth.jwt import JwtVerifier
from arbiter.console import (
    access,
    approvals,
    audit,
    catalog,
    keys,
    limits,
    login,
    oidc,
    policies,
    upstream_forms,
)
from arbiter.console.oidc_client import OidcClient
from arbiter.console.oidc_pending import PendingLogins
from arbiter.console.sessions import SessionStore
from arbiter.console.web import PREFIX, ConsoleRoute, new_state, redirect
from arbiter.settings import Settings

log = logging.getLogger(__name__)
_home = APIRouter(route_class=ConsoleRoute)


@_home.get("/")
async def home() -> Response:  # the app does not redirect slashes by itself
    return redirect("")


def install(app: FastAPI, settings: Settings, engine: AsyncEngine, jwt: JwtVerifier | None) -> None:
    cfg = settings.console
    sessions = SessionStore(engine, cfg.idle_timeout_s, cfg.max_lifetime_s, cfg.max_sessions)
    # Identity providers: the issuers /mcp trusts that have a `console` block (their JWKS, our verifier).
    logins = any(i.console is not None for i in settings.auth.issuers)
    sso = OidcClient(settings, jwt) if jwt is not None and logins else None
    if sso is not None and cfg.public_url is None:
        log.warning(
            "console single sign-on redirects to %s; set console.public_url if browsers reach Arbiter "
            "at another address",
            sso.redirect_uri,
        )
    app.state.console = new_state(sessions, sso, PendingLogins(engine) if sso is not None else None)
    routers = (_home, login.router, oidc.router, catalog.router, keys.router, audit.router, limits.router)
    # upstream_forms first: its /upstreams/new before catalog's /upstreams/{upstream_id}.
    for part in (upstream_forms.router, *routers, policies.router, access.router, approvals.router):
        app.include_router(part, prefix=PREFIX, include_in_schema=False)
