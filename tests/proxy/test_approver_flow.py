"""Approval by an approver (issue 19): a call under ``approve by role:billing-lead`` is recorded as pending,
the agent is told at once, an approver named by the rule approves or denies it through the admin API,
and the agent's retry of the same call runs it once; nobody decides their own request; every step is in
the audit log, linked by the approval id, and the chain verifies.

Real parts: the ``pay`` upstream of test_approval.py (it counts the refunds it ran), Arbiter on SQLite,
and across two replicas on PostgreSQL with a webhook receiver on loopback.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import mcp_types as types
import pytest
from cryptography.fernet import Fernet
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from arbiter.store import schema
from tests.audit.helpers import wait_for
from tests.conftest import ArbiterFactory, ArbiterServer, serve_in_thread
from tests.policies.conftest import new_key
from tests.proxy.test_approval import BIG, CARD, LEGACY, MODERN, Payments, User, _client, payments
from tests.refusals import tool_refusal

__all__ = ["payments"]  # fixture

POLICY = (
    "p, *, *, *, call, allow\n"
    "p, role:agent, *, pay/refund, call, approve by role:billing-lead for 1h, r.args.amount > 100\n"
    "p, role:agent, *, pay/ship, call, approve by user or role:billing-lead\n"
)
SECRET = "whsec-test-0123456789"


def _start(factory: ArbiterFactory, payments: Payments, **overrides: Any) -> ArbiterServer:
    server = factory(policy=POLICY, **overrides)
    server.register("pay", payments.url)
    with payments.lock:
        payments.runs.clear()
    return server


async def _refund(
    server: ArbiterServer, mode: str, key: str | None = None, **args: Any
) -> types.CallToolResult:
    async with _client(server, mode, None, key) as client:
        return await client.call_tool("pay__refund", {**BIG, **args})


def _api(server: ArbiterServer, key: str) -> httpx.Client:
    return httpx.Client(
        base_url=server.base_url + "/admin/v1", headers={"authorization": f"Bearer {key}"}, timeout=30
    )


def _linked(server: ArbiterServer, approval_id: str, count: int) -> list[dict[str, Any]]:
    """The audit records naming ``approval_id``: the calls' ``outcome.approval.id``, decisions' details."""

    def linked(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        for r in records:
            approval = (r.get("outcome") or {}).get("approval") or {}
            if approval.get("id") == approval_id or (r.get("admin") or {}).get("approval_id") == approval_id:
                found.append(r)
        return found

    return linked(wait_for(server, lambda rs: len(linked(rs)) >= count))


@pytest.mark.parametrize("mode", [MODERN, LEGACY])
async def test_an_approver_approves_and_the_agents_retry_runs_once(
    arbiter_factory: ArbiterFactory, payments: Payments, mode: str
) -> None:
    server = _start(arbiter_factory, payments)
    lead = new_key(server, "lena", ["billing-lead"])

    first = tool_refusal(await _refund(server, mode))
    assert first["reason"] == "approval_pending", first
    approval_id = first["approval_id"]
    assert approval_id.startswith("apr_") and first["approvers"] == ["role:billing-lead"]
    again = tool_refusal(await _refund(server, mode))  # asking again does not queue a second request
    assert again["approval_id"] == approval_id
    assert payments.refunds() == []

    with _api(server, lead) as api:
        pending = api.get("/approvals").json()
        assert [a["id"] for a in pending] == [approval_id]
        shown = pending[0]
        assert (
            shown["may_decide"] is True
            and shown["tool"] == "pay__refund"
            and shown["subject"] == "test-agent"
        )
        assert shown["arguments"]["amount"] == 500 and CARD not in json.dumps(shown)  # redacted as audited
        decided = api.post(f"/approvals/{approval_id}/approve", json={"note": "customer called"})
        assert decided.status_code == 200, decided.text
        assert decided.json()["status"] == "approved" and decided.json()["decided_by"] == "user:lena"
        twice = api.post(f"/approvals/{approval_id}/deny")
        assert twice.status_code == 409, twice.text

    ran = await _refund(server, mode)
    assert not ran.is_error, ran
    assert payments.refunds() == [{"amount": 500, "customer": "acme"}]

    after = tool_refusal(await _refund(server, mode))  # spent: the same call asks anew
    assert after["reason"] == "approval_pending" and after["approval_id"] != approval_id
    assert len(payments.refunds()) == 1
    with _api(server, lead) as api:
        assert api.get(f"/approvals/{approval_id}").json()["status"] == "used"

    records = _linked(server, approval_id, 4)
    calls = [r for r in records if r["kind"] == "mcp"]
    assert [r["outcome"]["approval"].get("status") for r in calls[:2]] == ["requested", "pending"]
    assert calls[-1]["decision"] == "allow" and calls[-1]["outcome"]["approval"]["answer"] == "approved"
    assert calls[-1]["outcome"]["approval"]["decided_by"] == "user:lena"
    decision = next(r for r in records if r["kind"] == "admin")
    assert decision["method"] == "approval.approve" and decision["actor"]["subject"] == "lena"
    assert "pay/refund" in decision["admin"]["rule"]
    with server.admin() as admin:
        verified = admin.get("/audit/verify").json()
    assert verified["ok"] is True, verified


async def test_nobody_approves_their_own_request_and_only_named_approvers_decide(
    arbiter_factory: ArbiterFactory, payments: Payments
) -> None:
    server = _start(arbiter_factory, payments)
    own = new_key(server, "test-agent", ["agent", "billing-lead"])  # the caller's other key, with the role
    cased = new_key(server, "Test-Agent", ["billing-lead"])  # the same subject but for its case
    clerk = new_key(server, "carl", ["billing"])
    stranger = new_key(server, "lena-globex", ["billing-lead"], tenant="globex")
    namesake = new_key(server, "test-agent", ["billing-lead"], tenant="globex")  # another tenant's
    approval_id = tool_refusal(await _refund(server, MODERN))["approval_id"]  # made with the agent's key

    with _api(server, own) as api:
        refused = api.post(f"/approvals/{approval_id}/approve")
        assert refused.status_code == 403 and "own request" in refused.json()["error"]["message"], (
            refused.text
        )
    for key in (clerk, stranger, cased, namesake):  # not an approver of it: as if it did not exist
        with _api(server, key) as api:
            refused = api.post(f"/approvals/{approval_id}/approve")
            assert refused.status_code == 404, refused.text
    with _api(server, clerk) as api:  # not an approver: the request is not even shown
        assert api.get("/approvals").json() == []
        assert api.get(f"/approvals/{approval_id}").status_code == 404
    with _api(server, own) as api:  # its maker sees it, but may not decide it
        mine = api.get(f"/approvals/{approval_id}").json()
        assert mine["status"] == "pending" and mine["may_decide"] is False
    with server.admin() as admin:  # admin:read on admin/approvals (a security admin) sees all
        assert [a["id"] for a in admin.get("/approvals").json()] == [approval_id]

    assert tool_refusal(await _refund(server, MODERN))["approval_id"] == approval_id  # still pending
    assert payments.refunds() == []
    refusals = [
        r
        for r in _linked(server, approval_id, 7)
        if r["kind"] == "admin" and r["outcome"]["status"] == "error"
    ]
    assert sorted(r["reason"] for r in refusals) == ["forbidden", *["not_found"] * 4]


async def test_a_denied_call_does_not_run_and_its_retry_is_told_so(
    arbiter_factory: ArbiterFactory, payments: Payments
) -> None:
    server = _start(arbiter_factory, payments)
    lead = new_key(server, "lena", ["billing-lead"])
    approval_id = tool_refusal(await _refund(server, MODERN))["approval_id"]
    with _api(server, lead) as api:
        assert api.post(f"/approvals/{approval_id}/deny", json={"note": "not this one"}).status_code == 200
    refused = tool_refusal(await _refund(server, MODERN))
    assert refused["reason"] == "approval_declined" and refused["approval_id"] == approval_id
    other = tool_refusal(await _refund(server, MODERN, amount=600))  # other arguments: another request
    assert other["reason"] == "approval_pending" and other["approval_id"] != approval_id
    assert payments.refunds() == []


async def test_the_user_is_asked_when_the_rule_allows_either_and_the_agent_can_ask(
    arbiter_factory: ArbiterFactory, payments: Payments
) -> None:
    """``approve by user or role:…``: an agent that can ask its user asks; one that cannot queues it."""
    server = _start(arbiter_factory, payments)
    user = User()
    async with _client(server, MODERN, user) as client:
        await client.call_tool("pay__ship", {"item": "desk"})  # approved by the user, then the tool asks too
    assert len(user.seen) == 2 and "Approve this call?" in user.seen[0]
    with server.admin() as admin:
        assert admin.get("/approvals", params={"status": "all"}).json() == []  # no approver was involved
    async with _client(server, MODERN, None) as client:
        queued = tool_refusal(await client.call_tool("pay__ship", {"item": "desk"}))
    assert queued["reason"] == "approval_pending" and queued["approvers"] == ["role:billing-lead"]


@dataclass
class Receiver:
    """A webhook receiver on loopback: every body it got, with its headers."""

    url: str = ""
    got: list[tuple[bytes, dict[str, str]]] = field(default_factory=list[tuple[bytes, dict[str, str]]])
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait(self, count: int) -> list[tuple[bytes, dict[str, str]]]:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.got) >= count:
                    return list(self.got)
            time.sleep(0.05)
        raise AssertionError(f"the webhook got {len(self.got)} notices, not {count}")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    async def hook(request: Request) -> Response:
        body = await request.body()
        with state.lock:
            state.got.append((body, dict(request.headers)))
        return Response(status_code=204)

    with serve_in_thread(Starlette(routes=[Route("/hook", hook, methods=["POST"])])) as port:
        state.url = f"http://127.0.0.1:{port}/hook"
        yield state


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)


def _signed(body: bytes, headers: dict[str, str]) -> bool:
    parts = dict(p.split("=", 1) for p in headers["arbiter-signature"].split(","))
    expected = hmac.new(SECRET.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts["v1"])


async def test_two_replicas_on_postgresql_from_request_to_webhook_to_approval_to_the_retry(
    arbiter_factory: ArbiterFactory, payments: Payments, postgres_url: str, receiver: Receiver
) -> None:
    await asyncio.to_thread(schema.upgrade, postgres_url)
    shared: dict[str, Any] = {
        "database_url": postgres_url,
        "secret_key": Fernet.generate_key().decode(),
        "approvals": {"webhook_url": receiver.url, "webhook_secret": SECRET},
    }
    first = _start(arbiter_factory, payments, **shared)
    second = arbiter_factory(policy=POLICY, **shared)  # the same database: upstreams, keys, approvals
    lead = new_key(second, "lena", ["billing-lead"])

    approval_id = tool_refusal(await _refund(first, MODERN))["approval_id"]
    [(body, headers)] = receiver.wait(1)
    assert _signed(body, headers), headers
    notice = json.loads(body)
    assert notice["type"] == "approval.requested" and notice["approval"]["id"] == approval_id
    assert notice["approval"]["tool"] == "pay__refund" and CARD not in body.decode()
    assert SECRET not in body.decode() and first.agent_key not in body.decode()

    with _api(second, lead) as api:
        assert api.post(f"/approvals/{approval_id}/approve").status_code == 200
    # The agent retries on both replicas at once: the approval runs the call once.
    ran = await asyncio.gather(_refund(first, MODERN), _refund(second, MODERN, first.agent_key))
    assert sorted(r.is_error for r in ran) == [False, True], ran
    [spent] = [tool_refusal(r) for r in ran if r.is_error]
    assert spent["reason"] == "approval_pending" and spent["approval_id"] != approval_id  # asks anew
    assert payments.refunds() == [{"amount": 500, "customer": "acme"}]

    with first.admin() as admin:  # each notice was delivered, once
        wait_until(
            lambda: (
                {a["webhook"] for a in admin.get("/approvals", params={"status": "all"}).json()}
                == {"delivered"}
            )
        )
        verified = admin.get("/audit/verify").json()
    deliveries = [h["arbiter-delivery"] for _, h in receiver.wait(2)]
    assert sorted(deliveries) == sorted({approval_id, spent["approval_id"]}), deliveries
    assert verified["ok"] is True, verified
    # The request, the decision and the call that ran (two replicas' writers store them in any order).
    records = sorted(_linked(first, approval_id, 3), key=lambda r: r["ts"])
    assert sorted(r["kind"] for r in records) == ["admin", "mcp", "mcp"]
    assert [r["kind"] for r in records] == ["mcp", "admin", "mcp"]  # in the order they happened
    assert records[-1]["outcome"]["approval"]["answer"] == "approved"


class Clock:
    """Wall-clock time the test moves on (Arbiter's approvals and in-process limits read it)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_a_refusal_after_the_approval_gives_it_back_and_requests_lapse(
    arbiter_factory: ArbiterFactory, payments: Payments
) -> None:
    clock = Clock()
    server = _start(arbiter_factory, payments, clock=clock, approvals={"pending_ttl_s": 60})
    lead = new_key(server, "lena", ["billing-lead"])
    with server.admin() as admin:
        limit = {"role": "agent", "upstream": "pay", "limit": 1, "period": "minute"}
        assert admin.post("/limits", json=limit).status_code == 201
    approval_id = tool_refusal(await _refund(server, MODERN))["approval_id"]  # queued: no token taken
    assert not (await _refund(server, MODERN, amount=50)).is_error  # unattended: the minute's token
    with _api(server, lead) as api:
        assert api.post(f"/approvals/{approval_id}/approve").status_code == 200
    limited = tool_refusal(await _refund(server, MODERN))
    assert limited["reason"] == "rate_limited"  # refused after the approval was claimed ...
    with _api(server, lead) as api:
        assert api.get(f"/approvals/{approval_id}").json()["status"] == "approved"  # ... and given back
    clock.now += 61  # the next minute's token
    assert not (await _refund(server, MODERN)).is_error
    assert payments.refunds() == [{"amount": 50, "customer": "acme"}, {"amount": 500, "customer": "acme"}]

    lapsing = tool_refusal(await _refund(server, MODERN, amount=700))["approval_id"]
    clock.now += 61  # past approvals.pending_ttl_s
    with _api(server, lead) as api:
        assert api.get(f"/approvals/{lapsing}").json()["status"] == "expired"
        late = api.post(f"/approvals/{lapsing}/approve")
        assert late.status_code == 409 and late.json()["error"]["status"] == "expired", late.text
    again = tool_refusal(await _refund(server, MODERN, amount=700))
    assert again["reason"] == "approval_pending" and again["approval_id"] != lapsing


