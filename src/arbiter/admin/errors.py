"""How the admin API (and every other FastAPI route) answers errors.

- ``ArbiterError``: its status and stable body; refused credentials are challenged and audited.
- A request that does not validate: a 401 first if the caller is not authenticated (a body is never
  judged for someone who may not send it), else 422 ``invalid_input`` naming each problem without
  echoing the input (which may not even be serialisable, e.g. ``NaN``).
- An unknown path or method under ``/admin/v1``: the same 401 first (so an anonymous caller cannot map
  the API), else 404 ``not_found`` / 405 ``method_not_allowed``.
- Anything else: a logged 500 with a fixed body (``internal_error``); see ``ArbiterApp`` for why the
  connection survives it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from arbiter.admin.deps import principal, runtime
from arbiter.audit.events import auth_event
from arbiter.audit.writer import AuditWriter
from arbiter.auth.authenticator import Authenticator, CredentialInQuery
from arbiter.errors import ArbiterError, InsufficientScope, Unauthorized

log = logging.getLogger(__name__)

ADMIN_PREFIX = "/admin/v1"
# Routing refusals under /admin/v1, as stable codes (the body shape of every other admin error).
_ROUTING_CODES = {404: "not_found", 405: "method_not_allowed"}


def _where(loc: Sequence[Any]) -> str:
    # "name", not "body.name": the body is what a field is in unless it says query/path/header.
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    return ".".join(str(part) for part in parts) or "body"


def validation_body(errors: Sequence[Any]) -> dict[str, object]:
    """The 422 body: one readable line, then each problem (location, message, type), never the input."""
    problems = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors]
    shown = "; ".join(f"{_where(p['loc'])}: {p['msg']}" for p in problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    message = " ".join(f"invalid request: {shown}{more}".split())  # one line, whatever the messages hold
    return {"error": {"code": "invalid_input", "message": message, "problems": problems}}


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

    async def refused(request: Request) -> JSONResponse | None:
        """The 401 for an unauthenticated caller under /admin/v1, judged before anything else."""
        if request.url.path.startswith(ADMIN_PREFIX):
            try:
                await principal(request, runtime(request))
            except (Unauthorized, InsufficientScope, CredentialInQuery) as exc:
                return arbiter_error(request, exc)
        return None

    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await refused(request) or JSONResponse(validation_body(exc.errors()), status_code=422)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = _ROUTING_CODES.get(exc.status_code)
        path = request.url.path
        if code is None or not (path == ADMIN_PREFIX or path.startswith(f"{ADMIN_PREFIX}/")):
            return await http_exception_handler(request, exc)
        if (denied := await refused(request)) is not None:
            return denied
        # The path is not echoed: it is the caller's input, and may be anything.
        allow = (exc.headers or {}).get("allow") or (exc.headers or {}).get("Allow")
        message = (
            "no such admin API path (the reference is at /admin/v1/docs)"
            if exc.status_code == 404
            else f"this path does not take {request.method}; it takes {allow}"
        )
        body = {"error": {"code": code, "message": message}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error while serving %s %s", request.method, request.url.path, exc_info=exc)
        return internal_error_response()

    async def arbiter_error_handler(request: Request, exc: ArbiterError) -> JSONResponse:
        return arbiter_error(request, exc)

    app.add_exception_handler(ArbiterError, arbiter_error_handler)  # pyright: ignore[reportArgumentType]
    app.add_exception_handler(RequestValidationError, invalid_request)  # pyright: ignore[reportArgumentType]
    app.add_exception_handler(HTTPException, http_error)  # pyright: ignore[reportArgumentType]
    app.add_exception_handler(Exception, unexpected)
