"""How the admin API (and every other FastAPI route) answers errors.

- ``ArbiterError``: its status and stable body; refused credentials are challenged and audited.
- A request that does not validate: a 401 first if the caller is not authenticated (a body is never
  judged for someone who may not send it), else 422 naming each problem without echoing the input
  (which may not even be serialisable, e.g. ``NaN``).
- Anything else: a logged 500 with a fixed body (``internal_error``); see ``ArbiterApp`` for why the
  connection survives it.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from arbiter.admin.deps import principal, runtime
from arbiter.audit.events import auth_event
from arbiter.audit.writer import AuditWriter
from arbiter.auth.authenticator import Authenticator, CredentialInQuery
from arbiter.errors import ArbiterError, InsufficientScope, Unauthorized

log = logging.getLogger(__name__)

ADMIN_PREFIX = "/admin/v1"


def internal_error_response() -> JSONResponse:
    body = {"error": {"code": "internal_error", "message": "Internal error; the server log has details"}}
    return JSONResponse(body, status_code=500)


def install(app: FastAPI, authenticator: Authenticator, audit: AuditWriter) -> None:
    """Register the handlers on ``app``."""

    def arbiter_error(request: Request, exc: ArbiterError) -> JSONResponse:
        headers = None
        if isinstance(exc, Unauthorized | InsufficientScope | CredentialInQuery):
            headers = {"www-authenticate": authenticator.challenge(exc)}
            audit.offer(auth_event(exc, request.scope, f"{request.method} {request.url.path}"))
        return JSONResponse(exc.to_http_body(), status_code=exc.http_status, headers=headers)

    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        if request.url.path.startswith(ADMIN_PREFIX):
            try:
                await principal(request, runtime(request))
            except (Unauthorized, InsufficientScope, CredentialInQuery) as refused:
                return arbiter_error(request, refused)
        problems = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": problems}, status_code=422)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error while serving %s %s", request.method, request.url.path, exc_info=exc)
        return internal_error_response()

    async def arbiter_error_handler(request: Request, exc: ArbiterError) -> JSONResponse:
        return arbiter_error(request, exc)

    app.add_exception_handler(ArbiterError, arbiter_error_handler)  # pyright: ignore[reportArgumentType]
    app.add_exception_handler(RequestValidationError, invalid_request)  # pyright: ignore[reportArgumentType]
    app.add_exception_handler(Exception, unexpected)
