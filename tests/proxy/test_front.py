"""The direct 2026-07-28 path (proxy/front.py) answers as the SDK's server transport would.

The same row of good and bad 2026-07-28 requests is sent with ``mcp.direct_path`` on (the default: the
pipeline's methods answered without the SDK's transport) and off (everything through the SDK); every
status, content type and body must be the same.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from arbiter.proxy.front import ModernFront
from tests.conftest import ArbiterFactory, ArbiterServer
from tests.proxy.test_handshake_front import Gate, gate  # noqa: F401 - the fixture

MODERN = "2026-07-28"
ACCEPT = "application/json, text/event-stream"
META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}


def _answers(arbiter: ArbiterServer) -> list[tuple[int, str | None, Any]]:
    """What an agent gets for a row of 2026-07-28 requests, good and bad, as (status, type, body)."""
    http = httpx.Client(
        base_url=arbiter.base_url, headers={"authorization": f"Bearer {arbiter.agent_key}"}, timeout=60
    )
    next_id = 0

    def send(
        method: str, params: dict[str, Any] | None, *, meta: bool = True, **headers: str | None
    ) -> httpx.Response:
        nonlocal next_id
        next_id += 1
        body: dict[str, Any] = {"jsonrpc": "2.0", "id": next_id, "method": method}
        if params is not None or meta:
            body["params"] = {**(params or {}), **({"_meta": META} if meta else {})}
        name = (params or {}).get("name")
        sent: dict[str, str | None] = {
            "accept": ACCEPT,
            "content-type": "application/json",
            "mcp-protocol-version": MODERN,
            "mcp-method": method,
            "mcp-name": name if isinstance(name, str) else None,
        }
        sent.update({k.replace("_", "-"): v for k, v in headers.items()})
        return http.post("/mcp", json=body, headers={k: v for k, v in sent.items() if v is not None})

    echo = {"name": "up__echo", "arguments": {"text": "hi"}}
    try:
        responses = [
            send("tools/call", echo),
            send("tools/list", None),
            send("tools/call", {"name": "up__echo", "arguments": "not an object"}),
            send("tools/call", {"name": "up__missing", "arguments": {}}),
            send("tools/call", {"name": "up__echo"}),
            send("tools/call", {"arguments": {}}),
            send("tools/call", echo, accept="text/plain"),
            send("tools/call", echo, content_type="text/plain"),
            send("tools/call", echo, mcp_name="up__wait"),  # the header disagrees with the body
            send("tools/call", echo, mcp_method="tools/list"),
            send("tools/call", echo, mcp_method=None),
            send("tools/call", echo, mcp_protocol_version="2099-01-01"),
            send("tools/call", echo, meta=False),  # no _meta: no version, client info or capabilities
            send("ping", None),
        ]
    finally:
        http.close()
    return [
        (r.status_code, r.headers.get("content-type"), r.json() if r.content else None) for r in responses
    ]


def test_the_agent_cannot_tell_the_direct_2026_07_28_path_from_the_sdks(
    arbiter_factory: ArbiterFactory,
    gate: Gate,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    answered: list[str] = []  # what the direct path answered itself (the rest went to the SDK)
    direct_call = ModernFront.__call__

    async def counted(self: ModernFront, *args: Any) -> None:
        answered.append(args[3]["method"])  # (request, receive, send, message, exchange)
        await direct_call(self, *args)

    monkeypatch.setattr(ModernFront, "__call__", counted)
    seen: dict[bool, list[tuple[int, str | None, Any]]] = {}
    served: dict[bool, list[str]] = {}
    for direct in (False, True):
        arbiter = arbiter_factory(mcp={"direct_path": direct})  # the second finds the upstream stored
        if not direct:
            arbiter.register("up", gate.url)
        seen[direct] = _answers(arbiter)
        served[direct], answered[:] = list(answered), []
    assert served[False] == []  # everything went through the SDK's transport
    assert served[True][:2] == ["tools/call", "tools/list"], served  # the direct path answered these
    assert seen[True] == seen[False]
    call, listed = seen[True][0][2], seen[True][1][2]
    assert seen[True][0][0] == 200
    assert call["result"]["content"] == [{"type": "text", "text": "echo: hi"}]
    assert call["result"]["resultType"] == "complete"  # shaped for 2026-07-28
    assert [t["name"] for t in listed["result"]["tools"]] == ["up__echo", "up__wait"]
    statuses = [status for status, _, _ in seen[True]]
    assert statuses == [200, 200, 400, 400, 200, 400, 406, 415, 400, 400, 400, 400, 400, 404]
    codes = [body["error"]["code"] for _, _, body in seen[True][8:12]]
    assert codes == [-32020] * 4  # a header that disagrees with the body, or missing, in either order
