"""Matching and specificity of rules and budgets, tool cost precedence, and what counts as the same
request or a failure before the tool ran."""

from __future__ import annotations

import pytest
from mcp.shared.exceptions import MCPError
from mcp_types import REQUEST_TIMEOUT

from arbiter.auth.principal import Principal
from arbiter.errors import PolicyDenied, UpstreamProtocolError, UpstreamUnavailable
from arbiter.limits.rules import (
    Match,
    RateRule,
    ToolCost,
    ToolSettings,
    check_tool_pattern,
    select,
    tool_settings,
)
from arbiter.proxy.interceptors.limits import IDEMPOTENCY_META, ran_before_failing, request_key
from arbiter.proxy.pipeline import CallContext

ALICE = Principal("alice", "arbiter", "api_key", tenant="acme", roles=frozenset({"support-agent", "staff"}))
NO_TENANT = Principal("bob", "arbiter", "api_key", roles=frozenset())


def rule(rule_id: int, per: tuple[str, ...] = ("principal",), **match: str) -> RateRule:
    return RateRule(rule_id, Match(**match), per, 10, "minute")  # type: ignore[arg-type]


def test_each_field_matches_by_glob_and_roles_match_any_role() -> None:
    assert Match(role="support-*", upstream="crm", tool="get_*").matches(ALICE, "crm", "get_customer")
    assert not Match(role="admin").matches(ALICE, "crm", "get_customer")
    assert not Match(tenant="acme").matches(NO_TENANT, "crm", "x")
    assert Match(tenant="*").matches(NO_TENANT, "crm", "x")
    assert not Match(role="*?").matches(NO_TENANT, "crm", "x")  # a role pattern needs some role
    assert not Match(tool="get_?").matches(ALICE, "crm", "get_customer")


def test_most_specific_rules_win_within_a_scope_and_every_scope_applies() -> None:
    rules = [
        rule(1, role="support-agent"),
        rule(2, role="support-agent", upstream="crm"),  # more specific, same scope: replaces 1
        rule(3, subject="al*", upstream="crm"),  # less specific than 2: glob 1 + exact 2 = 3 < 4
        rule(4, per=(), tenant="acme"),  # another scope: applies as well
        rule(5, per=(), tenant="globex"),  # does not match
        rule(6, role="support-agent", upstream="crm", tool="delete_*"),  # does not match get_customer
    ]
    chosen = {r.id for r in select(rules, ALICE, "crm", "get_customer")}
    assert chosen == {2, 4}
    tie = [rule(7, role="support-agent", upstream="crm"), rule(8, subject="alice", tenant="acme")]
    assert {r.id for r in select(tie, ALICE, "crm", "x")} == {7, 8}  # equal specificity: both apply


def test_tool_cost_longest_literal_pattern_wins_per_setting() -> None:
    costs = [
        ToolCost(1, "*", cost=1.0, loop_max_repeats=20),
        ToolCost(2, "crm/*", cost=2.0),
        ToolCost(3, "*/delete_*", cost=50.0, loop_window_s=5),
        ToolCost(4, "crm/delete_customer", loop_max_repeats=1),
    ]
    default = ToolSettings(0.5, 0, 60.0)
    assert tool_settings(costs, "crm", "delete_customer", default) == ToolSettings(50.0, 1, 5)
    assert tool_settings(costs, "crm", "get_customer", default) == ToolSettings(2.0, 20, 60.0)
    assert tool_settings(costs, "kb", "search", default) == ToolSettings(1.0, 20, 60.0)
    assert tool_settings([], "kb", "search", default) == default
    for bad in ("crm", "crm/", "CRM/x", ""):
        with pytest.raises(ValueError):
            check_tool_pattern(bad)


def _ctx(params: dict[str, object], request_id: int | str | None = 5) -> CallContext:
    return CallContext(method="tools/call", params=params, request_id=request_id)


def test_request_key_is_the_idempotency_key_else_nothing_without_a_session() -> None:
    assert request_key(_ctx({"_meta": {IDEMPOTENCY_META: "abc"}})) == "k:abc"
    assert request_key(_ctx({"_meta": {IDEMPOTENCY_META: "x" * 201}})) is None
    assert request_key(_ctx({"_meta": {IDEMPOTENCY_META: 5}})) is None
    assert request_key(_ctx({})) is None  # stateless, no key: every request is new


def test_what_counts_as_failing_before_the_tool_ran() -> None:
    assert not ran_before_failing(MCPError(-32602, "bad arguments"))
    assert not ran_before_failing(UpstreamUnavailable.of("crm"))  # could not connect
    assert not ran_before_failing(PolicyDenied("later step refused it"))
    timed_out = UpstreamUnavailable.of("crm")
    timed_out.__cause__ = MCPError(REQUEST_TIMEOUT, "timed out")
    assert ran_before_failing(timed_out)
    assert ran_before_failing(UpstreamProtocolError("garbled answer"))
