"""A request is answered once its record is stored (``audit.confirm_before_answer``): a process killed
right after answering has lost no record of what it answered (issue 17)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

import arbiter.audit.writer as writer_module
from arbiter.audit import tables as t
from arbiter.audit.record import Event, Renderer, light
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


def test_light_counts_arguments_and_messages_against_its_budget() -> None:
    small = Event(kind="mcp", decision="allow", reason="ok", actor={}, arguments={"text": "hi", "n": [1, 2]})
    assert light([small, small])
    big = Event(kind="mcp", decision="allow", reason="ok", actor={}, arguments={"t": "x" * 5000})
    assert not light([big])
    nested = {"a": [{"b": "x" * 100} for _ in range(50)]}  # 5,000 characters, only deep inside
    assert not light([Event(kind="mcp", decision="allow", reason="ok", actor={}, arguments=nested)])
    assert not light([small] * 20, budget=100)  # the budget is for the whole batch
    told = Event(kind="mcp", decision="deny", reason="x", actor={}, outcome={"message": "m" * 5000})
    assert not light([told])
    chatty = Event(kind="mcp", decision="allow", reason="ok", actor={}, client_info={"name": "n" * 5000})
    assert not light([chatty])  # what the client says it is gets redacted too
    many = {str(i): 1 for i in range(10**5)}
    huge = Event(kind="mcp", decision="allow", reason="ok", actor={}, arguments=many)
    assert not light([huge])
    admin = Event(kind="admin", decision="allow", reason="ok", actor={}, admin={"after": {}})
    assert not light([admin])  # admin changes are rendered off the loop whatever their size


async def test_a_waited_for_small_record_is_rendered_without_a_thread_and_a_large_one_with(
    sqlite_url: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = AuditSettings(spool_dir=f"{tmp_path}/spool")  # type: ignore[arg-type]
    engine = create_engine(sqlite_url)
    render = Renderer(Redactor(RedactSettings()), b"k" * 32).render
    writer = AuditWriter(AuditStore(engine, Signer.from_secret(None), cfg, render), render, cfg)
    to_thread: list[str] = []
    real = writer_module.anyio.to_thread.run_sync

    async def counting(fn: Any, *args: Any, **kwargs: Any) -> Any:
        to_thread.append(getattr(fn, "__name__", "?"))
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(writer_module.anyio.to_thread, "run_sync", counting)
    stopping = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run, stopping)
            for text in ("small", "x" * 10_000):
                writer.reserve()
                event = Event(kind="mcp", decision="allow", reason="ok", actor={}, arguments={"text": text})
                await writer.confirmed(writer.submit(event))
                assert await _count(engine) == (1 if text == "small" else 2)
                assert to_thread.count("render_all") == (0 if text == "small" else 1)
            stopping.set()
    finally:
        await engine.dispose()
