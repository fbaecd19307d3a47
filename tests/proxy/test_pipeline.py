"""The pipeline seam: an interceptor can deny, rewrite a list, and observe a result."""

from __future__ import annotations

import pytest
from mcp.shared.exceptions import MCPError

from arbiter.errors import RequestRejected
from arbiter.proxy.pipeline import CallContext, CallNext, Pipeline, Result
from tests.conftest import ArbiterFactory, UpstreamProc


class DenyDeletes:
    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        if ctx.method == "tools/call" and ctx.target == "delete_customer":
            raise RequestRejected(f"{ctx.exposed} is not allowed here", upstream=ctx.upstream)
        return await call_next(ctx)


class HideDeletes:
    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        result = await call_next(ctx)
        if ctx.method == "tools/list":
            result["tools"] = [t for t in result["tools"] if not t["name"].endswith("__delete_customer")]
        return result


class Observer:
    def __init__(self) -> None:
        self.calls: list[tuple[str | None, str | None, dict[str, object] | None, bool | None]] = []

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        result = await call_next(ctx)
        if ctx.method == "tools/call":
            self.calls.append((ctx.upstream, ctx.target, ctx.arguments, result.get("isError")))
        return result


async def test_interceptors_deny_rewrite_and_observe(
    arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc
) -> None:
    observer = Observer()
    server = arbiter_factory(interceptors=[observer, HideDeletes(), DenyDeletes()])
    server.register("crm", crm_upstream.url)
    async with server.client() as client:
        names = {t.name for t in (await client.list_tools()).tools}
        assert names == {"crm__get_customer", "crm__list_tickets", "crm__create_ticket"}

        with pytest.raises(MCPError) as err:
            await client.session.call_tool("crm__delete_customer", {"customer_id": "C-1003"})
        assert err.value.code == -31001
        assert err.value.data == {"reason": "request_rejected", "upstream": "crm"}

        # The denied call never reached the upstream: the customer is still there.
        found = await client.call_tool("crm__get_customer", {"customer_id": "C-1003"})
        assert found.structured_content is not None
        assert found.structured_content["name"] == "Initech Labs"

    # The observer sits before the deny step, so it saw the allowed call's result and not the denied one.
    assert observer.calls == [("crm", "get_customer", {"customer_id": "C-1003"}, False)]


async def test_pipeline_runs_in_order_and_needs_a_terminal_step() -> None:
    order: list[str] = []

    def step(name: str):
        async def run(ctx: CallContext, call_next: CallNext) -> Result:
            order.append(name)
            return await call_next(ctx)

        return run

    async def terminal(ctx: CallContext, call_next: CallNext) -> Result:
        order.append("end")
        return {"ok": True}

    pipeline = Pipeline([step("a"), step("b"), terminal])
    assert await pipeline(CallContext(method="tools/list", params={})) == {"ok": True}
    assert order == ["a", "b", "end"]
    with pytest.raises(ValueError):
        Pipeline([])
    with pytest.raises(RuntimeError):
        await Pipeline([step("only")])(CallContext(method="tools/list", params={}))
