"""The truth table (fixtures/policy.csv, fixtures/truth_table.*) through the engine and the CLI."""

from __future__ import annotations

import pytest

from arbiter.policies.engine import PolicyEngine, Subject, empty_engine
from arbiter.policies.rules import Rule, parse_csv
from arbiter.policies.tables import Case, Outcome, parse_table, run_table
from tests.policies.conftest import CSV_TABLE, POLICY_FILE, YAML_TABLE, run_cli

RULES = parse_csv(POLICY_FILE.read_text(encoding="utf-8"))
YAML_CASES = parse_table(YAML_TABLE.read_text(encoding="utf-8"), "yaml")
CSV_CASES = parse_table(CSV_TABLE.read_text(encoding="utf-8"), "csv")
ALL_CASES = YAML_CASES + CSV_CASES
VERSION = 7


def _id(source: str, case: Case) -> str:
    roles = "+".join(case.roles) or "-"
    return f"{source}{case.line:02d}-{case.subject}[{roles}]@{case.tenant or '-'}-{case.action}-{case.object}"


PARAMS = [pytest.param(c, id=_id("yaml", c)) for c in YAML_CASES] + [
    pytest.param(c, id=_id("csv", c)) for c in CSV_CASES
]


@pytest.fixture(scope="module")
def engine() -> PolicyEngine:
    return PolicyEngine(RULES, VERSION)


@pytest.mark.parametrize("case", PARAMS)
def test_truth_table_row(engine: PolicyEngine, case: Case) -> None:
    decision = engine.decide(case.who, case.object, case.action, case.args)
    assert Outcome(case, decision).ok, Outcome(case, decision).describe()
    assert decision.allowed is (case.expected == "allow")
    assert decision.version == VERSION
    # The decision names the rule that decided, and that rule is one of the policy's.
    if decision.allowed:
        assert decision.reason == "allowed"
        assert decision.rule in RULES and decision.rule.values[4] == "allow"
    elif decision.reason == "denied_by_rule":
        assert decision.rule in RULES and decision.rule.values[4] == "deny"
    else:
        assert decision.reason == "no_matching_rule" and decision.rule is None


def test_table_is_large_and_mixed() -> None:
    assert len(YAML_CASES) >= 40
    expected = [c.expected for c in ALL_CASES]
    assert expected.count("allow") >= 20 and expected.count("deny") >= 20
    assert {c.action for c in ALL_CASES} == {"call", "read", "get", "list", "admin:read", "admin:write"}


def _flipped(rules: list[Rule]) -> set[tuple[str, int]]:
    """The rows whose outcome differs under ``rules``: proves the table depends on what was removed."""
    outcomes = run_table(PolicyEngine(rules, 1), ALL_CASES)
    return {(o.case.subject, o.case.line) for o in outcomes if not o.ok}


def test_table_rows_depend_on_each_feature_of_the_policy() -> None:
    # Under the empty policy every "allow" row fails and every "deny" row holds.
    assert {(o.case.subject, o.case.line) for o in run_table(empty_engine(), ALL_CASES) if not o.ok} == {
        (c.subject, c.line) for c in ALL_CASES if c.expected == "allow"
    }
    no_deny = [r for r in RULES if not (r.ptype == "p" and r.values[4] == "deny")]
    assert {"max", "carol", "alice", "fin", "ed"} <= {s for s, _ in _flipped(no_deny)}
    no_roles = [r for r in RULES if r.ptype == "p"]
    assert {"max", "carol", "bob"} <= {s for s, _ in _flipped(no_roles)}
    unconditional = [Rule(r.ptype, (*r.values[:5], "")) if r.ptype == "p" else r for r in RULES]
    assert {"sam", "alice", "reg", "pat", "tia", "vic", "cleo"} <= {s for s, _ in _flipped(unconditional)}
    any_tenant = [Rule(r.ptype, (*r.values[:1], "*", *r.values[2:])) if r.ptype == "p" else r for r in RULES]
    assert {"sue", "ed"} <= {s for s, _ in _flipped(any_tenant)}


