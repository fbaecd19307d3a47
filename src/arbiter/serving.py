"""How Arbiter is served over HTTP: the one uvicorn configuration for ``serve``, ``demo`` and the tests."""

from __future__ import annotations

from typing import Any

import uvicorn
from starlette.types import ASGIApp

from arbiter.settings import Settings


def keep_alive_header(settings: Settings) -> str:
    # Announce less than the server waits, so clients that honour the header close first.
    return f"timeout={max(settings.keep_alive_s * 4 // 5, 1)}"


def uvicorn_config(app: ASGIApp, settings: Settings, *, host: str, port: int, **extra: Any) -> uvicorn.Config:
    """The server settings every Arbiter runs with; ``extra`` adds uvicorn options (e.g. log level)."""
    options: dict[str, Any] = {
        "log_level": settings.log_level.lower(),
        "access_log": False,
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
        **extra,
    }
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        timeout_keep_alive=settings.keep_alive_s,
        headers=[("keep-alive", keep_alive_header(settings))],
        **options,
    )
