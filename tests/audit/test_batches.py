"""The store's batch append, on SQLite and on PostgreSQL: every record of a batch is stored once, in
order, linked to the one before; a batch that cannot be stored leaves nothing behind; two writers
sharing a database extend one chain; checkpoints and replays keep working; the writer's held
connection outlives a server that dropped it."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from arbiter.audit import tables as t
from arbiter.audit.record import INDEXED, Event, Renderer, canonical, columns, seal_rows
from arbiter.audit.redact import Redactor
from arbiter.audit.signing import Signer, generate_key
from arbiter.audit.store import AuditStore
from arbiter.settings import AuditSettings, RedactSettings
from arbiter.store import schema
from arbiter.store.db import create_engine

SEED, PUBLIC = generate_key()
RENDER = Renderer(Redactor(RedactSettings()), b"k" * 32).render


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest) -> str:
    name: str = request.getfixturevalue(f"{request.param}_url")
    schema.upgrade(name)
    return name


@pytest.fixture
async def engine(url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(url)
    yield engine
    await engine.dispose()


def _store(engine: AsyncEngine, **settings: Any) -> AuditStore:
    cfg = AuditSettings(signing_key=SecretStr(SEED), trusted_public_keys=[PUBLIC], **settings)
    return AuditStore(engine, Signer.from_secret(cfg.signing_key), cfg, RENDER)


def _bodies(start: int, n: int, writer: str = "w") -> list[dict[str, Any]]:
    return [
        RENDER(
            Event(
                kind="mcp",
                decision="allow" if i % 3 else "deny",
                reason="allowed" if i % 3 else "policy_denied",
                actor={"subject": f"{writer}-{i % 7}", "tenant": "acme"},
                method="tools/call",
                tool="kb__search_docs",
                upstream="kb",
                request_id=i,
                arguments={"query": f"q{i}", "n": i},
                trace_id=f"{i:032x}",
            )
        )
        for i in range(start, start + n)
    ]


async def _rows(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(sa.select(t.events).order_by(t.events.c.seq))).all())


async def test_batches_of_every_size_store_each_record_once_in_order_on_one_chain(
    engine: AsyncEngine,
) -> None:
    store = _store(engine)
    sizes = [1, 2, 7, 300, 1, 500, 33]
    sent: list[dict[str, Any]] = []
    for size in sizes:
        batch = _bodies(len(sent), size)
        assert await store.append(batch) == size
        sent += batch
    rows = await _rows(engine)
    assert [r.seq for r in rows] == list(range(1, len(sent) + 1))
    assert [r.id for r in rows] == [b["id"] for b in sent]
    assert [json.loads(r.body)["request_id"] for r in rows] == list(range(len(sent)))
    prev = "0" * 64
    for r in rows:  # each row links to the one before and its columns match its body
        body = json.loads(r.body)
        assert r.prev_hash == body["prev_hash"] == prev
        assert canonical(body) == r.body
        assert {name: getattr(r, name) for name in INDEXED} == columns(body)
        prev = r.hash
    head = await store.head()
    assert (head.seq, head.hash) == (len(sent), prev)
    report = await store.verify()
    assert report.ok and report.records == len(sent), report.to_json()


async def test_a_batch_that_fails_stores_nothing_and_moves_no_head(engine: AsyncEngine) -> None:
    store = _store(engine)
    first = _bodies(0, 10)
    await store.append(first)
    head = await store.head()
    # The fifth record repeats a stored id: the whole batch is refused, as a database error.
    batch = _bodies(10, 50)
    batch[4] = {**batch[4], "id": first[3]["id"]}
    with pytest.raises(SQLAlchemyError):
        await store.append(batch)
    assert await store.head() == head
    assert len(await _rows(engine)) == 10
    # The same batch, stored as a replay, skips the stored record and extends the same chain.
    assert await store.append(batch, dedupe=True) == 49
    report = await store.verify()
    assert report.ok and report.records == 59, report.to_json()


async def test_a_replayed_batch_stores_only_the_records_not_yet_stored(engine: AsyncEngine) -> None:
    store = _store(engine)
    batch = _bodies(0, 200)
    assert await store.append(batch[:120]) == 120
    assert await store.append([dict(b) for b in batch], dedupe=True) == 80
    assert await store.append([dict(b) for b in batch], dedupe=True) == 0
    rows = await _rows(engine)
    assert [r.id for r in rows] == [b["id"] for b in batch]
    assert (await store.verify()).ok


async def test_two_writers_on_one_database_extend_one_chain(url: str, engine: AsyncEngine) -> None:
    # Two engines, as two replicas have: each append must wait for the other's head lock.
    other = create_engine(url)
    try:
        stores = [_store(engine), _store(other)]

        async def write(store: AuditStore, writer: str) -> None:
            for k in range(12):
                await store.append(_bodies(k * 25, 25, writer))

        async def write_holding(store: AuditStore, writer: str) -> None:
            async with store.holding():  # as the writer does: one connection for every batch
                await write(store, writer)

        await asyncio.gather(write_holding(stores[0], "a"), write(stores[1], "b"))
    finally:
        await other.dispose()
    rows = await _rows(engine)
    assert [r.seq for r in rows] == list(range(1, 601))
    subjects = [json.loads(r.body)["subject"][0] for r in rows]
    assert subjects.count("a") == subjects.count("b") == 300
    assert len({r.id for r in rows}) == 600
    report = await _store(engine).verify()
    assert report.ok and report.records == 600, report.to_json()


async def test_an_append_after_another_writer_moved_the_head_links_to_the_new_head(
    url: str, engine: AsyncEngine
) -> None:
    # Each store seals its next batch after the head it last wrote (one statement on PostgreSQL):
    # when another replica wrote in between, that batch must go after the other's records instead.
    other = create_engine(url)
    try:
        a, b = _store(engine), _store(other)
        for k in range(3):
            assert await a.append(_bodies(k * 10, 10, "a")) == 10
            assert await b.append(_bodies(k * 10, 10, "b")) == 10
    finally:
        await other.dispose()
    rows = await _rows(engine)
    assert [r.seq for r in rows] == list(range(1, 61))
    assert "".join(json.loads(r.body)["subject"][0] for r in rows[::10]) == "ababab"
    report = await _store(engine).verify()
    assert report.ok and report.records == 60, report.to_json()


async def test_writers_appending_small_batches_at_once_extend_one_unbroken_chain(
    url: str, engine: AsyncEngine
) -> None:
    # Three replicas, each with its held connection, racing with batches of 1 to 8 records: every
    # record stored once, each writer's in the order it sent them, one chain that verifies.
    others = [create_engine(url) for _ in range(2)]
    sizes = [1, 2, 3, 5, 8, 1, 1, 4]

    async def write(store: AuditStore, writer: str) -> None:
        async with store.holding():
            sent = 0
            for size in sizes * 4:
                assert await store.append(_bodies(sent, size, writer)) == size
                sent += size

    try:
        stores = [_store(e) for e in (engine, *others)]
        await asyncio.gather(*(write(s, w) for s, w in zip(stores, "abc", strict=True)))
    finally:
        for other in others:
            await other.dispose()
    rows = await _rows(engine)
    per_writer = sum(sizes) * 4
    assert [r.seq for r in rows] == list(range(1, 3 * per_writer + 1))
    assert len({r.id for r in rows}) == len(rows)
    bodies = [json.loads(r.body) for r in rows]
    for writer in "abc":
        sent = [b["request_id"] for b in bodies if b["subject"][0] == writer]
        assert sent == list(range(per_writer))
    report = await _store(engine).verify()
    assert report.ok and report.records == 3 * per_writer, report.to_json()


async def test_the_one_trip_append_stores_nothing_after_a_head_that_moved(engine: AsyncEngine) -> None:
    store = _store(engine)
    await store.append(_bodies(0, 10))
    stale = await store.head()
    await store.append(_bodies(10, 5))
    head = await store.head()
    async with engine.connect() as conn:
        tx = await t.appender(conn)
        assert tx.one_trip
        rows, seq, last = seal_rows(_bodies(15, 5), stale.seq, stale.hash)
        assert await tx.after(stale, rows, seq, last) is None
        assert await store.head() == head
        assert len(await _rows(engine)) == 15
        rows, seq, last = seal_rows(_bodies(15, 5), head.seq, head.hash)
        moved = await tx.after(head, rows, seq, last)
    assert moved == await store.head() and moved is not None and moved.seq == 20
    report = await store.verify()
    assert report.ok and report.records == 20, report.to_json()


async def test_a_held_connection_is_kept_between_batches_and_closed_at_the_end(
    engine: AsyncEngine,
) -> None:
    store = _store(engine)
    pool = engine.pool
    assert isinstance(pool, QueuePool)
    async with store.holding():
        for k in range(5):
            await store.append(_bodies(k * 40, 40))
            assert pool.checkedout() == 1  # the store's own, between batches too
    assert pool.checkedout() == 0
    report = await store.verify()
    assert report.ok and report.records == 200, report.to_json()


async def test_a_held_connection_the_server_dropped_is_replaced_without_a_failed_write(
    postgres_url: str,
) -> None:
    await asyncio.to_thread(schema.upgrade, postgres_url)
    engine = create_engine(postgres_url)
    try:
        store = _store(engine)
        async with store.holding():
            await store.append(_bodies(0, 30))
            # The server ends every other session (a restart, a failover, an idle timeout).
            async with engine.connect() as conn:
                ended = (
                    await conn.execute(
                        sa.text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        )
                    )
                ).all()
            assert ended  # the held one among them
            assert await store.append(_bodies(30, 30)) == 30
            assert await store.append(_bodies(60, 30)) == 30
        rows = await _rows(engine)
        assert [json.loads(r.body)["request_id"] for r in rows] == list(range(90))
        assert (await store.verify()).ok
    finally:
        await engine.dispose()


async def test_appends_sign_checkpoints_that_verify(engine: AsyncEngine) -> None:
    store = _store(engine, checkpoint_every=100)
    for k in range(7):
        await store.append(_bodies(k * 60, 60))
    head = await store.head()
    assert head.seq == 420
    assert head.checkpoint_seq >= 400  # signed within appends, every 100 records or more
    report = await store.verify()
    assert report.ok, report.to_json()
    assert report.checkpoints_valid >= 4 and report.checkpoints_invalid == 0


# The indexed columns: values cut to their column's size and control characters replaced, exactly as
# the straightforward reference below does.
_SIZES = {"subject": 300, "tenant": 200, "tool": 1100, "upstream": 64, "method": 64, "reason": 64}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _reference_columns(body: Mapping[str, Any]) -> dict[str, Any]:
    cols = {name: body.get(name) for name in INDEXED}
    for name, size in _SIZES.items():
        value = cols[name]
        if isinstance(value, str):
            cols[name] = _CONTROL.sub("?", value[:size])
    return cols


_text = st.text(st.characters(codec="utf-8"), max_size=40) | st.text(max_size=1200)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({}, optional={name: st.none() | _text | st.integers() for name in INDEXED}))
def test_indexed_columns_match_the_reference(body: dict[str, Any]) -> None:
    assert columns(body) == _reference_columns(body)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(st.characters(codec="utf-8")),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_canonical_is_sorted_compact_json(value: Any) -> None:
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert canonical(value) == expected


async def test_a_lone_surrogate_is_stored_as_a_replacement_character_and_the_chain_verifies(
    engine: AsyncEngine,
) -> None:
    # Python's JSON decoder lets "\ud800" through; no UTF-8 text can hold it. The record is kept.
    store = _store(engine)
    batch = _bodies(0, 3)
    batch[1]["arguments"] = {"query": "a\ud800b", "\udc00key": ["\ud83d"]}
    batch[1]["tool"] = "kb__\ud800"
    assert await store.append(batch) == 3
    rows = await _rows(engine)
    assert len(rows) == 3
    body = json.loads(rows[1].body)
    assert body["arguments"] == {"query": "a\ufffdb", "\ufffdkey": ["\ufffd"]}
    assert rows[1].tool == "kb__\ufffd"
    report = await store.verify()
    assert report.ok and report.records == 3, report.to_json()
