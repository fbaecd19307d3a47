"""No NUL character reaches the database from the admin API or the console.

PostgreSQL's text types cannot hold U+0000 (asyncpg refuses it), so an id, a query parameter or a stored
field holding one was a 500 there while SQLite took it. No Arbiter value has a use for it: it is refused
once, for every route, as a 422 (the usual validation answer, after the usual 401 for a caller without a
credential), before any handler runs. ``/mcp`` does not pass through FastAPI and is not concerned.
"""

from __future__ import annotations

import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException

# A JSON escape of U+0000 that is not itself escaped (an odd run of backslashes before the "u0000").
_JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_MESSAGE = "must not contain a NUL character"
_FORMS = ("application/x-www-form-urlencoded", "multipart/form-data")


def _problem(loc: tuple[str, ...]) -> dict[str, object]:
    return {"loc": loc, "msg": _MESSAGE, "type": "nul_character"}


async def refuse_nul(request: Request) -> None:
    """An app-wide dependency: raise a validation error if a path or query parameter, or the
    body (raw, form-encoded or a JSON escape) holds U+0000."""
    problems = [
        _problem(("path", name)) for name, value in request.path_params.items() if "\x00" in str(value)
    ]
    problems += [
        _problem(("query", name))
        for name, value in request.query_params.multi_items()
        if "\x00" in name + value
    ]
    if request.method in _BODY_METHODS and await _body_holds_nul(request):
        problems.append(_problem(("body",)))
    if problems:
        raise RequestValidationError(problems)


async def _body_holds_nul(request: Request) -> bool:
    # The bytes first where they can still be had: Starlette caches them, and both a later form() and the
    # route's own body() read that cache (a form parsed first would leave nothing for a route that reads
    # bytes, e.g. a CSV import sent with curl's default form content type). A route with form fields had
    # FastAPI parse the form before any dependency: then only the parsed form is left.
    try:
        body: bytes | None = await request.body()
    except RuntimeError:  # "Stream consumed": FastAPI parsed the form already
        body = None
    if body is not None and b"\x00" in body:
        return True
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(_FORMS):
        try:
            form = await request.form()
        except (MultiPartException, HTTPException):  # not a form after all: the route answers it
            return False
        return any(
            "\x00" in key or (isinstance(value, str) and "\x00" in value) for key, value in form.multi_items()
        )
    # A JSON escape of U+0000 decodes to one; in any other body the six characters are just text.
    return body is not None and "json" in content_type and _JSON_NUL.search(body) is not None
