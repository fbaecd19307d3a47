"""Reading what an Arbiter stored in its audit log, straight from its database."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sqlalchemy as sa

from arbiter.audit import tables as t
from arbiter.audit.signing import Signer
from arbiter.audit.store import AuditStore
from arbiter.audit.verify import Report
from arbiter.settings import AuditSettings
from arbiter.store.db import create_engine
from tests.conftest import ArbiterServer

Record = dict[str, Any]


def _run(
    database_url: str, work: Callable[[AuditStore, Any], Any], settings: AuditSettings | None = None
) -> Any:
    async def go() -> Any:
        engine = create_engine(database_url)
        try:
            store = AuditStore(engine, Signer.from_secret(None), settings or AuditSettings(), lambda e: {})
            return await work(store, engine)
        finally:
            await engine.dispose()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(go())
    # Called from an async test: run on a thread of its own so the test's loop is not re-entered.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result()


def stored(database_url: str) -> list[Record]:
    """Every stored record (body, parsed), in chain order, with its hash."""

    async def read(_: AuditStore, engine: Any) -> list[Record]:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(sa.select(t.events.c.body, t.events.c.hash).order_by(t.events.c.seq))
            ).all()
        return [{**json.loads(body), "hash": digest} for body, digest in rows]

    records: list[Record] = _run(database_url, read)
    return records


def raw_text(database_url: str) -> str:
    """Everything in the audit tables as text (to look for secrets)."""

    async def read(_: AuditStore, engine: Any) -> str:
        out: list[str] = []
        async with engine.connect() as conn:
            for table in (t.events, t.checkpoints, t.chain):
                for row in (await conn.execute(sa.select(table))).all():
                    out.append(repr(tuple(row)))
        return "\n".join(out)

    text: str = _run(database_url, read)
    return text


def verify(database_url: str, public_keys: list[str] | None = None) -> Report:
    async def check(store: AuditStore, _: Any) -> Report:
        return await store.verify()

    report: Report = _run(database_url, check, AuditSettings(trusted_public_keys=public_keys or []))
    return report


def execute(database_url: str, sql: str, **params: Any) -> None:
    async def run(_: AuditStore, engine: Any) -> None:
        async with engine.begin() as conn:
            await conn.execute(sa.text(sql), params)

    _run(database_url, run)


def wait_for(
    server: ArbiterServer, predicate: Callable[[list[Record]], bool], timeout: float = 10.0
) -> list[Record]:
    """Records once ``predicate`` holds (the writer flushes within a second)."""
    deadline = time.monotonic() + timeout
    while True:
        records = stored(server.settings.database_url)
        if predicate(records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"audit records never satisfied the condition; have {len(records)}")
        time.sleep(0.1)


def of_kind(records: list[Record], kind: str) -> list[Record]:
    return [r for r in records if r["kind"] == kind]
