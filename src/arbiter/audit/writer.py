"""The audit writer: the request path hands it events; one background task stores them in batches.

Never lossy, never on the request's latency:
- ``reserve()`` takes a slot in the bounded queue *before* a request runs, so a request that ran always
  has room for its record; when the queue is full, or the store is down and the mode is fail-closed,
  ``reserve()`` raises ``AuditUnavailable`` and the request does not run at all.
- ``submit()`` (synchronous, so it also runs when a request is cancelled) queues the record; the request
  is answered only after that, and (``audit.confirm_before_answer``, the default) only once ``confirmed()``
  says the record is in the store or the spool: a process killed after answering has lost no record of
  what it answered. Such waits flush at once, so records that arrive during a write share the next one;
  when records come faster than one per ``_GROUP_WINDOW_S``, the write waits that long for those of
  the requests still running (group commit).
- The background task renders (redacts, HMACs) and stores a batch at least every
  ``flush_interval_s``. A failed write is retried; records are dropped never: in fail-closed mode they
  wait in memory (and new requests are refused), in spool mode they go to a local append-only file that
  is replayed into the store when it answers again.
- On shutdown the queue is drained into the store, or, if the store is down, into the spool (whatever
  the mode), which the next start replays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import anyio
import anyio.to_thread
from sqlalchemy.exc import SQLAlchemyError

from arbiter.audit.confirmations import Confirmations
from arbiter.audit.record import Event, light, render_all
from arbiter.audit.spool import Spool
from arbiter.audit.store import AuditStore
from arbiter.errors import AuditUnavailable
from arbiter.settings import AuditSettings

log = logging.getLogger(__name__)

State = Literal["ok", "spooling", "unavailable"]
# How long a write that a request waits for may wait for records of other requests still running
# (group commit), when records come faster than one per window: one write then confirms several calls.
_GROUP_WINDOW_S = 0.002
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
        self._held_tried = False  # a write of _held was attempted (and may have committed)
        self._pending = 0  # reserved + queued + held: bounded by queue_max
        self._wake = asyncio.Event()
        self._state: State = "ok"
        self._retry_at = 0.0
        self._leftover = False
        self._closed = False
        self._last_error = ""
        self.stored = 0
        self.refused = 0  # requests refused because nothing could be recorded
        self.dropped = 0  # records that could not be kept at all (see offer())
        self._confirms = Confirmations()  # which records are stored or spooled; who waits for theirs
        # Seconds between records lately: a group write waits for others only if they come that often.
        self._gap = 1.0
        self._last_submit = 0.0
        # Told how long each batch write to the store took, in seconds, failed ones too (metrics).
        self.on_write: Callable[[float], None] | None = None

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

    @property
    def queued(self) -> int:
        """Records reserved, queued or held (not yet stored or spooled)."""
        return self._pending

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
        if self._state == "unavailable" or self._closed:
            self.refused += 1
            raise AuditUnavailable("the audit log cannot store records right now; try again shortly")
        if self._pending >= self._cfg.queue_max:
            self.refused += 1
            raise AuditUnavailable("the audit log is behind (its queue is full); try again shortly")
        self._pending += 1

    def submit(self, event: Event) -> int:
        """Queue a record for which ``reserve()`` succeeded. Never blocks, never raises. Returns the
        record's number, for ``confirmed()``."""
        self._queue.append(event)
        number = self._confirms.number()
        now = time.monotonic()
        self._gap += (now - self._last_submit - self._gap) / 8  # a moving average of the last few
        self._last_submit = now
        if (
            len(self._queue) == 1
            or len(self._queue) >= self._cfg.batch_max
            or (self._confirms.waiting and self._in_flight() == 0)  # the last one a group write waits for
        ):
            self._wake.set()
        return number

    async def confirmed(self, number: int) -> None:
        """Wait until record ``number`` (from ``submit()``) is in the store or the spool, at most
        ``write_timeout_s`` (one write's bound). Returns at once when confirm_before_answer is off, or
        when the store is failing: then new requests are refused, or records spooled, as the mode says,
        and a request that already ran is answered rather than held."""
        if not self._cfg.confirm_before_answer or self._confirms.safe(number) or self._state == "unavailable":
            return
        waiter, first = self._confirms.wait_for(number)
        if first:
            self._wake.set()  # no long batch gathering while someone waits (see _wait_for_work)
        # asyncio's timeout, not anyio's: once per call, and anyio's looks up the async library each time.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._cfg.write_timeout_s + self._cfg.flush_interval_s):
                await waiter

    def _in_flight(self) -> int:
        """Requests that reserved a slot and have not submitted their record yet."""
        return self._pending - len(self._queue) - len(self._held)

    def offer(self, event: Event) -> bool:
        """Record something that already happened without running anything (a refused credential):
        queued if there is room, otherwise counted and logged, since nothing ran. Such records may use
        only half the queue, so a flood of bad credentials cannot crowd out real callers' records."""
        if self._pending >= self._cfg.queue_max // 2 or self._state == "unavailable" or self._closed:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("audit: %d records of refused requests could not be queued", self.dropped)
            return False
        self._pending += 1
        self.submit(event)
        return True

    # --- the background task ----------------------------------------------------------------------
    # Records move queue -> (rendered) _held -> store, or -> spool. A batch stays in _held until the
    # store or the spool has it, so a write cut short (timeout, shutdown, cancellation) loses nothing:
    # it is retried, or spooled at the end; a retry that finds it already stored skips it by id.

    async def run(self, stopping: anyio.Event) -> None:
        """Store records until ``stopping`` is set; then drain (see ``drain``)."""
        watch = asyncio.ensure_future(self._wake_on(stopping))
        try:
            # One connection for every batch while running, not one from the pool per batch.
            async with self._store.holding():
                # Spool files a previous run (or a dead replica) left: stored now, or retried until
                # they are.
                self._leftover = not await self._replay("start-up")
                await self._checkpoint(force=True)  # a crash may have left the head unsigned
                while not stopping.is_set():
                    await self._wait_for_work(stopping)
                    if stopping.is_set():
                        break
                    try:
                        await self._flush_once()
                    except Exception:
                        log.exception("audit: the writer failed; refusing requests until a write succeeds")
                        self._set_state("unavailable")
                        self._retry_at = anyio.current_time() + self._cfg.retry_interval_s
                await self.drain()
        finally:
            watch.cancel()
            with anyio.CancelScope(shield=True):
                await self._spool_rest()

    async def _wake_on(self, stopping: anyio.Event) -> None:
        # One task for the whole run: a wait for work is then one await on _wake, not two new tasks
        # (one per event) made, raced and cancelled every time.
        await stopping.wait()
        self._wake.set()

    async def _woken(self, seconds: float | None) -> bool:
        """Wait until ``_wake`` is set (a record, a request waiting for one, or stopping), at most
        ``seconds``; whether it was."""
        if self._wake.is_set():
            return True
        if seconds == 0:
            await asyncio.sleep(0)  # let the requests running now submit first
            return self._wake.is_set()
        try:
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        except TimeoutError:
            return False
        return True

    async def _wait_for_work(self, stopping: anyio.Event) -> None:
        if self._queue:
            timeout: float | None = 0.0
        elif self._held or self._spool.active or self._leftover:
            timeout = self._cfg.retry_interval_s  # retry the store even if no new request comes
        else:
            timeout = self._cfg.checkpoint_interval_s  # an idle replica still signs the head
        idle = not await self._woken(timeout) and timeout == self._cfg.checkpoint_interval_s
        self._wake.clear()
        if idle:
            await self._checkpoint()
        if self._queue and not self._confirms.waiting:
            # Let a batch gather: records still reach the store within flush_interval_s (<= 1 s). Not
            # while a request waits for its record (confirmed() wakes this up).
            await self._gather(stopping, self._cfg.flush_interval_s)
        if self._queue and self._confirms.waiting and self._gap < _GROUP_WINDOW_S:
            # Group commit: a request waits for its record, and others running now would each make
            # a write of their own a moment later. When records come that often, gather them for at
            # most _GROUP_WINDOW_S, less if the batch fills or the last request running submits (a
            # lone request never waits here; nor does anyone when records come further apart).
            await self._gather(stopping, _GROUP_WINDOW_S, group=True)

    async def _gather(self, stopping: anyio.Event, seconds: float, *, group: bool = False) -> None:
        self._wake.clear()
        if len(self._queue) >= self._cfg.batch_max or stopping.is_set() or (group and self._in_flight() <= 0):
            return
        await self._woken(seconds)
        self._wake.clear()

    async def _flush_once(self) -> None:
        retry = self._cfg.retry_interval_s
        down = bool(self._held) or self._spool.active or self._leftover
        if down and anyio.current_time() < self._retry_at:
            # The store was down a moment ago: do not wait on it again before retry_interval_s.
            if self._spool.active and not self._held:
                await self._take_into_held()
                await self._held_to_spool()
            return
        if self._leftover:
            self._leftover = not await self._replay("recovery")
        if self._held and not await self._store_held():
            self._retry_at = anyio.current_time() + retry
            return
        if self._spool.active and not await self._replay("recovery"):
            self._retry_at = anyio.current_time() + retry
            # Still down: keep the spool in order by sending new records after the ones already there.
            await self._take_into_held()
            await self._held_to_spool()
            return
        await self._take_into_held()
        if self._held and not await self._store_held():
            self._retry_at = anyio.current_time() + retry

    async def _take_into_held(self) -> None:
        if self._held or not self._queue:
            return
        events = [self._queue.popleft() for _ in range(min(len(self._queue), self._cfg.batch_max))]
        if self._confirms.waiting and light(events):
            # A request waits for these, and they are small: rendering them here costs less than the
            # worker thread's hand-off and wake-up, which a lone call would otherwise wait through.
            self._held = render_all(self._render, events)
        else:
            # Redaction and hashing cost real CPU for large arguments: not on the loop serving /mcp.
            self._held = await anyio.to_thread.run_sync(render_all, self._render, events)
        self._held_tried = False

    async def _store_held(self) -> bool:
        """Store the held batch. A retry skips ids already stored: the write that failed may have
        committed before its deadline cut it short."""
        try:
            started = time.perf_counter()
            try:
                with anyio.fail_after(self._cfg.write_timeout_s):
                    await self._store.append(self._held, dedupe=self._held_tried)
            finally:
                if self.on_write is not None:
                    self.on_write(time.perf_counter() - started)
        except _STORE_ERRORS as exc:
            self._held_tried = True
            self._failed(exc)
            if self._cfg.on_store_failure == "spool" and await self._held_to_spool():
                return False
            self._set_state("unavailable")
            return False
        self._done(len(self._held))
        self._held = []
        if self._state != "ok" and not self._spool.active:
            self._set_state("ok")
        return True

    async def _held_to_spool(self) -> bool:
        if not self._held:
            return True
        try:
            await self._spool.write(self._held)
        except OSError as exc:
            # A full or read-only disk: keep the records in memory and refuse new requests.
            log.error("audit spool write failed (%s)", exc.strerror or type(exc).__name__)
            self._set_state("unavailable")
            return False
        self._done(len(self._held))
        self._held = []
        self._set_state("spooling")
        return True

    async def _replay(self, when: str) -> bool:
        """Move spooled records (ours and any a dead process left) into the store; False if it is down."""
        if not self._spool.active and not await anyio.to_thread.run_sync(self._spool.pending_files):
            return True

        async def append(bodies: Sequence[dict[str, Any]]) -> int:
            with anyio.fail_after(self._cfg.write_timeout_s):
                return await self._store.append(bodies, dedupe=True)

        try:
            count = await self._spool.replay(append)
        except _STORE_ERRORS as exc:
            self._failed(exc)
            return False
        if count:
            log.warning("audit spool replayed at %s: %d records stored", when, count)
        if self._state == "spooling" and not self._held:
            self._set_state("ok")
        return True

    async def _checkpoint(self, *, force: bool = False) -> None:
        try:
            with anyio.fail_after(self._cfg.write_timeout_s):
                await self._store.checkpoint(max_age_s=None if force else self._cfg.checkpoint_interval_s)
        except _STORE_ERRORS as exc:
            log.warning("audit: could not sign a checkpoint (%s)", type(exc).__name__)

    def _done(self, n: int) -> None:
        self._pending -= n
        self.stored += n
        self._confirms.stored(n)

    def _set_state(self, state: State) -> None:
        if state == self._state:
            return
        messages = {
            "ok": "audit store is back: records are stored again",
            "spooling": f"audit store unavailable: spooling records to {self._cfg.spool_dir}",
            "unavailable": "audit records cannot be stored: new requests are refused until they can",
        }
        (log.warning if state != "unavailable" else log.error)(messages[state])
        self._state = state
        if state == "unavailable":
            self._confirms.release_all()  # nothing will be stored soon: answer rather than hold them
        if state == "ok":
            self._last_error = ""  # the next outage is reported again

    def _failed(self, exc: BaseException) -> None:
        # The driver's message only: SQLAlchemy's own text would include the statement's parameters.
        orig = getattr(exc, "orig", None)
        what = f"{type(exc).__name__}: {str(orig)[:200]}" if orig is not None else type(exc).__name__
        if what != self._last_error:  # each new kind of failure once, not every retry
            log.error("audit store write failed (%s); mode %s", what, self._cfg.on_store_failure)
            self._last_error = what

    async def drain(self) -> None:
        """Store what is queued within ``drain_timeout_s``; spool the rest; sign the head."""
        self._closed = True  # anything later would have no writer: refuse it rather than lose it
        self._retry_at = 0.0
        with anyio.move_on_after(self._cfg.drain_timeout_s):
            while self._queue or self._held:
                before = self._pending
                await self._flush_once()
                if self._pending == before:  # no progress: the store is down
                    break
        await self._spool_rest()
        await self._checkpoint(force=True)

    async def _spool_rest(self) -> None:
        """Whatever is still held or queued goes to the spool (whatever the mode); the next start
        replays it. Safe to call twice, and under cancellation (the caller shields it)."""
        if self._queue:
            self._held = self._held + render_all(self._render, list(self._queue))
            self._queue.clear()
        if self._held:
            count = len(self._held)
            if await self._held_to_spool():
                log.warning(
                    "audit: %d records spooled to %s at shutdown; replayed at next start",
                    count,
                    self._cfg.spool_dir,
                )
            else:
                log.error("audit: %d records could not be stored or spooled at shutdown", count)
                self._held = []
        await self._spool.close()
