"""The console in a real browser (headless Chromium) against a real Arbiter with real upstreams.

Each test saves a screenshot of every page it visits under its own output directory (``shots``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from arbiter.auth import apikeys
from tests.audit.helpers import of_kind, wait_for
from tests.conftest import ADMIN_TOKEN, ArbiterFactory, ArbiterServer, serve_in_thread
from tests.console.conftest import make_key
from tests.integrity.test_pinning import POLICY, RugPull, names

POISON = (
    "<script>window.__pwned = 'script'</script>"
    "<img src=x onerror=\"window.__pwned = 'img'\">"
    "<a href=\"javascript:window.__pwned = 'link'\">click me</a>"
)


async def login(page: Any, server: ArbiterServer, key: str) -> None:
    await page.goto(f"{server.base_url}/console/login")
    await page.get_by_label("API key or admin token").fill(key)
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_url(f"{server.base_url}/console")


async def tool_names(server: ArbiterServer, token: str) -> set[str]:
    async with server.client(token=token) as client:
        return {t.name for t in (await client.list_tools()).tools}


async def shot(page: Any, shots: Path, name: str) -> None:
    await page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


async def csrf_of(page: Any) -> str:
    token: str = await page.locator("form.logout input[name=csrf]").get_attribute("value")
    assert token
    return token


def console_changes(server: ArbiterServer, method: str) -> list[dict[str, Any]]:
    records = wait_for(server, lambda rs: any(r.get("method") == method for r in of_kind(rs, "admin")))
    return [r for r in of_kind(records, "admin") if r["method"] == method]


async def test_login_with_a_key_a_strict_session_and_the_security_headers_on_every_page(
    arbiter: ArbiterServer, browser: Any, shots: Path
) -> None:
    key = make_key(arbiter, "alice", ["security-admin"])
    context = await browser.new_context()
    page = await context.new_page()
    first = await page.goto(f"{arbiter.base_url}/console")  # not logged in: to the login page
    assert first is not None and page.url == f"{arbiter.base_url}/console/login"
    await shot(page, shots, "login")
    await page.get_by_label("API key or admin token").fill(apikeys.PREFIX + "nope_nope")
    await page.get_by_role("button", name="Log in").click()
    assert "not accepted" in await page.get_by_role("alert").inner_text()

    await login(page, arbiter, key)
    [cookie] = [c for c in await context.cookies() if c["name"] == "arbiter_console"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert not cookie["secure"]  # plain HTTP on loopback only; anywhere else the cookie is Secure
    assert key not in cookie["value"]
    kb = await page.get_by_role("link", name="kb").first.get_attribute("href")
    for name, path in [
        ("overview", "/console"),
        ("upstreams", "/console/upstreams"),
        ("upstream", kb),
        ("keys", "/console/keys"),
        ("audit", "/console/audit"),
    ]:
        response = await page.goto(f"{arbiter.base_url}{path}")
        assert response is not None and response.status == 200, name
        headers = response.headers
        csp = headers["content-security-policy"]
        for directive in ("default-src 'self'", "script-src 'self'", "style-src 'self'"):
            assert directive in csp
        assert "frame-ancestors 'none'" in csp and "form-action 'self'" in csp
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert key not in await page.content()  # the key is never echoed into a page
        await shot(page, shots, name)
    await page.goto(f"{arbiter.base_url}/console")
    assert await page.locator("#count-pending").inner_text() == "0"  # the test upstreams are auto-approved

    await page.get_by_role("button", name="Log out").click()
    await page.wait_for_url(f"{arbiter.base_url}/console/login")
    await page.goto(f"{arbiter.base_url}/console/keys")
    assert page.url == f"{arbiter.base_url}/console/login"  # the session is gone
    [logged_in] = console_changes(arbiter, "console.login")
    assert logged_in["subject"] == "alice" and logged_in["actor"]["auth_method"] == "api_key"
    assert console_changes(arbiter, "console.logout")[0]["subject"] == "alice"
    await context.close()


async def test_a_security_admin_approves_a_pending_tool_and_the_agent_then_lists_it(
    arbiter_factory: ArbiterFactory, browser: Any, shots: Path, tmp_path: Path
) -> None:
    upstream = RugPull()
    upstream.descriptions["lookup"] = POISON  # never approved here: only rendered
    with serve_in_thread(upstream.app()) as port:
        server = arbiter_factory(policy=POLICY)
        upstream_id = server.register("up", f"http://127.0.0.1:{port}/mcp", auto_approve=False)["id"]
        assert await names(server) == set()  # both wait for review
        key = make_key(server, "sam", ["security-admin"])
        page = await browser.new_page()
        await login(page, server, key)
        assert await page.locator("#count-pending").inner_text() == "2"
        await shot(page, shots, "overview-pending")
        await page.get_by_role("link", name="up", exact=True).click()
        await page.get_by_role("link", name="ping").click()
        assert await page.locator("#definition-status").inner_text() == "pending"
        await shot(page, shots, "definition-pending")
        await page.get_by_role("button", name="Approve").click()
        await page.wait_for_selector("p.notice")
        assert await page.locator("#definition-status").inner_text() == "approved"
        assert await page.get_by_role("button", name="Approve").count() == 0  # nothing left to decide
        await shot(page, shots, "definition-approved")
        assert await names(server) == {"up__ping"}  # in force for the agent at once

    [approval] = console_changes(server, "definition.approve")
    assert approval["subject"] == "sam" and approval["reason"] == "changed"
    assert approval["tool"] == str(upstream_id) and approval["admin"]["via"] == "console"
    assert approval["admin"]["before"][0]["status"] == "pending"
    assert approval["admin"]["after"][0]["status"] == "approved"


async def test_a_poisoned_tool_description_renders_as_text(
    arbiter_factory: ArbiterFactory, browser: Any, shots: Path
) -> None:
    upstream = RugPull()
    upstream.descriptions["lookup"] = POISON
    with serve_in_thread(upstream.app()) as port:
        server = arbiter_factory(policy=POLICY)
        upstream_id = server.register("up", f"http://127.0.0.1:{port}/mcp", auto_approve=False)["id"]
        page = await browser.new_page()
        await login(page, server, ADMIN_TOKEN)  # the break-glass token logs in too
        base = f"{server.base_url}/console/upstreams/{upstream_id}"
        for name, path in [
            ("poisoned-list", base),
            ("poisoned-definition", f"{base}/definitions/tool/lookup"),
        ]:
            await page.goto(path)
            await page.wait_for_load_state("load")
            main = page.locator("main")
            # Escaped, the payload is text: no element of it exists, and nothing it would run has run.
            assert await main.locator("script").count() == 0
            assert await main.locator("img").count() == 0
            assert await main.locator("a[href^='javascript']").count() == 0
            assert "<script>window.__pwned" in await main.inner_text()
            assert await page.evaluate("window.__pwned") is None
            await shot(page, shots, name)
        assert await page.locator("#description").inner_text() == POISON


async def test_create_and_revoke_a_key(arbiter: ArbiterServer, browser: Any, shots: Path) -> None:
    page = await browser.new_page()
    await login(page, arbiter, make_key(arbiter, "kim", ["security-admin"]))
    await page.get_by_role("link", name="API keys").click()
    await page.get_by_text("Create a key").click()
    await page.get_by_label("Owner (the agent or service)").fill("bot-7")
    await page.get_by_label("Roles (comma-separated)").fill("agent")
    await page.get_by_role("button", name="Create key").click()
    secret = await page.locator("#new-key").inner_text()
    assert secret.startswith(apikeys.PREFIX)
    assert await tool_names(arbiter, secret)  # the new key works on /mcp
    row = page.locator("tr", has_text="bot-7")
    key_id = (await row.locator("code").first.inner_text()).strip()
    assert key_id in secret

    await row.get_by_role("button", name=f"Revoke key {key_id}").click()
    await page.wait_for_selector("p.notice")
    assert await page.locator(f"#key-{key_id} .state").inner_text() == "revoked"
    assert secret not in await page.content()  # shown once, never again
    await shot(page, shots, "keys-revoked")
    async with httpx.AsyncClient(timeout=30) as client:
        refused = await client.post(
            arbiter.mcp_url,
            json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
            headers={"authorization": f"Bearer {secret}", "accept": "application/json, text/event-stream"},
        )
    assert refused.status_code == 401

    # (the test's own keys were made through the admin API, as break-glass)
    [created] = [r for r in console_changes(arbiter, "api_key.create") if r["subject"] == "kim"]
    assert created["admin"]["via"] == "console" and created["admin"]["after"]["owner"] == "bot-7"
    assert secret not in str(created)
    [revoked] = console_changes(arbiter, "api_key.revoke")
    assert revoked["subject"] == "kim" and revoked["tool"] == key_id


async def test_an_auditor_searches_and_reads_but_has_no_edit_controls(
    arbiter: ArbiterServer, browser: Any, shots: Path
) -> None:
    page = await browser.new_page()
    await login(page, arbiter, make_key(arbiter, "audrey", ["auditor"]))
    nav = await page.get_by_role("navigation", name="Main").inner_text()
    assert "Audit" in nav and "API keys" not in nav and "Upstreams" not in nav
    await shot(page, shots, "auditor-overview")

    await page.get_by_role("link", name="Audit", exact=True).click()
    await page.get_by_label("subject").fill("audrey")
    await page.get_by_label("kind").select_option("admin")
    await page.get_by_role("button", name="Search").click()
    rows = page.locator("table.events tbody tr")
    assert await rows.count() == 1 and "console.login" in await rows.inner_text()
    await shot(page, shots, "auditor-search")
    await rows.locator("a").click()
    assert '"method": "console.login"' in await page.locator("#record").inner_text()
    await shot(page, shots, "auditor-record")
    await page.goto(f"{arbiter.base_url}/console/audit/verify")
    assert "verifies" in await page.locator("#verify-result").inner_text()
    await shot(page, shots, "auditor-verify")

    for path in ["/console", "/console/audit", "/console/audit/verify"]:
        await page.goto(f"{arbiter.base_url}{path}")
        assert await page.locator("form[method=post]").count() == 1  # logging out, nothing else
    for path in ["/console/keys", "/console/upstreams", "/console/upstreams/1"]:
        response = await page.goto(f"{arbiter.base_url}{path}")
        assert response is not None and response.status == 403, path
    csrf = await csrf_of(page)
    forged = [
        ("/console/keys", {"csrf": csrf, "owner": "evil", "roles": "security-admin"}),
        (
            "/console/upstreams/1/definitions/tool/search",
            {"csrf": csrf, "action": "approve", "sha256": "0" * 64},
        ),
    ]
    for path, form in forged:  # a valid session and token: the right is what is missing
        response = await page.request.post(f"{arbiter.base_url}{path}", form=form)
        assert response.status == 403, path
    with arbiter.admin() as admin:
        assert "evil" not in {k["owner"] for k in admin.get("/api-keys").json()}


async def test_a_form_post_without_the_csrf_token_is_refused(arbiter: ArbiterServer, browser: Any) -> None:
    page = await browser.new_page()
    await login(page, arbiter, ADMIN_TOKEN)
    url = f"{arbiter.base_url}/console/keys"
    for form in ({"owner": "no-csrf"}, {"owner": "no-csrf", "csrf": "forged"}):
        response = await page.request.post(url, form=form)
        assert response.status == 403
    ok = await page.request.post(url, form={"owner": "with-csrf", "csrf": await csrf_of(page)})
    assert ok.status == 200  # the same post with the session's token goes through
    with arbiter.admin() as admin:
        owners = {k["owner"] for k in admin.get("/api-keys").json()}
    assert "with-csrf" in owners and "no-csrf" not in owners
    # The login form has its own token (before there is a session): a post without it is refused too.
    async with httpx.AsyncClient(timeout=30) as client:
        bare = await client.post(f"{arbiter.base_url}/console/login", data={"key": ADMIN_TOKEN, "csrf": "x"})
    assert bare.status_code == 403
