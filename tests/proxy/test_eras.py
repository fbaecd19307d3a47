"""Both protocol eras, through the real MCP SDK client, against Arbiter in front of two real upstreams."""

from __future__ import annotations

from typing import Any

import pytest
from mcp import Client

from tests.conftest import ArbiterServer, UpstreamProc

MODES = ["legacy", "2026-07-28", "auto"]


def _dump(result: Any) -> dict[str, Any]:
    data: dict[str, Any] = result.model_dump(by_alias=True, mode="json", exclude_none=True)
    data.pop("_meta", None)  # the upstream stamps its own identity there; Arbiter stamps its own
    return data


@pytest.mark.parametrize("mode", MODES)
async def test_lists_merge_both_upstreams_with_prefixed_names(arbiter: ArbiterServer, mode: str) -> None:
    async with arbiter.client(mode) as client:  # pyright: ignore[reportArgumentType]
        expected_era = "2025-11-25" if mode == "legacy" else "2026-07-28"
        assert client.protocol_version == expected_era
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == {
            "kb__search_docs",
            "kb__get_doc",
            "crm__get_customer",
            "crm__list_tickets",
            "crm__create_ticket",
            "crm__delete_customer",
        }
        assert tools["crm__get_customer"].input_schema["required"] == ["customer_id"]
        resources = {r.uri for r in (await client.list_resources()).resources}
        assert resources == {"arbiter://kb/kb://index", "arbiter://crm/crm://customers"}
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
        assert templates == {"arbiter://kb/kb://docs/{doc_id}"}
        prompts = {p.name for p in (await client.list_prompts()).prompts}
        assert prompts == {"kb__answer_from_kb", "crm__summarize_customer"}


@pytest.mark.parametrize("mode", MODES)
async def test_calls_route_to_the_right_upstream_and_return_its_result_unchanged(
    arbiter: ArbiterServer, kb_upstream: UpstreamProc, crm_upstream: UpstreamProc, mode: str
) -> None:
    cases = [
        (crm_upstream, "crm", "get_customer", {"customer_id": "C-1002"}),
        (kb_upstream, "kb", "search_docs", {"query": "refund annual plan"}),
        (kb_upstream, "kb", "get_doc", {"doc_id": "nope"}),  # the tool's own isError result
    ]
    want: dict[str, Any] = {}
    async with arbiter.client(mode) as via:  # pyright: ignore[reportArgumentType]
        for upstream, prefix, tool, args in cases:
            async with Client(upstream.url, mode=mode, cache=None) as direct:  # pyright: ignore[reportArgumentType]
                want = _dump(await direct.call_tool(tool, args))
            got = _dump(await via.call_tool(f"{prefix}__{tool}", args))
            assert got == want
    assert want["isError"] is True  # the last case really was an error result, passed through


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_resources_and_prompts_route_by_prefix(arbiter: ArbiterServer, mode: str) -> None:
    async with arbiter.client(mode) as client:  # pyright: ignore[reportArgumentType]
        read = await client.read_resource("arbiter://kb/kb://docs/refund-policy")
        content = read.contents[0]
        assert content.uri == "arbiter://kb/kb://docs/refund-policy"
        assert "pro rata" in getattr(content, "text", "")
        index = await client.read_resource("arbiter://crm/crm://customers")
        assert "Acme Logistics" in getattr(index.contents[0], "text", "")
        prompt = await client.get_prompt("crm__summarize_customer", {"customer_id": "C-1003"})
        assert "C-1003" in getattr(prompt.messages[0].content, "text", "")


@pytest.mark.parametrize("mode", ["legacy", "2026-07-28"])
async def test_unknown_targets_answer_like_an_mcp_server(arbiter: ArbiterServer, mode: str) -> None:
    from mcp.shared.exceptions import MCPError

    async with arbiter.client(mode) as client:  # pyright: ignore[reportArgumentType]
        for name in ("crm__no_such_tool", "nosuchupstream__get_customer", "no-separator"):
            with pytest.raises(MCPError) as err:
                await client.session.call_tool(name, {})
            assert err.value.code == -32602
            assert err.value.message == f"Unknown tool: {name}"
            assert err.value.data is None
        with pytest.raises(MCPError) as perr:
            await client.get_prompt("kb__nope", {})
        assert (perr.value.code, perr.value.message) == (-32602, "Unknown prompt: kb__nope")
        with pytest.raises(MCPError) as rerr:
            await client.read_resource("arbiter://crm/crm://nothing-here")
        assert rerr.value.code == -32002


async def test_upstream_sessions_are_pooled_not_opened_per_request(arbiter: ArbiterServer) -> None:
    pool = arbiter.app.state.runtime.pool
    before = {name: pool.get(name).connects for name in ("kb", "crm")}
    for mode in ("legacy", "2026-07-28"):
        async with arbiter.client(mode) as client:  # pyright: ignore[reportArgumentType]
            for _ in range(25):
                await client.call_tool("crm__get_customer", {"customer_id": "C-1001"})
                await client.call_tool("kb__get_doc", {"doc_id": "sso-setup"})
    after = {name: pool.get(name).connects for name in ("kb", "crm")}
    assert after == before == {"kb": 1, "crm": 1}
