"""``/admin/v1/access`` ("what can this agent do?") and ``/access/who``, and the warnings of policy writes,
against a real Arbiter with the demo upstreams, a policy with argument conditions, and a rate limit."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import ArbiterServer

POLICY = """\
p, role:support-agent, *, kb/*, call, allow
p, role:support-agent, *, kb/*, read, allow
p, role:support-agent, *, crm/get_customer, call, allow
p, role:support-agent, *, crm/create_ticket, call, allow, r.args.priority in ("low", "normal")
p, role:support-agent, *, crm/delete_customer, call, deny
p, role:support-agent, *, crm/list_tickets, list, allow
p, role:support-agent, *, crm/summarize_customer, get, allow
p, role:billing, acme, crm/*, call, allow
p, role:billing, *, crm/delete_customer, call, deny, r.args.customer_id == "C-1001"
p, user:carol, *, crm/get_customer, call, allow
p, role:policy-reader, *, admin/policies, admin:read, allow
g, user:alice, role:support-agent, acme
"""


@pytest.fixture
def governed(arbiter: ArbiterServer) -> ArbiterServer:
    with arbiter.admin() as admin:
        resp = admin.post("/policies/import", content=POLICY, headers={"content-type": "text/csv"})
        assert resp.status_code == 200, resp.text
        resp = admin.post(
            "/limits", json={"role": "support-agent", "upstream": "crm", "limit": 30, "period": "minute"}
        )
        assert resp.status_code == 201, resp.text
        resp = admin.post(
            "/budgets", json={"upstream": "crm", "tool": "create_*", "limit": 50, "period": "day"}
        )
        assert resp.status_code == 201, resp.text
    return arbiter


def new_key(
    server: ArbiterServer, owner: str, roles: list[str], tenant: str | None = "acme"
) -> dict[str, Any]:
    with server.admin() as admin:
        resp = admin.post("/api-keys", json={"owner": owner, "roles": roles, "tenant": tenant})
    assert resp.status_code == 201, resp.text
    created: dict[str, Any] = resp.json()
    return created


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {i["name"]: i for i in items}


async def test_an_api_keys_report_matches_what_it_sees_on_mcp(governed: ArbiterServer) -> None:
    key = new_key(governed, "sam", ["support-agent"])
    with governed.admin() as admin:
        resp = admin.get("/access", params={"key_id": key["id"]})
    assert resp.status_code == 200, resp.text
    report = resp.json()
    assert "key" not in report["principal"] and key["key"] not in resp.text  # never the secret
    assert report["principal"] == {
        "subject": "sam",
        "roles": ["support-agent"],
        "tenant": "acme",
        "key_id": key["id"],
        "active": True,
    }
    tools = by_name(report["tools"])
    # The report lists exactly what the agent gets in tools/list (hidden delete_customer absent).
    async with governed.client(token=key["key"]) as client:
        listed = {t.name for t in (await client.list_tools()).tools}
        prompts = {p.name for p in (await client.list_prompts()).prompts}
        resources = {str(r.uri) for r in (await client.list_resources()).resources}
        templates = {t.uri_template for t in (await client.list_resource_templates()).resource_templates}
    assert set(tools) == listed
    assert listed == {
        "kb__search_docs",
        "kb__get_doc",
        "crm__get_customer",
        "crm__create_ticket",
        "crm__list_tickets",
    }
    assert set(by_name(report["prompts"])) == prompts == {"crm__summarize_customer"}
    assert set(by_name(report["resources"])) == resources == {"arbiter://kb/kb://index"}
    assert set(by_name(report["resource_templates"])) == templates == {"arbiter://kb/kb://docs/{doc_id}"}

    get = tools["crm__get_customer"]
    assert (get["decision"], get["rule"], get["object"]) == (
        "allow",
        "p, role:support-agent, *, crm/get_customer, call, allow",
        "crm/get_customer",
    )
    ticket = tools["crm__create_ticket"]
    assert ticket["decision"] == "conditional" and ticket["rule"] is None
    assert ticket["conditions"] == [
        {
            "effect": "allow",
            "condition": 'r.args.priority in ("low", "normal")',
            "rule": "p, role:support-agent, *, crm/create_ticket, call, allow, "
            'r.args.priority in ("low", "normal")',
        }
    ]
    listed_only = tools["crm__list_tickets"]
    assert (listed_only["decision"], listed_only["reason"]) == ("deny", "no_matching_rule")
    assert listed_only["rules"] == ["p, role:support-agent, *, crm/list_tickets, list, allow"]
    # Limits: the crm rate limit applies to crm tools, the create_* budget only to create_ticket.
    assert [(r["limit"], r["period"], r["per"]) for r in get["limits"]["rate_limits"]] == [
        (30, "minute", ["principal"])
    ]
    assert get["limits"]["budgets"] == [] and get["limits"]["cost"] == 1.0
    assert [(b["limit"], b["period"]) for b in ticket["limits"]["budgets"]] == [(50.0, "day")]
    assert tools["kb__search_docs"]["limits"]["rate_limits"] == []
    assert report["prompts"][0]["limits"] is None  # limits apply to tool calls only
    assert report["warnings"] == []


def test_a_role_in_a_tenant_and_a_named_subject(governed: ArbiterServer) -> None:
    with governed.admin() as admin:
        in_acme = admin.get("/access", params={"role": "billing", "tenant": "acme"}).json()
        elsewhere = admin.get("/access", params={"role": "billing", "tenant": "globex"}).json()
        alice = admin.get("/access", params={"subject": "alice", "tenant": "acme"}).json()
        alice_away = admin.get("/access", params={"subject": "alice", "tenant": "globex"}).json()
    tools = by_name(in_acme["tools"])
    assert set(tools) == {
        "crm__get_customer",
        "crm__list_tickets",
        "crm__create_ticket",
        "crm__delete_customer",
    }
    delete = tools["crm__delete_customer"]
    assert (
        delete["decision"] == "conditional" and delete["rule"] == "p, role:billing, acme, crm/*, call, allow"
    )
    assert [(c["effect"], c["condition"]) for c in delete["conditions"]] == [
        ("deny", 'r.args.customer_id == "C-1001"')
    ]
    assert elsewhere["tools"] == []  # billing's allow is for tenant acme only
    # alice is a support agent through a role link in acme only.
    assert "crm__get_customer" in by_name(alice["tools"]) and alice_away["tools"] == []


def test_who_may_call_a_tool(governed: ArbiterServer) -> None:
    sam = new_key(governed, "sam", ["support-agent"])
    new_key(governed, "bob", ["billing"], tenant="globex")  # billing, but not in acme: may not
    with governed.admin() as admin:
        resp = admin.get("/access/who", params={"tool": "crm__get_customer"})
    assert resp.status_code == 200, resp.text
    report = resp.json()
    grants = {(g["kind"], g["name"], g["tenant"]): g for g in report["grants"]}
    assert set(grants) == {
        ("role", "support-agent", "*"),
        ("role", "billing", "acme"),
        ("user", "alice", "acme"),
        ("user", "carol", "*"),
    }
    assert grants[("user", "carol", "*")]["rule"] == "p, user:carol, *, crm/get_customer, call, allow"
    keys = {k["id"]: k for k in report["api_keys"]}
    assert sam["id"] in keys and keys[sam["id"]]["owner"] == "sam"
    assert {k["owner"] for k in report["api_keys"]} == {"sam"}  # the test agent (role agent) and bob may not
    assert sam["key"] not in resp.text
    with governed.admin() as admin:
        missing = admin.get("/access/who", params={"tool": "crm__no_such_tool"}).json()
    # The policy still answers (billing's crm/* would cover it), with a warning that it does not exist.
    assert [(g["name"], g["tenant"]) for g in missing["grants"]] == [("billing", "acme")]
    assert missing["warnings"] == ["no tool crm__no_such_tool in the catalog; showing what the policy says"]


def test_a_misspelt_role_is_named_with_the_nearest_one(governed: ArbiterServer) -> None:
    with governed.admin() as admin:
        report = admin.get("/access", params={"role": "suport-agent"}).json()
        explained = admin.post(
            "/policies/explain",
            json={"subject": "x", "roles": ["suport-agent"], "object": "crm__get_customer"},
        ).json()
    expected = "no rule mentions role 'suport-agent'; did you mean 'support-agent'?"
    assert report["tools"] == [] and report["warnings"] == [expected]
    assert explained["allowed"] is False and explained["warnings"] == [expected]


def test_bad_queries_and_who_may_ask(governed: ArbiterServer) -> None:
    with governed.admin() as admin:
        assert admin.get("/access").status_code == 422
        assert admin.get("/access", params={"key_id": "0123456789abcdef", "role": "x"}).status_code == 422
        assert admin.get("/access", params={"key_id": "0123456789abcdef"}).status_code == 404
    reader = new_key(governed, "rita", ["policy-reader"])
    agent = new_key(governed, "sam", ["support-agent"])
    with governed.admin(reader["key"]) as admin:
        assert admin.get("/access", params={"role": "support-agent"}).status_code == 200
        assert admin.get("/access/who", params={"tool": "kb__get_doc"}).status_code == 200
    with governed.admin(agent["key"]) as admin:
        assert admin.get("/access", params={"role": "support-agent"}).status_code == 403
        assert admin.get("/access/who", params={"tool": "kb__get_doc"}).status_code == 403


def test_a_revoked_key_can_do_nothing(governed: ArbiterServer) -> None:
    key = new_key(governed, "sam", ["support-agent"])
    with governed.admin() as admin:
        assert admin.delete(f"/api-keys/{key['id']}").status_code == 204
        report = admin.get("/access", params={"key_id": key["id"]}).json()
        who = admin.get("/access/who", params={"tool": "crm__get_customer"}).json()
    assert report["principal"]["active"] is False and report["tools"] == []
    assert key["id"] not in {k["id"] for k in who["api_keys"]}


def test_policy_writes_warn_about_names_that_do_not_exist(governed: ArbiterServer) -> None:
    with governed.admin() as admin:
        added = admin.post(
            "/policies",
            json={
                "rules": [
                    {"subject": "role:x", "object": "crm/get_custmer", "action": "call"},
                    {"subject": "role:x", "object": "crmm/*", "action": "call"},
                    {"subject": "role:x", "object": "admin/polices", "action": "admin:read"},
                    {"subject": "role:x", "object": "kb/answer_from_kb", "action": "get"},
                    {"subject": "role:x", "object": "crm/crm://customers/C-1", "action": "read"},
                    {"subject": "role:x", "object": "admin/*", "action": "admin:write"},
                ]
            },
        )
        assert added.status_code == 201, added.text  # accepted: the tool may come later
        warnings = added.json()["warnings"]
        exported = admin.get("/policies/export").text
        imported = admin.post(
            "/policies/import", content=exported, headers={"content-type": "text/csv"}
        ).json()["warnings"]
        replaced = admin.put(
            "/policies", json={"rules": [{"subject": "role:x", "object": "kb/get_doc", "action": "call"}]}
        ).json()["warnings"]
    assert warnings == [
        "rule 1 (p, role:x, *, crm/get_custmer, call, allow): crm offers no tool matching 'get_custmer'; "
        "did you mean 'get_customer'?",
        "rule 2 (p, role:x, *, crmm/*, call, allow): no registered upstream matches 'crmm'; "
        "did you mean 'crm'? (registered: crm, kb); the rule applies once one is registered",
        "rule 3 (p, role:x, *, admin/polices, admin:read, allow): admin area 'polices' does not exist; "
        "did you mean 'policies'? "
        "(areas: api-keys, approvals, audit, budgets, limits, openapi, policies, upstreams, usage)",
    ]
    assert [w.split(": ", 1)[1] for w in imported] == [w.split(": ", 1)[1] for w in warnings]
    assert replaced == []
