"""Mount the console: its routers under ``/console`` and the in-memory session store in ``app.state``."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI, Response

from arbiter.console import audit, catalog, keys, login
from arbiter.console.web import PREFIX, ConsoleRoute, new_state, redirect
from arbiter.settings import ConsoleSettings

_home = APIRouter(route_class=ConsoleRoute)


@_home.get("/")
async def home() -> Response:  # the app does not redirect slashes by itself
    return redirect("")


def install(app: FastAPI, settings: ConsoleSettings) -> None:
    app.state.console = new_state(settings.idle_timeout_s, settings.max_sessions)
    for part in (_home, login.router, catalog.router, keys.router, audit.router):
        app.include_router(part, prefix=PREFIX, include_in_schema=False)
