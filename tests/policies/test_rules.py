"""Rule validation: every malformed kind of line is rejected, and the rejection names the line."""

from __future__ import annotations

from typing import Any, cast

import pytest

from arbiter.errors import InvalidInput
from arbiter.policies.rules import PolicyInvalid, Rule, check, parse_csv, split_line, to_csv
from tests.policies.conftest import POLICY_FILE

GOOD = "p, role:support, *, crm/get_customer, call, allow"

# (bad line, a fragment the error message must contain)
MALFORMED = {
    "unknown action": ("p, role:support, *, crm/get_customer, execute, allow", "unknown action 'execute'"),
    "admin action on a tool": ("p, role:support, *, crm/get_customer, admin:read, allow", "admin/<area>"),
    "bad subject": ("p, group:support, *, crm/get_customer, call, allow", "subject 'group:support'"),
    "subject with space": ("p, role:sup port, *, crm/get_customer, call, allow", "subject"),
    "bad tenant": ("p, role:support, ac me, crm/get_customer, call, allow", "tenant 'ac me'"),
    "object without name": ("p, role:support, *, crm, call, allow", "object 'crm'"),
    "object with bad upstream": ("p, role:support, *, CRM!/get_customer, call, allow", "not an upstream"),
    "object with double star": ("p, role:support, *, crm/**, call, allow", "single *"),
    "bad effect": ("p, role:support, *, crm/get_customer, call, permit", "effect 'permit'"),
    "function call": (
        "p, role:support, *, crm/get_customer, call, allow, len(r.args.x) > 1",
        "Call is not allowed",
    ),
    "method call": (
        "p, role:support, *, crm/get_customer, call, allow, r.args.x.startswith('a')",
        "Call is not allowed",
    ),
    "dunder attribute": (
        "p, role:support, *, crm/get_customer, call, allow, r.args.__class__ == 1",
        "'__class__' is not allowed",
    ),
    "unknown name": ("p, role:support, *, crm/get_customer, call, allow, os == 1", "not 'os'"),
    "unknown r field": ("p, role:support, *, crm/get_customer, call, allow, r.env == 1", "not r.env"),
    "unknown subject field": (
        "p, role:support, *, crm/get_customer, call, allow, r.sub.password == 'x'",
        "not 'password'",
    ),
    "lambda": ("p, role:support, *, crm/get_customer, call, allow, (lambda: 1) == 1", "Lambda"),
    "arithmetic": ("p, role:support, *, crm/get_customer, call, allow, r.args.a + 1 > 2", "BinOp"),
    "syntax error": (
        "p, role:support, *, crm/get_customer, call, allow, r.args.a ==",
        "not a valid expression",
    ),
    "variable subscript": (
        "p, role:support, *, crm/get_customer, call, allow, r.args[r.args.k] == 1",
        "subscripts must be constants",
    ),
    "too few p fields": ("p, role:support, *, crm/get_customer, call", "5 or 6 fields"),
    "too many p fields": (
        "p, role:support, *, crm/get_customer, call, allow, r.args.a == 1, x",
        "5 or 6 fields",
    ),
    "too few g fields": ("g, user:alice", "2 or 3 fields"),
    "too many g fields": ("g, user:alice, role:support, acme, extra", "2 or 3 fields"),
    "g member *": ("g, *, role:support", "member '*'"),
    "g role not a role": ("g, user:alice, user:bob", "role 'user:bob'"),
    "g self inheritance": ("g, role:support, role:support", "cannot inherit from itself"),
    "unknown rule type": ("x, role:support, *, crm/get_customer, call, allow", "unknown rule type 'x'"),
}


def _errors(err: pytest.ExceptionInfo[PolicyInvalid]) -> list[dict[str, Any]]:
    return cast("list[dict[str, Any]]", err.value.details["errors"])


@pytest.mark.parametrize("line,fragment", list(MALFORMED.values()), ids=list(MALFORMED))
def test_each_malformed_line_is_rejected_naming_its_line(line: str, fragment: str) -> None:
    text = f"# a policy\n{GOOD}\n\n{line}\n{GOOD.replace('get_customer', 'list_tickets')}\n"
    with pytest.raises(PolicyInvalid) as err:
        parse_csv(text)
    assert isinstance(err.value, InvalidInput)
    assert err.value.http_status == 422
    assert err.value.code == "policy_invalid"
    errors = _errors(err)
    assert [e["line"] for e in errors] == [4]  # comments and blank lines still count
    assert fragment in errors[0]["message"]
    assert errors[0]["text"] == line
    assert err.value.message.startswith("invalid policy: line 4: ")


def test_a_repeated_line_is_rejected_naming_the_first() -> None:
    with pytest.raises(PolicyInvalid) as err:
        parse_csv(f"{GOOD}\n\n{GOOD}\n")
    assert _errors(err)[0]["line"] == 3
    assert _errors(err)[0]["message"] == "repeats line 1"


