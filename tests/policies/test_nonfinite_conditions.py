"""A condition that reads NaN or an infinity cannot be evaluated, so it fails closed.

Every comparison with NaN is false: ``r.args.amount > 100`` would let an allow-all rule through an approve
rule's guard. The /mcp endpoint refuses such bodies (tests/proxy/test_nonfinite.py); the engine guards any
other path that produces them: deny and approve rules match, allow rules do not.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from arbiter.policies.engine import PolicyEngine, Subject
from arbiter.policies.rules import parse_csv

POLICY = """
p, role:agent, *, crm/pay, call, allow, r.args.amount < 100
p, role:agent, *, crm/refund, call, allow
p, role:agent, *, crm/refund, call, approve, r.args.order.amount > 100
p, role:agent, *, crm/wire, call, allow
p, role:agent, *, crm/wire, call, deny, r.args.amounts[0] >= 0
"""
AGENT = Subject("alice", "acme", ("agent",))


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine(parse_csv(POLICY), 1)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize(
    ("obj", "args", "outcome"),
    [
        ("crm/pay", lambda v: {"amount": v}, "deny"),  # the conditional allow does not match
        ("crm/refund", lambda v: {"order": {"amount": v}}, "approve"),  # nested: a person is asked
        ("crm/wire", lambda v: {"amounts": [v]}, "deny"),  # in a list: the deny rule matches
    ],
)
def test_a_non_finite_value_fails_the_condition_closed(
    engine: PolicyEngine, obj: str, args: Any, outcome: str, value: float
) -> None:
    assert engine.decide(AGENT, obj, "call", args(value)).outcome == outcome


def test_finite_values_decide_as_before(engine: PolicyEngine) -> None:
    assert engine.decide(AGENT, "crm/pay", "call", {"amount": 5.5}).outcome == "allow"
    assert engine.decide(AGENT, "crm/pay", "call", {"amount": 500}).outcome == "deny"
    assert engine.decide(AGENT, "crm/refund", "call", {"order": {"amount": 50.0}}).outcome == "allow"
    assert engine.decide(AGENT, "crm/refund", "call", {"order": {"amount": 500}}).outcome == "approve"
    assert engine.decide(AGENT, "crm/wire", "call", {"amounts": [-1.5, 2]}).outcome == "allow"
    assert engine.decide(AGENT, "crm/wire", "call", {"amounts": [3]}).outcome == "deny"
