"""CPU cost of the metrics steps per call, in process: one pipeline with and without them.

The steps around them do no work of their own (a resolve that names a known tool, a forward that
answers at once), so the difference is what ``ServerMetrics`` and ``ClientMetrics`` add to a
``tools/call``: two histogram observations, the decision counter, the in-flight count. Each figure is
the least of seven runs (what a busy machine adds is noise).

Run: ``.venv/bin/python bench/metrics_cost.py``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from arbiter.proxy.interceptors.metrics import ClientMetrics, ServerMetrics
from arbiter.proxy.pipeline import CallContext, CallNext, Pipeline, Result
from arbiter.telemetry.metrics import Metrics

_PARAMS: dict[str, Any] = {"name": "crm__get_customer", "arguments": {"customer_id": "C-1"}}


async def _resolve(ctx: CallContext, call_next: CallNext) -> Result:
    ctx.upstream, ctx.target, ctx.exposed = "crm", "get_customer", "crm__get_customer"
    ctx.definition = {"name": "get_customer"}
    return await call_next(ctx)


async def _forward(ctx: CallContext, call_next: CallNext) -> Result:
    return {"content": []}


async def _per_call(pipeline: Pipeline, n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        await pipeline(CallContext("tools/call", _PARAMS))
    return (time.process_time() - started) / n


async def main() -> None:
    metrics = Metrics()
    off = Pipeline([_resolve, _forward])
    on = Pipeline([ServerMetrics(metrics), _resolve, ClientMetrics(metrics), _forward])
    n = 50_000
    for pipeline in (off, on):
        await _per_call(pipeline, 5_000)  # warm up
    offs: list[float] = []
    ons: list[float] = []
    for _ in range(7):
        offs.append(await _per_call(off, n))
        ons.append(await _per_call(on, n))
    best_off, best_on = min(offs) * 1e6, min(ons) * 1e6
    print(f"pipeline without metrics steps: {best_off:6.2f} µs CPU per call")
    print(f"with them:                      {best_on:6.2f} µs (+{best_on - best_off:.2f})")


if __name__ == "__main__":
    asyncio.run(main())