def test_wrong_type_fails_closed_for_allow_and_for_deny_rules(engine: PolicyEngine) -> None:
    clerk = Subject("cleo", "acme", ("clerk",))
    assert engine.decide(clerk, "billing/credit", "call", {"amount": 20}).allowed
    # The allow rule cannot be evaluated ("20" <= 100): it does not match, nothing else allows.
    odd = engine.decide(clerk, "billing/credit", "call", {"amount": "20"})
    assert (odd.allowed, odd.reason, odd.rule) == (False, "no_matching_rule", None)
    finance = Subject("fin", "acme", ("finance",))
    assert engine.decide(finance, "billing/refund", "call", {"amount": 20}).allowed
    # The deny rule cannot be evaluated ("lots" > 1000): it matches, and wins.
    denied = engine.decide(finance, "billing/refund", "call", {"amount": "lots"})
    assert (denied.allowed, denied.reason) == (False, "denied_by_rule")
    assert denied.rule == Rule.deny("*", "billing/refund", "call", cond="r.args.amount > 1000")


def test_deny_overrides_an_allow_inherited_or_own(engine: PolicyEngine) -> None:
    for who in (Subject("max", "acme", ("manager",)), Subject("carol", "globex", ())):
        decision = engine.decide(who, "crm/delete_customer", "call")
        assert (decision.allowed, decision.reason) == (False, "denied_by_rule")
        assert decision.rule == Rule.deny("role:support", "crm/delete_customer", "call")
    assert engine.roles_of("user:carol") == ["role:manager"]


def test_decisions_are_cached_per_arguments(engine: PolicyEngine) -> None:
    # A cached decision for one set of arguments must never answer for another.
    pat = Subject("pat", "acme", ("spender",))
    results = [engine.decide(pat, "billing/refund", "call", {"amount": n}).allowed for n in (5, 500, 5, 500)]
    assert results == [True, False, True, False]
    # Also when the conditional rule reaches the object only through a glob.
    guarded = PolicyEngine(
        [Rule.allow("*", "*", "call"), Rule.deny("*", "*/delete_*", "call", cond="r.args.hard == True")], 1
    )
    who = Subject("x", "acme", ())
    flags = [
        guarded.decide(who, "crm/delete_customer", "call", {"hard": h}).allowed for h in (False, True, False)
    ]
    assert flags == [True, False, True]
    assert guarded.decide(who, "crm/get_customer", "call", {"hard": True}).allowed


@pytest.mark.parametrize(
    "request_",
    [
        (Subject("sam", "acme", ("support",)), "kb/search_docs", "call", {}),
        (Subject("root", "*", ("security-admin", "admin")), "admin/policies", "admin:write", {}),
        (Subject("*", "*", ("*",)), "*", "call", {}),
        (Subject("alice", "acme", ()), "crm/get_customer", "list", {}),
        (Subject("x", "", ()), "kb/kb://index", "read", {"anything": 1}),
    ],
    ids=["support", "admin-role", "wildcards", "list", "read"],
)
def test_empty_policy_denies_everything(request_: tuple[Subject, str, str, dict[str, object]]) -> None:
    sub, obj, act, args = request_
    for engine in (empty_engine(), PolicyEngine(parse_csv("# nothing yet\n\n"), 3)):
        decision = engine.decide(sub, obj, act, args)
        assert (decision.allowed, decision.reason, decision.rule) == (False, "no_matching_rule", None)
        assert not engine.visible(sub, obj, act)
    # The same request is allowed by a policy that grants it: the denial above came from emptiness.
    assert PolicyEngine([Rule.allow("*", "*", act)], 1).decide(sub, obj, act, args).allowed


@pytest.mark.parametrize("table", [YAML_TABLE, CSV_TABLE], ids=["yaml", "csv"])
def test_truth_table_through_the_cli(table: object) -> None:
    done = run_cli("policy", "test", str(table), "--policy", str(POLICY_FILE))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    cases = YAML_CASES if table == YAML_TABLE else CSV_CASES
    assert sum(line.startswith("ok   case ") for line in lines) == len(cases)
    assert not any(line.startswith("FAIL") for line in lines)
    assert lines[-1] == f"{len(cases)} passed, 0 failed ({POLICY_FILE})"
