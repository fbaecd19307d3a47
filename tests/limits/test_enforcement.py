"""Limits enforced by a real Arbiter in front of a real upstream: rate limits, budgets, refunds, the
loop breaker and request keys, on the in-process backend and on Redis."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import httpx
import pytest

from arbiter.errors import UpstreamUnavailable
from arbiter.proxy.interceptors.limits import IDEMPOTENCY_META
from arbiter.proxy.pipeline import CallContext, CallNext, Result
from tests.conftest import ArbiterFactory, ArbiterServer, Recorder, UpstreamProc
from tests.limits.conftest import admin_post, call, open_session
from tests.policies.conftest import new_key

SEARCH = "kb__search_docs"


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings overrides for each backend (Redis with a key prefix of the test's own)."""
    if request.param == "memory":
        return {}
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("redis_prefix")
    return {"redis_url": url, "limits": {"redis_prefix": prefix}}


def _forwarded(recorder: Recorder) -> int:
    return sum(1 for c in recorder.calls if c.method == "tools/call")


async def test_burst_of_one_and_a_half_times_the_limit_admits_exactly_the_limit(
    arbiter_factory: ArbiterFactory,
    kb_upstream: UpstreamProc,
    backend: dict[str, Any],
    http: httpx.AsyncClient,
) -> None:
    recorder = Recorder()
    server = arbiter_factory([recorder], **backend)
    server.register("kb", kb_upstream.url)
    # 20 per day: refills one call every 72 minutes, so no refill can land within the burst.
    rule = admin_post(server, "/limits", {"upstream": "kb", "limit": 20, "period": "day"})
    replies = await asyncio.gather(
        *(call(http, server, server.agent_key, SEARCH, {"query": f"sso {i}"}) for i in range(30))
    )
    admitted = [r for r in replies if r.ok]
    refused = [r for r in replies if not r.ok]
    assert len(admitted) == 20
    assert _forwarded(recorder) == 20
    assert len(refused) == 10 and {r.reason for r in refused} == {"rate_limited"}
    assert all(r.tool_error for r in refused)  # handed to the model as a failed tool result
    data = refused[0].refusal
    assert data["rule_id"] == rule["id"]
    # Retry after about one refill interval (72 min), never 0.
    assert 0 < data["retry_after_s"] <= 72 * 60


async def test_most_specific_rule_per_scope_applies_and_other_scopes_still_count(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc, http: httpx.AsyncClient
) -> None:
    server = arbiter_factory()
    server.register("kb", kb_upstream.url)
    # Per principal: role rule 2/day, overridden for this agent (more specific: subject + role) by 5/day.
    admin_post(server, "/limits", {"role": "agent", "limit": 2, "period": "day"})
    admin_post(server, "/limits", {"subject": "test-agent", "role": "agent", "limit": 5, "period": "day"})
    # A tenant-wide total counts every call as well: 4/day for all of acme.
    admin_post(server, "/limits", {"tenant": "acme", "per": [], "limit": 4, "period": "day"})
    other = new_key(server, "other-agent", ["agent"])
    first = [await call(http, server, server.agent_key, SEARCH, {"query": str(i)}) for i in range(3)]
    assert [r.ok for r in first] == [True, True, True]  # the override (5), not the role rule (2)
    second = [await call(http, server, other, SEARCH, {"query": str(i)}) for i in range(2)]
    # other-agent has the role rule (2) but acme's total (4) has one call left.
    assert [r.ok for r in second] == [True, False]
    assert second[1].reason == "rate_limited"
    with server.admin() as admin:
        explained = admin.post(
            "/limits/explain",
            json={"subject": "test-agent", "roles": ["agent"], "tenant": "acme", "tool": SEARCH},
        ).json()
    assert len(explained["rules"]) == 2


