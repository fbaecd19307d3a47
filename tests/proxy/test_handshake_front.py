"""The direct path for handshake-era requests (proxy/handshake_front.py): it answers as the SDK's session
transport does, cancels on the agent's word, keeps the session's idle countdown, and leaves to the SDK
every request it does not take.

Raw HTTP against Arbiter in front of a real upstream, with the direct path on and off: what the agent
sees must not tell them apart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
from mcp.server import MCPServer
from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp_types.version import LATEST_HANDSHAKE_VERSION

from arbiter.proxy.handshake_front import held
from tests.audit.helpers import of_kind, wait_for
from tests.conftest import ArbiterFactory, ArbiterServer, serve_in_thread
from tests.proxy.test_resilience import HandshakeOnly

VERSION = LATEST_HANDSHAKE_VERSION
ACCEPT = "application/json, text/event-stream"


@dataclass
class Gate:
    """The upstream's ``wait`` tool holds until the test opens the gate (or the call is cancelled)."""

    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)
    open: bool = False
    waiting: int = 0
    cancelled: int = 0

    def until(self, what: str, predicate: Any, within_s: float = 30.0) -> None:
        deadline = time.monotonic() + within_s
        while True:
            with self.lock:
                if predicate(self):
                    return
            assert time.monotonic() < deadline, f"the upstream never got to: {what}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def gate() -> Iterator[Gate]:
    state = Gate()
    server = MCPServer("gated")

    @server.tool()
    async def echo(text: str) -> str:
        return f"echo: {text}"

    @server.tool()
    async def wait() -> str:
        with state.lock:
            state.waiting += 1
        try:
            for _ in range(6000):  # at most a minute: a test that fails never holds the thread for good
                with state.lock:
                    if state.open:
                        return "opened"
                await anyio.sleep(0.01)
        except anyio.get_cancelled_exc_class():
            with state.lock:
                state.cancelled += 1
            raise
        return "never opened"

    # Handshake era upstream: it acts on notifications/cancelled (a 2026-07-28 one in JSON mode does not).
    with serve_in_thread(HandshakeOnly(server.streamable_http_app(json_response=True))) as port:
        state.url = f"http://127.0.0.1:{port}/mcp"
        yield state


class Agent:
    """A handshake-era agent speaking raw HTTP: one session, requests numbered from 1."""

    def __init__(self, arbiter: ArbiterServer, key: str | None = None) -> None:
        self.http = httpx.Client(
            base_url=arbiter.base_url,
            headers={"authorization": f"Bearer {key or arbiter.agent_key}"},
            timeout=60,
        )
        self.sid = ""
        self.next_id = 0

    def open(self, *, initialized: bool = True) -> Agent:
        resp = self.post(
            {
                "jsonrpc": "2.0",
                "id": 0,
                "method": "initialize",
                "params": {
                    "protocolVersion": VERSION,
                    "capabilities": {},
                    "clientInfo": {"name": "raw", "version": "1"},
                },
            }
        )
        assert resp.status_code == 200, resp.text
        self.sid = resp.headers["mcp-session-id"]
        if initialized:
            note = self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
            assert note.status_code == 202, note.text
        return self

    def post(self, message: dict[str, Any], **headers: str) -> httpx.Response:
        sent = {"accept": ACCEPT, "content-type": "application/json", "mcp-protocol-version": VERSION}
        if self.sid:
            sent["mcp-session-id"] = self.sid
        sent.update({k.replace("_", "-"): v for k, v in headers.items()})
        return self.http.post("/mcp", json=message, headers=sent)

    def request(self, method: str, params: dict[str, Any] | None, **headers: str) -> httpx.Response:
        self.next_id += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
        if params is not None:
            message["params"] = params
        return self.post(message, **headers)

    def close(self) -> None:
        self.http.close()


