"""/admin/v1/policies: versioned changes, conflicts, import/export, explain, dry-run, and who may use it."""

from __future__ import annotations

from typing import Any

import httpx

from arbiter.policies.rules import parse_csv, to_csv
from tests.conftest import ArbiterFactory, UpstreamProc
from tests.policies.conftest import POLICY_FILE, new_key, rpc

CSV = {"content-type": "text/csv"}
READ_KB = {"type": "p", "subject": "role:support", "object": "kb/*", "action": "read"}
SUPPORT_LINK = {"type": "g", "member": "user:bob", "role": "role:support", "tenant": "globex"}
ROUND = {
    "subject": "role:spender",
    "object": "billing/refund",
    "action": "call",
    "condition": "r.args.amount <= 100",
}


def _state(admin: httpx.Client) -> tuple[int, list[str]]:
    body = admin.get("/policies").json()
    return body["version"], sorted(rule["csv"] for rule in body["rules"])


def test_add_remove_and_replace_each_bump_the_version(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory(policy=None)
    with server.admin() as admin:
        assert admin.get("/policies").json() == {"version": 0, "rules": []}
        added = admin.post("/policies", json=READ_KB)
        assert added.status_code == 201, added.text
        body = added.json()
        assert body["version"] == 1
        (rule,) = body["rules"]
        assert rule == {
            "id": rule["id"],
            "type": "p",
            "subject": "role:support",
            "tenant": "*",
            "object": "kb/*",
            "action": "read",
            "effect": "allow",
            "condition": "",
            "csv": "p, role:support, *, kb/*, read, allow",
        }
        both = admin.post("/policies", json={"rules": [SUPPORT_LINK, ROUND]})
        assert both.status_code == 201, both.text
        assert both.json()["version"] == 2
        assert _state(admin) == (
            2,
            sorted(
                [
                    "p, role:support, *, kb/*, read, allow",
                    "g, user:bob, role:support, globex",
                    "p, role:spender, *, billing/refund, call, allow, r.args.amount <= 100",
                ]
            ),
        )
        removed = admin.delete(f"/policies/{rule['id']}")
        assert removed.status_code == 200, removed.text
        assert removed.json()["version"] == 3
        assert "p, role:support, *, kb/*, read, allow" not in [r["csv"] for r in removed.json()["rules"]]
        assert admin.delete(f"/policies/{rule['id']}").status_code == 404
        assert admin.delete("/policies/999999").status_code == 404
        assert _state(admin)[0] == 3

        replaced = admin.put("/policies", json={"rules": [READ_KB]})
        assert replaced.status_code == 200, replaced.text
        assert _state(admin) == (4, ["p, role:support, *, kb/*, read, allow"])
        exported = admin.get("/policies/export")
        assert exported.status_code == 200
        assert exported.headers["content-type"].startswith("text/csv")
        assert exported.headers["x-policy-version"] == "4"
        assert exported.text == "p, role:support, *, kb/*, read, allow\n"


def test_stale_expected_version_and_duplicates_are_conflicts(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory(policy=None)
    with server.admin() as admin:
        assert admin.post("/policies", json=READ_KB).status_code == 201
        before = _state(admin)
        stale = admin.put("/policies?expected_version=0", json={"rules": [ROUND]})
        assert stale.status_code == 409, stale.text
        assert stale.json()["error"]["code"] == "conflict"
        stale_import = admin.post(
            "/policies/import?expected_version=0", content="p, *, *, *, call, allow\n", headers=CSV
        )
        assert stale_import.status_code == 409
        duplicate = admin.post("/policies", json=READ_KB)
        assert duplicate.status_code == 409, duplicate.text
        # All or none: a batch with one duplicate adds nothing.
        mixed = admin.post("/policies", json={"rules": [ROUND, READ_KB]})
        assert mixed.status_code == 409
        assert _state(admin) == before
        current = admin.put(f"/policies?expected_version={before[0]}", json={"rules": [ROUND]})
        assert current.status_code == 200, current.text
        assert _state(admin) == (
            before[0] + 1,
            ["p, role:spender, *, billing/refund, call, allow, r.args.amount <= 100"],
        )


def test_a_rule_repeated_within_one_change_is_rejected(arbiter_factory: ArbiterFactory) -> None:
    # Stored twice, deleting "the" rule by id would leave its twin in force: refuse, naming the repeat.
    server = arbiter_factory(policy=None)
    with server.admin() as admin:
        twice = admin.post("/policies", json={"rules": [READ_KB, READ_KB]})
        assert twice.status_code == 422, twice.text
        assert twice.json()["error"]["errors"] == [{"line": 2, "message": "repeats rule 1"}]
        line = "p, role:support, *, kb/*, read, allow\n"
        imported = admin.post("/policies/import", content=line * 2, headers={"content-type": "text/csv"})
        assert imported.status_code == 422, imported.text
        assert imported.json()["error"]["errors"][0]["line"] == 2
        assert _state(admin) == (0, [])


def test_an_invalid_rule_is_rejected_naming_it(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory(policy=None)
    bad = {"subject": "role:support", "object": "kb/*", "action": "call", "condition": "__import__('os')"}
    with server.admin() as admin:
        resp = admin.post("/policies", json={"rules": [READ_KB, bad]})
        assert resp.status_code == 422, resp.text
        error = resp.json()["error"]
        assert error["code"] == "policy_invalid"
        assert [e["line"] for e in error["errors"]] == [2]
        assert "Call is not allowed" in error["errors"][0]["message"]
        assert admin.put("/policies", json={"rules": [{**READ_KB, "action": "fly"}]}).status_code == 422
        assert (
            admin.post("/policies", json={"type": "g", "member": "user:a", "role": "admins"}).status_code
            == 422
        )
        assert _state(admin) == (0, [])


def test_malformed_import_is_rejected_whole_and_changes_nothing(
    arbiter_factory: ArbiterFactory, crm_upstream: UpstreamProc
) -> None:
    server = arbiter_factory(policy="p, role:agent, acme, crm/get_customer, call, allow\n")
    server.register("crm", crm_upstream.url)
    call = {"name": "crm__get_customer", "arguments": {"customer_id": "C-1001"}}
    assert (
        rpc(server, server.agent_key, "tools/call", call)["result"]["structuredContent"]["name"]
        == "Acme Logistics"
    )
    with server.admin() as admin:
        before = _state(admin)
        exported = admin.get("/policies/export").text
        malformed = "# replacement\np, *, *, *, call, allow\np, *, *, crm/*, call, perhaps\ng, user:x\n"
        resp = admin.post("/policies/import", content=malformed, headers=CSV)
        assert resp.status_code == 422, resp.text
        error = resp.json()["error"]
        assert error["code"] == "policy_invalid"
        assert "line 3" in error["message"]
        assert [(e["line"], e["text"]) for e in error["errors"]] == [
            (3, "p, *, *, crm/*, call, perhaps"),
            (4, "g, user:x"),
        ]
        assert _state(admin) == before
        assert admin.get("/policies/export").text == exported
    # Nothing changed for the agent either: still allowed, and the replacement's grant is not in force.
    assert "result" in rpc(server, server.agent_key, "tools/call", call)
    assert (
        rpc(server, server.agent_key, "tools/call", {"name": "crm__list_tickets", "arguments": {}})["error"][
            "code"
        ]
        == -32602
    )


def test_import_replaces_the_policy_and_export_round_trips(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory(policy=None)
    text = POLICY_FILE.read_text(encoding="utf-8")
    with server.admin() as admin:
        resp = admin.post("/policies/import", content=text, headers=CSV)
        assert resp.status_code == 200, resp.text
        assert resp.json()["version"] == 1
        exported = admin.get("/policies/export")
        assert exported.headers["x-policy-version"] == "1"
        assert sorted(parse_csv(exported.text), key=repr) == sorted(parse_csv(text), key=repr)
        assert exported.text == to_csv(parse_csv(text))


def _explain(admin: httpx.Client, **body: Any) -> dict[str, Any]:
    resp = admin.post("/policies/explain", json=body)
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


def test_explain_answers_with_the_deciding_rule(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory(policy=POLICY_FILE.read_text(encoding="utf-8"))
    with server.admin() as admin:
        version = _state(admin)[0]
        denied = _explain(
            admin, subject="max", roles=["manager"], tenant="acme", object="crm__delete_customer"
        )
        assert denied == {
            "allowed": False,
            "decision": "deny",
            "reason": "denied_by_rule",
            "rule": "p, role:support, *, crm/delete_customer, call, deny",
            "policy_version": version,
            "object": "crm/delete_customer",
            "visible": False,
            "warnings": [],
        }
        conditional = _explain(
            admin, subject="sam", roles=["support"], object="crm/create_ticket", args={"priority": "high"}
        )
        assert (conditional["allowed"], conditional["reason"], conditional["visible"]) == (
            False,
            "no_matching_rule",
            True,
        )
        assert conditional["rule"] is None
        allowed = _explain(
            admin, subject="sam", roles=["support"], object="crm/create_ticket", args={"priority": "low"}
        )
        assert allowed["allowed"] is True
        assert (
            allowed["rule"]
            == 'p, role:support, *, crm/create_ticket, call, allow, r.args.priority in ("low", "normal")'
        )
        admin_read = _explain(
            admin, subject="uv", roles=["upstream-viewer"], object="admin/upstreams", action="admin:read"
        )
        assert (admin_read["allowed"], admin_read["visible"]) == (True, None)
        assert (
            admin.post("/policies/explain", json={"subject": "x", "object": "kb/x", "bogus": 1}).status_code
            == 422
        )


def test_dry_run_answers_and_changes_nothing(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory(policy="p, role:support, *, kb/*, call, allow\n")
    cases = [
        {"subject": "sam", "roles": ["support"], "object": "kb__search_docs", "expected": "allow"},
        {"subject": "sam", "roles": ["support"], "object": "crm/get_customer", "expected": "allow"},
        {"subject": "sam", "roles": ["support"], "object": "crm/delete_customer", "expected": "deny"},
    ]
    candidate = "p, role:support, *, kb/*, call, allow\np, role:support, *, crm/get_*, call, allow\n"
    with server.admin() as admin:
        before = _state(admin)
        live = admin.post("/policies/dry-run", json={"cases": cases})
        assert live.status_code == 200, live.text
        assert (live.json()["passed"], live.json()["failed"]) == (2, 1)
        assert live.json()["policy_version"] == before[0]
        assert [r["ok"] for r in live.json()["results"]] == [True, False, True]
        assert live.json()["results"][1]["reason"] == "no_matching_rule"
        tried = admin.post("/policies/dry-run", json={"policy": candidate, "cases": cases})
        assert tried.status_code == 200, tried.text
        assert (tried.json()["passed"], tried.json()["failed"]) == (3, 0)
        assert tried.json()["results"][1]["rule"] == "p, role:support, *, crm/get_*, call, allow"
        bad_policy = admin.post("/policies/dry-run", json={"policy": "p, x\n", "cases": cases})
        assert bad_policy.status_code == 422
        assert bad_policy.json()["error"]["errors"][0]["line"] == 1
        bad_cases = admin.post(
            "/policies/dry-run", json={"cases": [{"subject": "sam", "object": "kb/x", "expected": "?"}]}
        )
        assert bad_cases.status_code == 422
        assert _state(admin) == before  # neither the version nor the rules moved


def test_auditor_may_not_write_policies_or_read_upstreams(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory(policy=None)
    auditor = new_key(server, "audrey", ["auditor"])
    with server.admin(auditor) as admin:
        assert admin.post("/policies", json=READ_KB).status_code == 403
        assert admin.put("/policies", json={"rules": []}).status_code == 403
        assert (
            admin.post("/policies/import", content="p, *, *, *, call, allow\n", headers=CSV).status_code
            == 403
        )
        forbidden = admin.get("/upstreams")
        assert forbidden.status_code == 403
        assert forbidden.json()["error"]["code"] == "forbidden"
        assert admin.get("/policies").status_code == 403
        assert admin.get("/openapi.json").status_code == 200  # the built-in auditor grant still works
    with server.admin() as admin:
        assert _state(admin) == (0, [])


def test_a_policy_rule_grants_an_admin_area(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory(policy=None)
    viewer = new_key(server, "vera", ["ops-viewer"])
    security = new_key(server, "sec", ["security-admin"])
    with server.admin(viewer) as admin:
        assert admin.get("/upstreams").status_code == 403  # before the grant
    with server.admin(security) as admin:  # a built-in admin role may write policies on an empty policy
        grant = {"subject": "role:ops-viewer", "object": "admin/upstreams", "action": "admin:read"}
        assert admin.post("/policies", json=grant).status_code == 201
    with server.admin(viewer) as admin:
        listed = admin.get("/upstreams")
        assert listed.status_code == 200, listed.text
        assert listed.json() == []
        assert (
            admin.post("/upstreams", json={"name": "kb", "url": "http://127.0.0.1:9/mcp"}).status_code == 403
        )
        assert admin.get("/policies").status_code == 403  # only the granted area


def test_delegated_key_managers_cannot_mint_built_in_admin_roles(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory(policy=None)
    manager = new_key(server, "kim", ["key-manager"])
    with server.admin() as admin:
        grant = {"subject": "role:key-manager", "object": "admin/api-keys", "action": "admin:write"}
        assert admin.post("/policies", json=grant).status_code == 201
    with server.admin(manager) as admin:
        ordinary = admin.post("/api-keys", json={"owner": "bot", "roles": ["support"]})
        assert ordinary.status_code == 201, ordinary.text
        for role in ("security-admin", "auditor"):
            minted = admin.post("/api-keys", json={"owner": "me-too", "roles": [role]})
            assert minted.status_code == 403, minted.text