async def test_a_role_rule_does_not_lift_a_cap_on_one_tool(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc, http: httpx.AsyncClient
) -> None:
    server = arbiter_factory()
    server.register("kb", kb_upstream.url)
    cap = admin_post(server, "/limits", {"upstream": "kb", "tool": "get_*", "limit": 1, "period": "day"})
    # More exact fields, but not a subset of the cap's calls (it covers every tool of kb): both apply.
    admin_post(server, "/limits", {"role": "agent", "upstream": "kb", "limit": 60, "period": "day"})
    doc = {"doc_id": "sso-setup"}
    assert (await call(http, server, server.agent_key, "kb__get_doc", doc)).ok
    capped = await call(http, server, server.agent_key, "kb__get_doc", doc)
    assert capped.reason == "rate_limited" and capped.refusal["rule_id"] == cap["id"]
    assert (await call(http, server, server.agent_key, SEARCH, {"query": "x"})).ok  # the role's 60 only


async def test_budget_admits_exactly_what_it_holds_under_100_concurrent_calls(
    arbiter_factory: ArbiterFactory,
    kb_upstream: UpstreamProc,
    backend: dict[str, Any],
    http: httpx.AsyncClient,
) -> None:
    recorder = Recorder()
    server = arbiter_factory([recorder], **backend)
    server.register("kb", kb_upstream.url)
    admin_post(server, "/tool-costs", {"tool": "kb/*", "cost": 2.5})
    budget = admin_post(
        server, "/budgets", {"tenant": "acme", "per": ["tenant"], "period": "day", "limit": 25}
    )
    replies = await asyncio.gather(
        *(call(http, server, server.agent_key, SEARCH, {"query": f"q{i}"}) for i in range(100))
    )
    assert sum(r.ok for r in replies) == 10
    assert _forwarded(recorder) == 10  # nothing over budget reached the upstream
    refused = [r for r in replies if not r.ok]
    assert {r.reason for r in refused} == {"budget_exceeded"}
    data = refused[0].refusal
    assert refused[0].tool_error
    assert data["budget_id"] == budget["id"] and data["limit"] == 25 and data["cost"] == 2.5
    usage = _usage(server, group_by="tenant")
    assert usage["totals"] == {"calls": 10, "limited": 90, "cost": 25.0}


async def test_a_duplicate_of_a_request_that_ran_is_refused_and_not_run_again(
    arbiter_factory: ArbiterFactory,
    kb_upstream: UpstreamProc,
    backend: dict[str, Any],
    http: httpx.AsyncClient,
) -> None:
    recorder = Recorder()
    server = arbiter_factory([recorder], **backend)
    server.register("kb", kb_upstream.url)
    admin_post(server, "/budgets", {"period": "day", "limit": 3})  # 3 calls at the default cost of 1
    admin_post(server, "/tool-costs", {"tool": "kb/*", "loop_max_repeats": 2})
    key = server.agent_key
    same = {IDEMPOTENCY_META: f"req-{uuid.uuid4().hex}"}
    # The same request 50 times (stateless era, idempotency key): it runs and is charged once; every
    # copy is refused, reaches no upstream, and neither charges nor counts for the loop breaker.
    replies = [await call(http, server, key, SEARCH, {"query": "sso"}, meta=same) for _ in range(50)]
    assert replies[0].ok
    assert {r.reason for r in replies[1:]} == {"duplicate_request"}
    error = replies[1].error
    assert error["code"] == -31009 and "will not be run or charged again" in error["message"]
    assert _forwarded(recorder) == 1
    # Handshake era: the same JSON-RPC id in the same session is the same request ...
    session = await open_session(http, server, key)
    assert (await call(http, server, key, SEARCH, {"query": "vat"}, request_id=41, session=session)).ok
    again = await call(http, server, key, SEARCH, {"query": "vat"}, request_id=41, session=session)
    assert again.reason == "duplicate_request"
    # ... and in another session it is another request: run and charged. That is the budget's third unit.
    other = await open_session(http, server, key)
    assert (await call(http, server, key, SEARCH, {"query": "vat"}, request_id=41, session=other)).ok
    assert _forwarded(recorder) == 3
    over = await call(http, server, key, SEARCH, {"query": "new"}, meta={IDEMPOTENCY_META: "another"})
    assert over.reason == "budget_exceeded"
    assert over.refusal["spent"] == 3
    # Without a key, stateless requests are each new (their ids are unique only per client): refused.
    assert (await call(http, server, key, SEARCH, {"query": "sso"})).reason == "budget_exceeded"
    usage = _usage(server, group_by="tenant")
    assert usage["totals"] == {"calls": 3, "limited": 49 + 1 + 2, "cost": 3.0}