def test_every_bad_line_is_reported_at_once() -> None:
    other = "p, role:support, *, kb/*, read, allow"
    text = "\n".join([GOOD, MALFORMED["bad effect"][0], other, MALFORMED["unknown action"][0]])
    with pytest.raises(PolicyInvalid) as err:
        parse_csv(text)
    assert [e["line"] for e in _errors(err)] == [2, 4]
    assert "(and 1 more)" in err.value.message


@pytest.mark.parametrize(
    "rule",
    [
        Rule.allow("role:support", "crm/get_customer", "delete"),
        Rule.allow("team:x", "crm/get_customer", "call"),
        Rule.allow("role:support", "get_customer", "call"),
        Rule("p", ("role:support", "*", "crm/get_customer", "call", "maybe", "")),
        Rule.allow("role:support", "crm/get_customer", "call", cond="__import__('os')"),
        Rule.deny("role:support", "crm/get_customer", "call", cond="r.args.__dict__ == {}"),
        Rule.allow("role:support", "crm/get_customer", "call", cond="open == 1"),
        Rule.allow("role:support", "admin/upstreams", "admin:write", dom="bad tenant"),
        Rule.role("user:alice", "alice"),
    ],
    ids=lambda r: r.csv(),
)
def test_check_raises_value_error_for_a_bad_rule(rule: Rule) -> None:
    with pytest.raises(ValueError):
        check(rule)


@pytest.mark.parametrize(
    "rule",
    [
        Rule.allow("*", "*", "call"),
        Rule.allow("user:alice@example.com", "kb/kb://docs/*", "read", dom="acme"),
        Rule.deny("role:support", "*/delete_?", "call", cond="r.args.force == True"),
        Rule.allow("role:x", "crm/a", "call", cond="r.args['customer-id'] in ('C-1', 'C-2')"),
        Rule.allow("role:x", "crm/a", "call", cond="not (r.args.a.b >= 2 or 'vip' in r.sub.roles)"),
        Rule.allow("role:x", "crm/a", "call", cond="r.args.n == -1 and r.args.s not in [1, 2]"),
        Rule.allow("role:auditor", "admin/audit", "admin:read"),
        Rule.role("user:bob", "role:support", "globex"),
    ],
    ids=lambda r: r.csv(),
)
def test_check_accepts_good_rules(rule: Rule) -> None:
    check(rule)  # does not raise


def test_commas_inside_parentheses_and_quotes_stay_in_the_condition() -> None:
    line = "p, role:x, *, crm/a, call, allow, r.args.s in ('a, b', \"c,d\") and r.args.t in (1, 2)"
    assert split_line(line)[6] == "r.args.s in ('a, b', \"c,d\") and r.args.t in (1, 2)"
    (rule,) = parse_csv(line)
    assert rule.values[5] == "r.args.s in ('a, b', \"c,d\") and r.args.t in (1, 2)"


def test_fixture_policy_round_trips_through_csv() -> None:
    rules = parse_csv(POLICY_FILE.read_text(encoding="utf-8"))
    assert len(rules) > 20 and sum(r.ptype == "g" for r in rules) == 3
    again = parse_csv(to_csv(rules))
    assert sorted(again, key=repr) == sorted(rules, key=repr)
    # p lines first, then the role links; the short form when there is no condition
    text = to_csv([Rule.role("user:a", "role:b"), Rule.allow("role:b", "kb/*", "call")])
    assert text == "p, role:b, *, kb/*, call, allow\ng, user:a, role:b, *\n"
    assert Rule.role("user:a", "role:b").to_json() == {
        "type": "g",
        "member": "user:a",
        "role": "role:b",
        "tenant": "*",
    }


def test_an_argument_named_like_an_internal_helper_is_still_an_argument() -> None:
    # r.args.wrap once resolved to a helper method instead of the argument, so this deny never fired.
    from arbiter.policies.engine import PolicyEngine, Subject

    rules = parse_csv('p, *, *, crm/*, call, allow\np, *, *, crm/*, call, deny, r.args.wrap == "danger"\n')
    engine = PolicyEngine(rules, 1)
    sub = Subject("alice", "acme", ())
    assert not engine.decide(sub, "crm/x", "call", {"wrap": "danger"}).allowed
    assert not engine.decide(sub, "crm/x", "call", {"n": {"wrap": "danger"}, "wrap": "danger"}).allowed
    assert engine.decide(sub, "crm/x", "call", {"wrap": "safe"}).allowed


def test_objects_with_commas_or_quotes_are_refused_so_export_reimports() -> None:
    with pytest.raises(ValueError, match="commas or quotes"):
        check(Rule.allow("role:a", "crm/a,b", "call"))
