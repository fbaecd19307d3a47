"""The admin API client the operator commands share (upstreams, keys, limits, policy export/import/
dry-run, audit query): their ``--url``/``--token``/``--json`` options and one-line failures.

httpx is imported when a command runs, not here, so ``arbiter --help`` stays fast. The token goes
only into the Authorization header: no message, table or error line ever includes it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer

if TYPE_CHECKING:
    import httpx

DEFAULT_URL = "http://127.0.0.1:8080"
PREFIX = "/admin/v1"
_TIMEOUT_S = 60.0  # a refresh or a large import may take a while; a dead server still fails

Url = Annotated[
    str,
    typer.Option(
        "--url",
        envvar="ARBITER_URL",
        help="The running Arbiter's base URL",
        show_envvar=True,
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="ARBITER_TOKEN",
        help="A bearer token with admin rights: an API key or the break-glass admin token",
        show_envvar=True,
        show_default=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print the server's answer as JSON")]

Params = Mapping[str, str | int | float | bool | list[str] | None]


def _first_line(text: str, limit: int = 300) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def describe_error(status: int, body: str) -> str:
    """The server's error body on one line: ``code: message (details)`` for Arbiter's error shape,
    each problem for a validation error, else the body's text."""
    try:
        data: object = json.loads(body)
    except ValueError:
        return _first_line(body) or f"HTTP {status}"
    if isinstance(data, dict):
        doc = cast(dict[str, Any], data)
        error = doc.get("error")
        if isinstance(error, dict):
            err = cast(dict[str, Any], error)
            code, message = err.get("code", "error"), err.get("message", "")
            problems: Any = err.get("problems")
            if isinstance(problems, list) and problems:  # a validation error: each problem, readable
                listed = [_problem(p) for p in cast(list[object], problems)]
                return _first_line(f"{code}: " + "; ".join(listed))
            extra = {k: v for k, v in err.items() if k not in ("code", "message")}
            details = f" ({json.dumps(extra, separators=(',', ':'), default=str)})" if extra else ""
            return _first_line(f"{code}: {message}{details}")
        detail = doc.get("detail")
        if isinstance(detail, list):
            problems = [_problem(p) for p in cast(list[object], detail)]
            return _first_line("invalid request: " + "; ".join(problems))
    return _first_line(body)


def _problem(item: object) -> str:
    if not isinstance(item, dict):
        return str(item)
    p = cast(dict[str, Any], item)
    loc = ".".join(str(x) for x in cast(list[object], p.get("loc") or []) if x != "body")
    return f"{loc}: {p.get('msg', '')}" if loc else str(p.get("msg", ""))


class AdminClient:
    """Calls on one Arbiter's ``/admin/v1``; a refused or failed call raises, carrying one line."""

    def __init__(self, url: str, token: str | None) -> None:
        from arbiter.errors import InvalidInput

        if not token:
            raise InvalidInput("no admin token: give --token or set ARBITER_TOKEN")
        if not url.startswith(("http://", "https://")):
            raise InvalidInput(f"--url must be an http:// or https:// URL, not {url!r}")
        self.url = url.rstrip("/")
        self._token = token

    def __repr__(self) -> str:  # never the token, whatever prints the client
        return f"AdminClient({self.url!r})"

    def request(
        self,
        method: str,
        path: str,
        *,
        body: object = None,
        params: Params | None = None,
        content: str | None = None,
        content_type: str | None = None,
    ) -> httpx.Response:
        import httpx

        from arbiter.errors import AdminApiRefused, AdminApiUnreachable

        headers = {"authorization": f"Bearer {self._token}"}
        if content_type:
            headers["content-type"] = content_type
        query = {k: v for k, v in (params or {}).items() if v is not None}
        where = f"{method} {PREFIX}{path}"
        try:
            with httpx.Client(base_url=self.url + PREFIX, timeout=_TIMEOUT_S) as client:
                resp = client.request(
                    method,
                    path,
                    headers=headers,
                    params=cast(Any, query),
                    json=body if content is None else None,
                    content=content,
                )
        except httpx.HTTPError as exc:
            reason = _first_line(str(exc)) or type(exc).__name__
            raise AdminApiUnreachable(
                f"cannot reach Arbiter at {self.url} ({where}): {reason}; is it running? "
                "(--url or ARBITER_URL)"
            ) from None
        if resp.status_code >= 400:
            raise AdminApiRefused(
                f"{where} refused with HTTP {resp.status_code}: {describe_error(resp.status_code, resp.text)}"
            )
        return resp

    def json(self, method: str, path: str, **kw: Any) -> Any:
        """The answer's JSON (``None`` for a 204)."""
        resp = self.request(method, path, **kw)
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            from arbiter.errors import AdminApiRefused

            raise AdminApiRefused(
                f"{method} {PREFIX}{path}: the answer is not JSON (is --url an Arbiter?)"
            ) from None


def connect(url: str, token: str | None) -> AdminClient:
    return AdminClient(url or os.environ.get("ARBITER_URL") or DEFAULT_URL, token)
