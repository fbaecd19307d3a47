"""The policy on /mcp against the real kb and crm upstreams: filtered lists, hidden = unknown, denials."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from tests.conftest import ArbiterFactory, ArbiterServer, Recorder, UpstreamProc
from tests.policies.conftest import new_key, policy_version, rpc_http
from tests.refusals import tool_refusal

POLICY = """\
p, role:support, *, kb/*, call, allow
p, role:support, *, kb/*, read, allow
p, role:support, *, crm/get_customer, call, allow
# A conditional allow still lists the tool: some arguments pass.
p, role:support, *, crm/list_tickets, call, allow, r.args.customer_id == "C-1001"
p, role:support, *, crm/create_ticket, call, allow, r.args.priority in ("low", "normal")
p, role:support, *, crm/summarize_customer, get, allow
p, role:sales, *, crm/*, call, allow
p, role:sales, *, crm/*, read, allow
p, role:sales, *, crm/delete_customer, call, deny
# A conditional deny does not hide the tool.
p, role:sales, *, crm/create_ticket, call, deny, r.args.priority == "high"
p, role:sales, *, kb/answer_from_kb, get, allow
# list makes an item visible without letting the caller use it.
p, role:sales, *, kb/kb://index, list, allow
"""
MODES = ["legacy", "2026-07-28"]


@dataclass
class Governed:
    server: ArbiterServer
    recorder: Recorder  # sees every request that the policy let through to the forward step
    support: str
    sales: str


@pytest.fixture
def governed(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc, crm_upstream: UpstreamProc
) -> Governed:
    recorder = Recorder()
    server = arbiter_factory(interceptors=[recorder], policy=POLICY)
    server.register("kb", kb_upstream.url)
    server.register("crm", crm_upstream.url)
    return Governed(
        server,
        recorder,
        new_key(server, "sam", ["support"]),
        new_key(server, "sue", ["sales"], tenant="globex"),
    )


async def _lists(server: ArbiterServer, mode: str, token: str) -> dict[str, set[str]]:
    async with server.client(mode, token) as client:  # pyright: ignore[reportArgumentType]
        return {
            "tools": {t.name for t in (await client.list_tools()).tools},
            "resources": {str(r.uri) for r in (await client.list_resources()).resources},
            "templates": {
                t.uri_template for t in (await client.list_resource_templates()).resource_templates
            },
            "prompts": {p.name for p in (await client.list_prompts()).prompts},
        }


@pytest.mark.parametrize("mode", MODES)
async def test_lists_show_each_principal_only_what_it_may_use(governed: Governed, mode: str) -> None:
    assert await _lists(governed.server, mode, governed.support) == {
        "tools": {
            "kb__search_docs",
            "kb__get_doc",
            "crm__get_customer",
            "crm__list_tickets",
            "crm__create_ticket",
        },
        "resources": {"arbiter://kb/kb://index"},
        "templates": {"arbiter://kb/kb://docs/{doc_id}"},
        "prompts": {"crm__summarize_customer"},
    }
    assert await _lists(governed.server, mode, governed.sales) == {
        "tools": {"crm__get_customer", "crm__list_tickets", "crm__create_ticket"},
        "resources": {"arbiter://crm/crm://customers", "arbiter://kb/kb://index"},
        "templates": set(),
        "prompts": {"kb__answer_from_kb"},
    }
    # The test agent's role ("agent") has no rule at all.
    assert await _lists(governed.server, mode, governed.server.agent_key) == {
        "tools": set(),
        "resources": set(),
        "templates": set(),
        "prompts": set(),
    }


async def _error(server: ArbiterServer, mode: str, token: str, kind: str, name: str) -> MCPError:
    async with server.client(mode, token) as client:  # pyright: ignore[reportArgumentType]
        with pytest.raises(MCPError) as err:
            if kind == "tool":
                await client.session.call_tool(name, {"customer_id": "C-1001"})
            elif kind == "prompt":
                await client.get_prompt(name, {"question": "x"})
            else:
                await client.read_resource(name)
    return err.value


HIDDEN_VS_UNKNOWN = [
    ("tool", "crm__delete_customer", "crm__no_such_tool", "Unknown tool: {}"),
    ("tool", "kb__search_docs", "kb__no_such_tool", "Unknown tool: {}"),
    ("prompt", "kb__answer_from_kb", "kb__no_such_prompt", "Unknown prompt: {}"),
    (
        "resource",
        "arbiter://crm/crm://customers",
        "arbiter://crm/crm://nothing-here",
        "Resource not found: {}",
    ),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "kind,hidden,unknown,message", HIDDEN_VS_UNKNOWN, ids=[h[1] for h in HIDDEN_VS_UNKNOWN]
)
async def test_a_hidden_target_answers_exactly_like_an_unknown_one(
    governed: Governed, mode: str, kind: str, hidden: str, unknown: str, message: str
) -> None:
    token = governed.sales if hidden.startswith("kb__search") else governed.support
    seen = await _error(governed.server, mode, token, kind, hidden)
    missing = await _error(governed.server, mode, token, kind, unknown)
    assert (seen.code, seen.message, seen.data) == (missing.code, message.format(hidden), None)
    assert missing.message == message.format(unknown)
    assert seen.code in (-32602, -32002)
    assert _forwarded(governed.recorder) == []  # neither got past the policy


async def test_hidden_and_unknown_are_byte_for_byte_alike_over_raw_http(governed: Governed) -> None:
    server, token = governed.server, governed.sales
    hidden_resp, hidden = rpc_http(server, token, "tools/call", {"name": "kb__search_docs", "arguments": {}})
    unknown_resp, unknown = rpc_http(
        server, token, "tools/call", {"name": "kb__nothing_here", "arguments": {}}
    )
    assert hidden_resp.status_code == unknown_resp.status_code
    assert hidden_resp.text.replace("kb__search_docs", "NAME") == unknown_resp.text.replace(
        "kb__nothing_here", "NAME"
    )
    assert hidden == {
        "jsonrpc": "2.0",
        "id": 7,
        "error": {"code": -32602, "message": "Unknown tool: kb__search_docs"},
    }
    assert unknown["error"] == {"code": -32602, "message": "Unknown tool: kb__nothing_here"}
    # The same tool, for a caller who may see it, is not unknown: the hiding came from the policy.
    args = {"name": "kb__search_docs", "arguments": {"query": "sso"}}
    _, visible = rpc_http(server, governed.support, "tools/call", args)
    assert visible["result"]["isError"] is False
    assert _forwarded(governed.recorder) == ["kb__search_docs"]


def _forwarded(recorder: Recorder) -> list[str | None]:
    """The targets of the calls, reads and gets that got past the policy (lists are not counted)."""
    return [c.exposed for c in recorder.calls if c.method in ("tools/call", "resources/read", "prompts/get")]


def _tickets(result: Any) -> list[str]:
    return [t["subject"] for t in result.structured_content["tickets"]]


def _text(result: types.CallToolResult) -> str:
    block = result.content[0]
    assert isinstance(block, types.TextContent)
    return block.text


@pytest.mark.parametrize("mode", MODES)
async def test_a_visible_but_denied_call_is_policy_denied_and_never_forwarded(
    governed: Governed, mode: str
) -> None:
    server, recorder = governed.server, governed.recorder
    version = policy_version(server)
    refused, granted = f"refused {uuid.uuid4().hex}", f"granted {uuid.uuid4().hex}"
    async with server.client(mode, governed.support) as client:  # pyright: ignore[reportArgumentType]
        denied = await client.session.call_tool(
            "crm__create_ticket", {"customer_id": "C-1003", "subject": refused, "priority": "high"}
        )
        assert tool_refusal(denied) == {
            "reason": "policy_denied",
            "message": "the policy does not allow you to call crm__create_ticket",
            "policy_version": version,
        }
        assert "crm__create_ticket" in _text(denied) and refused not in _text(denied)
        assert _forwarded(recorder) == []
        # The same tool with arguments the condition accepts goes through (so the refusal was the policy's).
        created = await client.call_tool(
            "crm__create_ticket", {"customer_id": "C-1003", "subject": granted, "priority": "low"}
        )
        assert created.is_error is False
        assert _forwarded(recorder) == ["crm__create_ticket"]
        tickets = _tickets(await client.call_tool("crm__list_tickets", {"customer_id": "C-1001"}))
        # The conditional allow does not cover C-1003's list.
        other = await client.session.call_tool("crm__list_tickets", {"customer_id": "C-1003"})
        assert tool_refusal(other)["reason"] == "policy_denied"
    async with server.client(mode, governed.sales) as sales:  # pyright: ignore[reportArgumentType]
        in_crm = _tickets(await sales.call_tool("crm__list_tickets", {"customer_id": "C-1003"}))
        # A conditional deny: listed, and refused when it matches.
        cond_deny = await sales.session.call_tool(
            "crm__create_ticket", {"customer_id": "C-1003", "subject": refused, "priority": "high"}
        )
        assert tool_refusal(cond_deny)["reason"] == "policy_denied"
        assert tool_refusal(cond_deny)["policy_version"] == version
        with pytest.raises(MCPError) as listed_only:  # visible through `list`, not readable
            await sales.read_resource("arbiter://kb/kb://index")
        assert listed_only.value.code == -31001
    assert "SSO login loops back to sign-in" in tickets
    assert granted in in_crm and refused not in in_crm  # the upstream never ran the refused calls
    assert _forwarded(recorder) == [
        "crm__create_ticket",
        "crm__list_tickets",
        "crm__list_tickets",
    ]


@pytest.fixture
def unprotected(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc, crm_upstream: UpstreamProc
) -> ArbiterServer:
    server = arbiter_factory(policy=None)  # the default: the empty policy
    server.register("kb", kb_upstream.url)
    server.register("crm", crm_upstream.url)
    return server


@pytest.mark.parametrize("mode", MODES)
async def test_the_empty_policy_shows_nothing_and_allows_nothing(
    unprotected: ArbiterServer, mode: str
) -> None:
    assert policy_version(unprotected) == 0
    for token in (unprotected.agent_key, new_key(unprotected, "boss", ["security-admin", "admin"])):
        assert await _lists(unprotected, mode, token) == {
            "tools": set(),
            "resources": set(),
            "templates": set(),
            "prompts": set(),
        }
        for kind, target, message in [
            ("tool", "crm__get_customer", "Unknown tool: crm__get_customer"),
            ("prompt", "crm__summarize_customer", "Unknown prompt: crm__summarize_customer"),
            ("resource", "arbiter://kb/kb://index", "Resource not found: arbiter://kb/kb://index"),
        ]:
            err = await _error(unprotected, mode, token, kind, target)
            assert (err.message, err.data) == (message, None)
            assert err.code == (-32002 if kind == "resource" else -32602)
    # With one rule the same call works: the upstreams were there all along.
    with unprotected.admin() as admin:
        grant = {"subject": "role:agent", "object": "crm/get_customer", "action": "call"}
        assert admin.post("/policies", json=grant).status_code == 201
    async with unprotected.client(mode) as client:  # pyright: ignore[reportArgumentType]
        result = await client.call_tool("crm__get_customer", {"customer_id": "C-1002"})
        assert result.structured_content is not None and result.structured_content["name"] == "Globex Retail"
