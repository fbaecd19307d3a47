"""Pipeline step 8: the result guard (integrity/results.py), around forward.

Placed right before forward, so every other step (and third-party interceptor) sees the guarded result.
It tells forward how much of the answer the relay may read (``ctx.result_cap``) and lets the relay show
it the raw bytes (``ctx.inspect_result``), so a clean result is passed on as decoded, untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from arbiter.errors import ResultTooLarge
from arbiter.integrity.results import SLACK_BYTES, ResultGuard
from arbiter.proxy.pipeline import CallContext, CallNext, Result

# What goes upstream: the cap bounds every answer read, the rest of the guard looks at tool results.
_FORWARDED = frozenset({"tools/call", "resources/read", "prompts/get"})


class GuardResult:
    def __init__(self, guard: ResultGuard) -> None:
        self._guard = guard

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        if ctx.method not in _FORWARDED:
            return await call_next(ctx)
        guard = self._guard
        tool = ctx.exposed or "the target"
        ctx.result_cap = guard.cap + SLACK_BYTES
        if ctx.method != "tools/call":
            try:
                return await call_next(ctx)
            except ResultTooLarge:
                raise guard.too_large(tool) from None
        probe = guard.probe()
        ctx.inspect_result = probe
        schema = _output_schema(ctx.definition)
        try:
            result = await call_next(ctx)
        except ResultTooLarge as exc:
            ctx.guard = {**(ctx.guard or {}), "result": {"oversize": guard.settings.on_oversize}}
            if guard.settings.on_oversize == "refuse":
                raise guard.too_large(tool) from None
            result = guard.truncated(exc, schema)
            probe.size = None  # built here, not read: measured and scanned as a whole
        checked, found = guard.check(tool, result, schema, probe)
        if found:
            ctx.guard = {**(ctx.guard or {}), "result": {**_result_facts(ctx), "redacted": found}}
        return checked


def _output_schema(definition: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    schema: Any = definition.get("outputSchema") if definition is not None else None
    return cast(Mapping[str, Any], schema) if isinstance(schema, dict) else None


def _result_facts(ctx: CallContext) -> dict[str, object]:
    found: Any = (ctx.guard or {}).get("result")
    return cast(dict[str, object], found) if isinstance(found, dict) else {}