def _answers(arbiter: ArbiterServer, other_key: str) -> list[tuple[int, str | None, Any]]:
    """What one agent's session gets for a row of requests, good and bad, as (status, type, body)."""
    agent = Agent(arbiter).open()
    early = Agent(arbiter).open(initialized=False)
    intruder = Agent(arbiter, other_key)
    intruder.sid = agent.sid  # a session id that is not theirs
    try:
        responses = [
            agent.request("tools/call", {"name": "up__echo", "arguments": {"text": "hi"}}),
            agent.request("tools/list", None),
            agent.request("tools/call", {"name": "up__echo", "arguments": "not an object"}),
            agent.request("tools/call", {"name": "up__missing", "arguments": {}}),
            agent.request("tools/call", {"name": "up__echo"}),
            agent.request("tools/call", {"arguments": {}}),
            agent.request("tools/call", {"name": "up__echo", "arguments": {"text": 1}}, accept="text/plain"),
            agent.request("tools/call", {"name": "up__echo", "arguments": {}}, content_type="text/plain"),
            agent.request("ping", None),
            early.request("tools/call", {"name": "up__echo", "arguments": {"text": "early"}}),
            intruder.request("tools/call", {"name": "up__echo", "arguments": {"text": "not mine"}}),
        ]
    finally:
        for each in (agent, early, intruder):
            each.close()
    return [
        (r.status_code, r.headers.get("content-type"), r.json() if r.content else None) for r in responses
    ]


def _new_key(arbiter: ArbiterServer) -> str:
    with arbiter.admin() as admin:
        resp = admin.post("/api-keys", json={"owner": "other-agent", "roles": ["agent"], "tenant": "acme"})
    assert resp.status_code == 201, resp.text
    key: str = resp.json()["key"]
    return key


def test_the_agent_cannot_tell_the_direct_path_from_the_sdks(
    arbiter_factory: ArbiterFactory, gate: Gate
) -> None:
    seen: dict[bool, list[tuple[int, str | None, Any]]] = {}
    for direct in (False, True):
        arbiter = arbiter_factory(
            mcp={"direct_path": direct}
        )  # the second finds the upstream in the database
        if not direct:
            arbiter.register("up", gate.url)
        seen[direct] = _answers(arbiter, _new_key(arbiter))
    assert seen[True] == seen[False]
    statuses = [status for status, _, _ in seen[True]]
    assert statuses == [200, 200, 200, 200, 200, 200, 406, 415, 200, 200, 404]  # what the SDK answers
    call, listed = seen[True][0][2], seen[True][1][2]
    assert call["result"]["content"] == [{"type": "text", "text": "echo: hi"}]
    assert "resultType" not in call["result"]  # shaped for the handshake era, as the SDK shapes it
    assert [t["name"] for t in listed["result"]["tools"]] == ["up__echo", "up__wait"]


