"""The console's policies page, impact preview, "why?" and "what can this agent do?", in a real browser
against a real Arbiter with the demo upstreams. Each test saves a screenshot of every page it visits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.audit.helpers import wait_for
from tests.conftest import ADMIN_TOKEN, ALLOW_ALL, ArbiterFactory, ArbiterServer, UpstreamProc
from tests.console.conftest import make_key
from tests.console.test_console import console_changes, csrf_of, login, shot, tool_names

DENY = {"subject": "user:bot-1", "object": "kb/search_docs", "action": "call", "effect": "deny"}


async def calls(server: ArbiterServer, token: str, tool: str, count: int) -> None:
    async with server.client(token=token) as client:
        for i in range(count):
            assert not (await client.call_tool(tool, {"query": f"refund {i}"})).is_error


def recorded_calls(server: ArbiterServer, subject: str, tool: str, count: int) -> list[dict[str, Any]]:
    def mine(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in records if r.get("subject") == subject and r.get("tool") == tool]

    return mine(wait_for(server, lambda rs: len(mine(rs)) >= count))


async def fill_rule(page: Any, fields: dict[str, str]) -> None:
    form = page.locator("#add-rule")
    if not await form.get_attribute("open"):
        await page.get_by_text("Add a rule").click()
    await form.get_by_label("Subject (").fill(fields["subject"])
    await form.get_by_label("Object (").fill(fields["object"])
    await form.get_by_label("Action").select_option(fields["action"])
    await form.get_by_label("Effect").select_option(fields["effect"])


async def test_a_security_admin_previews_the_impact_then_revokes_a_tool_and_the_agent_loses_it(
    arbiter: ArbiterServer, browser: Any, shots: Path
) -> None:
    agent = make_key(arbiter, "bot-1", ["agent"])
    other = make_key(arbiter, "bot-2", ["agent"])
    await calls(arbiter, agent, "kb__search_docs", 2)
    await calls(arbiter, other, "kb__search_docs", 1)
    [seq, *_] = [r["seq"] for r in recorded_calls(arbiter, "bot-1", "kb__search_docs", 2)]
    assert "kb__search_docs" in await tool_names(arbiter, agent)

    page = await browser.new_page()
    await login(page, arbiter, make_key(arbiter, "sec", ["security-admin"]))
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Policies").click()
    assert await page.locator("table.rules tbody tr").count() == 3  # the test's allow-all policy
    await shot(page, shots, "policies")

    await fill_rule(page, DENY)
    await page.get_by_role("button", name="Preview impact").click()
    await page.wait_for_url(f"{arbiter.base_url}/console/policies/impact")
    assert await page.locator("#count-allow-to-deny").inner_text() == "2"  # bot-1's two calls, not bot-2's
    assert await page.locator("#count-deny-to-allow").inner_text() == "0"
    assert await page.locator("#count-undecidable").inner_text() == "0"
    agents = await page.locator("table.impact-agents tbody").inner_text()
    assert "bot-1" in agents and "bot-2" not in agents
    assert "kb__search_docs" in await page.locator("table.impact-tools tbody").inner_text()
    assert "+ p, user:bot-1, *, kb/search_docs, call, deny" in await page.locator("#change").inner_text()
    assert await page.locator("#impact-capped").count() == 0
    await shot(page, shots, "impact-preview")
    assert "kb__search_docs" in await tool_names(arbiter, agent)  # a preview changes nothing

    await page.get_by_role("button", name="Apply this change").click()
    await page.wait_for_url(f"{arbiter.base_url}/console/policies")
    assert "Rule added" in await page.locator("p.notice").inner_text()
    assert await page.locator("table.rules tbody tr", has_text="user:bot-1").count() == 1
    await shot(page, shots, "policies-after")
    seen = await tool_names(arbiter, agent)
    assert "kb__search_docs" not in seen and "kb__get_doc" in seen  # in force for the agent at once
    assert "kb__search_docs" in await tool_names(arbiter, other)
    [added] = [r for r in console_changes(arbiter, "policy.add") if r["subject"] == "sec"]
    assert added["admin"]["via"] == "console"
    assert added["admin"]["after"] == ["p, user:bot-1, *, kb/search_docs, call, deny"]

    # "Why?" from the audit record of an allowed call: allowed then, by the rule recorded; denied now.
    await page.goto(f"{arbiter.base_url}/console/audit/{seq}")
    await page.locator("#explain-link").click()
    assert "allow" in await page.locator("#explain-then").inner_text()
    now = await page.locator("#explain-now").inner_text()
    assert "deny" in now and "would differ" in now and "user:bot-1" in now
    await shot(page, shots, "explain")

    # What can bot-1 do now, and who may call the tool.
    await page.get_by_role("link", name="What can this agent do?").click()
    [key_id] = [k["id"] for k in arbiter_keys(arbiter) if k["owner"] == "bot-1"]
    await page.get_by_label("API key").select_option(key_id)
    await page.get_by_role("button", name="Show").click()
    tools = await page.locator("table.access-tools tbody").inner_text()
    assert "kb__get_doc" in tools and "kb__search_docs" not in tools
    assert "p, *, *, *, call, allow" in tools  # the deciding rule
    await shot(page, shots, "access-agent")
    await page.goto(f"{arbiter.base_url}/console/access?roles=agent&subject=bot-1")
    assert "kb__search_docs" not in await page.locator("table.access-tools tbody").inner_text()
    await page.goto(f"{arbiter.base_url}/console/access/who?tool=kb__search_docs")
    keys = await page.locator("table.who-keys tbody").inner_text()
    assert "bot-2" in keys and "bot-1" not in keys
    await shot(page, shots, "access-who")


def arbiter_keys(server: ArbiterServer) -> list[dict[str, Any]]:
    with server.admin() as admin:
        found: list[dict[str, Any]] = admin.get("/api-keys").json()
    return found


async def test_the_impact_of_an_approve_rule_is_shown_as_allow_to_approve(
    arbiter: ArbiterServer, browser: Any, shots: Path
) -> None:
    """Allowed calls an approve rule would send to a person are not denials: their own count and column."""
    agent = make_key(arbiter, "bot-3", ["agent"])
    await calls(arbiter, agent, "kb__search_docs", 2)
    recorded_calls(arbiter, "bot-3", "kb__search_docs", 2)
    page = await browser.new_page()
    await login(page, arbiter, make_key(arbiter, "sec", ["security-admin"]))
    await page.goto(f"{arbiter.base_url}/console/policies")
    await fill_rule(page, {**DENY, "subject": "user:bot-3", "effect": "approve"})
    await page.get_by_role("button", name="Preview impact").click()
    await page.wait_for_url(f"{arbiter.base_url}/console/policies/impact")
    assert await page.locator("#count-allow-to-approve").inner_text() == "2"
    assert await page.locator("#count-allow-to-deny").inner_text() == "0"
    assert await page.locator("#count-approve-to-allow").inner_text() == "0"
    agents = page.locator("table.impact-agents")
    assert "allow → approve" in await agents.locator("thead").inner_text()
    assert "bot-3" in await agents.locator("tbody").inner_text()
    assert "allow → approve" in await page.locator("table.impact-samples tbody").inner_text()
    await shot(page, shots, "impact-preview-approve")


async def test_rules_are_validated_in_the_form_and_edited_and_deleted(
    arbiter: ArbiterServer, browser: Any, shots: Path
) -> None:
    page = await browser.new_page()
    await login(page, arbiter, ADMIN_TOKEN)
    await page.goto(f"{arbiter.base_url}/console/policies")
    await fill_rule(page, {**DENY, "object": "no slash here"})
    async with page.expect_response(f"{arbiter.base_url}/console/policies") as answer:
        await page.get_by_role("button", name="Add rule").click()
    assert (await answer.value).status == 400  # the person's mistake, not a server error
    assert "must be <upstream>/<name>" in await page.get_by_role("alert").inner_text()
    assert await page.locator("#add-object").input_value() == "no slash here"  # kept as typed
    await shot(page, shots, "policies-invalid")

    row = page.locator("table.rules tbody tr", has_text="read")
    rule_id = (await row.locator("td").first.inner_text()).strip()
    await row.get_by_role("link", name=f"Edit rule {rule_id}").click()
    await page.get_by_label("Object (").fill("kb/*")
    await shot(page, shots, "policy-edit")
    await page.get_by_role("button", name="Save rule").click()
    await page.wait_for_url(f"{arbiter.base_url}/console/policies")
    assert await page.locator("table.rules tbody tr", has_text="kb/*").count() == 1
    with arbiter.admin() as admin:
        rules = {r["csv"] for r in admin.get("/policies").json()["rules"]}
    assert "p, *, *, kb/*, read, allow" in rules and "p, *, *, *, read, allow" not in rules

    row = page.locator("table.rules tbody tr", has_text="get")
    rule_id = (await row.locator("td").first.inner_text()).strip()
    await row.get_by_role("button", name=f"Delete rule {rule_id}").click()
    await page.wait_for_selector("p.notice")
    assert await page.locator("table.rules tbody tr").count() == 2
    # The decision-table tests run against the live policy.
    await page.get_by_label("Cases (YAML)").fill(
        "- {subject: a, roles: [agent], object: kb__search_docs, expected: allow}\n"
        "- {subject: a, object: crm/get_customer, action: get, expected: allow}\n"
    )
    await page.get_by_role("button", name="Run tests").click()
    assert await page.locator("#test-summary").inner_text() == "1 passed, 1 failed (the live policy)"
    await shot(page, shots, "policy-tests")


async def test_an_approve_rule_names_its_approvers_in_the_form_and_keeps_them_when_edited(
    arbiter: ArbiterServer, browser: Any, shots: Path
) -> None:
    page = await browser.new_page()
    await login(page, arbiter, ADMIN_TOKEN)
    await page.goto(f"{arbiter.base_url}/console/policies")
    refund = {"subject": "role:agent", "object": "crm/refund", "action": "call", "effect": "approve"}
    await fill_rule(page, refund)
    await page.locator("#add-approval").fill("by   role:billing-lead for 240m")
    await page.get_by_role("button", name="Add rule").click()
    await page.wait_for_selector("p.notice")
    stored = "p, role:agent, *, crm/refund, call, approve by role:billing-lead for 4h"  # canonical
    row = page.locator("table.rules tbody tr", has_text="crm/refund")
    rule_id = (await row.locator("td").first.inner_text()).strip()
    await row.get_by_role("link", name=f"Edit rule {rule_id}").click()
    assert await page.locator("#edit-approval").input_value() == "by role:billing-lead for 4h"
    await page.get_by_label("Condition (").fill("r.args.amount > 100")
    await page.get_by_role("button", name="Save rule").click()
    await page.wait_for_url(f"{arbiter.base_url}/console/policies")
    with arbiter.admin() as admin:
        rules = {r["csv"] for r in admin.get("/policies").json()["rules"]}
    assert f"{stored}, r.args.amount > 100" in rules  # the approvers survived the edit

    await fill_rule(page, {**refund, "object": "crm/delete", "effect": "allow"})
    await page.locator("#add-approval").fill("by role:billing-lead")
    async with page.expect_response(f"{arbiter.base_url}/console/policies") as answer:
        await page.get_by_role("button", name="Add rule").click()
    assert (await answer.value).status == 400
    assert "must be allow, deny or approve" in await page.get_by_role("alert").inner_text()
    await shot(page, shots, "policy-approvers")


async def test_an_auditor_and_a_policy_reader_cannot_change_the_policy(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc, browser: Any, shots: Path
) -> None:
    # Read rights on the policy alone open a console session (login.CONSOLE_AREAS).
    reader_rule = "p, role:policy-reader, *, admin/policies, admin:read, allow\n"
    server = arbiter_factory(policy=ALLOW_ALL + reader_rule)
    server.register("kb", kb_upstream.url)
    await calls(server, server.agent_key, "kb__search_docs", 1)
    record = recorded_calls(server, "test-agent", "kb__search_docs", 1)[0]
    forged_paths = [
        "/console/policies",
        "/console/policies/1/delete",
        "/console/policies/1",
        "/console/policies/replace",
    ]

    auditor = await browser.new_page()
    await login(auditor, server, make_key(server, "audrey", ["auditor"]))
    await auditor.goto(f"{server.base_url}/console/audit")
    assert "Policies" not in await auditor.get_by_role("navigation", name="Main").inner_text()
    for path in ["/console/policies", "/console/access", "/console/access/who?tool=kb__search_docs"]:
        response = await auditor.goto(f"{server.base_url}{path}")
        assert response is not None and response.status == 403, path
    await auditor.goto(f"{server.base_url}/console/audit/{record['seq']}")
    assert await auditor.locator("#explain-link").count() == 0  # the policy is not theirs to read
    csrf = await csrf_of(auditor)
    form = {"csrf": csrf, **DENY, "expected_version": "1", "policy": "", "mode": "add"}
    for path in [*forged_paths, "/console/policies/impact"]:
        response = await auditor.request.post(f"{server.base_url}{path}", form=form)
        assert response.status == 403, path

    reader = await browser.new_page()
    await login(reader, server, make_key(server, "rita", ["policy-reader"]))
    await reader.goto(f"{server.base_url}/console/policies")
    assert await reader.locator("table.rules tbody tr").count() == 4  # allow-all's 3 and the reader's
    assert await reader.locator("main form[method=post]").count() == 1  # the decision-table tests only
    assert await reader.get_by_role("button", name="Delete rule 1").count() == 0
    assert await reader.get_by_text("Add a rule").count() == 0
    await shot(reader, shots, "policies-read-only")
    csrf = await csrf_of(reader)
    for path in forged_paths:
        response = await reader.request.post(f"{server.base_url}{path}", form={**form, "csrf": csrf})
        assert response.status == 403, path
    with server.admin() as admin:
        assert len(admin.get("/policies").json()["rules"]) == 4  # nothing changed


async def test_a_policy_form_post_without_the_csrf_token_is_refused(
    arbiter: ArbiterServer, browser: Any
) -> None:
    page = await browser.new_page()
    await login(page, arbiter, ADMIN_TOKEN)
    url = f"{arbiter.base_url}/console/policies"
    await page.goto(url)
    for form in (DENY, {**DENY, "csrf": "forged"}):
        response = await page.request.post(url, form=form)
        assert response.status == 403
        impact = await page.request.post(f"{url}/impact", form={**form, "mode": "add"})
        assert impact.status == 403
    ok = await page.request.post(url, form={**DENY, "csrf": await csrf_of(page)})
    assert ok.status == 200  # the same post with the session's token goes through (to the page)
    with arbiter.admin() as admin:
        rules = [r["csv"] for r in admin.get("/policies").json()["rules"]]
    assert rules.count("p, user:bot-1, *, kb/search_docs, call, deny") == 1
