"""Approvers decide pending calls in the console (issue 19), in a real browser against a real Arbiter and
the ``pay`` upstream that counts the refunds it ran: an approver with no admin right logs in, sees the
agent's pending refund, approves it with a note; the agent's retry runs it once and the page shows it
used. The request's maker sees their own request without the buttons, and a forged post is refused
with the reason, on the page. The decision is in the audit log as the admin API records it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.conftest import ADMIN_TOKEN, ArbiterFactory
from tests.console.test_console import console_changes, csrf_of, login, shot
from tests.policies.conftest import new_key
from tests.proxy.test_approval import CARD, MODERN, Payments
from tests.proxy.test_approver_flow import _refund, _start, payments
from tests.refusals import tool_refusal

__all__ = ["payments"]  # fixture


async def test_an_approver_approves_in_the_console_and_the_agents_retry_runs_once(
    arbiter_factory: ArbiterFactory, payments: Payments, browser: Any, shots: Path
) -> None:
    server = _start(arbiter_factory, payments)
    lead = new_key(server, "lena", ["billing-lead"])  # an approver, with no admin right at all
    approval_id = tool_refusal(await _refund(server, MODERN))["approval_id"]
    assert payments.refunds() == []

    page = await browser.new_page()
    await login(page, server, lead)
    nav = await page.get_by_role("navigation", name="Main").inner_text()
    assert "Approvals" in nav and "Audit" not in nav and "Policies" not in nav
    await page.get_by_role("link", name="Approvals").click()
    await page.wait_for_url(f"{server.base_url}/console/approvals")
    row = page.locator(f"#approval-{approval_id}")
    text = await row.inner_text()
    assert "pay__refund" in text and "test-agent (acme)" in text and "role:billing-lead" in text
    assert await row.locator("td.may-decide").inner_text() == "yes"
    await shot(page, shots, "approvals-pending")

    await page.get_by_role("link", name=approval_id).click()
    await page.wait_for_url(f"{server.base_url}/console/approvals/{approval_id}")
    arguments = json.loads(await page.locator("#approval-arguments").inner_text())
    assert arguments["amount"] == 500 and arguments["customer"] == "acme"
    assert CARD not in await page.content()  # redacted as the audit log shows it
    assert "pay/refund" in await page.locator("#approval-rule").inner_text()
    await page.get_by_label("Note (optional").fill("customer called")
    await shot(page, shots, "approval-pending")
    await page.get_by_role("button", name="Approve").click()
    await page.wait_for_selector("p.notice")
    assert await page.locator("#approval-status").inner_text() == "approved"
    assert await page.locator("#approval-decided-by").inner_text() == "user:lena"
    assert await page.locator("#approval-note").inner_text() == "customer called"
    assert await page.get_by_role("button", name="Approve").count() == 0  # decided: no buttons

    ran = await _refund(server, MODERN)  # the agent's retry of the same call
    assert not ran.is_error, ran
    assert payments.refunds() == [{"amount": 500, "customer": "acme"}]
    await page.reload()
    assert await page.locator("#approval-status").inner_text() == "used"
    assert await page.locator("#approval-used").count() == 1
    await shot(page, shots, "approval-used")

    [decision] = console_changes(server, "approval.approve")
    assert decision["subject"] == "lena" and decision["tool"] == approval_id
    admin = decision["admin"]
    assert admin["approval_id"] == approval_id and admin["via"] == "console"
    assert admin["after"] == {"status": "approved", "decided_by": "user:lena", "note": "customer called"}
    assert admin["subject"] == "test-agent" and "pay/refund" in admin["rule"]


async def test_the_maker_of_a_request_sees_it_without_buttons_and_a_forged_decision_is_refused(
    arbiter_factory: ArbiterFactory, payments: Payments, browser: Any, shots: Path
) -> None:
    server = _start(arbiter_factory, payments)
    own = new_key(server, "test-agent", ["agent", "billing-lead"])  # the caller, holding the role too
    approval_id = tool_refusal(await _refund(server, MODERN, own))["approval_id"]

    page = await browser.new_page()
    await login(page, server, own)
    await page.goto(f"{server.base_url}/console/approvals")
    row = page.locator(f"#approval-{approval_id}")
    assert await row.locator("td.may-decide").inner_text() == "no"
    await row.get_by_role("link", name=approval_id).click()
    await page.wait_for_url(f"{server.base_url}/console/approvals/{approval_id}")
    assert await page.locator("#approval-status").inner_text() == "pending"
    assert await page.get_by_role("button", name="Approve").count() == 0
    assert await page.get_by_role("button", name="Deny").count() == 0
    assert "your own request" in await page.locator("#not-yours").inner_text()

    url = f"{server.base_url}/console/approvals/{approval_id}"
    forged = await page.request.post(url, form={"csrf": await csrf_of(page), "decision": "approve"})
    assert forged.status == 403
    shown = await forged.text()  # the request's page, with the reason (not an error page)
    assert 'id="decision-error"' in shown and "nobody may approve or deny their own request" in shown
    assert 'id="approval-status">pending' in shown
    without_csrf = await page.request.post(url, form={"decision": "approve"})
    assert without_csrf.status == 403

    [refused] = console_changes(server, "approval.approve")  # the refused attempt, linked to the request
    assert refused["subject"] == "test-agent" and refused["admin"]["approval_id"] == approval_id
    assert refused["outcome"]["status"] == "error" and refused["outcome"]["http_status"] == 403
    with server.admin() as api:
        assert api.get(f"/approvals/{approval_id}").json()["status"] == "pending"
    assert payments.refunds() == []

    # A security admin sees every request (admin:read on admin/approvals) but is no approver of this one.
    admin_page = await browser.new_page()
    await login(admin_page, server, ADMIN_TOKEN)
    await admin_page.goto(f"{server.base_url}/console/approvals")
    assert await admin_page.locator(f"#approval-{approval_id} td.may-decide").inner_text() == "no"
    # Neither an approver nor an admin: the console still has nothing to show an agent's key.
    agent_page = await browser.new_page()
    await agent_page.goto(f"{server.base_url}/console/login")
    await agent_page.get_by_label("API key or admin token").fill(server.agent_key)
    await agent_page.get_by_role("button", name="Log in").click()
    assert "no admin rights" in await agent_page.get_by_role("alert").inner_text()


def test_a_record_sent_for_approval_says_so_on_its_why_link() -> None:
    from arbiter.console.audit import _explained  # pyright: ignore[reportPrivateUsage]

    asked = {"decision": "approve", "allowed": False, "reason": "approval_required"}
    assert _explained({"kind": "mcp", "policy": asked}) == "sent for approval"
    assert _explained({"kind": "mcp", "policy": {"allowed": True}}) == "allowed"
    assert _explained({"kind": "mcp", "policy": {"allowed": False, "reason": "no_matching_rule"}}) == "denied"
