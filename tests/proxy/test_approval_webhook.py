"""The approval webhook against a real receiver on loopback and a real migrated SQLite file.

A notice is signed so that the docs' own verification code accepts it (and rejects another secret or a
changed body) and carries the request; a receiver that fails twice gets it on the third attempt, one
that always fails sees exactly ``webhook_attempts`` attempts before the notice is given up; refused,
slow and redirecting receivers fail the attempt; a kick sends at once, an unkicked notice is found on
the next wake and a lapsed lease is taken over; a database error does not end the loop; two replicas on
one database send each notice once.

The loop waits through an injected sleep on a fake clock (shared with the store), so a test steps it to
its next wake instead of waiting out backoffs and leases; no test sleeps a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from arbiter.demo.runner import free_port
from arbiter.proxy.approval_requests import ApprovalRequest, ApprovalRequests, CallFacts
from arbiter.proxy.approval_webhook import WAKE_S, ApprovalWebhook
from arbiter.settings import ApprovalSettings
from arbiter.store.db import create_engine
from tests.conftest import serve_in_thread

SECRET = "whsec-test-0123456789abcdef"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "approvals.md"
LOGGER = "arbiter.proxy.approval_webhook"


def _docs_verify() -> Callable[..., bool]:
    """The signature check the docs give receivers: the first Python block of the Webhook section."""
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index("## Webhook") :]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found is not None, "docs/approvals.md shows no Python verification example"
    namespace: dict[str, Any] = {}
    exec(found.group(1), namespace)  # our own docs, run as a receiver would run them
    return namespace["verify"]


verify = _docs_verify()


@dataclass(frozen=True)
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def payload(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A webhook receiver on loopback: ``/hook`` answers ``fail_status`` to its first ``fail_first``
    posts, then 200; ``/slow`` answers after longer than any attempt may take; ``/moved`` redirects to
    ``/hook``."""

    base: str = ""
    fail_first: int = 0
    fail_status: int = 503
    got: list[Delivery] = field(default_factory=list[Delivery])
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            body = await request.body()
            path = request.url.path
            with self.lock:
                self.got.append(Delivery(path, {k.lower(): v for k, v in request.headers.items()}, body))
                seen = sum(1 for d in self.got if d.path == path)
            if path == "/slow":
                await anyio.sleep(5)
            if path == "/moved":
                return RedirectResponse("/hook", status_code=307)
            return Response(status_code=self.fail_status if seen <= self.fail_first else 200)

        return Starlette(routes=[Route(p, hook, methods=["POST"]) for p in ("/hook", "/slow", "/moved")])

    def deliveries(self, path: str = "/hook") -> list[Delivery]:
        with self.lock:
            return [d for d in self.got if d.path == path]


