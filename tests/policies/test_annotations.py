"""Tool annotations in policy conditions (``r.tool``): the pinned definition's claims may narrow what a
rule allows, never widen it beyond the rules (issue 15: annotations are informative only)."""

from __future__ import annotations

from collections.abc import Iterator

import mcp_types as types
import pytest
from mcp.server import MCPServer

from arbiter.policies.engine import PolicyEngine, Subject
from arbiter.policies.rules import compile_condition, parse_csv
from tests.conftest import ArbiterFactory, serve_in_thread
from tests.refusals import tool_refusal

POLICY = """\
p, role:agent, *, crm/*, call, allow
p, role:agent, *, crm/*, call, deny, r.tool.destructiveHint == True
p, role:reader, *, crm/*, call, allow, r.tool.readOnlyHint == True
"""
AGENT = Subject("a", "acme", ("agent",))
READER = Subject("r", "acme", ("reader",))


@pytest.fixture
def engine() -> PolicyEngine:
    return PolicyEngine(parse_csv(POLICY), 1)


def test_a_destructive_tool_is_denied_by_a_rule_on_its_annotation(engine: PolicyEngine) -> None:
    assert engine.decide(AGENT, "crm/delete", "call", {}, {"destructiveHint": True}).allowed is False
    assert engine.decide(AGENT, "crm/get", "call", {}, {"destructiveHint": False}).allowed is True
    assert engine.decide(AGENT, "crm/get", "call", {}).allowed is True  # no annotations: nothing claimed


def test_an_allow_conditioned_on_read_only_needs_the_claim(engine: PolicyEngine) -> None:
    assert engine.decide(READER, "crm/get", "call", {}, {"readOnlyHint": True}).allowed is True
    assert engine.decide(READER, "crm/put", "call", {}, {"readOnlyHint": False}).allowed is False
    assert engine.decide(READER, "crm/put", "call", {}).allowed is False  # a missing claim allows nothing
    # Cached decisions keep the annotations apart: the same tool, other claims, another answer.
    assert engine.decide(READER, "crm/x", "call", {}, {"readOnlyHint": True}).allowed is True
    assert engine.decide(READER, "crm/x", "call", {}, {"readOnlyHint": False}).allowed is False


def test_conditions_name_only_r_args_r_sub_and_r_tool() -> None:
    compile_condition("r.tool.readOnlyHint == True")
    with pytest.raises(ValueError, match=r"r\.tool\.<annotation>"):
        compile_condition("r.definition.readOnlyHint == True")


@pytest.fixture
def annotated_upstream() -> Iterator[str]:
    server = MCPServer("ann")

    @server.tool(annotations=types.ToolAnnotations(destructive_hint=True))
    def wipe() -> str:
        return "wiped"

    @server.tool(annotations=types.ToolAnnotations(read_only_hint=True))
    def look() -> str:
        return "looked"

    with serve_in_thread(server.streamable_http_app(json_response=True, stateless_http=True)) as port:
        yield f"http://127.0.0.1:{port}/mcp"


async def test_the_pinned_annotations_reach_the_policy_through_the_proxy(
    arbiter_factory: ArbiterFactory, annotated_upstream: str
) -> None:
    policy = (
        "p, role:agent, *, ann/*, call, allow\n"
        "p, role:agent, *, ann/*, call, deny, r.tool.destructiveHint == True\n"
    )
    server = arbiter_factory(policy=policy)
    server.register("ann", annotated_upstream)
    async with server.client() as client:
        assert not (await client.call_tool("ann__look", {})).is_error
        refused = await client.call_tool("ann__wipe", {})
    assert tool_refusal(refused)["reason"] == "policy_denied"
