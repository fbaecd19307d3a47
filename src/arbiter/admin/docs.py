"""``/admin/v1/docs``: the interactive API reference (Swagger UI, vendored: no CDN).

The page and its scripts are static and the same for everyone: they hold no data, so they are served
without a credential (a browser cannot send a bearer header when opening a page). The data, the OpenAPI
document, stays behind authentication: the page asks for the token and fetches the document with it
(docs/operations.md, "Admin API reference"). A strict Content-Security-Policy keeps the page to its
own scripts and styles and this server.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, Response

from arbiter.errors import NotFound

router = APIRouter(include_in_schema=False)

# swagger-ui-dist, pinned: see static/swagger-ui/VERSION for the version and how to update it.
_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "arbiter-docs.js": "text/javascript; charset=utf-8",
    "arbiter-docs.css": "text/css; charset=utf-8",
}

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
}


@cache
def _read(name: str) -> bytes:
    return resources.files("arbiter.admin").joinpath("static", "swagger-ui", name).read_bytes()


@router.get("/docs")
async def docs_page() -> Response:
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/docs/{asset}")
async def docs_asset(asset: str) -> Response:
    media_type = _ASSETS.get(asset)
    if media_type is None:
        raise NotFound("no such file of the API reference")
    # The file names carry no version, so browsers revalidate rather than keep an old copy.
    return Response(_read(asset), media_type=media_type, headers={**_HEADERS, "cache-control": "no-cache"})
