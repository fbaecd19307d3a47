"""``GET /metrics``: the app's Prometheus metrics, behind a bearer token when one is configured."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from pydantic import SecretStr

from arbiter.telemetry.metrics import CONTENT_TYPE, Metrics

_CHALLENGE = {"www-authenticate": 'Bearer realm="metrics"'}


def metrics_router(metrics: Metrics, token: SecretStr | None) -> APIRouter:
    """The route serving ``metrics``; with ``token``, only to ``Authorization: Bearer <token>``."""
    router = APIRouter(include_in_schema=False)
    expected = token.get_secret_value().encode() if token is not None else None

    @router.get("/metrics")
    async def scrape(request: Request) -> Response:  # pyright: ignore[reportUnusedFunction]
        if expected is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            # Constant time, so the token cannot be guessed from how long a refusal takes.
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
                return Response(
                    b"unauthorized\n", status_code=401, media_type="text/plain", headers=_CHALLENGE
                )
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return router