class FailOnce:
    """Fails the first tool call as an unreachable upstream does, before anything is sent to it."""

    def __init__(self) -> None:
        self.failed = False

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        if ctx.method == "tools/call" and not self.failed:
            self.failed = True
            raise UpstreamUnavailable.of(ctx.upstream or "?")
        return await call_next(ctx)


async def test_a_retry_after_a_refunded_failure_is_a_new_request_charged_once(
    arbiter_factory: ArbiterFactory,
    kb_upstream: UpstreamProc,
    backend: dict[str, Any],
    http: httpx.AsyncClient,
) -> None:
    reached, ran = Recorder(), Recorder()
    server = arbiter_factory([reached, FailOnce(), ran], **backend)
    server.register("kb", kb_upstream.url)
    admin_post(server, "/budgets", {"period": "day", "limit": 1})
    key = server.agent_key
    same = {IDEMPOTENCY_META: f"req-{uuid.uuid4().hex}"}
    failed = await call(http, server, key, SEARCH, {"query": "sso"}, meta=same)
    assert failed.reason == "upstream_unavailable"
    # Refunded, and its key released: the retry runs, and is charged (the one unit of the budget) ...
    assert (await call(http, server, key, SEARCH, {"query": "sso"}, meta=same)).ok
    assert _forwarded(reached) == 2 and _forwarded(ran) == 1
    # ... once: a copy of it now is a duplicate, and the budget has nothing left for a new request.
    assert (await call(http, server, key, SEARCH, {"query": "sso"}, meta=same)).reason == "duplicate_request"
    over = await call(http, server, key, SEARCH, {"query": "new"})
    assert over.reason == "budget_exceeded" and over.refusal["spent"] == 1
    assert _forwarded(ran) == 1


async def test_the_same_key_with_other_arguments_or_from_another_caller_is_another_request(
    arbiter_factory: ArbiterFactory,
    kb_upstream: UpstreamProc,
    backend: dict[str, Any],
    http: httpx.AsyncClient,
) -> None:
    recorder = Recorder()
    server = arbiter_factory([recorder], **backend)
    server.register("kb", kb_upstream.url)
    admin_post(server, "/budgets", {"period": "day", "limit": 2})  # per principal
    other = new_key(server, "other-agent", ["agent"])
    same = {IDEMPOTENCY_META: "the-same-key"}
    assert (await call(http, server, server.agent_key, SEARCH, {"query": "a"}, meta=same)).ok
    assert (await call(http, server, server.agent_key, SEARCH, {"query": "b"}, meta=same)).ok
    assert (await call(http, server, other, SEARCH, {"query": "a"}, meta=same)).ok
    assert _forwarded(recorder) == 3
    copy = await call(http, server, server.agent_key, SEARCH, {"query": "a"}, meta=same)
    assert copy.reason == "duplicate_request"
    # Both of test-agent's requests were charged: its budget of 2 is spent.
    over = await call(http, server, server.agent_key, SEARCH, {"query": "c"}, meta=same)
    assert over.reason == "budget_exceeded" and over.refusal["spent"] == 2


class Gate:
    """Holds the first tool call until ``open`` is set (from the test's thread); lets others through."""

    def __init__(self) -> None:
        self.held = threading.Event()
        self.open = threading.Event()

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        if ctx.method == "tools/call" and not self.held.is_set():
            self.held.set()
            await asyncio.to_thread(self.open.wait, 30)
        return await call_next(ctx)


async def test_a_copy_of_a_request_still_running_is_refused(
    arbiter_factory: ArbiterFactory,
    kb_upstream: UpstreamProc,
    backend: dict[str, Any],
    http: httpx.AsyncClient,
) -> None:
    recorder, gate = Recorder(), Gate()
    server = arbiter_factory([recorder, gate], **backend)
    server.register("kb", kb_upstream.url)
    admin_post(server, "/budgets", {"period": "day", "limit": 100})
    same = {IDEMPOTENCY_META: f"req-{uuid.uuid4().hex}"}
    original = asyncio.create_task(call(http, server, server.agent_key, SEARCH, {"query": "sso"}, meta=same))
    try:
        assert await asyncio.to_thread(gate.held.wait, 20)
        copies = await asyncio.gather(
            *(call(http, server, server.agent_key, SEARCH, {"query": "sso"}, meta=same) for _ in range(20))
        )
        assert {r.reason for r in copies} == {"duplicate_request"}
    finally:
        gate.open.set()
    assert (await original).ok
    assert _forwarded(recorder) == 1