class FakeClock:
    """Wall time that moves only when the test says; ``sleep`` is the loop's wait seam, ended by
    ``wake_next``."""

    def __init__(self) -> None:
        self.now = time.time()  # near real time, so the docs' replay tolerance accepts the signatures
        self.sleepers: list[tuple[float, asyncio.Event]] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        entry = (self.now + delay, asyncio.Event())
        self.sleepers.append(entry)
        try:
            await entry[1].wait()
        finally:
            if entry in self.sleepers:
                self.sleepers.remove(entry)

    def wake_next(self) -> float:
        """Move to the earliest sleeper's deadline and wake every sleeper due by then; the step taken."""
        deadline = min(d for d, _ in self.sleepers)
        step = max(deadline - self.now, 0.0)
        self.now += step
        for entry in [e for e in self.sleepers if e[0] <= self.now]:
            self.sleepers.remove(entry)
            entry[1].set()
        return step


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 15.0) -> None:
    """Wait for a condition (polled), or fail saying which."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.02)


async def step(clock: FakeClock) -> float:
    """Once the loop waits, move the clock to when it wakes; the fake seconds that took."""

    async def waiting() -> bool:
        return bool(clock.sleepers)

    await until(waiting, "the webhook loop to wait")
    return clock.wake_next()


async def drive(clock: FakeClock, done: Callable[[], Awaitable[bool]], max_steps: int = 60) -> None:
    """Step the loop until ``done``."""
    for _ in range(max_steps):
        if await done():
            return
        await step(clock)
    raise AssertionError("the webhook loop never got there")


def facts(n: int = 0, **arguments: Any) -> CallFacts:
    return CallFacts(
        key=f"call-{n}",
        caller="https://idp.example|agent-7",
        subject="agent-7",
        tenant="acme",
        tool="pay__refund",
        upstream="pay",
        target="refund",
        arguments=arguments or {"amount": 250 + n, "customer": f"c-{n}"},
        rule="p, role:agent, *, pay/refund, call, approve by role:billing-lead",
        approvers=("role:billing-lead",),
        valid_s=3600,
    )


def settings(url: str, *, attempts: int = 8, timeout_s: float = 2.0) -> ApprovalSettings:
    return ApprovalSettings(
        webhook_url=url,
        webhook_secret=SecretStr(SECRET),
        webhook_attempts=attempts,
        webhook_timeout_s=timeout_s,
    )


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    with serve_in_thread(found.app()) as port:
        found.base = f"http://127.0.0.1:{port}"
        yield found


@pytest.fixture
async def engine(sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(sqlite_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(engine: AsyncEngine, clock: FakeClock) -> ApprovalRequests:
    return ApprovalRequests(engine, pending_ttl_s=86400, webhook=True, clock=clock)


@asynccontextmanager
async def running(*webhooks: ApprovalWebhook) -> AsyncIterator[None]:
    async with anyio.create_task_group() as tg:
        for webhook in webhooks:
            tg.start_soon(webhook.run)
        try:
            yield
        finally:
            tg.cancel_scope.cancel()
    for webhook in webhooks:
        await webhook.aclose()


def has(store: ApprovalRequests, request_id: str, webhook: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        found = await store.get(request_id)
        return found is not None and found.webhook == webhook

    return check


def sent(receiver: Receiver, count: int, path: str = "/hook") -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(receiver.deliveries(path)) >= count

    return check


def row(found: ApprovalRequest | None) -> ApprovalRequest:
    assert found is not None
    return found


async def test_a_notice_is_signed_and_carries_the_request(
    store: ApprovalRequests, clock: FakeClock, receiver: Receiver
) -> None:
    opened = await store.open(facts(amount=250, customer="Jürgen Müller"))
    webhook = ApprovalWebhook(store, settings(receiver.base + "/hook"), clock=clock, sleep=clock.sleep)
    async with running(webhook):
        await until(has(store, opened.id, "delivered"), "the notice to be delivered")

    [delivery] = receiver.deliveries()
    header = delivery.headers["arbiter-signature"]
    assert verify(SECRET.encode(), header, delivery.body)
    assert not verify(b"another-secret", header, delivery.body)
    assert not verify(SECRET.encode(), header, delivery.body.replace(b"250", b"950"))
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", header)
    assert delivery.headers["content-type"] == "application/json"
    assert delivery.headers["arbiter-delivery"] == opened.id
    assert delivery.headers["arbiter-attempt"] == "1"
    assert delivery.headers["user-agent"].startswith("arbiter/")
    payload = delivery.payload
    assert payload["type"] == "approval.requested"
    assert payload["attempt"] == 1
    assert payload["sent_s"] == clock.now
    approval = payload["approval"]
    assert approval["id"] == opened.id
    assert approval["tool"] == "pay__refund"
    assert approval["arguments"] == {"amount": 250, "customer": "Jürgen Müller"}
    assert approval["approvers"] == ["role:billing-lead"]
    assert "caller" not in approval  # the issuer stays out, as in the admin API
    # Compact UTF-8, not ASCII escapes.
    assert "Jürgen Müller".encode() in delivery.body
    assert delivery.body == json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


async def test_a_receiver_failing_twice_gets_the_notice_on_the_third_attempt(
    store: ApprovalRequests, clock: FakeClock, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    receiver.fail_first = 2
    opened = await store.open(facts(customer="c-secretive"))
    webhook = ApprovalWebhook(store, settings(receiver.base + "/hook"), clock=clock, sleep=clock.sleep)
    async with running(webhook):
        await drive(clock, has(store, opened.id, "delivered"))

    deliveries = receiver.deliveries()
    assert [d.headers["arbiter-attempt"] for d in deliveries] == ["1", "2", "3"]
    assert [d.payload["attempt"] for d in deliveries] == [1, 2, 3]
    assert all(verify(SECRET.encode(), d.headers["arbiter-signature"], d.body) for d in deliveries)
    # Backed off 2 s, then 4 s (fake seconds: the clock only moved when the loop waited).
    sent_s = [d.payload["sent_s"] for d in deliveries]
    assert sent_s[1] - sent_s[0] >= 2
    assert sent_s[2] - sent_s[1] >= 4
    failures = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(failures) == 2
    assert all(opened.id in r.getMessage() and "HTTP 503" in r.getMessage() for r in failures)
    assert "attempt 1 of 8" in failures[0].getMessage() and "attempt 2 of 8" in failures[1].getMessage()
    assert SECRET not in caplog.text and "c-secretive" not in caplog.text and "/hook" not in caplog.text


async def test_a_receiver_always_failing_is_given_up_after_the_attempts(
    store: ApprovalRequests, clock: FakeClock, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    receiver.fail_first = 1000
    receiver.fail_status = 500
    opened = await store.open(facts())
    webhook = ApprovalWebhook(
        store, settings(receiver.base + "/hook", attempts=3), clock=clock, sleep=clock.sleep
    )
    async with running(webhook):
        await drive(clock, has(store, opened.id, "failed"))
        for _ in range(3):  # given up means given up: later wakes send nothing
            await step(clock)

    assert [d.payload["attempt"] for d in receiver.deliveries()] == [1, 2, 3]
    assert row(await store.get(opened.id)).webhook == "failed"
    assert "attempt 3 of 3 failed (HTTP 500); giving up" in caplog.text


@pytest.mark.parametrize("path", ["/slow", "/moved", "refused"])
async def test_a_slow_redirecting_or_absent_receiver_fails_the_attempt(
    path: str,
    store: ApprovalRequests,
    clock: FakeClock,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    url = f"http://127.0.0.1:{free_port()}/hook" if path == "refused" else receiver.base + path
    opened = await store.open(facts())
    webhook = ApprovalWebhook(store, settings(url, attempts=1, timeout_s=0.5), clock=clock, sleep=clock.sleep)
    async with running(webhook):
        await until(has(store, opened.id, "failed"), "the attempt to fail")

    problem = {"/slow": "TimeoutError|ReadTimeout", "/moved": "HTTP 307", "refused": "ConnectError"}[path]
    assert re.search(rf"attempt 1 of 1 failed \(({problem})\); giving up", caplog.text)
    assert receiver.deliveries("/hook") == []  # a redirect is not followed


async def test_a_kick_sends_at_once_and_an_unkicked_notice_waits_at_most_one_wake(
    store: ApprovalRequests, clock: FakeClock, receiver: Receiver
) -> None:
    webhook = ApprovalWebhook(store, settings(receiver.base + "/hook"), clock=clock, sleep=clock.sleep)
    async with running(webhook):
        await step(clock)  # the first pass found nothing; now the loop waits its wake
        # Opened on another replica: nobody kicks this one, which finds it when it next wakes.
        elsewhere = await store.open(facts(1))
        assert await step(clock) <= WAKE_S
        await until(has(store, elsewhere.id, "delivered"), "the unkicked notice")
        # Opened here: the kick sends it without the clock moving at all.
        await until(lambda: _true(bool(clock.sleepers)), "the loop to wait again")
        here = await store.open(facts(2))
        webhook.kick(here)
        await until(has(store, here.id, "delivered"), "the kicked notice")
    assert [d.headers["arbiter-delivery"] for d in receiver.deliveries()] == [elsewhere.id, here.id]


async def _true(value: bool) -> bool:
    return value


async def test_a_lapsed_lease_is_taken_over(
    store: ApprovalRequests, clock: FakeClock, receiver: Receiver
) -> None:
    opened = await store.open(facts())
    # A replica leased the first attempt and died before sending or recording anything.
    assert await store.lease_notice(opened, 2.0 + 5.0)
    leased_s = clock.now
    webhook = ApprovalWebhook(store, settings(receiver.base + "/hook"), clock=clock, sleep=clock.sleep)
    async with running(webhook):
        await drive(clock, has(store, opened.id, "delivered"))

    [delivery] = receiver.deliveries()
    assert delivery.payload["attempt"] == 2
    assert delivery.payload["sent_s"] >= leased_s + 7.0  # not while the lease held


async def test_the_loop_survives_a_database_error(
    sqlite_url: str,
    store: ApprovalRequests,
    clock: FakeClock,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    path = sqlite_url.split("///", 1)[1]

    def rename(old: str, new: str) -> None:
        with sqlite3.connect(path) as db:
            db.execute(f"ALTER TABLE {old} RENAME TO {new}")

    async def logged() -> bool:
        return "the database failed" in caplog.text

    webhook = ApprovalWebhook(store, settings(receiver.base + "/hook"), clock=clock, sleep=clock.sleep)
    async with running(webhook):
        await step(clock)  # idle after a first pass that found nothing
        rename("approval_requests", "approval_requests_away")
        await step(clock)
        await until(logged, "the database error to be logged")
        rename("approval_requests_away", "approval_requests")
        opened = await store.open(facts())
        await drive(clock, has(store, opened.id, "delivered"))
    assert "OperationalError" in caplog.text


async def test_run_returns_once_told_to_stop(
    store: ApprovalRequests, clock: FakeClock, receiver: Receiver
) -> None:
    webhook = ApprovalWebhook(store, settings(receiver.base + "/hook"), clock=clock, sleep=clock.sleep)
    stopping = anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(webhook.run, stopping)
            await until(lambda: _true(bool(clock.sleepers)), "the loop to wait")
            stopping.set()  # the task group then ends only if run returns
    await webhook.aclose()


async def test_two_replicas_send_each_notice_once(sqlite_url: str, receiver: Receiver) -> None:
    """Real time and real waits: two engines on one file, racing for the same due rows."""
    engines = [create_engine(sqlite_url), create_engine(sqlite_url)]
    stores = [ApprovalRequests(e, pending_ttl_s=86400, webhook=True) for e in engines]
    opened = [await stores[n % 2].open(facts(n)) for n in range(12)]
    webhooks = [ApprovalWebhook(s, settings(receiver.base + "/hook")) for s in stores]

    async def all_delivered() -> bool:
        rows = [await stores[0].get(o.id) for o in opened]
        return all(r is not None and r.webhook == "delivered" for r in rows)

    try:
        async with running(*webhooks):
            await until(all_delivered, "every notice to be delivered")
    finally:
        for engine in engines:
            await engine.dispose()
    ids = sorted(d.headers["arbiter-delivery"] for d in receiver.deliveries())
    assert ids == sorted(o.id for o in opened)  # each once
    assert {d.payload["attempt"] for d in receiver.deliveries()} == {1}
