"""Pipeline step 4: the argument guard (integrity/arguments.py), for tool calls the policy allowed.

Runs after authorize (a tool the caller may not see is answered as missing before its arguments are
judged) and before the limits (a refused call is not charged). A deny finding or a schema violation
refuses the call; a redact finding replaces ``ctx.arguments`` for the steps after this one (forward sends
them), and the agent's own are put back once they are done: the steps before it (the MRTR seal binds a
round to the arguments the agent sends, and checks the retry's against them) and the audit record (through
the audit redactor, with the guard's findings in ``outcome.guard``) keep seeing what the agent sent. On a
deny nothing runs after this step, and ``ctx.arguments`` stays the redacted copy, so the audit record
never holds what a deny rule found, even for a detector the audit redactor does not run.
"""

from __future__ import annotations

from arbiter.integrity.arguments import ArgumentGuard
from arbiter.proxy.pipeline import CallContext, CallNext, Result


class GuardArguments:
    def __init__(self, guard: ArgumentGuard) -> None:
        self._guard = guard

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        if ctx.method != "tools/call":
            return await call_next(ctx)
        assert ctx.exposed is not None and ctx.principal is not None, "resolve and authorize run first"
        definition = ctx.definition
        schema = definition.get("inputSchema") if definition is not None else None
        checked = self._guard.check(
            ctx.exposed,
            ctx.principal.roles,
            ctx.arguments or {},
            schema if isinstance(schema, dict) else None,  # pyright: ignore[reportUnknownArgumentType]
        )
        if checked.found:
            ctx.guard = {**(ctx.guard or {}), "arguments": checked.found}
        if checked.refusal is not None:
            ctx.arguments = checked.arguments
            raise checked.refusal
        sent = ctx.arguments
        ctx.arguments = checked.arguments
        try:
            return await call_next(ctx)
        finally:
            ctx.arguments = sent
