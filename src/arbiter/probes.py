"""Probes: ``/healthz`` (the process answers) and ``/readyz`` (its dependencies answer)."""

from __future__ import annotations

import anyio
import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from arbiter.runtime import Runtime

router = APIRouter(include_in_schema=False)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    runtime: Runtime = request.app.state.runtime
    if request.app.state.admission.draining:
        # Stopping (SIGTERM): out of the load balancer at once, while in-flight requests finish.
        return JSONResponse({"status": "draining"}, status_code=503, headers={"retry-after": "1"})
    checks: dict[str, str] = {}
    try:
        with anyio.fail_after(2):
            async with runtime.engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001 - readiness reports any failure, never raises
        checks["database"] = f"error: {type(exc).__name__}"
    # Limits are reported, not a readiness condition: every replica shares the one Redis, so failing
    # readiness would take them all out at once, along with calls no limit applies to. "limits" says
    # whether Redis is reachable and what the replica does without it (refuse limited calls, or fall back).
    await runtime.limits.check()
    limits_check, limits = runtime.limits.health()
    limits = {**limits, "check": limits_check}
    # Audit: "spooling" is still ready (calls run, records wait on disk); "unavailable" is not (fail-closed).
    audit = runtime.audit.status()
    checks["audit"] = "error: unavailable" if audit["state"] == "unavailable" else "ok"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {
            "status": "ready" if ready else "not_ready",
            "checks": checks,
            "upstreams_down": runtime.pool.down(),
            # Which policy this replica enforces: replicas agree within policy.poll_interval_s.
            "policy_version": runtime.policy.engine.version,
            "audit": audit,
            "limits": limits,
        },
        status_code=200 if ready else 503,
    )
