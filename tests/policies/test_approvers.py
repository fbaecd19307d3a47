"""Who approves an ``approve`` rule's calls, and for how long: written in the effect column
(``approve by role:billing-lead for 4h``), stored in one spelling, shown as fields by the admin API, and
decided by Casbin like any approve rule. The policy's role links decide who holds an approver role."""

from __future__ import annotations

import pytest

from arbiter.auth.principal import Principal
from arbiter.policies.approvers import ApprovalSpec, parse
from arbiter.policies.engine import PolicyEngine, Subject
from arbiter.policies.rules import PolicyInvalid, parse_csv
from tests.conftest import ArbiterFactory


@pytest.mark.parametrize(
    ("effect", "spec", "canonical"),
    [
        ("approve", ApprovalSpec(("user",), None), "approve"),
        ("approve by user", ApprovalSpec(("user",), None), "approve"),
        (
            "approve by role:billing-lead",
            ApprovalSpec(("role:billing-lead",), None),
            "approve by role:billing-lead",
        ),
        (
            "approve  by user or role:lead or user:cfo  for 240m",
            ApprovalSpec(("user", "role:lead", "user:cfo"), 14400),
            "approve by user or role:lead or user:cfo for 4h",
        ),
        ("approve for 90s", ApprovalSpec(("user",), 90), "approve for 90s"),
        ("approve for 1d", ApprovalSpec(("user",), 86400), "approve for 1d"),
    ],
)
def test_an_approve_effect_says_who_approves_and_for_how_long(
    effect: str, spec: ApprovalSpec, canonical: str
) -> None:
    assert parse(effect) == spec
    assert spec.effect == canonical
    [rule] = parse_csv(f"p, role:agent, *, crm/refund, call, {effect}\n")
    assert rule.values[4] == canonical and rule.effect == "approve"
    assert parse(rule.values[4]) == spec


@pytest.mark.parametrize(
    ("effect", "message"),
    [
        ("approve by", "'by' must name"),
        ("approve by manager", "approver 'manager' must be user, role:<name> or user:<subject>"),
        ("approve by role:a or role:a", "named twice"),
        ("approve by role:a and role:b", "expected approve [by <approver>"),
        ("approve for", "'for' must give a duration"),
        ("approve for 2 hours", "duration '2' must be a whole number"),
        ("approve for 1w", "duration '1w'"),
        ("approve for 8d", "at most 7 days"),
        ("approved", "must be allow, deny or approve"),
        ("approve by " + " or ".join(f"user:{'x' * 200}{i}" for i in range(6)), "at most 1000"),
    ],
)
def test_a_malformed_approve_effect_is_refused_naming_what_is_wrong(effect: str, message: str) -> None:
    with pytest.raises(PolicyInvalid) as err:
        parse_csv(f"p, role:agent, *, crm/refund, call, {effect}\n")
    assert message in str(err.value), err.value


def test_an_approver_role_is_held_through_credentials_or_the_policys_role_links() -> None:
    engine = PolicyEngine(
        parse_csv(
            "p, role:agent, *, crm/refund, call, approve by role:billing-lead\n"
            "g, user:lena, role:billing-lead, acme\n"
            "g, role:cfo, role:billing-lead\n"
        ),
        1,
    )

    def person(subject: str, roles: set[str], tenant: str = "acme") -> Principal:
        return Principal(subject, "arbiter", "api_key", tenant, frozenset(roles))

    assert engine.names(person("lena", set()), "role:billing-lead")  # linked in her tenant
    assert not engine.names(person("lena", set(), "globex"), "role:billing-lead")  # not in another
    assert engine.names(person("carl", {"billing-lead"}), "role:billing-lead")  # from the credential
    assert engine.names(person("cora", {"cfo"}, "globex"), "role:billing-lead")  # inherited, any tenant
    assert not engine.names(person("ann", {"billing"}), "role:billing-lead")
    assert engine.names(person("ann", set()), "user:ann")
    decision = engine.decide(Subject("bot", "acme", ("agent",)), "crm/refund", "call", {})
    assert decision.outcome == "approve" and decision.rule is not None
    assert decision.rule.values[4] == "approve by role:billing-lead"


def test_the_admin_api_shows_and_takes_approvers_as_fields(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory(policy="p, *, *, *, call, allow\n")
    rule = {
        "subject": "role:agent",
        "object": "crm/refund",
        "action": "call",
        "effect": "approve",
        "approvers": ["role:billing-lead", "user"],
        "approval_valid_s": 7200,
    }
    with server.admin() as admin:
        added = admin.post("/policies", json=rule)
        assert added.status_code in (200, 201), added.text
        [shown] = [r for r in admin.get("/policies").json()["rules"] if r["object"] == "crm/refund"]
        assert (
            shown["csv"] == "p, role:agent, *, crm/refund, call, approve by role:billing-lead or user for 2h"
        )
        assert shown["effect"] == "approve" and shown["approvers"] == ["role:billing-lead", "user"]
        assert shown["approval_valid_s"] == 7200
        bad = admin.post("/policies", json={**rule, "effect": "allow"})
        assert bad.status_code == 422 and "approve rules only" in bad.text, bad.text
        bad = admin.post("/policies", json={**rule, "approvers": ["manager"]})
        assert bad.status_code == 422 and "approver 'manager'" in bad.text, bad.text
        exported = admin.get("/policies/export").text
    assert "approve by role:billing-lead or user for 2h" in exported
