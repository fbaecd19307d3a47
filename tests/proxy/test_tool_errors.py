"""tools/call refusals the model can act on: an isError tool result by default, a JSON-RPC error on request.

Both eras (the handshake era through the SDK's transport, 2026-07-28 through the direct path), both
settings, a killed upstream, the policy and the limits; a hidden tool still answers exactly like a missing
one; tools/list names the upstreams that are down, only to callers who could see one of their tools.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from arbiter.errors import ArbiterError, DuplicateRequest, RequestRejected, UnknownTarget
from arbiter.proxy.pipeline import CallContext
from arbiter.proxy.tool_errors import RESULT_REASONS, as_tool_result
from tests.audit.helpers import of_kind, wait_for
from tests.conftest import ArbiterFactory, ArbiterServer, UpstreamProc
from tests.limits.conftest import call, open_session
from tests.policies.conftest import new_key
from tests.refusals import refusal_of, tool_refusal

MODES = ["legacy", "2026-07-28"]
POLICY = """\
p, role:support, *, kb/*, call, allow
p, role:support, *, crm/get_customer, call, allow
p, role:support, *, crm/list_tickets, call, allow
p, role:support, *, crm/create_ticket, call, allow, r.args.priority == "low"
p, role:docs, *, kb/*, call, allow
"""
GET_CUSTOMER = ("crm__get_customer", {"customer_id": "C-1001"})


@dataclass
class Setup:
    server: ArbiterServer
    crm: UpstreamProc
    support: str  # sees kb and some crm tools
    docs: str  # sees only kb tools


@pytest.fixture(params=["result", "jsonrpc"])
def setup(
    request: pytest.FixtureRequest, arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc
) -> Iterator[Setup]:
    crm = UpstreamProc("arbiter.demo.crm").start()  # the test's own: it is killed
    try:
        server = arbiter_factory(policy=POLICY, mcp={"tool_errors": request.param})
        server.register("kb", kb_upstream.url)
        server.register("crm", crm.url)
        yield Setup(server, crm, new_key(server, "sam", ["support"]), new_key(server, "dora", ["docs"]))
    finally:
        crm.kill()


def _results(server: ArbiterServer) -> bool:
    return server.settings.mcp.tool_errors == "result"


async def _refusal(
    server: ArbiterServer, mode: str, token: str, name: str, args: dict[str, Any]
) -> dict[str, Any]:
    """Call ``name`` through the SDK client and return the refusal's details, in the configured form."""
    async with server.client(mode, token) as client:  # pyright: ignore[reportArgumentType]
        if _results(server):
            result = await client.session.call_tool(name, args)
            details = tool_refusal(result)
            text = result.content[0]
            assert isinstance(text, types.TextContent)
            return {**details, "text": text.text}
        with pytest.raises(MCPError) as err:
            await client.session.call_tool(name, args)
        data: Any = err.value.data
        assert isinstance(data, dict) and err.value.message == data.get("message", err.value.message)
        return {**data, "message": err.value.message, "code": err.value.code}


@pytest.mark.parametrize("mode", MODES)
async def test_a_killed_upstream_is_a_readable_refusal(setup: Setup, mode: str) -> None:
    setup.crm.kill()
    got = await _refusal(setup.server, mode, setup.support, *GET_CUSTOMER)
    assert got["reason"] == "upstream_unavailable" and got["upstream"] == "crm"
    if _results(setup.server):
        # crm__get_customer declares an outputSchema: the client did not raise on the error result.
        assert got["text"].startswith("crm is unavailable right now; try again")
        assert got["text"].endswith("or answer without it")
        assert "C-1001" not in got["text"]  # never the arguments
    else:
        assert got["code"] == -31002


@pytest.mark.parametrize("mode", MODES)
async def test_a_policy_refusal_is_a_readable_refusal(setup: Setup, mode: str) -> None:
    args = {"customer_id": "C-1001", "subject": "secret-subject-x", "priority": "high"}
    got = await _refusal(setup.server, mode, setup.support, "crm__create_ticket", args)
    assert got["reason"] == "policy_denied" and isinstance(got["policy_version"], int)
    if _results(setup.server):
        assert got["text"].startswith("you are not allowed to use crm__create_ticket (policy)")
        assert "secret-subject-x" not in json.dumps(got)
    else:
        assert got["code"] == -31001


@pytest.mark.parametrize("mode", MODES)
async def test_a_rate_limit_says_when_to_try_again(setup: Setup, mode: str) -> None:
    with setup.server.admin() as admin:
        created = admin.post("/limits", json={"upstream": "kb", "limit": 1, "period": "hour"})
        assert created.status_code == 201, created.text
    async with setup.server.client(mode, setup.support) as client:  # pyright: ignore[reportArgumentType]
        ok = await client.session.call_tool("kb__search_docs", {"query": "sso"})
        assert ok.is_error is False
    got = await _refusal(setup.server, mode, setup.support, "kb__search_docs", {"query": "sso"})
    assert got["reason"] == "rate_limited" and got["retry_after_s"] >= 1
    if _results(setup.server):
        assert re.search(r"; try again in [1-9][0-9]* s or answer without it$", got["text"]), got["text"]
    else:
        assert got["code"] == -31004


@pytest.mark.parametrize("mode", MODES)
async def test_a_hidden_tool_answers_exactly_like_a_missing_one(setup: Setup, mode: str) -> None:
    setup.crm.kill()  # even while its upstream is down: hidden stays hidden, not "unavailable"
    server = setup.server
    async with httpx.AsyncClient(timeout=30) as http:
        session = await open_session(http, server, setup.docs) if mode == "legacy" else None
        hidden = await call(http, server, setup.docs, "crm__get_customer", {}, session=session)
        missing = await call(http, server, setup.docs, "crm__no_such_tool", {}, session=session)
    assert hidden.body == {
        "jsonrpc": "2.0",
        "id": 7,
        "error": {"code": -32602, "message": "Unknown tool: crm__get_customer"},
    }
    assert json.dumps(hidden.body).replace("crm__get_customer", "N") == json.dumps(missing.body).replace(
        "crm__no_such_tool", "N"
    )

    # The auditor is told the truth: the hidden tool was a denial by the policy, the missing one unknown.
    def calls(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in of_kind(rs, "mcp") if r["method"] == "tools/call"]

    records = calls(wait_for(server, lambda rs: len(calls(rs)) >= 2))
    reasons = {r["tool"]: (r["decision"], r["reason"]) for r in records}
    assert reasons == {
        "crm__get_customer": ("deny", "policy_denied"),
        "crm__no_such_tool": ("deny", "unknown_target"),
    }


async def test_the_audit_record_is_the_refusal_either_way(setup: Setup) -> None:
    setup.crm.kill()
    async with httpx.AsyncClient(timeout=30) as http:
        reply = await call(http, setup.server, setup.support, *GET_CUSTOMER)
    assert (refusal_of(reply.body) or {}).get("reason") == "upstream_unavailable"
    assert ("result" in reply.body) is _results(setup.server)
    records = wait_for(setup.server, lambda rs: any(r["method"] == "tools/call" for r in of_kind(rs, "mcp")))
    records = [r for r in of_kind(records, "mcp") if r["method"] == "tools/call"]
    (record,) = records
    assert record["reason"] == "upstream_unavailable" and record["outcome"]["error_code"] == -31002


@pytest.mark.parametrize("mode", MODES)
async def test_tools_list_names_the_missing_upstreams_to_those_who_could_see_them(
    setup: Setup, mode: str
) -> None:
    server = setup.server
    async with server.client(mode, setup.support) as client:  # pyright: ignore[reportArgumentType]
        listed = await client.list_tools()
        assert listed.meta is None or "arbiter/unavailable" not in listed.meta
        setup.crm.kill()
        try:  # Arbiter learns that crm is down
            await client.session.call_tool(*GET_CUSTOMER)
        except MCPError:  # tool_errors: jsonrpc
            assert not _results(server)
        listed = await client.list_tools()
        assert {t.name for t in listed.tools} == {"kb__search_docs", "kb__get_doc"}
        assert listed.meta is not None and listed.meta["arbiter/unavailable"] == ["crm"]
    async with server.client(mode, setup.docs) as client:  # pyright: ignore[reportArgumentType]
        listed = await client.list_tools()  # docs could never see a crm tool: crm is not named
        assert {t.name for t in listed.tools} == {"kb__search_docs", "kb__get_doc"}
        assert listed.meta is None or "arbiter/unavailable" not in listed.meta
    with server.admin() as admin:
        (crm,) = [u for u in admin.get("/upstreams").json() if u["name"] == "crm"]
    assert crm["status"] == "down" and crm["listed"] is False


@pytest.mark.parametrize("reason", sorted(RESULT_REASONS))
def test_every_converted_reason_reads_as_a_sentence(reason: str) -> None:
    exc = type("Refusal", (ArbiterError,), {"code": reason})("the message", upstream="crm", retry_after_s=2.2)
    call = CallContext(method="tools/call", params={}, exposed="crm__get_customer", upstream="crm")
    result = as_tool_result(exc, call)
    assert result is not None
    text = result["content"][0]["text"]
    assert "{" not in text and ("crm" in text)
    if "try again" in text:
        assert "try again in 3 s" in text  # rounded up, whole seconds
    expected = {"reason": reason, "message": "the message", "upstream": "crm", "retry_after_s": 2.2}
    assert result["structuredContent"] == expected == result["_meta"]["arbiter/error"]


@pytest.mark.parametrize(
    "exc",
    [
        DuplicateRequest("copy of a request that ran"),
        RequestRejected("an interceptor of the deployment's own said no"),
        UnknownTarget("Unknown tool: crm__x"),
        ArbiterError("internal"),
    ],
)
def test_other_refusals_stay_jsonrpc_errors(exc: ArbiterError) -> None:
    call = CallContext(method="tools/call", params={}, exposed="crm__x", upstream="crm")
    assert as_tool_result(exc, call) is None