def test_a_cancelled_call_is_cancelled_upstream_and_answered_as_the_sdk_does(
    arbiter_factory: ArbiterFactory, gate: Gate
) -> None:
    arbiter = arbiter_factory()
    arbiter.register("up", gate.url)
    agent = Agent(arbiter).open()
    answered: list[httpx.Response] = []
    with gate.lock:
        waiting, cancelled = gate.waiting, gate.cancelled
    caller = threading.Thread(
        target=lambda: answered.append(agent.request("tools/call", {"name": "up__wait"}))
    )
    caller.start()
    try:
        gate.until("the call", lambda g: g.waiting > waiting)
        cancel = {"requestId": agent.next_id, "reason": "the user moved on"}
        note = agent.post({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": cancel})
        assert note.status_code == 202
        gate.until("the upstream's cancellation", lambda g: g.cancelled > cancelled)
    finally:
        caller.join(timeout=60)
        agent.close()
    (resp,) = answered
    assert resp.status_code == 200
    assert resp.json()["error"] == {"code": -32800, "message": "Request cancelled"}

    def calls(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in of_kind(records, "mcp") if r["method"] == "tools/call"]

    (record,) = calls(wait_for(arbiter, lambda rs: len(calls(rs)) >= 1))
    assert record["outcome"]["status"] == "cancelled"


def test_another_callers_cancel_does_nothing(arbiter_factory: ArbiterFactory, gate: Gate) -> None:
    arbiter = arbiter_factory()
    arbiter.register("up", gate.url)
    agent = Agent(arbiter).open()
    intruder = Agent(arbiter, _new_key(arbiter))
    intruder.sid = agent.sid
    answered: list[httpx.Response] = []
    with gate.lock:
        waiting = gate.waiting
        gate.open = False
    caller = threading.Thread(
        target=lambda: answered.append(agent.request("tools/call", {"name": "up__wait"}))
    )
    caller.start()
    try:
        gate.until("the call", lambda g: g.waiting > waiting)
        cancel = {"requestId": agent.next_id}
        refused = intruder.post({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": cancel})
        assert refused.status_code == 404  # the SDK's answer to a session that is not theirs
        with gate.lock:
            gate.open = True
    finally:
        caller.join(timeout=60)
        with gate.lock:
            gate.open = False
        agent.close()
        intruder.close()
    (resp,) = answered
    assert resp.json()["result"]["content"] == [{"type": "text", "text": "opened"}]


def _sessions_held(arbiter: ArbiterServer) -> dict[str, StreamableHTTPServerTransport]:
    manager: Any = arbiter.app.mcp_endpoint._manager  # pyright: ignore[reportPrivateUsage, reportAttributeAccessIssue]
    held_now: dict[str, StreamableHTTPServerTransport] = manager._server_instances
    return held_now


def test_a_call_answered_directly_holds_its_session_open_and_idleness_still_ends_it(
    arbiter_factory: ArbiterFactory, gate: Gate
) -> None:
    idle_s = 1.0
    arbiter = arbiter_factory(mcp={"session_idle_timeout_s": idle_s})
    arbiter.register("up", gate.url)
    agent = Agent(arbiter).open()  # no GET stream: only requests hold the session
    answered: list[httpx.Response] = []
    with gate.lock:
        waiting = gate.waiting
        gate.open = False
    caller = threading.Thread(
        target=lambda: answered.append(agent.request("tools/call", {"name": "up__wait"}))
    )
    caller.start()
    try:
        gate.until("the call", lambda g: g.waiting > waiting)
        # Longer than the idle timeout, with only the direct call in flight: the session must stay.
        until = time.monotonic() + 3 * idle_s
        while time.monotonic() < until:
            time.sleep(0.05)
        assert agent.sid in _sessions_held(arbiter)
        with gate.lock:
            gate.open = True
        caller.join(timeout=60)
    finally:
        with gate.lock:
            gate.open = True
        caller.join(timeout=60)
        with gate.lock:
            gate.open = False
    (resp,) = answered
    assert resp.json()["result"]["content"] == [{"type": "text", "text": "opened"}]
    # With nothing in flight the countdown runs again and ends the session.
    deadline = time.monotonic() + 60
    while agent.sid in _sessions_held(arbiter):
        assert time.monotonic() < deadline, "the idle session was never ended"
        time.sleep(0.05)
    gone = agent.request("tools/call", {"name": "up__echo", "arguments": {"text": "late"}})
    assert gone.status_code == 404
    agent.close()


async def test_held_suspends_the_sdks_idle_countdown_and_restarts_it() -> None:
    """What ``held`` relies on in the SDK's transport: its idle scope, timeout and in-flight count."""
    transport = StreamableHTTPServerTransport(mcp_session_id="s1", idle_timeout=5.0)
    async with transport.connect():
        scope = transport.idle_scope
        assert scope is not None
        with held(transport):
            assert scope.deadline == float("inf")
            with held(transport):
                pass
            assert scope.deadline == float("inf")  # another call still in flight
        assert scope.deadline <= anyio.current_time() + 5.0
        assert transport._requests_in_flight == 0  # pyright: ignore[reportPrivateUsage]
        await transport.terminate()


def test_a_session_that_ended_is_forgotten(arbiter_factory: ArbiterFactory, gate: Gate) -> None:
    arbiter = arbiter_factory()
    arbiter.register("up", gate.url)
    agent = Agent(arbiter).open()
    first = agent.request("tools/call", {"name": "up__echo", "arguments": {"text": "one"}})
    assert first.json()["result"]["content"] == [{"type": "text", "text": "echo: one"}]
    sessions: Any = arbiter.app.mcp_endpoint._handshake._sessions  # pyright: ignore[reportAttributeAccessIssue]
    assert len(sessions) == 1
    ended = agent.http.delete("/mcp", headers={"mcp-session-id": agent.sid, "mcp-protocol-version": VERSION})
    assert ended.status_code == 200
    deadline = time.monotonic() + 30
    while len(sessions):
        assert time.monotonic() < deadline, "the ended session was kept"
        time.sleep(0.02)
    after = agent.request("tools/call", {"name": "up__echo", "arguments": {"text": "two"}})
    assert after.status_code == 404
    agent.close()


# --- Review of the direct path: more of what an agent may send, each compared with the SDK's answer.


def _seen(r: httpx.Response) -> tuple[int, str | None, bool, Any]:
    """What the agent sees of one answer: status, media type, whether it names the session, body."""
    body = r.json() if r.content else None
    return (r.status_code, r.headers.get("content-type"), "mcp-session-id" in r.headers, body)


def _raw(agent: Agent, body: bytes, **headers: str) -> httpx.Response:
    sent = {"accept": ACCEPT, "content-type": "application/json", "mcp-protocol-version": VERSION}
    sent["mcp-session-id"] = agent.sid
    sent.update({k.replace("_", "-"): v for k, v in headers.items()})
    return agent.http.post("/mcp", content=body, headers=sent)


def _odd_answers(arbiter: ArbiterServer) -> list[tuple[int, str | None, bool, Any]]:
    agent = Agent(arbiter).open()
    echo = {"name": "up__echo", "arguments": {"text": "hi"}}
    try:
        responses = [
            agent.request("tools/call", echo),
            _raw(agent, b'{"jsonrpc":"2.0","id":"s-1","method":"tools/call","params":null}'),
            _raw(agent, b'{"jsonrpc":"2.0","id":3,"method":"tools/call"}'),
            _raw(agent, b'{"jsonrpc":"2.0","id":4,"method":"tools/list","params":null}'),
            _raw(agent, b'{"jsonrpc":"2.0","id":"","method":"tools/list"}'),
            _raw(agent, b'{"jsonrpc":"2.0","id":-9007199254740993,"method":"tools/list"}'),
            _raw(agent, b'{"jsonrpc":"2.0","id":5,"method":"tools/list","extra":1}'),
            _raw(
                agent,
                b'{"jsonrpc":"2.0","id":6,"method":"tools/call",'
                b'"params":{"name":"up__echo","arguments":{"text":"x"},"_meta":{"progressToken":7}}}',
            ),
            _raw(agent, b'{"jsonrpc":"2.0","id":7,"method":"resources/read","params":{}}'),
            _raw(agent, b'{"jsonrpc":"2.0","id":8,"method":"prompts/get","params":{"name":1}}'),
            _raw(agent, b'{"jsonrpc":"2.0","id":9,"method":"completion/complete","params":{}}'),
            _raw(agent, b'{"jsonrpc":"2.0","id":10,"method":"tools/list","params":{"cursor":5}}'),
            agent.request("tools/list", None, accept="*/*"),
            agent.request("tools/list", None, accept="application/*"),
            agent.request("tools/list", None, accept="text/event-stream"),
            agent.request("tools/list", None, content_type="application/json; charset=utf-8"),
            agent.request("tools/list", None, content_type="application/json-rpc"),
            agent.request("tools/list", None, mcp_protocol_version="2025-03-26"),
            agent.request("tools/list", None, mcp_protocol_version="2024-01-01"),
            agent.request("tools/call", echo, mcp_method="tools/call", mcp_name="up__echo"),
            agent.request("tools/call", echo, mcp_name="up__other"),
            agent.request("logging/setLevel", {"level": "info"}),
            agent.request("resources/read", {"uri": "up://nothing/here"}),
            agent.request("resources/read", {"uri": "nobody://x"}),
            agent.request("prompts/get", {"name": "up__nothing"}),
            agent.request(
                "completion/complete",
                {"ref": {"type": "ref/prompt", "name": "up__nothing"}, "argument": {"name": "a"}},
            ),
            agent.request("tools/call", {"name": "nobody__echo", "arguments": {}}),
            agent.request("tools/list", None, mcp_session_id=agent.sid.upper()),
            agent.http.post(
                "/mcp",
                json={"jsonrpc": "2.0", "id": 99, "method": "tools/list"},
                headers={"accept": ACCEPT, "content-type": "application/json", "mcp-session-id": agent.sid},
            ),
        ]
    finally:
        agent.close()
    return [_seen(r) for r in responses]


def test_odd_requests_are_answered_as_the_sdk_answers_them(
    arbiter_factory: ArbiterFactory, gate: Gate
) -> None:
    seen: dict[bool, list[tuple[int, str | None, bool, Any]]] = {}
    for direct in (False, True):
        arbiter = arbiter_factory(mcp={"direct_path": direct})
        if not direct:
            arbiter.register("up", gate.url)
        seen[direct] = _odd_answers(arbiter)
    for i, (sdk, ours) in enumerate(zip(seen[False], seen[True], strict=True)):
        assert ours == sdk, f"row {i}"


def _gated_call(gate: Gate, agent: Agent) -> tuple[threading.Thread, list[httpx.Response]]:
    """Start a call to the gated tool and wait until the upstream holds it."""
    answered: list[httpx.Response] = []
    with gate.lock:
        waiting = gate.waiting
        gate.open = False

    def call() -> None:
        answered.append(agent.request("tools/call", {"name": "up__wait"}))

    caller = threading.Thread(target=call)
    caller.start()
    gate.until("the call", lambda g: g.waiting > waiting)
    return caller, answered


def _release(gate: Gate, caller: threading.Thread) -> None:
    with gate.lock:
        gate.open = True
    caller.join(timeout=60)
    with gate.lock:
        gate.open = False


@pytest.mark.parametrize("direct", [False, True])
def test_a_cancel_naming_the_call_by_its_id_as_a_string_cancels_it(
    arbiter_factory: ArbiterFactory, gate: Gate, direct: bool
) -> None:
    # The SDK correlates "7" and 7 (mcp.shared.dispatcher.coerce_request_id).
    arbiter = arbiter_factory(mcp={"direct_path": direct})
    arbiter.register("up", gate.url)
    agent = Agent(arbiter).open()
    with gate.lock:
        cancelled = gate.cancelled
    caller, answered = _gated_call(gate, agent)
    try:
        cancel = {"requestId": str(agent.next_id)}
        note = agent.post({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": cancel})
        assert note.status_code == 202
        gate.until("the upstream's cancellation", lambda g: g.cancelled > cancelled)
    finally:
        _release(gate, caller)
        agent.close()
    (resp,) = answered
    assert "error" in resp.json(), resp.text
    assert resp.json()["error"]["code"] == -32800


@pytest.mark.parametrize("direct", [False, True])
def test_a_cancel_the_transport_refuses_cancels_nothing(
    arbiter_factory: ArbiterFactory, gate: Gate, direct: bool
) -> None:
    arbiter = arbiter_factory(mcp={"direct_path": direct})
    arbiter.register("up", gate.url)
    agent = Agent(arbiter).open()
    caller, answered = _gated_call(gate, agent)
    try:
        params = {"requestId": agent.next_id}
        cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params}
        refused = [
            agent.post(cancel, content_type="text/plain"),
            agent.post(cancel, accept="text/event-stream"),
        ]
        assert [r.status_code for r in refused] == [415, 406]
    finally:
        _release(gate, caller)
        agent.close()
    (resp,) = answered
    assert resp.json()["result"]["content"] == [{"type": "text", "text": "opened"}]


@pytest.mark.parametrize("direct", [False, True])
def test_a_cancel_naming_true_does_not_cancel_call_1(
    arbiter_factory: ArbiterFactory, gate: Gate, direct: bool
) -> None:
    # JSON true is no request id (bool is an int in Python: it would alias id 1).
    arbiter = arbiter_factory(mcp={"direct_path": direct})
    arbiter.register("up", gate.url)
    agent = Agent(arbiter).open()
    caller, answered = _gated_call(gate, agent)
    assert agent.next_id == 1
    try:
        for odd in (True, 1.0):
            cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": odd}}
            assert agent.post(cancel).status_code in (202, 400)
    finally:
        _release(gate, caller)
        agent.close()
    (resp,) = answered
    assert resp.json()["result"]["content"] == [{"type": "text", "text": "opened"}]


@pytest.mark.parametrize("direct", [False, True])
def test_a_session_ended_during_a_call_ends_the_call(
    arbiter_factory: ArbiterFactory, gate: Gate, direct: bool
) -> None:
    arbiter = arbiter_factory(mcp={"direct_path": direct})
    arbiter.register("up", gate.url)
    agent = Agent(arbiter).open()
    with gate.lock:
        cancelled = gate.cancelled
    caller, answered = _gated_call(gate, agent)
    try:
        headers = {"mcp-session-id": agent.sid, "mcp-protocol-version": VERSION}
        assert agent.http.delete("/mcp", headers=headers).status_code == 200
        gate.until("the upstream's cancellation", lambda g: g.cancelled > cancelled, within_s=20)
    finally:
        _release(gate, caller)
        agent.close()
    (resp,) = answered
    assert resp.status_code == 500, resp.text
    assert resp.json() == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32603, "message": "Session terminated before the request completed"},
    }

    def calls(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in of_kind(records, "mcp") if r["method"] == "tools/call"]

    (record,) = calls(wait_for(arbiter, lambda rs: len(calls(rs)) >= 1))
    assert record["outcome"]["status"] == "cancelled"
    assert resp.headers["mcp-session-id"] == agent.sid


@pytest.mark.parametrize("direct", [False, True])
def test_a_refused_request_restarts_the_idle_countdown(
    arbiter_factory: ArbiterFactory, gate: Gate, direct: bool
) -> None:
    arbiter = arbiter_factory(mcp={"direct_path": direct, "session_idle_timeout_s": 600})
    arbiter.register("up", gate.url)
    agent = Agent(arbiter).open()
    scope = _sessions_held(arbiter)[agent.sid].idle_scope
    assert scope is not None

    def counting() -> float:
        # The countdown runs once nothing is in flight (an answer can arrive before its request ends).
        until = time.monotonic() + 30
        while scope.deadline == float("inf"):
            assert time.monotonic() < until, "the countdown never restarted"
            time.sleep(0.01)
        return scope.deadline

    before = counting()
    # The server's event loop (uvloop) keeps time in whole milliseconds: wait until its clock has
    # passed the countdown's start, so that a restart shows as a later deadline and not the same one
    # (a fast machine can send the next request within that millisecond).
    while time.monotonic() <= before - 600 + 0.002:
        time.sleep(0.001)
    refused = agent.request("tools/call", {"name": "up__echo", "arguments": "not an object"})
    assert refused.json()["error"]["code"] == -32602
    assert counting() > before
    agent.close()


def test_a_refused_request_is_audited_as_on_the_sdks_path(
    arbiter_factory: ArbiterFactory, gate: Gate
) -> None:
    def shape(record: dict[str, Any]) -> tuple[Any, ...]:
        outcome = record["outcome"]
        return (
            record["method"],
            record["decision"],
            record["reason"],
            record["request_id"],
            outcome.get("status"),
            outcome.get("error_code"),
            outcome.get("http_status"),
        )

    seen: dict[bool, list[tuple[Any, ...]]] = {}
    had = 0
    for direct in (False, True):
        arbiter = arbiter_factory(mcp={"direct_path": direct})
        if not direct:
            arbiter.register("up", gate.url)
        agent = Agent(arbiter).open()
        agent.request("tools/call", {"name": "up__echo", "arguments": {"text": "hi"}})
        agent.request("tools/call", {"name": "up__echo", "arguments": "not an object"})
        agent.request("tools/list", None)
        agent.close()
        records = of_kind(wait_for(arbiter, lambda rs, n=had + 3: len(of_kind(rs, "mcp")) >= n), "mcp")
        seen[direct] = sorted((shape(r) for r in records[had:]), key=repr)
        had = len(records)
        arbiter.stop()
    assert seen[True] == seen[False]


@pytest.mark.parametrize("direct", [False, True])
def test_a_call_carries_what_the_agent_declared_last(
    arbiter_factory: ArbiterFactory, gate: Gate, direct: bool
) -> None:
    # The SDK takes a second initialize on an open session and keeps what it declares.
    arbiter = arbiter_factory(mcp={"direct_path": direct})
    arbiter.register("up", gate.url)
    agent = Agent(arbiter).open()
    agent.request("tools/list", None)
    again = agent.post(
        {
            "jsonrpc": "2.0",
            "id": 100,
            "method": "initialize",
            "params": {
                "protocolVersion": VERSION,
                "capabilities": {},
                "clientInfo": {"name": "second", "version": "2"},
            },
        }
    )
    assert again.status_code == 200, again.text
    agent.request("tools/call", {"name": "up__echo", "arguments": {"text": "hi"}})
    agent.close()

    def calls(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in of_kind(records, "mcp") if r["method"] == "tools/call"]

    (record,) = calls(wait_for(arbiter, lambda rs: len(calls(rs)) >= 1))
    assert record["client_info"]["name"] == "second"


def test_a_session_that_idled_out_is_forgotten(arbiter_factory: ArbiterFactory, gate: Gate) -> None:
    arbiter = arbiter_factory(mcp={"session_idle_timeout_s": 0.5})
    arbiter.register("up", gate.url)
    agent = Agent(arbiter).open()
    first = agent.request("tools/call", {"name": "up__echo", "arguments": {"text": "one"}})
    assert first.json()["result"]["content"] == [{"type": "text", "text": "echo: one"}]
    sessions: Any = arbiter.app.mcp_endpoint._handshake._sessions  # pyright: ignore[reportAttributeAccessIssue]
    deadline = time.monotonic() + 30
    while len(sessions) or agent.sid in _sessions_held(arbiter):
        assert time.monotonic() < deadline, "the idle session was kept"
        time.sleep(0.02)
    agent.close()


@pytest.mark.parametrize("version", ["2024-11-05", "2025-03-26", "2025-06-18"])
def test_results_are_shaped_for_the_sessions_version_as_the_sdk_shapes_them(
    arbiter_factory: ArbiterFactory, gate: Gate, version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(f"{__name__}.VERSION", version)
    seen: dict[bool, list[tuple[int, str | None, bool, Any]]] = {}
    for direct in (False, True):
        arbiter = arbiter_factory(mcp={"direct_path": direct})
        if not direct:
            arbiter.register("up", gate.url)
        agent = Agent(arbiter).open()
        responses = [
            agent.request("tools/list", None),
            agent.request("tools/call", {"name": "up__echo", "arguments": {"text": "hi"}}),
            agent.request("tools/call", {"name": "up__echo", "arguments": {}}),
            agent.request("completion/complete", {"ref": {"type": "ref/prompt", "name": "up__x"}}),
        ]
        agent.close()
        seen[direct] = [_seen(r) for r in responses]
    assert seen[True] == seen[False]


def _stateless_answers(arbiter: ArbiterServer) -> list[tuple[int, str | None, bool, Any]]:
    """What a handshake-era agent without a session gets for a row of requests (mcp.stateless_legacy)."""
    agent = Agent(arbiter)  # no session: every POST stands alone
    echo = {"name": "up__echo", "arguments": {"text": "hi"}}
    try:
        responses = [
            agent.request("tools/call", echo),
            agent.request("tools/list", None),
            agent.request("tools/call", {"name": "up__echo", "arguments": "not an object"}),
            agent.request("tools/call", {"name": "up__missing", "arguments": {}}),
            agent.request("tools/call", {"arguments": {}}),
            agent.request("tools/list", None, accept="text/plain"),
            agent.request("tools/list", None, content_type="text/plain"),
            agent.request("tools/list", None, mcp_protocol_version="2024-11-05"),
            agent.request("tools/list", None, mcp_protocol_version="2024-01-01"),
            _raw(agent, b'{"jsonrpc":"2.0","id":"s-1","method":"tools/call","params":null}'),
            agent.http.post(
                "/mcp",
                json={"jsonrpc": "2.0", "id": 99, "method": "tools/call", "params": echo},
                headers={"accept": ACCEPT, "content-type": "application/json"},  # no version header
            ),
        ]
    finally:
        agent.close()
    return [_seen(r) for r in responses]


def test_without_sessions_the_agent_cannot_tell_the_direct_path_from_the_sdks(
    arbiter_factory: ArbiterFactory, gate: Gate
) -> None:
    seen: dict[bool, list[tuple[int, str | None, bool, Any]]] = {}
    for direct in (False, True):
        arbiter = arbiter_factory(mcp={"stateless_legacy": True, "direct_path": direct})
        if not direct:
            arbiter.register("up", gate.url)
        seen[direct] = _stateless_answers(arbiter)
    assert seen[True] == seen[False]
    call = seen[True][0][3]
    assert call["result"]["content"] == [{"type": "text", "text": "echo: hi"}]
    assert [status for status, _, _, _ in seen[True]][:5] == [200, 200, 200, 200, 200]
