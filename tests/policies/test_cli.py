"""`arbiter policy test` and `arbiter policy explain`, run as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ArbiterFactory
from tests.policies.conftest import POLICY_FILE, YAML_TABLE, run_cli

RIGHT = "- {subject: sam, roles: [support], tenant: acme, object: crm/get_customer, expected: allow}\n"
WRONG = "- {subject: sam, roles: [support], tenant: acme, object: crm/delete_customer, expected: allow}\n"


def _table(tmp_path: Path, text: str, name: str = "table.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_policy_test_passes_on_right_expectations(tmp_path: Path) -> None:
    done = run_cli("policy", "test", _table(tmp_path, RIGHT), "--policy", str(POLICY_FILE))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0].startswith(
        "ok   case 1: sam [roles support, tenant acme] call crm/get_customer"
    )


def test_policy_test_fails_on_a_wrong_expectation_and_prints_it(tmp_path: Path) -> None:
    done = run_cli("policy", "test", _table(tmp_path, RIGHT + WRONG), "--policy", str(POLICY_FILE))
    assert done.returncode == 1, done.stdout + done.stderr
    ok, fail, summary = done.stdout.splitlines()
    assert ok.startswith("ok   case 1:")
    assert fail.startswith("FAIL case 2: sam [roles support, tenant acme] call crm/delete_customer {}")
    assert "expected allow, got deny (p, role:support, *, crm/delete_customer, call, deny)" in fail
    assert summary.startswith("1 passed, 1 failed")


def test_a_wrong_expectation_in_a_csv_table_fails_too(tmp_path: Path) -> None:
    table = (
        'subject,roles,tenant,object,action,args,expected\nnobody,,acme,crm/get_customer,call,"{}",allow\n'
    )
    done = run_cli("policy", "test", _table(tmp_path, table, "t.csv"), "--policy", str(POLICY_FILE))
    assert done.returncode == 1
    assert "FAIL case 2: nobody" in done.stdout
    assert "no rule matched (default deny)" in done.stdout


@pytest.mark.parametrize(
    "name,text,fragment",
    [
        (
            "t.yaml",
            "- {subject: sam, object: kb/x, expected: maybe}\n",
            "expected must be allow, deny or approve",
        ),
        ("t.yaml", "- {subject: sam, object: kb/x, action: run, expected: allow}\n", "unknown action"),
        ("t.yaml", "- {object: kb/x, expected: allow}\n", "subject is required"),
        ("t.yaml", "- {subject: sam, object: kb/x, args: [1], expected: allow}\n", "args must be a mapping"),
        ("t.yaml", "cases: {subject: sam}\n", "a decision table is a list"),
        ("t.yaml", "- {subject: sam, object: [unclosed\n", "not valid YAML"),
        ("t.csv", "subject,object,args,expected\nsam,kb/x,{not json},allow\n", "case 2"),
    ],
    ids=["bad-expected", "bad-action", "no-subject", "args-list", "not-a-list", "bad-yaml", "bad-csv-json"],
)
def test_policy_test_rejects_a_malformed_table(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    done = run_cli("policy", "test", _table(tmp_path, text, name), "--policy", str(POLICY_FILE))
    assert done.returncode == 2, done.stdout + done.stderr
    assert fragment in done.stderr
    assert "passed" not in done.stdout


def test_policy_test_rejects_a_malformed_policy_naming_the_line(tmp_path: Path) -> None:
    policy = tmp_path / "bad.csv"
    policy.write_text("p, role:a, *, kb/*, call, allow\np, role:a, *, kb/*, fly, allow\n", encoding="utf-8")
    done = run_cli("policy", "test", _table(tmp_path, RIGHT), "--policy", str(policy))
    assert done.returncode == 2
    assert "line 2" in done.stderr and "unknown action 'fly'" in done.stderr


def test_policy_explain_prints_the_deciding_rule() -> None:
    done = run_cli(
        "policy", "explain", "--subject", "fin", "--role", "finance", "--tenant", "acme",
        "--object", "billing__refund", "--action", "call", "--args", '{"amount": 5000}',
        "--policy", str(POLICY_FILE),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "allowed": False,
        "decision": "deny",
        "reason": "denied_by_rule",
        "rule": "p, *, *, billing/refund, call, deny, r.args.amount > 1000",
        "policy_version": 0,
    }
    allowed = run_cli(
        "policy", "explain", "--subject", "carol", "--tenant", "acme", "--object", "crm/list_tickets",
        "--policy", str(POLICY_FILE),
    )  # fmt: skip
    body = json.loads(allowed.stdout)
    assert (body["allowed"], body["reason"]) == (True, "allowed")
    assert body["rule"] == "p, role:support, *, crm/list_tickets, call, allow"


def test_policy_explain_rejects_arguments_that_are_not_a_json_object() -> None:
    for bad in ("{nope", "[1, 2]"):
        done = run_cli(
            "policy",
            "explain",
            "--subject",
            "s",
            "--object",
            "kb/x",
            "--args",
            bad,
            "--policy",
            str(POLICY_FILE),
        )
        assert done.returncode == 2
        assert "--args" in done.stderr


def test_policy_test_uses_the_live_policy_without_a_policy_file(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory(policy=POLICY_FILE.read_text(encoding="utf-8"))
    with server.admin() as admin:
        version = admin.get("/policies").json()["version"]
    env = {"ARBITER_DATABASE_URL": server.settings.database_url}
    done = run_cli("policy", "test", str(YAML_TABLE), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].endswith(f"(live policy version {version})")
    with server.admin() as admin:  # the live policy changes: the same table now fails
        resp = admin.post(
            "/policies/import", content="p, *, *, *, call, allow\n", headers={"content-type": "text/csv"}
        )
    assert resp.status_code == 200, resp.text
    again = run_cli("policy", "test", str(YAML_TABLE), env=env)
    assert again.returncode == 1
    assert f"(live policy version {version + 1})" in again.stdout
