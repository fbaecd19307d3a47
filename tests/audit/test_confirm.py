"""A request is answered once its record is stored (``audit.confirm_before_answer``): a process killed
right after answering has lost no record of what it answered (issue 17)."""

from __future__ import annotations

import anyio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.audit import tables as t
from arbiter.audit.record import Event, Renderer
from arbiter.audit.redact import Redactor
from arbiter.audit.signing import Signer
from arbiter.audit.store import AuditStore
from arbiter.audit.writer import AuditWriter
from arbiter.settings import AuditSettings, RedactSettings
from arbiter.store.db import create_engine


async def _count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(sa.select(sa.func.count()).select_from(t.events))).scalar_one())


def _event(n: int) -> Event:
    return Event(
        kind="mcp", decision="allow", reason="ok", actor={"subject": f"agent-{n}"}, method="tools/call"
    )


async def test_confirmed_returns_once_the_record_is_in_the_store(sqlite_url: str, tmp_path: object) -> None:
    # The longest batch gathering there is: a waiting request must not sit it out, nor return before.
    cfg = AuditSettings(flush_interval_s=1.0, spool_dir=f"{tmp_path}/spool")  # type: ignore[arg-type]
    engine = create_engine(sqlite_url)
    render = Renderer(Redactor(RedactSettings()), b"k" * 32).render
    writer = AuditWriter(AuditStore(engine, Signer.from_secret(None), cfg, render), render, cfg)
    stopping = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run, stopping)
            for round_ in range(3):
                numbers: list[int] = []
                for n in range(5):  # calls in flight together share writes
                    writer.reserve()
                    numbers.append(writer.submit(_event(n)))
                async with anyio.create_task_group() as waits:
                    for number in numbers:
                        waits.start_soon(writer.confirmed, number)
                assert await _count(engine) == 5 * (round_ + 1)
            stopping.set()
    finally:
        await engine.dispose()


async def test_without_confirmation_confirmed_does_not_wait(sqlite_url: str, tmp_path: object) -> None:
    cfg = AuditSettings(confirm_before_answer=False, spool_dir=f"{tmp_path}/spool")  # type: ignore[arg-type]
    engine = create_engine(sqlite_url)
    render = Renderer(Redactor(RedactSettings()), b"k" * 32).render
    writer = AuditWriter(AuditStore(engine, Signer.from_secret(None), cfg, render), render, cfg)
    try:
        writer.reserve()
        await writer.confirmed(writer.submit(_event(0)))  # no writer task runs: it would wait forever
        assert writer.queued == 1
    finally:
        await engine.dispose()
