"""The ``approve`` effect: allowed once a person says yes, decided by Casbin like allow and deny.

Deny overrides approve, approve overrides allow (when both match a person is asked), and an approve rule
alone grants the call with approval. Explain, decision tables, dry runs and access reports say so.
"""

from __future__ import annotations

from typing import Any

import pytest

from arbiter.policies.access import access
from arbiter.policies.engine import PolicyEngine, Subject
from arbiter.policies.rules import PolicyInvalid, parse_csv
from arbiter.policies.tables import parse_table, run_table
from tests.conftest import ArbiterFactory

POLICY = """
p, role:agent, *, crm/*, call, allow
p, role:agent, *, crm/refund, call, approve, r.args.amount > 100
p, role:agent, *, crm/delete_*, call, approve
p, role:agent, *, crm/delete_all, call, deny
p, role:agent, *, crm/close, call, deny, r.args.force == True
p, role:agent, *, crm/close, call, approve
p, role:auditor, *, books/export, call, approve
"""
AGENT = Subject("alice", "acme", ("agent",))
AUDITOR = Subject("ann", "acme", ("auditor",))


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine(parse_csv(POLICY), 4)


@pytest.mark.parametrize(
    ("who", "obj", "args", "outcome", "rule"),
    [
        (AGENT, "crm/refund", {"amount": 50}, "allow", "p, role:agent, *, crm/*, call, allow"),
        (AGENT, "crm/refund", {"amount": 500}, "approve", "approve, r.args.amount > 100"),
        # A condition that cannot be evaluated: a person is asked, the call never runs unattended.
        (AGENT, "crm/refund", {"amount": "lots"}, "approve", "approve, r.args.amount > 100"),
        (AGENT, "crm/delete_contact", {}, "approve", "crm/delete_*, call, approve"),
        (AGENT, "crm/delete_all", {}, "deny", "crm/delete_all, call, deny"),  # deny overrides approve
        (AGENT, "crm/close", {"force": True}, "deny", "deny, r.args.force == True"),
        (AGENT, "crm/close", {"force": False}, "approve", "crm/close, call, approve"),
        (AUDITOR, "books/export", {}, "approve", "books/export, call, approve"),  # approve alone grants
        (AUDITOR, "crm/refund", {"amount": 500}, "deny", None),  # no rule for the role
    ],
)
def test_each_call_is_allowed_approved_or_denied_by_one_rule(
    engine: PolicyEngine, who: Subject, obj: str, args: dict[str, Any], outcome: str, rule: str | None
) -> None:
    decision = engine.decide(who, obj, "call", args)
    assert decision.outcome == outcome
    assert decision.allowed is (outcome == "allow")  # approve never runs unattended
    assert decision.needs_approval is (outcome == "approve")
    body = decision.to_json()
    assert body["decision"] == outcome and body["policy_version"] == 4
    if rule is None:
        assert decision.rule is None and decision.reason == "no_matching_rule"
    else:
        assert decision.rule is not None and rule in decision.rule.csv()
    if outcome == "approve":
        assert decision.reason == "approval_required"


def test_a_tool_usable_with_approval_is_listed_unless_a_deny_hides_it(engine: PolicyEngine) -> None:
    assert engine.visible(AUDITOR, "books/export", "call")  # only an approve rule grants it
    assert not engine.visible(AUDITOR, "crm/refund", "call")
    assert not engine.visible(AGENT, "crm/delete_all", "call")  # an unconditional deny hides


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("p, role:agent, *, kb/*, read, approve", "approve rule applies to tool calls"),
        ("p, role:agent, *, admin/policies, admin:write, approve", "approve rule applies to tool calls"),
        ("p, role:agent, *, kb/x, call, ask", "must be allow, deny or approve"),
    ],
)
def test_an_approve_rule_names_a_tool_call(line: str, message: str) -> None:
    with pytest.raises(PolicyInvalid, match=message):
        parse_csv(line)


def test_decision_tables_expect_approve(engine: PolicyEngine) -> None:
    table = """
- {subject: alice, roles: [agent], object: crm__refund, args: {amount: 500}, expected: approve}
- {subject: alice, roles: [agent], object: crm__refund, args: {amount: 50}, expected: allow}
- {subject: alice, roles: [agent], object: crm__refund, args: {amount: 500}, expected: allow}
"""
    results = run_table(engine, parse_table(table, "yaml"))
    assert [r.ok for r in results] == [True, True, False]
    assert "expected allow, got approve" in results[2].describe()
    assert results[0].to_json()["decision"] == "approve"


def test_the_access_report_says_approve(engine: PolicyEngine) -> None:
    export = access(engine, AUDITOR, "books/export", "call")
    assert (export.decision, export.reason) == ("approve", "approval_required")
    refund = access(engine, AGENT, "crm/refund", "call")  # depends on the amount
    assert refund.decision == "conditional"
    assert ("approve", "r.args.amount > 100") in [(c.effect, c.condition) for c in refund.conditions]


def test_explain_and_dry_run_report_approve(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory(policy=POLICY.strip() + "\n")
    with server.admin() as admin:
        explained = admin.post(
            "/policies/explain",
            json={"subject": "alice", "roles": ["agent"], "object": "crm__refund", "args": {"amount": 500}},
        )
        assert explained.status_code == 200, explained.text
        body = explained.json()
        assert (body["decision"], body["reason"], body["allowed"]) == ("approve", "approval_required", False)
        case = {"subject": "alice", "roles": ["agent"], "object": "crm/refund", "args": {"amount": 500}}
        dry = admin.post("/policies/dry-run", json={"cases": [{**case, "expected": "approve"}]})
        assert dry.status_code == 200, dry.text
        assert dry.json()["passed"] == 1 and dry.json()["results"][0]["decision"] == "approve"
        added = admin.post(
            "/policies",
            json={
                "rules": [
                    {"subject": "role:agent", "object": "crm/wire", "action": "call", "effect": "approve"}
                ]
            },
        )
        assert added.status_code in (200, 201), added.text
        listed = admin.get("/policies").json()["rules"]
        assert any(r["effect"] == "approve" and r["object"] == "crm/wire" for r in listed)