async def test_a_failed_upstream_call_is_refunded(
    arbiter_factory: ArbiterFactory,
    kb_upstream: UpstreamProc,
    backend: dict[str, Any],
    http: httpx.AsyncClient,
) -> None:
    doomed = UpstreamProc("arbiter.demo.kb").start()
    try:
        server = arbiter_factory(**backend)
        server.register("kb", kb_upstream.url)
        server.register("kb2", doomed.url)
        admin_post(server, "/budgets", {"period": "day", "limit": 1})
        doomed.kill()
        failed = await call(http, server, server.agent_key, "kb2__search_docs", {"query": "sso"})
        assert failed.reason == "upstream_unavailable"
        # The unit the failed call reserved is back: one call still fits, a second does not.
        assert (await call(http, server, server.agent_key, SEARCH, {"query": "sso"})).ok
        assert (
            await call(http, server, server.agent_key, SEARCH, {"query": "x"})
        ).reason == "budget_exceeded"
        usage = _usage(server, group_by="upstream")
        by_upstream = {r["upstream"]: r for r in usage["rows"]}
        assert by_upstream["kb2"]["cost"] == 0 and by_upstream["kb2"]["calls"] == 1
        assert by_upstream["kb"]["cost"] == 1
    finally:
        doomed.kill()


async def test_loop_breaker_trips_on_the_n_plus_first_identical_call_only(
    arbiter_factory: ArbiterFactory,
    kb_upstream: UpstreamProc,
    backend: dict[str, Any],
    http: httpx.AsyncClient,
) -> None:
    server = arbiter_factory(**backend)
    server.register("kb", kb_upstream.url)
    admin_post(server, "/tool-costs", {"tool": "kb/search_docs", "loop_max_repeats": 3, "loop_window_s": 600})
    key = server.agent_key
    same = {"query": "password reset", "limit": 2}
    for _ in range(3):
        assert (await call(http, server, key, SEARCH, same)).ok
    tripped = await call(
        http, server, key, SEARCH, dict(reversed(same.items()))
    )  # same arguments, other order
    assert tripped.reason == "repeated_call"
    assert tripped.tool_error
    assert 0 < tripped.refusal["retry_after_s"] <= 600
    assert (await call(http, server, key, SEARCH, {"query": "password reset", "limit": 3})).ok
    # Another caller making the same call is not in this caller's loop.
    other = new_key(server, "other-agent", ["agent"])
    assert (await call(http, server, other, SEARCH, same)).ok
    # A tool without the setting has no loop breaker (the default is off).
    for _ in range(5):
        assert (await call(http, server, key, "kb__get_doc", {"doc_id": "sso-setup"})).ok


async def test_limits_apply_only_to_calls_the_policy_allows(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc, http: httpx.AsyncClient
) -> None:
    server = arbiter_factory(policy="p, *, *, kb/search_docs, call, allow\n")
    server.register("kb", kb_upstream.url)
    admin_post(server, "/limits", {"limit": 1, "period": "day"})
    hidden = [await call(http, server, server.agent_key, "kb__get_doc", {"doc_id": "x"}) for _ in range(3)]
    # An invisible tool still looks unknown, however often it is asked for, and uses no tokens.
    assert all(r.error["code"] == -32602 and "data" not in r.error for r in hidden)
    assert (await call(http, server, server.agent_key, SEARCH, {"query": "sso"})).ok
    assert (await call(http, server, server.agent_key, SEARCH, {"query": "sso"})).reason == "rate_limited"


def _usage(server: ArbiterServer, **params: str) -> dict[str, Any]:
    with server.admin() as admin:
        resp = admin.get("/usage", params=params)
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out
