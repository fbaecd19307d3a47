"""Regressions from black-box probing (issue 10), each reproduced from outside over real HTTP: admin ids out
of range, errors that cost the connection, disconnects that left upstream calls running, null ids, media
types, bodies that never arrive, idle connections, and hidden tools leaking through header checks."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import anyio
import httpx
import pytest
from mcp.server import MCPServer
from pydantic import Field

from arbiter.proxy.pipeline import CallContext, CallNext, Result
from tests.audit.helpers import Record, wait_for
from tests.conftest import ArbiterFactory, ArbiterServer, serve_in_thread

HANDSHAKE = "2025-11-25"
MODERN = "2026-07-28"
POLICY = "p, role:agent, *, up/slow, call, allow\np, role:regional, *, up/regional, call, allow\n"
ACCEPT = "application/json, text/event-stream"


class SlowUpstream:
    """A real MCP server whose ``slow`` tool records whether it finished or was cancelled.

    It answers over SSE: the SDK cancels a tool when the HTTP request of an SSE answer goes away (it does
    not for JSON answers), which is how an upstream learns that Arbiter abandoned the call.
    """

    def __init__(self) -> None:
        self.events: list[str] = []
        self.lock = threading.Lock()
        server = MCPServer("slow")

        @server.tool()
        async def slow(seconds: float) -> str:
            self._note("start")
            try:
                await anyio.sleep(seconds)
            except anyio.get_cancelled_exc_class():
                self._note("cancelled")
                raise
            self._note("done")
            return "finished"

        @server.tool()
        def regional(region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})]) -> str:
            return f"served from {region}"

        self.app = server.streamable_http_app(stateless_http=True, json_response=False)

    def _note(self, what: str) -> None:
        with self.lock:
            self.events.append(what)

    def wait_for(self, what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while what not in self.events:
            assert time.monotonic() < deadline, f"the upstream never reported {what!r}: {self.events}"
            time.sleep(0.05)


@pytest.fixture
def slow_upstream() -> Iterator[tuple[SlowUpstream, str]]:
    upstream = SlowUpstream()
    with serve_in_thread(upstream.app) as port:
        yield upstream, f"http://127.0.0.1:{port}/mcp"


@pytest.fixture
def make_gateway(
    arbiter_factory: ArbiterFactory, slow_upstream: tuple[SlowUpstream, str]
) -> Callable[..., ArbiterServer]:
    def make(**overrides: Any) -> ArbiterServer:
        server = arbiter_factory(policy=POLICY, **overrides)
        server.register("up", slow_upstream[1])
        return server

    return make


def _mcp_records(server: ArbiterServer, count: int, **match: object) -> list[Record]:
    def matching(records: list[Record]) -> list[Record]:
        return [r for r in records if r["kind"] == "mcp" and all(r.get(k) == v for k, v in match.items())]

    return matching(wait_for(server, lambda records: len(matching(records)) >= count))


def _headers(
    server: ArbiterServer, era: str, method: str | None = None, name: str | None = None
) -> dict[str, str]:
    headers = {**server.auth_headers, "accept": ACCEPT, "content-type": "application/json"}
    headers["mcp-protocol-version"] = era
    if method is not None:
        headers["mcp-method"] = method
    if name is not None:
        headers["mcp-name"] = name
    return headers


def _call_body(tool: str, arguments: dict[str, Any], era: str, request_id: int = 7) -> dict[str, Any]:
    params: dict[str, Any] = {"name": tool, "arguments": arguments}
    if era == MODERN:
        params["_meta"] = {
            "io.modelcontextprotocol/protocolVersion": MODERN,
            "io.modelcontextprotocol/clientInfo": {"name": "probe", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {},
        }
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": params}


def _open_session(http: httpx.Client, server: ArbiterServer) -> dict[str, str]:
    """A handshake-era session: the headers its later requests carry."""
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
    headers = {**server.auth_headers, "accept": ACCEPT, "content-type": "application/json"}
    resp = http.post(server.mcp_url, json=init, headers=headers)
    assert resp.status_code == 200, resp.text
    headers["mcp-protocol-version"] = HANDSHAKE
    headers["mcp-session-id"] = resp.headers["mcp-session-id"]
    done = http.post(
        server.mcp_url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers
    )
    assert done.status_code == 202
    return headers


# --- 3. a client that disconnects cancels its upstream call -------------------------------------------


@pytest.mark.parametrize(
    ("era", "json_response"),
    [(MODERN, True), (HANDSHAKE, True), (HANDSHAKE, False), (MODERN, False)],
    ids=["2026-07-28-json", "handshake-json", "handshake-sse", "2026-07-28-sse"],
)
def test_a_client_disconnect_cancels_the_upstream_call(
    make_gateway: Callable[..., ArbiterServer],
    slow_upstream: tuple[SlowUpstream, str],
    era: str,
    json_response: bool,
) -> None:
    server = make_gateway(mcp={"json_response": json_response})
    upstream, _ = slow_upstream
    with httpx.Client(timeout=30) as http:
        headers = (
            _open_session(http, server)
            if era == HANDSHAKE
            else _headers(server, era, "tools/call", "up__slow")
        )
    body = json.dumps(_call_body("up__slow", {"seconds": 60}, era)).encode()
    # The agent goes away once the upstream has started the tool: its connection closes, which is all a
    # vanished agent does.
    with _raw_post(server, headers, body, len(body)):
        upstream.wait_for("start")
    upstream.wait_for("cancelled")
    assert "done" not in upstream.events
    [record] = _mcp_records(server, 1, method="tools/call")
    assert (record["reason"], record["outcome"]["status"]) == ("cancelled", "cancelled")
    # Arbiter is still serving.
    with httpx.Client(timeout=30) as http:
        headers = _headers(server, MODERN, "tools/call", "up__slow")
        resp = http.post(server.mcp_url, json=_call_body("up__slow", {"seconds": 0}, MODERN), headers=headers)
    assert resp.status_code == 200 and "finished" in resp.text


# --- 4, 5. null ids and media types --------------------------------------------------------------------


def test_a_null_id_is_an_invalid_request_and_audited(make_gateway: Callable[..., ArbiterServer]) -> None:
    server = make_gateway()
    with httpx.Client(timeout=30) as http:
        headers = _open_session(http, server)
        resp = http.post(
            server.mcp_url, json={"jsonrpc": "2.0", "id": None, "method": "tools/list"}, headers=headers
        )
        modern = http.post(
            server.mcp_url,
            json={**_call_body("up__slow", {"seconds": 0}, MODERN), "id": None},
            headers=_headers(server, MODERN, "tools/call", "up__slow"),
        )
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == -32600
    assert (modern.status_code, modern.json()["error"]["code"]) == (400, -32600)
    records = _mcp_records(server, 2, reason="invalid_request")
    assert {r["method"] for r in records} == {"tools/list", "tools/call"}
    assert all(r["decision"] == "deny" and r["actor"]["subject"] == "test-agent" for r in records)


@pytest.mark.parametrize("era", [HANDSHAKE, MODERN])
def test_an_unpaired_surrogate_is_a_parse_error_and_the_gateway_keeps_auditing(
    make_gateway: Callable[..., ArbiterServer], era: str
) -> None:
    # Once a request whose id was "\ud800" was answered, its audit record could not be encoded: the
    # writer died, the app's task group with it, and later calls ran unaudited.
    server = make_gateway()
    with httpx.Client(timeout=30) as http:
        if era == HANDSHAKE:
            headers = _open_session(http, server)
            body = b'{"jsonrpc":"2.0","id":"\\ud800","method":"tools/list"}'
        else:
            headers = _headers(server, MODERN, "tools/call", "up__slow")
            body = json.dumps(_call_body("up__slow", {"seconds": 0}, MODERN)).encode()
            body = body.replace(b'"id": 7', b'"id": "\\ud800"')
            assert b"\\ud800" in body
        resp = http.post(
            server.mcp_url, content=body, headers={**headers, "content-type": "application/json"}
        )
        assert (resp.status_code, resp.json()["error"]["code"]) == (400, -32700), resp.text
        assert "surrogate" in resp.json()["error"]["message"]
        # A paired surrogate (an emoji) is fine, and the gateway is whole.
        fine = http.post(
            server.mcp_url,
            json={**_call_body("up__slow", {"seconds": 0}, MODERN), "id": "\U0001f600"},
            headers=_headers(server, MODERN, "tools/call", "up__slow"),
        )
        assert fine.status_code == 200 and fine.json()["id"] == "\U0001f600", fine.text
    records = _mcp_records(server, 1, reason="parse_error")
    assert records[0]["decision"] == "deny"
    assert server.app.state.runtime.audit.status()["state"] == "ok"


@pytest.mark.parametrize("era", [HANDSHAKE, MODERN])
@pytest.mark.parametrize("content_type", ["text/plain", "application/jsonx", None])
def test_a_wrong_content_type_is_415_and_audited(
    make_gateway: Callable[..., ArbiterServer], era: str, content_type: str | None
) -> None:
    server = make_gateway()
    headers = _headers(server, era, "tools/call", "up__slow")
    del headers["content-type"]
    if content_type is not None:
        headers["content-type"] = content_type
    with httpx.Client(timeout=30) as http:
        resp = http.post(server.mcp_url, content=json.dumps(_call_body("up__slow", {}, era)), headers=headers)
    assert resp.status_code == 415
    assert resp.json()["error"]["code"] == -32600
    [record] = _mcp_records(server, 1, reason="unsupported_media_type")
    assert record["outcome"]["http_status"] == 415 and record["method"] == "tools/call"


# --- 6. bodies: declared too large, or never arriving -------------------------------------------------


def _raw_post(server: ArbiterServer, headers: dict[str, str], body: bytes, declared: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    lines = ["POST /mcp HTTP/1.1", f"Host: 127.0.0.1:{server.port}", f"Content-Length: {declared}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return sock


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


@pytest.mark.parametrize("era", [HANDSHAKE, MODERN])
def test_a_declared_length_over_the_limit_is_refused_at_once(
    make_gateway: Callable[..., ArbiterServer], era: str
) -> None:
    server = make_gateway()
    # 1,000 bytes of a body that claims to be a terabyte: answered without waiting for the rest.
    with _raw_post(server, _headers(server, era), b"x" * 1000, 999_999_999_999) as sock:
        status, headers, body = _read_response(sock)
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(body)["error"]["message"] == f"Request body exceeds {1024 * 1024} bytes"
    _mcp_records(server, 1, reason="payload_too_large")


@pytest.mark.parametrize("era", [HANDSHAKE, MODERN])
def test_a_body_that_never_arrives_times_out(make_gateway: Callable[..., ArbiterServer], era: str) -> None:
    server = make_gateway(mcp={"body_timeout_s": 0.5})
    with _raw_post(server, _headers(server, era), b'{"jsonrpc": ', 500) as sock:
        status, headers, _ = _read_response(sock)  # the socket's own 30 s timeout fails the test instead
    assert status == 408 and headers["connection"] == "close"
    _mcp_records(server, 1, reason="request_timeout")


# --- 7. idle keep-alive connections ---------------------------------------------------------------------


def test_idle_connections_outlive_client_expiry_and_say_so(
    make_gateway: Callable[..., ArbiterServer],
) -> None:
    server = make_gateway()
    assert server.server.config.timeout_keep_alive == 75  # httpx expires its idle connections at 5 s
    with httpx.Client(timeout=30) as http:
        health = http.get(f"{server.base_url}/healthz")
        mcp = http.post(server.mcp_url, json={}, headers=_headers(server, MODERN))
    for resp in (health, mcp):
        assert resp.headers["keep-alive"] == "timeout=60"  # clients that honour it close first


def test_the_idle_timeout_setting_is_what_the_server_applies(
    make_gateway: Callable[..., ArbiterServer],
) -> None:
    server = make_gateway(keep_alive_s=2)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/healthz")
    resp = conn.getresponse()
    resp.read()
    assert resp.getheader("keep-alive") == "timeout=1"
    assert conn.sock is not None
    assert conn.sock.recv(1) == b""  # the server closes the idle connection (before the 30 s timeout)
    conn.close()


# --- 2. admin ids out of range; errors keep the connection usable ---------------------------------------


HUGE = "1180591620717411303424"


def test_admin_ids_out_of_range_are_client_errors_on_a_connection_that_stays_usable(
    make_gateway: Callable[..., ArbiterServer],
) -> None:
    server = make_gateway()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    auth = {"authorization": f"Bearer {server.admin().headers['authorization'].split()[1]}"}
    requests = [
        (method, f"/admin/v1/{path}/{value}")
        for path in ("limits", "budgets", "upstreams")
        for method in ("GET", "DELETE")
        for value in (HUGE, "-1", "0", "2147483648")
    ]
    requests += [("DELETE", f"/admin/v1/tool-costs/{HUGE}"), ("DELETE", f"/admin/v1/policies/{HUGE}")]
    requests += [
        ("GET", f"/admin/v1/upstreams/{HUGE}/catalog"),
        ("POST", f"/admin/v1/upstreams/{HUGE}/refresh"),
    ]
    conn.connect()
    sock = conn.sock
    for method, path in requests:
        conn.request(method, path, headers=auth)
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 422, (method, path, resp.status, body)
        assert resp.getheader("connection") != "close"
    conn.request("GET", "/admin/v1/upstreams", headers=auth)
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())[0]["name"] == "up"
    assert conn.sock is sock  # every answer came on the one connection
    conn.close()


def test_an_internal_error_is_answered_and_the_connection_survives(
    make_gateway: Callable[..., ArbiterServer], caplog: pytest.LogCaptureFixture
) -> None:
    server = make_gateway()

    async def broken() -> None:
        raise RuntimeError("a bug")

    server.app.add_api_route("/admin/v1/broken", broken)  # a real unhandled error in a real route
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.connect()
    sock = conn.sock
    for _ in range(20):
        conn.request("GET", "/admin/v1/broken")
        resp = conn.getresponse()
        assert resp.status == 500
        assert json.loads(resp.read()) == {
            "error": {"code": "internal_error", "message": "Internal error; the server log has details"}
        }
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200
    assert conn.sock is sock
    conn.close()
    assert "a bug" in caplog.text  # logged for the operator, not told to the client


# --- 8. a hidden tool's Mcp-Param headers are not checked ---------------------------------------------


def test_a_hidden_tool_answers_exactly_like_a_missing_one_despite_its_header_parameters(
    make_gateway: Callable[..., ArbiterServer],
) -> None:
    server = make_gateway()
    with server.admin() as admin:
        created = admin.post("/api-keys", json={"owner": "eu-agent", "roles": ["regional"], "tenant": "acme"})
    regional_key = created.json()["key"]

    def call(tool: str, token: str) -> httpx.Response:
        headers = {**_headers(server, MODERN, "tools/call", tool), "authorization": f"Bearer {token}"}
        with httpx.Client(timeout=30) as http:
            return http.post(server.mcp_url, json=_call_body(tool, {"region": "eu"}, MODERN), headers=headers)

    hidden = call("up__regional", server.agent_key)  # no Mcp-Param-Region header, and not visible
    missing = call("up__nosuchtool", server.agent_key)
    assert hidden.status_code == missing.status_code
    assert hidden.content == missing.content.replace(b"up__nosuchtool", b"up__regional")
    assert hidden.json()["error"]["code"] == -32602
    # The caller who may see it is told about the missing header, by the SDK's own check.
    visible = call("up__regional", regional_key)
    assert visible.json()["error"]["code"] == -32020
    assert "Mcp-Param-Region" in visible.json()["error"]["message"]


@pytest.mark.parametrize(
    "message",
    [
        {"jsonrpc": "2.0", "id": False, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 1.5, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": {}, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": [1], "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 0, "method": "tools/call", "params": [], "result": {}},
        {"jsonrpc": "1.0", "id": 1, "method": "tools/list"},
        {"id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "id": 0, "params": {}, "result": {}},  # found by the fuzzer in a clean CI run
        {"jsonrpc": "2.0", "id": 0, "result": {}, "error": {"code": 1, "message": "x"}},
        {"jsonrpc": "2.0", "id": 0},
    ],
    ids=[
        "id-false",
        "id-fraction",
        "id-object",
        "id-list",
        "method-and-result",
        "jsonrpc-1.0",
        "no-jsonrpc",
        "response-with-params",
        "result-and-error",
        "neither",
    ],
)
def test_handshake_messages_that_are_no_valid_request_are_refused_not_dropped(
    make_gateway: Callable[..., ArbiterServer], message: dict[str, Any]
) -> None:
    server = make_gateway()
    with httpx.Client(timeout=30) as http:
        headers = _open_session(http, server)
        resp = http.post(server.mcp_url, json=message, headers=headers)
    assert resp.status_code == 400, resp.text  # not 202 "accepted" and silently dropped
    error = resp.json()["error"]
    assert error["code"] == -32600 and error["message"].startswith("Invalid request: ")
    assert "pydantic" not in error["message"]
    _mcp_records(server, 1, reason="invalid_request")


def test_an_admin_body_that_is_not_valid_json_is_judged_only_after_authentication(
    make_gateway: Callable[..., ArbiterServer],
) -> None:
    server = make_gateway()
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        anonymous = http.post(
            "/admin/v1/upstreams", content=b"{", headers={"content-type": "application/json"}
        )
        not_a_number = http.post(
            "/admin/v1/api-keys",
            content=b'{"owner": NaN}',
            headers={"content-type": "application/json", **server.admin().headers},
        )
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "missing_credentials"
    # Validation errors name the problem without echoing the input (NaN cannot even be serialised).
    assert not_a_number.status_code == 422, not_a_number.text
    error = not_a_number.json()["error"]
    assert error["code"] == "invalid_input" and error["problems"]
    assert all("input" not in problem for problem in error["problems"])
    refused = wait_for(server, lambda r: any(x["kind"] == "auth" for x in r))
    assert [x["method"] for x in refused if x["kind"] == "auth"] == ["POST /admin/v1/upstreams"]


def test_a_trailing_slash_is_not_redirected_before_authentication(
    make_gateway: Callable[..., ArbiterServer],
) -> None:
    server = make_gateway()
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        resp = http.get("/admin/v1/upstreams/")
        known = http.get("/admin/v1/upstreams/", headers=server.admin().headers)
    # Found by hypothesis: a 307 answered an unauthenticated request. Now nothing is judged, not even
    # whether the path exists, before the caller is authenticated (tests/admin/test_api_contract.py).
    assert resp.status_code == 401, resp.text
    assert known.status_code == 404 and known.json()["error"]["code"] == "not_found"


class HoldFirstCall:
    """An interceptor (after limits, before forward) that holds the first call until it is cancelled, as a
    slow connect or token fetch would: the request is admitted and charged but not yet sent."""

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.cancelled = threading.Event()

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        if not self.holding.is_set():
            self.holding.set()
            try:
                await anyio.sleep_forever()
            finally:
                self.cancelled.set()
        return await call_next(ctx)


def test_a_call_cancelled_before_it_was_sent_is_not_charged_and_can_be_retried(
    make_gateway: Callable[..., ArbiterServer],
) -> None:
    hold = HoldFirstCall()
    server = make_gateway(interceptors=[hold])
    with server.admin() as admin:  # one unit a call, a budget of one: a kept charge would refuse the retry
        assert admin.post("/budgets", json={"period": "day", "limit": 1}).status_code == 201
    call = _call_body("up__slow", {"seconds": 0}, MODERN)
    call["params"]["_meta"]["arbiter/idempotency-key"] = "retry-me"
    body = json.dumps(call).encode()
    headers = _headers(server, MODERN, "tools/call", "up__slow")
    with _raw_post(server, headers, body, len(body)):
        assert hold.holding.wait(30)
    assert hold.cancelled.wait(30)
    [record] = _mcp_records(server, 1, reason="cancelled")
    assert record["cost"] == 0.0
    with httpx.Client(timeout=30) as http:  # the same request again: neither a duplicate nor over budget
        retry = http.post(server.mcp_url, content=body, headers=headers)
    assert retry.status_code == 200 and "finished" in retry.text, retry.text
