"""Tells an outside system (chat, ticketing, a pager) that an approval waits: a signed POST per new pending
request (``approval_requests.py``), retried with backoff, sent once across replicas (docs/approvals.md).

The queue is the ``approval_requests`` table itself, not memory: a request opened on one replica may be
sent by another, and a notice that was due when a replica stopped is sent by the next one that looks.
``kick`` is the fast path for a request opened on this replica; every replica also looks at least every
``WAKE_S`` for rows it was not told about (opened or retried elsewhere, or leased by a replica that died
mid-attempt, once that lease lapses).

Each attempt first takes a lease on its row (a conditional update that also counts the attempt), so two
replicas never send the same attempt; the lease outlasts the attempt's own time limit. Delivery is at
least once, not exactly once: a replica that sent but died before it recorded the outcome leaves the row
to be sent again once its lease lapses. ``Arbiter-Delivery`` (the approval id) lets a receiver drop the
repeat.

The body is signed the way Stripe signs its webhooks (``t=<unix s>,v1=<hex HMAC-SHA256 of "t." + body>``)
so receivers can reuse code they have. Logs name the approval, the attempt and what failed, never the
secret, the body (it carries the call's arguments) or the URL (chat webhook URLs embed a token).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version

import anyio
import httpx
from sqlalchemy.exc import SQLAlchemyError

from arbiter.limits.store import db_error_message
from arbiter.proxy.approval_requests import ApprovalRequest, ApprovalRequests
from arbiter.settings import ApprovalSettings

log = logging.getLogger(__name__)

EVENT = "approval.requested"
WAKE_S = 5.0  # look for notices this replica was not kicked for at least this often
LEASE_MARGIN_S = 5.0  # a lease outlasts the attempt's time limit by this much
BACKOFF_FIRST_S = 2.0  # after attempt n fails: 2, 4, 8, ... s
BACKOFF_CAP_S = 300.0
DB_RETRY_FIRST_S = 1.0  # after a database error: 1, 2, 4, ... s
DB_RETRY_CAP_S = 30.0
BATCH = 20  # due rows read at a time

Sleep = Callable[[float], Awaitable[None]]


def backoff_s(attempt: int) -> float:
    """How long after failed attempt ``attempt`` (1-based) the next one is due."""
    return min(BACKOFF_FIRST_S * 2 ** (attempt - 1), BACKOFF_CAP_S)


def signature(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``Arbiter-Signature`` header's value for ``body`` sent at ``timestamp``."""
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def _user_agent() -> str:
    try:
        return f"arbiter/{version('arbiter')}"
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
        return "arbiter"