async def test_racing_first_calls_open_one_request_and_a_caller_cannot_flood_approvers(
    arbiter_factory: ArbiterFactory, payments: Payments
) -> None:
    server = _start(arbiter_factory, payments, approvals={"max_pending_per_caller": 3})
    first = await asyncio.gather(*(_refund(server, MODERN) for _ in range(4)))
    assert len({tool_refusal(r)["approval_id"] for r in first}) == 1
    for amount in (600, 700):
        assert tool_refusal(await _refund(server, MODERN, amount=amount))["reason"] == "approval_pending"
    full = tool_refusal(await _refund(server, MODERN, amount=800))
    assert full["reason"] == "approval_queue_full" and full["pending_max"] == 3
    with server.admin() as admin:
        assert len(admin.get("/approvals").json()) == 3
    assert payments.refunds() == []


async def test_a_call_the_argument_guard_refuses_is_not_put_before_an_approver(
    arbiter_factory: ArbiterFactory, payments: Payments
) -> None:
    server = _start(arbiter_factory, payments)
    bad = tool_refusal(await _refund(server, MODERN, amount="five hundred"))  # not the schema's integer
    assert bad["reason"] == "invalid_arguments", bad
    with server.admin() as admin:
        assert admin.get("/approvals", params={"status": "all"}).json() == []
