"""An operator-defined stdio upstream next to a streamable HTTP one."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import ArbiterFactory, UpstreamProc, wait_listening


async def test_stdio_and_http_upstreams_side_by_side(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc
) -> None:
    server = arbiter_factory(
        upstreams=[
            {
                "name": "crm",
                "transport": "stdio",
                "command": [sys.executable, "-m", "arbiter.demo.crm", "--transport", "stdio"],
            }
        ]
    )
    server.register("kb", kb_upstream.url)
    with server.admin() as admin:
        listed = {u["name"]: u for u in admin.get("/upstreams").json()}
        assert listed["crm"]["source"] == "config"
        assert listed["crm"]["transport"] == "stdio"
        # Operator-defined upstreams cannot be changed through the API.
        assert admin.patch(f"/upstreams/{listed['crm']['id']}", json={"enabled": False}).status_code == 409
        assert admin.delete(f"/upstreams/{listed['crm']['id']}").status_code == 409
        # Its catalog is discovered on demand.
        refreshed = admin.post(f"/upstreams/{listed['crm']['id']}/refresh")
        assert refreshed.status_code == 200, refreshed.text
        assert refreshed.json()["catalog"]["tools"] == 4
    for mode in ("legacy", "2026-07-28"):
        async with server.client(mode) as client:  # pyright: ignore[reportArgumentType]
            names = {t.name for t in (await client.list_tools()).tools}
            assert {"crm__get_customer", "kb__search_docs"} <= names
            via_stdio = await client.call_tool(
                "crm__list_tickets", {"customer_id": "C-1001", "status": "open"}
            )
            assert via_stdio.structured_content is not None
            assert [t["ticket_id"] for t in via_stdio.structured_content["tickets"]] == [501]
            via_http = await client.call_tool("kb__get_doc", {"doc_id": "data-export"})
            assert "Exporting customer data" in getattr(via_http.content[0], "text", "")


@pytest.fixture
def sse_upstream() -> Iterator[UpstreamProc]:
    """The demo CRM served over the older HTTP+SSE transport."""
    up = UpstreamProc("arbiter.demo.crm")
    up.proc = subprocess.Popen(
        [sys.executable, "-m", "arbiter.demo.crm", "--transport", "sse", "--port", str(up.port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_listening(up.port, up.proc)
    yield up
    up.kill()


async def test_sse_upstream(arbiter_factory: ArbiterFactory, sse_upstream: UpstreamProc) -> None:
    server = arbiter_factory()
    created = server.register("legacy-crm", f"http://127.0.0.1:{sse_upstream.port}/sse", transport="sse")
    assert created["catalog"]["tools"] == 4
    async with server.client() as client:
        result = await client.call_tool("legacy-crm__get_customer", {"customer_id": "C-1002"})
        assert result.structured_content is not None
        assert result.structured_content["name"] == "Globex Retail"
