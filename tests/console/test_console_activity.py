"""The overview's activity charts and the audit export, in a real browser against a real Arbiter with
the demo upstreams: the numbers come from real calls through ``/mcp``, the downloads are parsed."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from arbiter.audit.activity import percentile
from arbiter.audit.bundle import verify_bundle
from tests.audit.helpers import wait_for
from tests.conftest import ALLOW_ALL, ArbiterFactory, ArbiterServer, UpstreamProc
from tests.console.conftest import make_key
from tests.console.test_console import login, shot
from tests.console.test_console_policies import calls, recorded_calls


async def denied_call(server: ArbiterServer, tool: str) -> None:
    async with server.client() as client:
        with pytest.raises(Exception):  # noqa: B017  (an unknown tool: refused, recorded as a denial)
            await client.session.call_tool(tool, {})


def calls_recorded(server: ArbiterServer, count: int) -> list[dict[str, Any]]:
    def mine(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in records if r.get("method") == "tools/call"]

    return mine(wait_for(server, lambda rs: len(mine(rs)) >= count))


async def cell(row: Any, css: str) -> str:
    text: str = await row.locator(css).inner_text()
    return text.strip()


async def test_the_overview_charts_count_real_calls_per_tool_and_upstream(
    arbiter: ArbiterServer, browser: Any, shots: Path
) -> None:
    page = await browser.new_page()
    await login(page, arbiter, make_key(arbiter, "olga", ["security-admin"]))
    assert "No tool calls in the last 24h" in await page.locator("#activity-empty").inner_text()
    await shot(page, shots, "overview-empty")

    await calls(arbiter, arbiter.agent_key, "kb__search_docs", 3)
    await denied_call(arbiter, "kb__no_such_tool")
    recorded = calls_recorded(arbiter, 4)
    latencies = sorted(r["latency_ms"] for r in recorded)

    await page.goto(f"{arbiter.base_url}/console")
    assert await page.locator("#total-calls").inner_text() == "4"
    assert await page.locator("#total-denials").inner_text() == "1"
    assert await page.locator("#total-errors").inner_text() == "0"
    # p95 of four calls is the slowest; latencies are binned to the whole ms below 100 ms.
    slowest = latencies[-1]
    expected = percentile([(float(int(slowest)), 1)], 0.95) if slowest < 100 else None
    if expected is not None:
        assert await page.locator("#total-p95").inner_text() == f"{expected:g} ms"
    tool = page.locator("#tool-activity tr[data-name='kb__search_docs']")
    assert await cell(tool, ".n") == "3" and await cell(tool, ".denials") == "0"
    unknown = page.locator("#tool-activity tr[data-name='kb__no_such_tool']")
    assert await cell(unknown, ".n") == "1" and await cell(unknown, ".denials") == "1"
    assert await cell(page.locator("#upstream-activity tbody tr").first, ".n") in ("3", "4")
    # The chart: one column per hour, this hour's with the answered and denied parts.
    chart = page.locator("#calls-chart")
    assert await chart.get_attribute("role") == "img"
    assert "Calls per 60 minutes" in (await chart.locator("title").first.text_content() or "")
    assert await chart.locator("rect.bar-ok").count() == 1
    assert await chart.locator("rect.bar-deny").count() == 1
    assert await page.locator("#latency-chart polyline").count() == 2
    assert await page.locator("#latency-chart circle").count() == 2  # one hour with calls: a dot per line
    # The same numbers as a table (the charts' accessible alternative): the last hour has the calls.
    await page.get_by_text("The charts as a table").click()
    rows = page.locator("#activity-table tbody tr")
    assert await rows.count() == 24
    assert (await rows.last.locator("td").all_inner_texts())[1:4] == ["4", "1", "0"]
    await shot(page, shots, "overview-charts")

    await page.get_by_role("link", name="Last 1h").click()
    assert await page.locator("#activity-table tbody tr").count() == 12
    assert await page.locator("#total-calls").inner_text() == "4"
    await shot(page, shots, "overview-charts-1h")


async def test_an_auditor_exports_the_search_as_jsonl_csv_and_a_verifiable_bundle(
    arbiter: ArbiterServer, browser: Any, shots: Path, tmp_path: Path
) -> None:
    await calls(arbiter, arbiter.agent_key, "kb__search_docs", 2)
    await denied_call(arbiter, "kb__no_such_tool")
    recorded_calls(arbiter, "test-agent", "kb__search_docs", 2)
    calls_recorded(arbiter, 3)

    page = await browser.new_page()
    await login(page, arbiter, make_key(arbiter, "audrey", ["auditor"]))
    await page.goto(f"{arbiter.base_url}/console/audit")
    await page.get_by_label("tool").fill("kb__search_docs")
    await page.get_by_label("decision").select_option("allow")
    await page.get_by_label("kind").select_option("mcp")
    await page.get_by_role("button", name="Search").click()
    found = await page.locator("table.events tbody tr").all_inner_texts()
    assert len(found) == 2, found
    await shot(page, shots, "audit-export")

    async with page.expect_download() as jsonl_info:
        await page.locator("#export-jsonl").click()
    jsonl = tmp_path / "export.jsonl"
    await (await jsonl_info.value).save_as(jsonl)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == 2
    assert {(r["tool"], r["decision"], r["kind"]) for r in records} == {("kb__search_docs", "allow", "mcp")}
    assert records[0]["seq"] < records[1]["seq"] and all(len(r["hash"]) == 64 for r in records)

    async with page.expect_download() as csv_info:
        await page.locator("#export-csv").click()
    exported = tmp_path / "export.csv"
    await (await csv_info.value).save_as(exported)
    rows = list(csv.DictReader(exported.read_text().splitlines()))
    assert [(r["tool"], r["decision"]) for r in rows] == [("kb__search_docs", "allow")] * 2
    assert [int(r["seq"]) for r in rows] == [r["seq"] for r in records]

    async with page.expect_download() as bundle_info:
        await page.locator("#export-bundle").click()
    download = await bundle_info.value
    assert download.suggested_filename.endswith(".bundle.jsonl")
    saved = tmp_path / download.suggested_filename
    await download.save_as(saved)
    report = verify_bundle(saved)
    assert report.ok and report.records >= 3

    # A range of the chain: from the first exported record to the second.
    first, second = records[0]["seq"], records[1]["seq"]
    ranged = await page.request.get(
        f"{arbiter.base_url}/console/audit/export?format=bundle&from_seq={first}&to_seq={second}"
    )
    assert ranged.status == 200
    lines = [json.loads(x) for x in (await ranged.text()).splitlines()]
    assert lines[0]["from_seq"] == first and lines[0]["to_seq"] == second
    bad = await page.request.get(f"{arbiter.base_url}/console/audit/export?format=xml")
    assert bad.status == 422  # InvalidInput, as on the admin API


async def test_who_may_not_read_the_audit_log_has_no_export_and_no_charts(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc, browser: Any, shots: Path
) -> None:
    reader_rule = "p, role:policy-reader, *, admin/policies, admin:read, allow\n"
    server = arbiter_factory(policy=ALLOW_ALL + reader_rule)
    server.register("kb", kb_upstream.url)
    await calls(server, server.agent_key, "kb__search_docs", 1)
    page = await browser.new_page()
    await login(page, server, make_key(server, "paul", ["policy-reader"]))
    assert await page.locator("#activity").count() == 0
    assert await page.locator("a[href*='/audit']").count() == 0
    await shot(page, shots, "no-audit-overview")
    for query in ("format=jsonl", "format=csv&tool=kb__search_docs", "format=bundle"):
        response = await page.request.get(f"{server.base_url}/console/audit/export?{query}")
        assert response.status == 403, query
        assert "attachment" not in response.headers.get("content-disposition", "")
    # The refusals are audited, as every console refusal is.
    wait_for(server, lambda rs: sum(1 for r in rs if "/console/audit/export" in json.dumps(r)) >= 3)
