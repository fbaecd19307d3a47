"""Registering, editing, disabling and deleting upstreams from the console, in a real browser against a real
Arbiter and the demo kb upstream; an agent's tools/list through /mcp shows the effect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from tests.conftest import ALLOW_ALL, ArbiterFactory, ArbiterServer, UpstreamProc
from tests.console.conftest import make_key
from tests.console.test_console import console_changes, csrf_of, login, shot, tool_names

SECRET = "s3cret-upstream-token-do-not-show"


def _server(arbiter_factory: ArbiterFactory) -> ArbiterServer:
    # Definitions wait for a review: the console's approval is what makes the new tools appear.
    return arbiter_factory(
        integrity={"auto_approve_default": False}, secret_key=Fernet.generate_key().decode()
    )


async def _fill(page: Any, url: str, name: str | None = None) -> None:
    if name is not None:
        await page.locator("#u-name").fill(name)
    await page.get_by_label("URL (").fill(url)


async def test_a_security_admin_registers_edits_and_disables_an_upstream_and_the_agent_sees_it(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc, browser: Any, shots: Path
) -> None:
    server = _server(arbiter_factory)
    agent = server.agent_key
    page = await browser.new_page()
    await login(page, server, make_key(server, "sec", ["security-admin"]))
    await page.goto(f"{server.base_url}/console/upstreams")
    await page.get_by_role("link", name="Register an upstream").click()
    await page.wait_for_url(f"{server.base_url}/console/upstreams/new")
    await _fill(page, kb_upstream.url, "kb")
    await shot(page, shots, "register-form")
    await page.get_by_role("button", name="Register").click()
    await page.wait_for_url(f"{server.base_url}/console/upstreams/*")
    assert "Upstream kb registered" in await page.locator("p.notice").inner_text()
    assert not {t for t in await tool_names(server, agent) if t.startswith("kb__")}  # pending review

    await page.get_by_role("link", name="search_docs").click()
    await page.get_by_role("button", name="Approve").click()
    await page.wait_for_selector("p.notice")
    assert "kb__search_docs" in await tool_names(server, agent)
    [created] = console_changes(server, "upstream.create")
    assert created["subject"] == "sec" and created["admin"]["via"] == "console"

    # Edit: a header credential; its value is stored sealed, never shown back nor audited.
    upstream_page = f"{server.base_url}/console/upstreams/{created['admin']['after']['id']}"
    await page.goto(upstream_page)
    await page.get_by_role("link", name="Edit upstream").click()
    await page.get_by_label("Credential kind").select_option("header")
    await page.get_by_label("Header name").fill("X-Api-Key")
    await page.get_by_label("Header value").fill(SECRET)
    await page.get_by_role("button", name="Save").click()
    await page.wait_for_url(upstream_page)
    assert "Upstream kb saved" in await page.locator("p.notice").inner_text()
    await page.get_by_role("link", name="Edit upstream").click()
    assert await page.get_by_label("Header name").input_value() == "X-Api-Key"
    assert SECRET not in await page.content()
    assert "blank keeps the stored value" in await page.locator("#upstream-form").inner_text()
    await shot(page, shots, "edit-form")
    [updated] = console_changes(server, "upstream.update")
    assert updated["subject"] == "sec" and updated["admin"]["via"] == "console"
    assert updated["admin"]["after"]["credential"].startswith("[REDACTED")  # as the API's records
    assert SECRET not in json.dumps(updated)
    assert "kb__search_docs" in await tool_names(server, agent)

    # Disable, confirmed: the agent's tools/list loses the upstream's tools at once.
    await page.goto(upstream_page)
    await page.get_by_label("Its tools leave every agent's list").check()
    await page.get_by_role("button", name="Disable upstream").click()
    await page.wait_for_url(upstream_page)
    assert "Upstream kb disabled" in await page.locator("p.notice").inner_text()
    assert not {t for t in await tool_names(server, agent) if t.startswith("kb__")}
    with server.admin() as admin:
        assert admin.get("/upstreams").json()[0]["enabled"] is False
    await shot(page, shots, "disabled")

    await page.get_by_role("button", name="Enable upstream").click()
    await page.wait_for_url(upstream_page)
    assert "kb__search_docs" in await tool_names(server, agent)
    await page.get_by_label("Delete it and its catalog").check()
    await page.get_by_role("button", name="Delete upstream").click()
    await page.wait_for_url(f"{server.base_url}/console/upstreams")
    assert not {t for t in await tool_names(server, agent) if t.startswith("kb__")}
    assert console_changes(server, "upstream.delete")[0]["subject"] == "sec"


async def test_a_bad_url_or_name_is_shown_in_the_form_not_as_a_server_error(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc, browser: Any, shots: Path
) -> None:
    server = _server(arbiter_factory)
    page = await browser.new_page()
    await login(page, server, make_key(server, "sec", ["security-admin"]))
    await page.goto(f"{server.base_url}/console/upstreams/new")
    await _fill(page, "ftp://example.invalid/mcp", "kb")
    async with page.expect_response(f"{server.base_url}/console/upstreams/new") as answer:
        await page.get_by_role("button", name="Register").click()
    assert (await answer.value).status == 422
    assert "http or https" in await page.locator("#form-error").inner_text()
    assert await page.locator("#u-name").input_value() == "kb"  # the input is kept
    await shot(page, shots, "register-error")

    csrf = await csrf_of(page)
    for form in (
        {"csrf": csrf, "name": "Bad Name", "url": kb_upstream.url},
        {"csrf": csrf, "name": "kb", "url": "http://127.0.0.1:1/mcp"},  # nothing listens there
    ):
        response = await page.request.post(f"{server.base_url}/console/upstreams/new", form=form)
        assert 400 <= response.status < 500, form
        assert "form-error" in await response.text()
    with server.admin() as admin:
        assert admin.get("/upstreams").json() == []


async def test_an_auditor_sees_no_controls_and_forged_or_csrf_less_posts_are_refused(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc, browser: Any
) -> None:
    server = _server(arbiter_factory)
    upstream_id = server.register("kb", kb_upstream.url)["id"]
    base = f"{server.base_url}/console/upstreams"
    auditor = await browser.new_page()
    await login(auditor, server, make_key(server, "audrey", ["auditor"]))
    await auditor.goto(base)
    assert await auditor.get_by_role("link", name="Register an upstream").count() == 0
    await auditor.goto(f"{base}/{upstream_id}")
    assert await auditor.get_by_role("link", name="Edit upstream").count() == 0
    assert await auditor.locator("main form[method=post]").count() == 0
    for path in ("/new", f"/{upstream_id}/edit"):
        response = await auditor.goto(f"{base}{path}")
        assert response is not None and response.status == 403, path
    csrf = await csrf_of(auditor)
    forged = {"csrf": csrf, "name": "evil", "url": kb_upstream.url, "enabled": "false", "confirm": "true"}
    for path in ("/new", f"/{upstream_id}/edit", f"/{upstream_id}/enabled", f"/{upstream_id}/delete"):
        response = await auditor.request.post(f"{base}{path}", form=forged)
        assert response.status == 403, path

    admin_page = await browser.new_page()
    await login(admin_page, server, make_key(server, "sec", ["security-admin"]))
    await admin_page.goto(base)
    for form in ({k: v for k, v in forged.items() if k != "csrf"}, {**forged, "csrf": "forged"}):
        for path in ("/new", f"/{upstream_id}/enabled", f"/{upstream_id}/delete"):
            response = await admin_page.request.post(f"{base}{path}", form=form)
            assert response.status == 403, path
    with server.admin() as admin:
        [row] = admin.get("/upstreams").json()
    assert row["name"] == "kb" and row["enabled"] is True


async def test_an_upstream_admin_who_is_not_a_security_admin_may_not_turn_auto_approve_on(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc, browser: Any
) -> None:
    rules = "".join(
        f"p, role:upstream-admin, *, admin/upstreams, {action}, allow\n"
        for action in ("admin:read", "admin:write")
    )
    server = arbiter_factory(policy=ALLOW_ALL + rules, integrity={"auto_approve_default": False})
    page = await browser.new_page()
    await login(page, server, make_key(server, "uma", ["upstream-admin"]))
    await page.goto(f"{server.base_url}/console/upstreams/new")
    assert await page.locator("input[name=auto_approve]").count() == 0
    form = {"csrf": await csrf_of(page), "name": "kb", "url": kb_upstream.url, "auto_approve": "true"}
    response = await page.request.post(f"{server.base_url}/console/upstreams/new", form=form)
    assert response.status == 403
    await _fill(page, kb_upstream.url, "kb")
    await page.get_by_role("button", name="Register").click()
    await page.wait_for_url(f"{server.base_url}/console/upstreams/*")
    with server.admin() as admin:
        [row] = admin.get("/upstreams").json()
    assert row["name"] == "kb" and row["auto_approve"] is False
    assert console_changes(server, "upstream.create")[0]["subject"] == "uma"
