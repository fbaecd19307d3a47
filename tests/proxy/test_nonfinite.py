"""NaN, Infinity, -Infinity and numbers too large for a double in a /mcp body are parse errors.

JSON (RFC 8259) has none of them, but Python's json and the SDK's parser read them. Once, a body orjson
refused for holding one took the SDK's path: a condition such as ``r.args.amount > 100`` was false for
NaN (an approve rule did not match, an allow rule let the call through) and the upstream got ``null``.
Each case runs over real HTTP in both protocol eras, on Arbiter's direct path and on the SDK's.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mcp.server import MCPServer

from tests.audit.helpers import Record, verify, wait_for
from tests.conftest import ArbiterFactory, ArbiterServer, serve_in_thread

HANDSHAKE = "2025-11-25"
MODERN = "2026-07-28"
ACCEPT = "application/json, text/event-stream"
POLICY = "p, *, *, *, call, allow\np, role:agent, *, wire/pay, call, approve, r.args.amount > 100\n"
NON_FINITE = [
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e400",
    b"-1E+400",
    b"1" + b"0" * 400 + b".5",
    b"1" + b"0" * 250 + b"e60",
]
META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientInfo": {"name": "probe", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}


@pytest.fixture(scope="module")
def wire() -> Iterator[tuple[str, list[Any]]]:
    """A real upstream whose ``pay`` tool records every amount it is called with."""
    server = MCPServer("wire")
    paid: list[Any] = []
    lock = threading.Lock()

    @server.tool()
    def pay(amount: float | None = None) -> str:
        with lock:
            paid.append(amount)
        return "paid"

    with serve_in_thread(server.streamable_http_app(json_response=True, stateless_http=True)) as port:
        yield f"http://127.0.0.1:{port}/mcp", paid


def _body(era: str, amount: bytes) -> bytes:
    params: dict[str, Any] = {"name": "wire__pay", "arguments": {"amount": "AMOUNT"}}
    if era == MODERN:
        params["_meta"] = META
    body = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params}).encode()
    return body.replace(b'"AMOUNT"', amount)


def _headers(http: httpx.Client, server: ArbiterServer, era: str) -> dict[str, str]:
    headers = {**server.auth_headers, "accept": ACCEPT, "content-type": "application/json"}
    if era == HANDSHAKE:
        init = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": HANDSHAKE,
                "capabilities": {},
                "clientInfo": {"name": "p", "version": "1"},
            },
        }
        resp = http.post(server.mcp_url, json=init, headers=headers)
        assert resp.status_code == 200, resp.text
        headers["mcp-session-id"] = resp.headers["mcp-session-id"]
        done = http.post(
            server.mcp_url,
            json={"jsonrpc": "2.0", "method": "notifications/initialized"},
            headers={**headers, "mcp-protocol-version": HANDSHAKE},
        )
        assert done.status_code == 202
    return {**headers, "mcp-protocol-version": era, "mcp-method": "tools/call", "mcp-name": "wire__pay"}


@pytest.mark.parametrize(
    ("era", "mcp"),
    [
        (MODERN, {"json_response": True}),  # Arbiter's direct path
        (MODERN, {"json_response": False}),  # the SDK's transport
        (HANDSHAKE, {"direct_path": True}),
        (HANDSHAKE, {"direct_path": False}),
    ],
    ids=["modern-direct", "modern-sdk", "handshake-direct", "handshake-sdk"],
)
def test_a_non_finite_number_is_a_parse_error_and_never_reaches_upstream(
    arbiter_factory: ArbiterFactory, wire: tuple[str, list[Any]], era: str, mcp: dict[str, Any]
) -> None:
    url, paid = wire
    server = arbiter_factory(policy=POLICY, mcp=mcp)
    server.register("wire", url)
    paid.clear()
    with httpx.Client(timeout=30) as http:
        headers = _headers(http, server, era)
        garbage = http.post(server.mcp_url, content=b"{", headers=headers)
        assert garbage.status_code == 400, garbage.text
        for amount in NON_FINITE:
            resp = http.post(server.mcp_url, content=_body(era, amount), headers=headers)
            # As the transport answers any invalid JSON: the same status, headers and body shape.
            assert resp.status_code == 400, (amount, resp.text)
            assert resp.headers["content-type"] == garbage.headers["content-type"]
            answer = resp.json()
            assert answer.keys() == garbage.json().keys() and answer["id"] is None
            assert answer["error"]["code"] == garbage.json()["error"]["code"] == -32700, (amount, answer)
        # Numbers orjson cannot read for other reasons (beyond 64 bits) still work, as do plain ones.
        big = http.post(
            server.mcp_url, content=_body(era, b"123456789012345678901234567890"), headers=headers
        )
        assert big.status_code == 200 and "error" not in big.json(), big.text
        small = http.post(server.mcp_url, content=_body(era, b"5.5"), headers=headers)
        assert small.status_code == 200 and small.json()["result"]["content"][0]["text"] == "paid", small.text
    assert paid == [5.5]  # the big amount needs approval (> 100); no non-finite one arrived at all

    def refused(records: list[Record]) -> list[Record]:
        return [r for r in records if r["kind"] == "mcp" and r.get("reason") == "parse_error"]

    records = refused(wait_for(server, lambda rs: len(refused(rs)) >= len(NON_FINITE) + 1))
    assert all(r["decision"] == "deny" for r in records)
    assert server.app.state.runtime.audit.status()["state"] == "ok"
    assert verify(server.settings.database_url).ok
