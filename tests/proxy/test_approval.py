"""Approval as a policy outcome: the end user approves a call through MCP, in both eras, against a real
upstream that counts the calls it runs.

The policy lets agents refund up to 100 unattended and asks the user above that. A 2026-07-28 agent gets
``input_required`` with a form and a sealed state, a handshake-era agent an ``elicitation/create`` on its
session; an acceptance runs the call exactly once, a decline runs nothing; the state opens only for its
own caller and arguments, once, before it expires; an agent that cannot be asked gets a readable refusal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import mcp_types as types
import pytest
from cryptography.fernet import Fernet
from mcp import Client
from mcp.client.context import ClientRequestContext
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.shared.exceptions import MCPError

from tests.audit.helpers import of_kind, wait_for
from tests.conftest import ArbiterFactory, ArbiterServer, authed_transport, serve_in_thread
from tests.policies.conftest import new_key
from tests.refusals import tool_refusal

MODERN = "2026-07-28"
LEGACY = "legacy"
POLICY = (
    "p, *, *, *, call, allow\n"
    "p, role:agent, *, pay/refund, call, approve, r.args.amount > 100\n"
    "p, role:agent, *, pay/ship, call, approve\n"
)
WHERE = {"type": "object", "properties": {"city": {"type": "string"}}}
CARD = "4111 1111 1111 1111"  # the audit redaction's card detector hides it from the user's form too


@dataclass
class Payments:
    """The upstream, and every refund it ran."""

    url: str
    runs: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])
    lock: threading.Lock = field(default_factory=threading.Lock)

    def refunds(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.runs)


@pytest.fixture(scope="module")
def payments() -> Iterator[Payments]:
    server = MCPServer("pay")
    state = Payments("")

    @server.tool()
    def refund(amount: int, customer: str, card: str = "") -> str:
        with state.lock:
            state.runs.append({"amount": amount, "customer": customer})
        return f"refunded {amount} to {customer}"

    @server.tool()
    def ship(item: str, ctx: Context) -> types.CallToolResult | types.InputRequiredResult:
        """Asks its own question (an upstream's input round) before it ships."""
        answer = (ctx.input_responses or {}).get("where")
        if not isinstance(answer, types.ElicitResult):
            ask = types.ElicitRequest(
                params=types.ElicitRequestFormParams(message=f"Where to ship {item}?", requested_schema=WHERE)
            )
            return types.InputRequiredResult(input_requests={"where": ask}, request_state=f"ship:{item}")
        with state.lock:
            state.runs.append({"ship": item})
        return types.CallToolResult(content=[types.TextContent(text=f"shipped {item}")])

    app = server.streamable_http_app(json_response=True, stateless_http=True)
    with serve_in_thread(app) as port:
        state.url = f"http://127.0.0.1:{port}/mcp"
        yield state


def _start(factory: ArbiterFactory, payments: Payments, **overrides: Any) -> ArbiterServer:
    server = factory(policy=POLICY, **overrides)
    server.register("pay", payments.url)
    with payments.lock:
        payments.runs.clear()
    return server


@pytest.fixture(params=[True, False], ids=["direct", "sdk"])
def arbiter(
    request: pytest.FixtureRequest, arbiter_factory: ArbiterFactory, payments: Payments
) -> ArbiterServer:
    # mcp.json_response: 2026-07-28 requests take the direct path (front.py), or the SDK's transport.
    return _start(arbiter_factory, payments, mcp={"json_response": request.param})


class User:
    """The person at the agent's client: answers each approval form with ``action``, noting what it saw."""

    def __init__(self, action: str = "accept") -> None:
        self.action = action
        self.seen: list[str] = []

    async def __call__(
        self, context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult:
        self.seen.append(params.message)
        content = {"approve": True} if self.action == "accept" else None
        return types.ElicitResult(action=self.action, content=content)  # pyright: ignore[reportArgumentType]


def _client(server: ArbiterServer, mode: str, user: User | None, key: str | None = None) -> Client:
    return Client(
        authed_transport(server.mcp_url, key or server.agent_key),  # pyright: ignore[reportArgumentType]
        mode=mode,  # pyright: ignore[reportArgumentType]
        cache=None,
        elicitation_callback=user,
    )


def _refund_records(server: ArbiterServer, count: int) -> list[dict[str, Any]]:
    def calls(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in of_kind(records, "mcp") if r["method"] == "tools/call"]

    return calls(wait_for(server, lambda rs: len(calls(rs)) >= count))


def _text(result: types.CallToolResult) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)


BIG = {"amount": 500, "customer": "acme", "card": CARD}


async def test_a_modern_agent_runs_the_call_once_the_user_accepts(
    arbiter: ArbiterServer, payments: Payments
) -> None:
    user = User()
    async with _client(arbiter, MODERN, user) as client:
        result = await client.call_tool("pay__refund", BIG)
    assert not result.is_error and _text(result) == "refunded 500 to acme"
    assert payments.refunds() == [{"amount": 500, "customer": "acme"}]  # exactly once
    (shown,) = user.seen
    assert "pay__refund" in shown and "refund on pay" in shown and '"amount": 500' in shown
    assert CARD not in shown and "[REDACTED" in shown  # as the audit log shows the arguments
    asked, ran = _refund_records(arbiter, 2)
    assert asked["policy"]["decision"] == "approve" and asked["policy"]["reason"] == "approval_required"
    assert "r.args.amount > 100" in asked["policy"]["rule"]
    assert asked["outcome"]["approval"] == {"requested": True, "via": "input_required"}
    assert ran["decision"] == "allow" and ran["outcome"]["status"] == "ok"
    assert ran["outcome"]["approval"] == {"requested": True, "via": "input_required", "answer": "accepted"}


async def test_a_handshake_era_agent_is_asked_on_its_session(
    arbiter: ArbiterServer, payments: Payments
) -> None:
    user = User()
    async with _client(arbiter, LEGACY, user) as client:
        result = await client.call_tool("pay__refund", BIG)
    assert not result.is_error and _text(result) == "refunded 500 to acme"
    assert payments.refunds() == [{"amount": 500, "customer": "acme"}]
    assert len(user.seen) == 1 and CARD not in user.seen[0]
    (record,) = _refund_records(arbiter, 1)  # one request, one record
    assert record["outcome"]["approval"] == {"requested": True, "via": "elicitation", "answer": "accepted"}
    assert record["policy"]["decision"] == "approve"


@pytest.mark.parametrize("mode", [MODERN, LEGACY])
@pytest.mark.parametrize(("action", "answer"), [("decline", "declined"), ("cancel", "cancelled")])
async def test_a_call_the_user_declines_does_not_run(
    arbiter_factory: ArbiterFactory, payments: Payments, mode: str, action: str, answer: str
) -> None:
    server = _start(arbiter_factory, payments)
    async with _client(server, mode, User(action)) as client:
        result = await client.call_tool("pay__refund", BIG)
    refusal = tool_refusal(result)
    assert refusal["reason"] == "approval_declined", refusal
    assert refusal["message"] == f"the user {answer} the call to pay__refund"
    assert payments.refunds() == []
    record = _refund_records(server, 2 if mode == MODERN else 1)[-1]
    assert record["decision"] == "deny" and record["reason"] == "approval_declined"
    assert record["outcome"]["approval"]["answer"] == answer


@pytest.mark.parametrize("mode", [MODERN, LEGACY])
async def test_the_condition_decides_whether_the_user_is_asked(
    arbiter_factory: ArbiterFactory, payments: Payments, mode: str
) -> None:
    server = _start(arbiter_factory, payments)
    user = User()
    async with _client(server, mode, user) as client:
        small = await client.call_tool("pay__refund", {"amount": 50, "customer": "acme"})
        assert not small.is_error and user.seen == []  # amount 50: runs unattended
        large = await client.call_tool("pay__refund", {"amount": 500, "customer": "acme"})
        assert not large.is_error and len(user.seen) == 1  # amount 500: asks
    assert [r["amount"] for r in payments.refunds()] == [50, 500]
    first = _refund_records(server, 1)[0]
    assert first["policy"]["decision"] == "allow" and "approval" not in first["outcome"]


@pytest.mark.parametrize("mode", [MODERN, LEGACY])
async def test_an_agent_that_cannot_ask_its_user_is_told_approval_is_required(
    arbiter_factory: ArbiterFactory, payments: Payments, mode: str
) -> None:
    server = _start(arbiter_factory, payments)
    async with _client(server, mode, None) as client:  # no callback: it declares no elicitation
        result = await client.call_tool("pay__refund", BIG)
    refusal = tool_refusal(result)
    assert refusal["reason"] == "approval_required", refusal
    assert "approves it" in refusal["message"] and "elicitation" in refusal["message"]
    assert "runs only once the user approves it" in _text(result)
    assert payments.refunds() == []
    (record,) = _refund_records(server, 1)
    assert (
        record["reason"] == "approval_required" and record["outcome"]["approval"]["answer"] == "unavailable"
    )


YES: types.InputResponses = {
    "arbiter_approval": types.ElicitResult(action="accept", content={"approve": True})
}


async def _first_round(client: Client, args: dict[str, Any]) -> str:
    first = await client.session.call_tool("pay__refund", args, allow_input_required=True)
    assert isinstance(first, types.InputRequiredResult) and first.request_state is not None
    assert set(first.input_requests or {}) == {"arbiter_approval"}
    return first.request_state


async def _retry(client: Client, args: dict[str, Any], state: str) -> types.CallToolResult:
    result = await client.session.call_tool(
        "pay__refund", args, input_responses=YES, request_state=state, allow_input_required=True
    )
    assert isinstance(result, types.CallToolResult)
    return result


async def test_the_approval_state_opens_once_for_its_own_caller_and_arguments(
    arbiter: ArbiterServer, payments: Payments
) -> None:
    mallory = new_key(arbiter, "mallory", ["agent"])
    async with _client(arbiter, MODERN, User()) as alice:
        state = await _first_round(alice, BIG)
        assert state.startswith("arb1.")
        with pytest.raises(MCPError) as other_args:
            await _retry(alice, {**BIG, "amount": 5000}, state)
        assert other_args.value.error.code == types.INVALID_PARAMS
        async with _client(arbiter, MODERN, User(), mallory) as other:
            with pytest.raises(MCPError) as other_caller:
                await _retry(other, BIG, state)
        assert other_caller.value.error.message == "Invalid or expired requestState"
        assert payments.refunds() == []  # no refused retry ran anything
        done = await _retry(alice, BIG, state)
        assert not done.is_error and _text(done) == "refunded 500 to acme"
        with pytest.raises(MCPError) as again:
            await _retry(alice, BIG, state)
        assert (again.value.error.data or {}).get("reason") == "invalid_request_state"
    assert payments.refunds() == [{"amount": 500, "customer": "acme"}]  # once, whatever was replayed
    records = _refund_records(arbiter, 5)
    why = [
        r["outcome"]["approval"].get("request_state")
        for r in records
        if r["reason"] == "invalid_request_state"
    ]
    assert why == ["arguments", "principal", "used"]


async def test_an_approval_state_expires(arbiter_factory: ArbiterFactory, payments: Payments) -> None:
    ttl = 1.0
    server = _start(arbiter_factory, payments, mcp={"request_state_ttl_s": ttl})
    async with _client(server, MODERN, User()) as client:
        state = await _first_round(client, BIG)
        sealed_by = time.time()  # the state was sealed before this, on the same wall clock
        # Until the expiry itself, on the event loop's clock (a wait for a moment, not a guessed delay).
        await anyio.sleep_until(anyio.current_time() + (sealed_by + ttl - time.time()) + 0.01)
        assert time.time() > sealed_by + ttl
        with pytest.raises(MCPError) as late:
            await _retry(client, BIG, state)
    assert late.value.error.code == types.INVALID_PARAMS
    assert payments.refunds() == []
    records = _refund_records(server, 2)
    assert records[-1]["outcome"]["approval"]["request_state"] == "expired"


async def test_an_approval_is_single_use_across_replicas(
    arbiter_factory: ArbiterFactory, payments: Payments
) -> None:
    """Two replicas on one database and one secret key: either opens the state, only one runs it."""
    key = Fernet.generate_key().decode()
    first = _start(arbiter_factory, payments, secret_key=key)
    second = arbiter_factory(policy=POLICY, secret_key=key)  # same database: same upstreams and keys
    async with _client(first, MODERN, User()) as on_first:
        state = await _first_round(on_first, BIG)
        async with _client(second, MODERN, User(), first.agent_key) as on_second:
            done = await _retry(on_second, BIG, state)
        assert not done.is_error
        with pytest.raises(MCPError) as replayed:
            await _retry(on_first, BIG, state)
    assert replayed.value.error.code == types.INVALID_PARAMS
    assert payments.refunds() == [{"amount": 500, "customer": "acme"}]


@pytest.mark.parametrize("mode", [MODERN, LEGACY])
async def test_an_approved_call_still_answers_its_upstreams_own_questions(
    arbiter_factory: ArbiterFactory, payments: Payments, mode: str
) -> None:
    """After the user's yes, the tool's own input round goes on without asking for approval again."""
    server = _start(arbiter_factory, payments)
    user = User()
    async with _client(server, mode, user) as client:
        result = await client.call_tool("pay__ship", {"item": "box"})
    assert not result.is_error and _text(result) == "shipped box"
    assert payments.refunds() == [{"ship": "box"}]
    assert len(user.seen) == 2 and "Approve this call" in user.seen[0] and "Where to ship" in user.seen[1]
    records = _refund_records(server, 3 if mode == MODERN else 1)
    answers = [r["outcome"]["approval"].get("answer") for r in records]
    assert answers == ([None, "accepted", "earlier"] if mode == MODERN else ["accepted"])


# Attacks on the approval step (review of issue 19's first slice).

WHERE_YES: types.InputResponses = {"where": types.ElicitResult(action="accept", content={"city": "Lyon"})}


async def _ship(client: Client, **extra: Any) -> types.Result:
    return await client.session.call_tool("pay__ship", {"item": "box"}, allow_input_required=True, **extra)


async def test_an_upstreams_round_after_an_approval_runs_once(
    arbiter: ArbiterServer, payments: Payments
) -> None:
    """The user approved one run: the upstream's own state that follows must not run the call again."""
    async with _client(arbiter, MODERN, User()) as client:
        asked = await _ship(client)
        assert isinstance(asked, types.InputRequiredResult) and asked.request_state is not None
        where = await _ship(client, input_responses=YES, request_state=asked.request_state)
        assert isinstance(where, types.InputRequiredResult) and where.request_state is not None
        done = await _ship(client, input_responses=WHERE_YES, request_state=where.request_state)
        assert isinstance(done, types.CallToolResult) and not done.is_error
        with pytest.raises(MCPError) as replayed:
            await _ship(client, input_responses=WHERE_YES, request_state=where.request_state)
    assert replayed.value.error.code == types.INVALID_PARAMS
    assert payments.refunds() == [{"ship": "box"}]
    records = _refund_records(arbiter, 4)  # one record a request, each with the approval's facts
    assert [r["outcome"]["approval"].get("answer") for r in records] == [None, "accepted", "earlier", None]
    assert records[-1]["outcome"]["approval"]["request_state"] == "used"


async def test_an_upstream_state_from_before_the_approve_rule_asks_the_user(
    arbiter: ArbiterServer, payments: Payments
) -> None:
    """A state the upstream issued while the call ran unattended is not an approval once a rule asks."""
    with arbiter.admin() as admin:
        resp = admin.post(
            "/policies/import", content="p, *, *, *, call, allow\n", headers={"content-type": "text/csv"}
        )
        assert resp.status_code == 200, resp.text
    async with _client(arbiter, MODERN, User()) as client:
        where = await _ship(client)
        assert isinstance(where, types.InputRequiredResult) and where.request_state is not None
        assert set(where.input_requests or {}) == {"where"}  # unattended: the upstream's own question
        with arbiter.admin() as admin:
            resp = admin.post("/policies/import", content=POLICY, headers={"content-type": "text/csv"})
            assert resp.status_code == 200, resp.text
        with pytest.raises(MCPError) as skipped:
            await _ship(client, input_responses=WHERE_YES, request_state=where.request_state)
    assert skipped.value.error.code == types.INVALID_PARAMS
    assert payments.refunds() == []
    last = _refund_records(arbiter, 2)[-1]
    assert (
        last["reason"] == "invalid_request_state" and last["outcome"]["approval"]["request_state"] == "kind"
    )


class Sloppy(User):
    """Accepts, but with content that is not the form's yes."""

    def __init__(self, content: Any) -> None:
        super().__init__("accept")
        self.content = content

    async def __call__(
        self, context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult:
        self.seen.append(params.message)
        return types.ElicitResult(action="accept", content=self.content)


@pytest.mark.parametrize("mode", [MODERN, LEGACY])
@pytest.mark.parametrize("content", [{"approve": "false"}, {"approve": 0}, {"approve": "no"}])
async def test_an_acceptance_without_a_yes_does_not_run(
    arbiter_factory: ArbiterFactory, payments: Payments, mode: str, content: Any
) -> None:
    server = _start(arbiter_factory, payments)
    async with _client(server, mode, Sloppy(content)) as client:
        result = await client.call_tool("pay__refund", BIG)
    assert tool_refusal(result)["reason"] == "approval_declined"
    assert payments.refunds() == []


async def test_two_retries_racing_with_one_approval_run_it_once(
    arbiter: ArbiterServer, payments: Payments
) -> None:
    """The same accepted state sent twice at once (or for another tool): one run, the rest refused."""
    outcomes: list[str] = []

    async def retry(client: Client, state: str) -> None:
        try:
            done = await _retry(client, BIG, state)
            outcomes.append("ran" if not done.is_error else "error")
        except MCPError as exc:
            outcomes.append(str((exc.error.data or {}).get("reason")))

    async with _client(arbiter, MODERN, User()) as one, _client(arbiter, MODERN, User()) as two:
        state = await _first_round(one, BIG)
        with pytest.raises(MCPError) as other_tool:
            await _ship(one, input_responses=YES, request_state=state)
        assert other_tool.value.error.code == types.INVALID_PARAMS
        async with anyio.create_task_group() as tg:
            tg.start_soon(retry, one, state)
            tg.start_soon(retry, two, state)
    assert sorted(outcomes) == ["invalid_request_state", "ran"]
    assert payments.refunds() == [{"amount": 500, "customer": "acme"}]
