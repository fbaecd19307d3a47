"""How Arbiter is served over HTTP: the one uvicorn configuration for ``serve``, ``demo`` and the tests."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from arbiter.admission import Admission
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


log = logging.getLogger(__name__)


class GracefulServer(uvicorn.Server):
    """uvicorn's server, stopping as a replica behind a load balancer should.

    On SIGTERM (or SIGINT): ``drain()`` at once, so ``/readyz`` answers 503 and new requests are refused
    with 503 + ``Retry-After`` (admission.py); for ``drain_delay_s`` Arbiter still accepts connections
    (answering them so) while the load balancer (Kubernetes endpoints) stops routing to it; then
    uvicorn's own graceful shutdown: stop listening, let in-flight requests finish within
    ``shutdown_grace_s``, run the lifespan's shutdown, which flushes the audit queue. A second signal
    skips the rest of the delay.
    """

    def __init__(self, config: uvicorn.Config, *, drain: Callable[[], None], drain_delay_s: float) -> None:
        super().__init__(config)
        self._drain = drain
        self._drain_delay_s = drain_delay_s
        self._drain_until: float | None = None
        self._deferred: int | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._drain()  # a flag: safe in a signal handler
        if self._drain_delay_s > 0 and self._deferred is None and not self.should_exit:
            log.info("draining for %gs before shutting down", self._drain_delay_s)
            self._deferred = sig
            self._drain_until = time.monotonic() + self._drain_delay_s
            return
        self._drain_until = None
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None and time.monotonic() >= self._drain_until:
            self._drain_until = None
            super().handle_exit(self._deferred or signal.SIGTERM, None)
        return await super().on_tick(counter)


def graceful_server(config: uvicorn.Config, admission: Admission, settings: Settings) -> GracefulServer:
    """The server for an app made by ``create_app``, whose ``app.state.admission`` it drains."""
    return GracefulServer(config, drain=admission.drain, drain_delay_s=settings.drain_delay_s)
