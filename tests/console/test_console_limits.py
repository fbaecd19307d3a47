"""The console's *Limits and budgets* page in a real browser: the rules, the costs, and each budget's
spending as bars, read-only; someone the policy gives no limits rights neither sees it nor may open it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.conftest import ArbiterServer
from tests.console.conftest import make_key
from tests.console.test_console import login, shot
from tests.console.test_console_policies import calls


async def test_the_limits_page_shows_rules_costs_and_spending_against_each_budget(
    arbiter: ArbiterServer, browser: Any, shots: Path
) -> None:
    with arbiter.admin() as admin:
        for path, body in [
            ("/limits", {"limit": 100, "period": "minute", "tool": "search_*", "description": "searches"}),
            ("/budgets", {"period": "day", "limit": 10, "upstream": "kb", "description": "kb <b>daily</b>"}),
            ("/budgets", {"period": "month", "limit": 50, "per": []}),
            ("/tool-costs", {"tool": "kb/search_docs", "cost": 2.5}),
        ]:
            assert admin.post(path, json=body).status_code == 201, path
    await calls(arbiter, arbiter.agent_key, "kb__search_docs", 2)  # 2 x 2.5 = 5 spent by test-agent

    page = await browser.new_page()
    await login(page, arbiter, make_key(arbiter, "lee", ["security-admin"]))
    await page.get_by_role("link", name="Limits and budgets").click()
    await page.wait_for_url(f"{arbiter.base_url}/console/limits")
    rule = page.locator("#rules tbody tr")
    assert await rule.count() == 1
    assert "100 per minute" in await rule.locator(".limit").inner_text()
    assert "kb/search_docs" in await page.locator("#costs").inner_text()

    per_agent = page.locator("#budget-1")
    assert "kb <b>daily</b>" in await per_agent.locator("h3").inner_text()  # text, not markup
    [spent] = await per_agent.locator(".spent").all_inner_texts()
    assert spent == "5 of 10 (50%)"
    assert "principal=" in await per_agent.locator("tbody td").first.inner_text()
    assert await per_agent.locator("meter").get_attribute("value") == "5.0"
    shared = page.locator("#budget-2")
    assert await shared.locator(".spent").inner_text() == "5 of 50 (10%)"
    assert await shared.locator("tbody td").first.inner_text() == "everyone"
    assert await page.locator("main form").count() == 0  # read-only
    await shot(page, shots, "limits")

    auditor = await browser.new_page()
    await login(auditor, arbiter, make_key(arbiter, "ann", ["auditor"]))
    assert "Limits" not in await auditor.get_by_role("navigation", name="Main").inner_text()
    refused = await auditor.goto(f"{arbiter.base_url}/console/limits")
    assert refused is not None and refused.status == 403
