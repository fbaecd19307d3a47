"""Matching of rules and budgets (a strictly narrower one overrides a broader one), tool cost precedence,
and what counts as the same request or a failure before the tool ran."""

from __future__ import annotations

import pytest
from mcp.shared.exceptions import MCPError
from mcp_types import REQUEST_TIMEOUT

from arbiter.auth.principal import Principal
from arbiter.errors import PolicyDenied, UpstreamProtocolError, UpstreamUnavailable
from arbiter.limits.rules import (
    Budget,
    Match,
    RateRule,
    ToolCost,
    ToolSettings,
    check_rule_tool,
    check_tool_pattern,
    pattern_covers,
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


def test_a_strictly_narrower_rule_overrides_within_a_scope_and_every_scope_applies() -> None:
    rules = [
        rule(1, role="support-agent"),
        rule(2, role="support-agent", upstream="crm"),  # a subset of 1's calls, same scope: replaces 1
        rule(3, subject="al*", upstream="crm"),  # neither a subset nor a superset of 2: both apply
        rule(4, per=(), tenant="acme"),  # another scope: applies as well
        rule(5, per=(), tenant="globex"),  # does not match
        rule(6, role="support-agent", upstream="crm", tool="delete_*"),  # does not match get_customer
    ]
    chosen = {r.id for r in select(rules, ALICE, "crm", "get_customer")}
    assert chosen == {2, 3, 4}
    # delete_customer matches 6 too, a subset of both 1 and 2: it replaces both; 3 is not comparable
    # with 6 and stays.
    assert {r.id for r in select(rules, ALICE, "crm", "delete_customer")} == {3, 4, 6}
    same = [rule(7, role="support-agent", upstream="crm"), rule(8, role="support-agent", upstream="crm")]
    assert {r.id for r in select(same, ALICE, "crm", "x")} == {7, 8}  # the same match: both apply


def test_a_rule_for_a_role_never_lifts_a_cap_on_a_tool() -> None:
    delete_cap = rule(1, upstream="crm", tool="delete_*")  # 1/min in production
    support = rule(2, role="support-agent", upstream="crm")  # 60/min
    # Each matches calls the other does not (other roles' deletes; support agents' reads): both apply,
    # however many exact fields the role rule has.
    assert {r.id for r in select([delete_cap, support], ALICE, "crm", "delete_customer")} == {1, 2}
    assert {r.id for r in select([delete_cap, support], ALICE, "crm", "get_customer")} == {2}
    # A true subset still overrides: the one tool, within the glob, replaces the glob's rule.
    exact = rule(3, upstream="crm", tool="delete_customer")
    chosen = select([delete_cap, support, exact], ALICE, "crm", "delete_customer")
    assert {r.id for r in chosen} == {2, 3}


def test_budgets_select_by_the_same_subset_rule() -> None:
    def budget(budget_id: int, **match: str) -> Budget:
        return Budget(budget_id, Match(**match), ("principal",), "day", 10.0)

    tenant_wide = budget(1, tenant="acme")
    expensive = budget(2, upstream="crm", tool="delete_*")
    alice = budget(3, subject="alice", tenant="acme")  # a subset of 1: replaces it for alice
    assert {b.id for b in select([tenant_wide, expensive, alice], ALICE, "crm", "delete_customer")} == {2, 3}
    assert {b.id for b in select([tenant_wide, expensive], NO_TENANT, "crm", "delete_customer")} == {2}


def test_which_glob_covers_which() -> None:
    assert pattern_covers("*", "anything") and pattern_covers("*", "crm-*")
    assert pattern_covers("crm-*", "crm-*") and pattern_covers("crm-*", "crm-eu")
    assert pattern_covers("delete_?", "delete_x")
    assert not pattern_covers("crm-eu", "*") and not pattern_covers("crm-eu", "crm-*")
    assert not pattern_covers("crm-*", "kb") and not pattern_covers("delete_*", "crm-eu")
    # Two different globs are not compared (undecidable in general): neither overrides the other.
    assert not pattern_covers("crm-*", "crm-eu-*") and not pattern_covers("crm-eu-*", "crm-*")
    assert Match(role="support-agent").covers(Match(role="support-agent", tool="get_*"))
    assert not Match(role="support-agent").covers(Match(upstream="crm"))
    assert Match(tool="get_*").overridden_by(Match(upstream="crm", tool="get_customer"))
    assert not Match(tool="get_*").overridden_by(Match(tool="get_*"))


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


def test_a_rule_tool_with_an_upstream_in_it_is_refused_with_the_fix() -> None:
    assert check_rule_tool("delete_*") == "delete_*"
    with pytest.raises(ValueError, match=r"upstream field .*upstream 'crm', tool 'delete_\*'"):
        check_rule_tool("crm/delete_*")


def _ctx(params: dict[str, object], request_id: int | str | None = 5) -> CallContext:
    return CallContext(method="tools/call", params=params, request_id=request_id)


def test_request_key_is_the_idempotency_key_else_nothing_without_a_session() -> None:
    assert request_key(_ctx({"_meta": {IDEMPOTENCY_META: "abc"}})) == "k:abc"
    assert request_key(_ctx({"_meta": {IDEMPOTENCY_META: "x" * 201}})) is None
    assert request_key(_ctx({"_meta": {IDEMPOTENCY_META: 5}})) is None
    assert request_key(_ctx({})) is None  # stateless, no key: every request is new


def test_what_counts_as_failing_before_the_tool_ran() -> None:
    timed_out = UpstreamUnavailable.of("crm")
    timed_out.__cause__ = MCPError(REQUEST_TIMEOUT, "timed out")
    connect_timeout = UpstreamUnavailable.of("crm")
    connect_timeout.__cause__ = TimeoutError()
    # Never handed to the upstream (no connection, a connect timeout, a refusal by another step): refunded.
    assert not ran_before_failing(UpstreamUnavailable.of("crm"), sent=False)
    assert not ran_before_failing(connect_timeout, sent=False)
    assert not ran_before_failing(PolicyDenied("a step before forwarding refused it"), sent=False)
    # The upstream's own JSON-RPC error: it refused the request, whenever it came.
    assert not ran_before_failing(MCPError(-32602, "bad arguments"), sent=True)
    # A broken connection: most often a dead upstream; refunded (the documented trade-off).
    assert not ran_before_failing(UpstreamUnavailable.of("crm"), sent=True)
    # Sent, then a deadline, a garbled answer or a later refusal: it may have run.
    assert ran_before_failing(timed_out, sent=True)
    assert ran_before_failing(UpstreamProtocolError("garbled answer"), sent=True)
    assert ran_before_failing(PolicyDenied("a result guard refused the answer"), sent=True)
