"""The admin API for limits, budgets, tool costs and usage: CRUD, validation, permissions, reloads."""

from __future__ import annotations

import time

import httpx

from tests.conftest import ArbiterFactory, UpstreamProc
from tests.limits.conftest import admin_post, call
from tests.policies.conftest import new_key

SEARCH = "kb__search_docs"


def test_rules_crud_bumps_the_version_and_keeps_who_changed_it(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory()
    with server.admin() as admin:
        assert admin.get("/limits").json() == {"version": 0, "rules": []}
        created = admin.post(
            "/limits", json={"role": "support-agent", "upstream": "crm", "limit": 60, "period": "minute"}
        )
        assert created.status_code == 201, created.text
        rule = created.json()
        assert rule["per"] == ["principal"] and rule["burst"] == 60
        assert rule["updated_by"] == "arbiter|break-glass"
        listed = admin.get("/limits").json()
        assert listed["version"] == 1 and [r["id"] for r in listed["rules"]] == [rule["id"]]
        changed = admin.put(
            f"/limits/{rule['id']}",
            json={
                "tenant": "acme",
                "per": ["tool", "principal"],
                "limit": 1000,
                "period": "minute",
                "burst": 50,
            },
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["per"] == ["principal", "tool"] and changed.json()["burst"] == 50
        assert admin.get(f"/limits/{rule['id']}").json()["tenant"] == "acme"
        assert admin.delete(f"/limits/{rule['id']}").status_code == 204
        assert admin.get(f"/limits/{rule['id']}").status_code == 404
        assert admin.get("/limits").json()["version"] == 3


def test_invalid_input_is_refused_with_a_specific_message(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory()
    cases = [
        (
            "/limits",
            {"upstream": "CRM!", "limit": 1, "period": "minute"},
            "upstream must be an upstream name",
        ),
        ("/limits", {"limit": 0, "period": "minute"}, "greater than 0"),
        ("/limits", {"limit": 5, "period": "fortnight"}, "'second', 'minute', 'hour' or 'day'"),
        ("/limits", {"limit": 5, "period": "minute", "per": ["tool", "tool"]}, "more than once"),
        ("/limits", {"limit": 5, "period": "minute", "subject": ""}, "must not be empty"),
        # Copied from a cost entry: the upstream has a field of its own, and a tool name has no '/'.
        (
            "/limits",
            {"tool": "crm/delete_*", "limit": 1, "period": "minute"},
            "tool must not contain '/'",
        ),
        (
            "/budgets",
            {"tool": "crm/*", "period": "day", "limit": 5},
            "put the upstream in the upstream field",
        ),
        ("/budgets", {"period": "week", "limit": 5}, "'hour', 'day' or 'month'"),
        ("/budgets", {"period": "day", "limit": -1}, "greater than or equal to 0"),
        ("/tool-costs", {"tool": "crm/*"}, "set at least one of cost"),
        ("/tool-costs", {"tool": "crm", "cost": 1}, "<upstream>/<tool>"),
        ("/tool-costs", {"tool": "crm/x", "cost": 1, "price": 2}, "Extra inputs are not permitted"),
    ]
    with server.admin() as admin:
        for path, body, message in cases:
            resp = admin.post(path, json=body)
            assert resp.status_code == 422, (path, body, resp.text)
            assert message in resp.text, (path, body, resp.text)
        assert admin.post("/tool-costs", json={"tool": "crm/*", "cost": 2}).status_code == 201
        duplicate = admin.post("/tool-costs", json={"tool": "crm/*", "cost": 3})
        assert duplicate.status_code == 409 and "exists already" in duplicate.text
        assert admin.get("/usage", params={"group_by": "colour"}).status_code == 422
        assert admin.get("/limits").json()["version"] == 1  # nothing invalid was written


def test_reads_and_writes_need_the_policy_per_area(arbiter_factory: ArbiterFactory) -> None:
    policy = (
        "p, *, *, *, call, allow\n"
        "p, role:limits-viewer, *, admin/limits, admin:read, allow\n"
        "p, role:limits-viewer, *, admin/usage, admin:read, allow\n"
    )
    server = arbiter_factory(policy=policy)
    viewer = new_key(server, "viewer", ["limits-viewer"])
    with server.admin(viewer) as admin:
        assert admin.get("/limits").status_code == 200
        assert admin.get("/usage").status_code == 200
        assert admin.post("/limits", json={"limit": 1, "period": "minute"}).status_code == 403
        assert admin.get("/budgets").status_code == 403
        assert admin.get("/tool-costs").status_code == 403
    with server.admin(None) as anonymous:
        assert anonymous.get("/limits").status_code == 401


async def test_a_change_on_one_replica_is_enforced_by_another(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc
) -> None:
    a = arbiter_factory(limits={"reload_interval_s": 0.2})
    a.register("kb", kb_upstream.url)
    b = arbiter_factory(database_url=a.settings.database_url, limits={"reload_interval_s": 0.2})
    async with httpx.AsyncClient(timeout=30) as http:
        assert (await call(http, b, a.agent_key, SEARCH, {"query": "x"})).ok
        admin_post(a, "/limits", {"tool": "search_docs", "limit": 1, "period": "day"})
        deadline = time.monotonic() + 10
        reasons: list[str | None] = []
        while "rate_limited" not in reasons:
            assert time.monotonic() < deadline, f"replica B never applied the new rule: {reasons}"
            reasons.append((await call(http, b, a.agent_key, SEARCH, {"query": "x"})).reason)


async def test_usage_reports_calls_refusals_and_cost_per_caller_and_tool(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc
) -> None:
    server = arbiter_factory()
    server.register("kb", kb_upstream.url)
    admin_post(server, "/tool-costs", {"tool": "kb/*", "cost": 0.5})
    admin_post(server, "/tool-costs", {"tool": "kb/get_doc", "cost": 2})  # more specific: wins for get_doc
    admin_post(server, "/limits", {"tool": "get_doc", "limit": 2, "period": "day"})
    other = new_key(server, "other-agent", ["agent"], tenant="globex")
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(3):
            await call(http, server, server.agent_key, "kb__get_doc", {"doc_id": "sso-setup"})
        await call(http, server, server.agent_key, SEARCH, {"query": "x"})
        await call(http, server, other, SEARCH, {"query": "y"})
    with server.admin() as admin:
        by_tool = admin.get("/usage", params={"group_by": ["tenant", "tool"], "period": "month"}).json()
        only_globex = admin.get("/usage", params={"tenant": "globex", "group_by": "principal"}).json()
    rows = {(r["tenant"], r["tool"]): r for r in by_tool["rows"]}
    assert rows[("acme", "get_doc")] == {
        "tenant": "acme",
        "tool": "get_doc",
        "calls": 2,
        "limited": 1,
        "cost": 4.0,
    }
    assert rows[("acme", "search_docs")]["cost"] == 0.5
    assert rows[("globex", "search_docs")]["calls"] == 1
    assert by_tool["totals"] == {"calls": 4, "limited": 1, "cost": 5.0}
    assert [r["principal"] for r in only_globex["rows"]] == ["arbiter|other-agent"]


async def test_in_process_budget_spend_survives_a_restart(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc
) -> None:
    first = arbiter_factory()
    first.register("kb", kb_upstream.url)
    admin_post(first, "/budgets", {"period": "month", "limit": 2})
    async with httpx.AsyncClient(timeout=30) as http:
        assert all(
            [(await call(http, first, first.agent_key, SEARCH, {"query": str(i)})).ok for i in range(2)]
        )
        key = first.agent_key
        first.stop()  # writes what it charged on the way out
        second = arbiter_factory(database_url=first.settings.database_url, policy=None)
        refused = await call(http, second, key, SEARCH, {"query": "again"})
    assert refused.reason == "budget_exceeded" and refused.refusal["spent"] == 2