class ApprovalWebhook:
    """The delivery loop of one replica; ``run`` in the app's task group, ``kick`` as the approval
    interceptor's ``on_request``.

    ``clock`` (wall time, shared with the store's) dates attempts and signatures and decides what is due;
    ``sleep`` is how the loop waits between passes. Tests inject both to step through backoffs without
    waiting them out; ``transport`` is httpx's seam.
    """

    def __init__(
        self,
        requests: ApprovalRequests,
        settings: ApprovalSettings,
        *,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        if settings.webhook_url is None or settings.webhook_secret is None:
            raise ValueError("the approval webhook needs approvals.webhook_url and approvals.webhook_secret")
        self._requests = requests
        httpx.URL(settings.webhook_url)  # an unusable URL fails here, at startup, not in every attempt
        self._url = settings.webhook_url
        self._secret = settings.webhook_secret.get_secret_value().encode()
        self._attempts = settings.webhook_attempts
        self._timeout_s = settings.webhook_timeout_s
        self._lease_s = settings.webhook_timeout_s + LEASE_MARGIN_S
        self._clock = clock
        self._sleep = sleep
        # A receiver's redirect is its misconfiguration, not an instruction to post the call's arguments
        # elsewhere: it counts as a failed attempt.
        self._client = httpx.AsyncClient(
            transport=transport,
            timeout=settings.webhook_timeout_s,
            follow_redirects=False,
            headers={"User-Agent": _user_agent()},
        )
        # Set by kick (synchronous, on the event loop's thread); cleared when a pass starts, so a kick
        # during a pass brings another pass rather than being lost.
        self._kicked = asyncio.Event()
        self._stopping: anyio.Event | None = None

    def kick(self, opened: ApprovalRequest | None = None) -> None:
        """A request was just opened on this replica: look for due notices now rather than at the next
        wake. Never blocks; ``opened`` is accepted for the interceptor's callback and not needed."""
        self._kicked.set()

    async def run(self, stopping: anyio.Event | None = None) -> None:
        """Deliver due notices until ``stopping`` is set (between attempts, never mid-attempt) or the task
        is cancelled. A failed delivery is retried per row; a database error is logged and the pass
        retried after a backoff: nothing else ends the loop."""
        self._stopping = stopping
        self._kicked = asyncio.Event()  # bound to this run's event loop (an app may be started again)
        db_failures = 0
        while not self._stopped():
            self._kicked.clear()
            try:
                wait_s = await self._pass()
                db_failures = 0
            except (SQLAlchemyError, OSError) as exc:
                db_failures += 1
                wait_s = min(DB_RETRY_FIRST_S * 2 ** (db_failures - 1), DB_RETRY_CAP_S)
                log.warning(
                    "approval webhook: the database failed (%s); looking again in %.0f s",
                    db_error_message(exc),
                    wait_s,
                )
            await self._idle(wait_s)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _pass(self) -> float:
        """Send every notice due now; how long until the loop should look again."""
        while True:
            due = await self._requests.due_notices(limit=BATCH)
            taken = 0
            for found in due:
                if self._stopped():
                    return 0.0
                taken += await self._attempt(found)
            if len(due) < BATCH or taken == 0:
                break
        next_s = await self._requests.next_notice_s()
        if next_s is None:
            return WAKE_S
        return min(max(next_s - self._clock(), 0.0), WAKE_S)

    async def _attempt(self, found: ApprovalRequest) -> bool:
        """One attempt at one row, if this replica gets its lease; whether it did."""
        if found.webhook_attempts >= self._attempts:
            # The last attempt was leased by a replica that stopped before recording its outcome.
            log.warning(
                "approval %s: webhook gave up after %d attempts (the last one's outcome was not recorded)",
                found.id,
                found.webhook_attempts,
            )
            await self._requests.notice_done(found.id, found.webhook_attempts, outcome="failed")
            return True
        if not await self._requests.lease_notice(found, self._lease_s):
            return False  # another replica has it, or just had it
        attempt = found.webhook_attempts + 1
        problem = await self._send(found, attempt)
        if problem is None:
            log.info("approval %s: webhook delivered (attempt %d)", found.id, attempt)
            await self._requests.notice_done(found.id, attempt, outcome="delivered")
        elif attempt >= self._attempts:
            log.warning(
                "approval %s: webhook attempt %d of %d failed (%s); giving up",
                found.id,
                attempt,
                self._attempts,
                problem,
            )
            await self._requests.notice_done(found.id, attempt, outcome="failed")
        else:
            delay = backoff_s(attempt)
            log.warning(
                "approval %s: webhook attempt %d of %d failed (%s); trying again in %.0f s",
                found.id,
                attempt,
                self._attempts,
                problem,
                delay,
            )
            await self._requests.notice_done(found.id, attempt, outcome="due", next_s=self._clock() + delay)
        return True

    async def _send(self, found: ApprovalRequest, attempt: int) -> str | None:
        """POST the notice; None if the receiver took it (2xx), else what went wrong, for the log."""
        sent = self._clock()
        payload = {"type": EVENT, "approval": found.to_json(), "attempt": attempt, "sent_s": sent}
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
        headers = {
            "Content-Type": "application/json",
            "Arbiter-Signature": signature(self._secret, int(sent), body),
            "Arbiter-Delivery": found.id,
            "Arbiter-Attempt": str(attempt),
        }
        try:
            # httpx's timeout bounds each read and write, not the whole exchange; the lease needs a bound
            # on the whole, so a receiver that answers a byte at a time cannot outlast it.
            with anyio.fail_after(self._timeout_s):
                # The response's body is never read: a receiver's answer is its status.
                async with self._client.stream("POST", self._url, content=body, headers=headers) as response:
                    status = response.status_code
        except (httpx.HTTPError, OSError) as exc:  # TimeoutError is an OSError
            return type(exc).__name__
        return None if 200 <= status < 300 else f"HTTP {status}"

    async def _idle(self, wait_s: float) -> None:
        """Wait ``wait_s`` (by the injected sleep), or until kicked or told to stop."""
        if self._kicked.is_set() or self._stopped():
            return
        async with anyio.create_task_group() as tg:

            async def on_stop(stopping: anyio.Event) -> None:
                await stopping.wait()
                tg.cancel_scope.cancel()

            async def on_kick() -> None:
                await self._kicked.wait()
                tg.cancel_scope.cancel()

            async def on_time() -> None:
                await self._sleep(wait_s)
                tg.cancel_scope.cancel()

            tg.start_soon(on_kick)
            tg.start_soon(on_time)
            if self._stopping is not None:
                tg.start_soon(on_stop, self._stopping)

    def _stopped(self) -> bool:
        return self._stopping is not None and self._stopping.is_set()
