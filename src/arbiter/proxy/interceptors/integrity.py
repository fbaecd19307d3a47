"""Pipeline step 3: only approved definitions are used (docs/integrity.md).

Resolve finds a target whose definition the upstream offers but a security admin has not approved
(``ctx.held``); authorize has already answered callers who may not see it as if it did not exist. Those
who may see it learn why it cannot be used, and nothing reaches the upstream.
"""

from __future__ import annotations

from arbiter.errors import ToolQuarantined
from arbiter.proxy.pipeline import CallContext, CallNext, Result

_WHY = {
    "pending": "is new and waits for a security admin's review",
    "quarantined": "changed since it was approved and waits for a security admin's review",
    "rejected": "was rejected by a security admin",
    "disabled": "was disabled by a security admin",
}


class Integrity:
    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        if ctx.held is not None:
            why = _WHY.get(ctx.held, "is not approved")
            raise ToolQuarantined(f"{ctx.exposed}: its definition {why}", status=ctx.held)
        return await call_next(ctx)
