"""The audit store: appends batches to the hash chain, writes signed checkpoints, purges by retention.

One chain per database. Every append takes the chain-head row's lock first (an UPDATE, so it is a
write lock on SQLite and a row lock on PostgreSQL), reads the head, numbers and links its records, and
moves the head in the same transaction. Replicas sharing a database therefore extend one valid chain;
they serialise only for the length of one batch insert.

An append costs three statements whatever the batch's size (lock and read the head with RETURNING,
insert every row with one prepared statement executed for all of them, move the head; see tables.py),
the rows go to the driver as plain tuples, and the writer keeps its connection between batches: the
database's own work (its indexes, its log, its commit) is most of what is left. An append after the
head this store last wrote goes in one trip (on PostgreSQL one statement, its own transaction; on SQLite
one hand-off to the driver's thread) and stores the batch only if the head is still there; otherwise
(another replica wrote meanwhile, or a checkpoint is due) it takes the locked path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import anyio
import anyio.to_thread
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from arbiter.audit import tables as t
from arbiter.audit.record import INDEXED, Event, columns, now_ms, seal, seal_rows
from arbiter.audit.signing import KeyRing, Signer, checkpoint_payload
from arbiter.audit.tables import Head
from arbiter.audit.verify import ChainCheck, Checkpoint, Report
from arbiter.errors import AuditChainBroken
from arbiter.settings import AuditSettings

log = logging.getLogger(__name__)

_VERIFY_PAGE = 2000
_DELETE_CHUNK = 10_000


class AuditStore:
    def __init__(
        self,
        engine: AsyncEngine,
        signer: Signer,
        settings: AuditSettings,
        render: Callable[[Event], dict[str, Any]],
    ) -> None:
        self._engine = engine
        self._signer = signer
        self._settings = settings
        self._render = render
        self._holding = False  # see holding()
        self._held: AsyncConnection | None = None
        self._held_tx: t.Append | None = None  # the statements for _held, made when it was connected
        # asyncio's lock: the writer runs on asyncio, and anyio's yields to the loop even when free.
        self._held_lock = asyncio.Lock()
        # The head as this store's last append left it: the next one is sealed after it (see _append).
        self._head: Head | None = None

    @property
    def signer(self) -> Signer:
        return self._signer

    def keyring(self) -> KeyRing:
        return KeyRing([self._signer.public_b64, *self._settings.trusted_public_keys])

    async def append(self, bodies: Sequence[dict[str, Any]], *, dedupe: bool = False) -> int:
        """Store rendered records at the end of the chain; returns how many were new.

        ``dedupe`` skips records whose id is already stored (a spool replayed after a crash that came
        between storing it and deleting the spool file).
        """
        if not bodies:
            return 0
        if not self._holding:
            async with self._engine.connect() as conn:
                return await self._append(conn, await t.appender(conn), bodies, dedupe)
        async with self._held_lock:
            while True:
                conn, tx = self._held, self._held_tx
                fresh = conn is None or tx is None
                if conn is None or tx is None:
                    await self._release()  # one an interrupted connect left behind, if any
                    conn = self._held = await self._engine.connect()
                    try:
                        # Once per connection: finding the driver's connection is a greenlet hand-off.
                        tx = self._held_tx = await t.appender(conn)
                    except BaseException:
                        await self._release()
                        raise
                try:
                    return await self._append(conn, tx, bodies, dedupe)
                except DBAPIError as exc:
                    await self._release()
                    if fresh or not exc.connection_invalidated:
                        raise
                except BaseException:
                    await self._release()
                    raise
                # The held connection died while idle (a restarted server, an idle timeout), which the
                # pool's ping would have caught: once more, on a fresh one. The write may have committed
                # before the connection went, so records already stored are skipped.
                dedupe = True

    async def _append(
        self, conn: AsyncConnection, tx: t.Append, bodies: Sequence[dict[str, Any]], dedupe: bool
    ) -> int:
        known = self._head
        if tx.one_trip and known is not None and not dedupe:
            # Sealed after the head this store last wrote, stored in one trip only if that is still
            # the head; a checkpoint that falls due, a replay and a head another writer moved take
            # the locked path below.
            rows, seq, last = seal_rows(bodies, known.seq, known.hash)
            if not self._checkpoint_due(known, seq, now_ms()):
                moved = await tx.after(known, rows, seq, last)
                if moved is not None:
                    self._head = moved
                    return len(rows)
        async with conn.begin():
            head = await tx.lock_head()
            if dedupe:
                ids = [b["id"] for b in bodies]
                present = set(
                    (await conn.execute(sa.select(t.events.c.id).where(t.events.c.id.in_(ids)))).scalars()
                )
                bodies = [b for b in bodies if b["id"] not in present]
                if not bodies:
                    return 0
            rows, seq, last = seal_rows(bodies, head.seq, head.hash)
            await tx.insert(rows)
            values: dict[str, int | str] = {"seq": seq, "hash": last}
            now = now_ms()
            moved = replace(head, seq=seq, hash=last)
            if self._checkpoint_due(head, seq, now):
                await self._checkpoint(conn, seq, last, now, "periodic")
                values.update(checkpoint_seq=seq, checkpoint_ms=now)
                moved = replace(moved, checkpoint_seq=seq, checkpoint_ms=now)
            await tx.move_head(values)
        self._head = moved  # committed
        return len(rows)

    def _checkpoint_due(self, head: Head, seq: int, now: int) -> bool:
        cfg = self._settings
        return (
            seq - head.checkpoint_seq >= cfg.checkpoint_every
            or now - head.checkpoint_ms >= cfg.checkpoint_interval_s * 1000
        )

    @asynccontextmanager
    async def holding(self) -> AsyncGenerator[None]:
        """Inside, appends keep one connection from batch to batch instead of taking one from the pool
        for each, which costs a check-out, a ping (a round trip on PostgreSQL) and a reset every time.
        The writer holds one while it runs; the connection is closed at the end."""
        self._holding = True
        try:
            yield
        finally:
            self._holding = False
            await self._release()

    async def _release(self) -> None:
        conn, self._held, self._held_tx = self._held, None, None
        if conn is not None:
            with anyio.CancelScope(shield=True):  # also when the write was cancelled: never leaked
                await conn.close()

    async def append_replayed(self, bodies: Sequence[dict[str, Any]]) -> int:
        return await self.append(bodies, dedupe=True)

    async def checkpoint(self, *, max_age_s: float | None = None) -> int | None:
        """Sign the head now (at start, shutdown, when idle) unless it is signed already, or (with
        ``max_age_s``) was signed that recently. Returns the signed seq, or None."""
        head = await self.head()
        if head.seq in (0, head.checkpoint_seq):
            return None
        if max_age_s is not None and now_ms() - head.checkpoint_ms < max_age_s * 1000:
            return None
        async with self._engine.begin() as conn:
            head = await t.lock_head(conn)
            if head.seq in (0, head.checkpoint_seq):
                return None
            now = now_ms()
            await self._checkpoint(conn, head.seq, head.hash, now, "periodic")
            await conn.execute(
                sa.update(t.chain).where(t.chain.c.id == 1).values(checkpoint_seq=head.seq, checkpoint_ms=now)
            )
            return head.seq

    async def _checkpoint(self, conn: AsyncConnection, seq: int, hash_: str, ts_ms: int, kind: str) -> None:
        signature = self._signer.sign(checkpoint_payload(seq, hash_, ts_ms, kind))
        await conn.execute(
            sa.insert(t.checkpoints).values(
                seq=seq, hash=hash_, ts_ms=ts_ms, kind=kind, key_id=self._signer.key_id, signature=signature
            )
        )

    async def head(self) -> Head:
        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(t.chain).where(t.chain.c.id == 1))).one()
            return t.head_of(row)

    async def ping(self) -> None:
        async with self._engine.connect() as conn:
            await conn.execute(sa.select(t.chain.c.seq).where(t.chain.c.id == 1))

    async def load_checkpoints(self, conn: AsyncConnection, since: int = 0) -> dict[int, list[Checkpoint]]:
        result = await conn.execute(
            sa.select(t.checkpoints).where(t.checkpoints.c.seq >= since).order_by(t.checkpoints.c.id)
        )
        found: dict[int, list[Checkpoint]] = {}
        for r in result:
            found.setdefault(r.seq, []).append(
                Checkpoint(r.seq, r.hash, r.ts_ms, r.kind, r.key_id, r.signature)
            )
        return found

    async def verify(self, *, through: int | None = None) -> Report:
        """Check the whole stored chain (from the last purge's anchor), streaming in pages."""
        anchor, report = await self._verify_once(through)
        if not report.ok and (await self.head()).anchor_seq != anchor:
            # A purge moved the anchor while we read: what looked missing was purged. Check again.
            _, report = await self._verify_once(through)
        return report

    async def _verify_once(self, through: int | None) -> tuple[int, Report]:
        async with self._engine.connect() as conn:
            head = t.head_of((await conn.execute(sa.select(t.chain).where(t.chain.c.id == 1))).one())
            check = ChainCheck(
                head.anchor_seq,
                head.anchor_hash,
                self.keyring(),
                await self.load_checkpoints(conn, head.anchor_seq),
                unsigned_before_ms=self._unsigned_threshold(),
            )
            async for page in _pages(conn, head.anchor_seq, through):
                # Hashing a page costs tens of ms of CPU: off the event loop that serves /mcp.
                await anyio.to_thread.run_sync(_feed, check, page)
            if through is None:
                return head.anchor_seq, check.finish(head.seq, head_hash=head.hash)
            return head.anchor_seq, check.finish()

    def _unsigned_threshold(self) -> int | None:
        """With a signing key, every record older than two checkpoint intervals (and five minutes' grace)
        must be covered by a valid signed checkpoint: otherwise checkpoints were deleted."""
        if self._signer.private is None:
            return None
        return now_ms() - int((2 * self._settings.checkpoint_interval_s + 300) * 1000)

    async def purge(self, cutoff_ms: int, actor: dict[str, Any]) -> int:
        """Purge records older than ``cutoff_ms`` behind a signed checkpoint at the cut; the purge is
        itself recorded. Returns how many were purged (0: none old enough). Raises ``AuditChainBroken``
        if the records to be purged do not verify.

        The records are verified before the chain lock is taken, so appends from every replica are held
        up only for moving the anchor; the rows themselves are deleted afterwards, in chunks."""
        await self._delete_below_anchor()  # what an interrupted purge left
        head = await self.head()
        async with self._engine.connect() as conn:
            newer = (
                await conn.execute(
                    sa.select(sa.func.min(t.events.c.seq)).where(t.events.c.ts_ms >= cutoff_ms)
                )
            ).scalar()
            cut = (newer - 1) if newer is not None else head.seq
            if cut <= head.anchor_seq:
                return 0
            points = await self.load_checkpoints(conn, head.anchor_seq)
            check = ChainCheck(
                head.anchor_seq,
                head.anchor_hash,
                self.keyring(),
                {seq: cps for seq, cps in points.items() if seq <= cut},  # later ones are not purged
            )
            async for page in _pages(conn, head.anchor_seq, cut):
                await anyio.to_thread.run_sync(_feed, check, page)
        report = check.finish(cut)
        if not report.ok:
            first = report.problems[0].seq if report.problems else None
            raise AuditChainBroken(
                f"purge refused: the records to purge do not verify (first problem at seq {first}); "
                "run `arbiter audit verify`",
                first_broken_seq=first,
            )
        async with self._engine.begin() as conn:
            locked = await t.lock_head(conn)
            if locked.anchor_seq != head.anchor_seq:
                return 0  # another replica purged meanwhile
            cut_hash = (
                await conn.execute(sa.select(t.events.c.hash).where(t.events.c.seq == cut))
            ).scalar_one()
            if cut_hash != check.last_hash:
                raise AuditChainBroken(f"purge refused: record {cut} changed while it was being verified")
            now = now_ms()
            await self._checkpoint(conn, cut, cut_hash, now, "purge")
            await conn.execute(sa.delete(t.checkpoints).where(t.checkpoints.c.seq < cut))
            event = Event(
                kind="audit",
                decision="allow",
                reason="purged",
                actor=actor,
                method="audit.purge",
                admin={
                    "cutoff_ms": cutoff_ms,
                    "purged_through_seq": cut,
                    "purged": report.records,
                    "anchor_hash": cut_hash,
                },
            )
            body = self._render(event)
            seq = locked.seq + 1
            text, digest = seal(body, seq, locked.hash)
            await conn.execute(
                sa.insert(t.events).values(
                    seq=seq, id=body["id"], **columns(body), body=text, prev_hash=locked.hash, hash=digest
                )
            )
            await conn.execute(
                sa.update(t.chain)
                .where(t.chain.c.id == 1)
                .values(seq=seq, hash=digest, anchor_seq=cut, anchor_hash=cut_hash)
            )
        await self._delete_below_anchor()
        log.info(
            "audit purge: %d records through seq %d removed behind a signed checkpoint", report.records, cut
        )
        return report.records

    async def _delete_below_anchor(self) -> None:
        """Delete records the anchor has already left behind, a chunk per transaction."""
        anchor = (await self.head()).anchor_seq
        while True:
            async with self._engine.begin() as conn:
                low = (
                    await conn.execute(sa.select(sa.func.min(t.events.c.seq)).where(t.events.c.seq <= anchor))
                ).scalar()
                if low is None:
                    return
                await conn.execute(
                    sa.delete(t.events).where(t.events.c.seq <= min(anchor, low + _DELETE_CHUNK - 1))
                )


def _cols(row: Any) -> dict[str, Any]:
    return {name: getattr(row, name) for name in INDEXED}


def _feed(check: ChainCheck, page: Sequence[Any]) -> None:
    for row in page:
        check.feed(row.seq, row.body, row.hash, row.prev_hash, _cols(row))


async def _pages(conn: AsyncConnection, after: int, through: int | None) -> AsyncIterator[Sequence[Any]]:
    """Records with seq > after (and <= through), in seq order, a page at a time."""
    last = after
    while True:
        query = sa.select(t.events).where(t.events.c.seq > last).order_by(t.events.c.seq).limit(_VERIFY_PAGE)
        if through is not None:
            query = query.where(t.events.c.seq <= through)
        page = (await conn.execute(query)).all()
        if page:
            yield page
        if len(page) < _VERIFY_PAGE:
            return
        last = page[-1].seq
