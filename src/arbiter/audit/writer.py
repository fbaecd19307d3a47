"""The audit writer: the request path hands it events; one background task stores them in batches.

Never lossy, never on the request's latency:
- ``reserve()`` takes a slot in the bounded queue *before* a request runs, so a request that ran always
  has room for its record; when the queue is full, or the store is down and the mode is fail-closed,
  ``reserve()`` raises ``AuditUnavailable`` and the request does not run at all.
- ``submit()`` (synchronous, so it also runs when a request is cancelled) queues the record; the request
  is answered only after that.
- The background task renders (redacts, HMACs) and stores a batch at least every
  ``flush_interval_s``. A failed write is retried; records are dropped never: in fail-closed mode they
  wait in memory (and new requests are refused), in spool mode they go to a local append-only file that
  is replayed into the store when it answers again.
- On shutdown the queue is drained into the store, or, if the store is down, into the spool (whatever
  the mode), which the next start replays.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

import anyio
from sqlalchemy.exc import SQLAlchemyError

from arbiter.audit.record import Event
from arbiter.audit.spool import Spool
from arbiter.audit.store import AuditStore
from arbiter.errors import AuditUnavailable
from arbiter.settings import AuditSettings

log = logging.getLogger(__name__)

State = Literal["ok", "spooling", "unavailable"]
_STORE_ERRORS = (SQLAlchemyError, OSError, TimeoutError)


class AuditWriter:
    def __init__(
        self, store: AuditStore, render: Callable[[Event], dict[str, Any]], settings: AuditSettings
    ) -> None:
        self._store = store
        self._render = render
        self._cfg = settings
        self._spool = Spool(settings.spool_dir, settings.batch_max)
        self._queue: deque[Event] = deque()
        self._held: list[dict[str, Any]] = []  # rendered records a failed write left behind
        self._pending = 0  # reserved + queued + held: bounded by queue_max
        self._wake = asyncio.Event()
        self._state: State = "ok"
        self._retry_at = 0.0
        self._leftover = False
        self.stored = 0
        self.refused = 0  # requests refused because nothing could be recorded
        self.dropped = 0  # records that could not be kept at all (see offer())

    @property
    def store(self) -> AuditStore:
        return self._store

    @property
    def state(self) -> State:
        return self._state

    @property
    def refusing(self) -> bool:
        """Whether ``reserve()`` would refuse now (store down in fail-closed mode, or the queue full)."""
        return self._state == "unavailable" or self._pending >= self._cfg.queue_max

    def status(self) -> dict[str, object]:
        return {
            "state": self._state,
            "mode": self._cfg.on_store_failure,
            "queued": self._pending,
            "spooled": self._spool.records,
            "refused": self.refused,
        }

    # --- the request path -------------------------------------------------------------------------

    def reserve(self) -> None:
        """Take a queue slot for one record, or refuse: the caller must not run unaudited."""
        if self._state == "unavailable":
            self.refused += 1
            raise AuditUnavailable("the audit log cannot store records right now; try again shortly")
        if self._pending >= self._cfg.queue_max:
            self.refused += 1
            raise AuditUnavailable("the audit log is behind (its queue is full); try again shortly")
        self._pending += 1

    def submit(self, event: Event) -> None:
        """Queue a record for which ``reserve()`` succeeded. Never blocks, never raises."""
        self._queue.append(event)
        if len(self._queue) == 1 or len(self._queue) >= self._cfg.batch_max:
            self._wake.set()

    def offer(self, event: Event) -> bool:
        """Record something that already happened without running anything (a refused credential):
        queued if there is room, otherwise counted and logged, since nothing ran."""
        try:
            self.reserve()
        except AuditUnavailable:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("audit: %d records of refused requests could not be queued", self.dropped)
            return False
        self.submit(event)
        return True

    # --- the background task ----------------------------------------------------------------------

    async def run(self, stopping: anyio.Event) -> None:
        """Store records until ``stopping`` is set; then drain (see ``drain``)."""
        # Spool files a previous run (or a dead replica) left: stored now, or retried until they are.
        self._leftover = not await self._replay("start-up")
        while not stopping.is_set():
            await self._wait_for_work(stopping)
            if stopping.is_set():
                break
            await self._flush_once()
        await self.drain()

    async def _wait_for_work(self, stopping: anyio.Event) -> None:
        if self._queue:
            timeout = 0.0
        elif self._held or self._spool.active or self._leftover:
            timeout = self._cfg.retry_interval_s  # retry the store even if no new request comes
        else:
            timeout = None
        stop = asyncio.ensure_future(stopping.wait())
        wake = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({stop, wake}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            wake.cancel()
        self._wake.clear()
        if self._queue and len(self._queue) < self._cfg.batch_max and not stopping.is_set():
            # Let a batch gather: records still reach the store within flush_interval_s (<= 1 s).
            with anyio.move_on_after(self._cfg.flush_interval_s):
                await stopping.wait()

    async def _flush_once(self) -> None:
        retry = self._cfg.retry_interval_s
        if (self._held or self._spool.active) and anyio.current_time() < self._retry_at:
            # The store was down a moment ago: do not wait on it again before retry_interval_s.
            if self._spool.active and not self._held:
                batch = self._take()
                if batch:
                    await self._to_spool(batch)
            return
        if self._leftover and anyio.current_time() >= self._retry_at:
            self._leftover = not await self._replay("recovery")
            if self._leftover:
                self._retry_at = anyio.current_time() + retry
        if self._held:
            if not await self._store_batch(self._held, retry=True):
                self._retry_at = anyio.current_time() + retry
                return
            self._held = []
        if self._spool.active and not await self._replay("recovery"):
            self._retry_at = anyio.current_time() + retry
            # Still down: keep the spool in order by sending new records after the ones already there.
            batch = self._take()
            if batch:
                await self._to_spool(batch)
            return
        batch = self._take()
        if batch and not await self._store_batch(batch):
            self._retry_at = anyio.current_time() + retry

    def _take(self) -> list[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        while self._queue and len(batch) < self._cfg.batch_max:
            batch.append(self._render(self._queue.popleft()))
        return batch

    async def _store_batch(self, batch: list[dict[str, Any]], *, retry: bool = False) -> bool:
        try:
            with anyio.fail_after(self._cfg.write_timeout_s):
                await self._store.append(batch)
        except _STORE_ERRORS as exc:
            self._failed(exc)
            if retry:
                # Already held: wait for the next retry (in spool mode, move it to disk instead).
                if self._cfg.on_store_failure == "spool" and await self._to_spool(batch):
                    self._held = []
                    return False
                return False
            if self._cfg.on_store_failure == "spool" and await self._to_spool(batch):
                return False
            self._held = batch
            self._state = "unavailable"
            return False
        self._done(len(batch))
        if self._state != "ok" and not self._spool.active:
            log.warning("audit store is back: records are stored again")
            self._state = "ok"
        return True

    async def _to_spool(self, batch: list[dict[str, Any]]) -> bool:
        try:
            await self._spool.write(batch)
        except OSError as exc:
            # A full or read-only disk: keep the records in memory and refuse new requests.
            log.error(
                "audit spool write failed (%s); refusing new requests until records can be stored",
                exc.strerror or type(exc).__name__,
            )
            self._held = batch
            self._state = "unavailable"
            return False
        self._done(len(batch))
        if self._state != "spooling":
            log.warning("audit store unavailable: spooling records to %s", self._cfg.spool_dir)
        self._state = "spooling"
        return True

    async def _replay(self, when: str) -> bool:
        """Move spooled records (ours and any a dead process left) into the store; False if it is down."""
        if not self._spool.pending_files() and not self._spool.active:
            return True
        try:
            with anyio.fail_after(max(self._cfg.write_timeout_s, 60.0)):
                count = await self._spool.replay(self._store.append_replayed)
        except _STORE_ERRORS as exc:
            self._failed(exc)
            return False
        if count:
            log.warning("audit spool replayed at %s: %d records stored", when, count)
        if self._state == "spooling":
            self._state = "ok"
            log.warning("audit store is back: spooled records replayed, records are stored again")
        return True

    def _done(self, n: int) -> None:
        self._pending -= n
        self.stored += n

    def _failed(self, exc: BaseException) -> None:
        if self._state == "ok":
            # The driver's message only: SQLAlchemy's own text would include the statement's parameters.
            orig = getattr(exc, "orig", None)
            what = str(orig)[:200] if orig is not None else type(exc).__name__
            log.error("audit store write failed (%s); mode %s", what, self._cfg.on_store_failure)

    async def drain(self) -> None:
        """Store what is queued within ``drain_timeout_s``; spool the rest; sign the head."""
        self._retry_at = 0.0
        with anyio.move_on_after(self._cfg.drain_timeout_s):
            while self._queue or self._held:
                before = self._pending
                await self._flush_once()
                if self._pending == before:  # no progress: the store is down
                    break
        rest = self._held + self._take_all()
        self._held = []
        if rest:
            try:
                await self._spool.write(rest)
                self._done(len(rest))
                log.warning(
                    "audit: %d records spooled to %s at shutdown; replayed at next start",
                    len(rest),
                    self._cfg.spool_dir,
                )
            except OSError:
                log.error("audit: %d records could not be stored or spooled at shutdown", len(rest))
        await self._spool.close()
        try:
            with anyio.fail_after(self._cfg.write_timeout_s):
                await self._store.checkpoint()
        except _STORE_ERRORS:
            log.warning("audit: could not sign a final checkpoint at shutdown")

    def _take_all(self) -> list[dict[str, Any]]:
        rest: list[dict[str, Any]] = []
        while self._queue:
            rest.extend(self._take())
        return rest
