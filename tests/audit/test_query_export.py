"""The auditor's read side: filters, cursor pagination, JSONL/CSV export, bundles verified offline, the
query plans behind the filters, and the admin API with its auditor-only access."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite

from arbiter.audit import tables as t
from arbiter.audit.bundle import SELF_KEYS_NOTE, verify_bundle
from arbiter.audit.export import CSV_COLUMNS, bundle_chunks, csv_cell, csv_chunks, jsonl_chunks, plan_bundle
from arbiter.audit.query import (
    Filters,
    Order,
    decode_cursor,
    encode_cursor,
    fetch_page,
    page_statement,
    parse_limit,
    parse_time,
)
from arbiter.audit.record import canonical, record_hash
from arbiter.audit.verify import Report
from arbiter.errors import InvalidInput
from arbiter.store.db import create_engine
from tests.audit.corpus import BASE_MS, DAY_MS, OTHER_PUBLIC, PUBLIC, SEED, append, event, populate, store_for
from tests.conftest import ADMIN_TOKEN, ArbiterFactory

Record = dict[str, Any]


@pytest.fixture
async def db(sqlite_url: str) -> str:
    await populate(sqlite_url)
    return sqlite_url


async def _all(url: str, filters: Filters, order: Order = "asc", limit: int = 1000) -> list[Record]:
    engine = create_engine(url)
    found: list[Record] = []
    cursor: str | None = None
    try:
        while True:
            page = await fetch_page(engine, filters, limit=limit, cursor=cursor, order=order)
            found.extend(page.events)
            cursor = page.next_cursor
            if cursor is None:
                return found
    finally:
        await engine.dispose()


async def _stored(url: str) -> list[Record]:
    return await _all(url, Filters())


def _key(r: Record) -> tuple[int, int]:
    return (r["ts_ms"], r["seq"])


# --- filters --------------------------------------------------------------------------------------


FILTER_CASES = [
    ("subject", "alice", lambda r: r["subject"] == "alice"),
    ("tenant", "globex", lambda r: r["tenant"] == "globex"),
    ("tool", "crm__get_customer", lambda r: r["tool"] == "crm__get_customer"),
    ("upstream", "kb", lambda r: r["upstream"] == "kb"),
    ("decision", "deny", lambda r: r["decision"] == "deny"),
    ("reason", "rate_limited", lambda r: r["reason"] == "rate_limited"),
    ("kind", "auth", lambda r: r["kind"] == "auth"),
    ("method", "tools/call", lambda r: r["method"] == "tools/call"),
]


@pytest.mark.parametrize(("name", "value", "matches"), FILTER_CASES, ids=[c[0] for c in FILTER_CASES])
async def test_each_filter_narrows_to_exactly_the_matching_records(
    db: str, name: str, value: str, matches: Any
) -> None:
    everything = await _stored(db)
    expected = sorted((r for r in everything if matches(r)), key=_key)
    assert 0 < len(expected) < len(everything)  # the corpus makes this filter a real narrowing
    got = await _all(db, Filters.parse(**{name: value}), limit=17)
    assert [r["seq"] for r in got] == [r["seq"] for r in expected]


async def test_trace_id_and_time_range_and_combined_filters(db: str) -> None:
    everything = await _stored(db)
    traced = next(r for r in everything if r["trace_id"])
    got = await _all(db, Filters.parse(trace_id=traced["trace_id"].upper()))  # case does not matter
    assert [r["seq"] for r in got] == [traced["seq"]]

    since, until = BASE_MS + 2 * DAY_MS, BASE_MS + 5 * DAY_MS
    expected = [r["seq"] for r in sorted(everything, key=_key) if since <= r["ts_ms"] < until]
    assert 0 < len(expected) < len(everything)
    iso = Filters.parse(since="2026-01-03T00:00:00Z", until="2026-01-06")
    assert [r["seq"] for r in await _all(db, iso, limit=9)] == expected
    epoch = Filters.parse(since=str(since), until=str(until))
    assert [r["seq"] for r in await _all(db, epoch)] == expected

    combined = Filters.parse(subject="bob", tenant="acme", decision="allow", since=str(since))
    expected = [
        r["seq"]
        for r in sorted(everything, key=_key)
        if r["subject"] == "bob"
        and r["tenant"] == "acme"
        and r["decision"] == "allow"
        and r["ts_ms"] >= since
    ]
    assert expected
    assert [r["seq"] for r in await _all(db, combined, limit=3)] == expected


def test_time_values_parse_as_iso_8601_or_epoch_ms() -> None:
    ms = 1_767_268_800_000  # 2026-01-01T12:00:00Z
    assert parse_time("2026-01-01T12:00:00Z", "since") == ms
    assert parse_time("2026-01-01T14:00:00+02:00", "since") == ms
    assert parse_time("2026-01-01T12:00:00", "since") == ms  # no zone: UTC
    assert parse_time("2026-01-01T12:00:00.250Z", "since") == ms + 250
    assert parse_time(str(ms), "since") == ms
    assert parse_time("2026-01-01", "since") == ms - 12 * 3_600_000
    for bad in ("yesterday", "2026-13-01", "1767268800", "-5", ""):
        with pytest.raises(InvalidInput):
            parse_time(bad, "since")
    with pytest.raises(InvalidInput, match="earlier"):
        Filters.parse(since="2026-01-02", until="2026-01-01")
    with pytest.raises(InvalidInput, match="decision"):
        Filters.parse(decision="maybe")
    with pytest.raises(InvalidInput, match="trace"):
        Filters.parse(trace_id="not-a-trace")
    for bad_limit in ("0", "1001", "ten", "-1"):
        with pytest.raises(InvalidInput, match="limit"):
            parse_limit(bad_limit)
    assert parse_limit(None) == 100


async def test_a_long_subject_is_found_although_its_column_is_cut(sqlite_url: str) -> None:
    long_subject = "user:" + "x" * 400  # the indexed column keeps 300 characters
    await append(sqlite_url, [event(random.Random(1), BASE_MS, subject=long_subject)])
    got = await _all(sqlite_url, Filters.parse(subject=long_subject))
    assert [r["subject"] for r in got] == [long_subject]


# --- cursors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_cursor_pages_return_every_record_exactly_once_in_order(db: str, order: Order) -> None:
    everything = await _stored(db)
    expected = sorted(everything, key=_key, reverse=order == "desc")
    for filters in (Filters(), Filters.parse(tenant="acme")):
        want = [r["seq"] for r in expected if filters.tenant in (None, r["tenant"])]
        pages = 0
        seen: list[int] = []
        engine = create_engine(db)
        cursor: str | None = None
        try:
            while True:
                page = await fetch_page(engine, filters, limit=7, cursor=cursor, order=order)
                pages += 1
                assert len(page.events) <= 7
                seen.extend(r["seq"] for r in page.events)
                cursor = page.next_cursor
                if cursor is None:
                    break
        finally:
            await engine.dispose()
        assert seen == want
        assert len(set(seen)) == len(seen)
        assert pages == -(-len(want) // 7)  # no trailing empty page


def test_bad_cursors_are_invalid_input_with_a_clear_message() -> None:
    good = encode_cursor("asc", BASE_MS, 12)
    assert decode_cursor(good, "asc") == (BASE_MS, 12)
    for bad in ("garbage!", "Zm9vYmFy", "", encode_cursor("asc", 1, 2, of="c"), "A" * 200):
        with pytest.raises(InvalidInput, match="cursor") as info:
            decode_cursor(bad, "asc")
        assert info.value.http_status == 422
    with pytest.raises(InvalidInput, match="order=asc"):
        decode_cursor(good, "desc")


# --- exports --------------------------------------------------------------------------------------


async def test_jsonl_lines_rehash_to_the_stored_hash(db: str) -> None:
    engine = create_engine(db)
    try:
        text = "".join([c async for c in jsonl_chunks(engine, Filters.parse(upstream="crm"), page_size=11)])
        async with engine.connect() as conn:
            hashes = dict((await conn.execute(sa.select(t.events.c.seq, t.events.c.hash))).all())
    finally:
        await engine.dispose()
    lines = text.splitlines()
    expected = [r for r in sorted(await _stored(db), key=_key) if r["upstream"] == "crm"]
    assert len(lines) == len(expected) > 11  # more than one page
    for line, want in zip(lines, expected, strict=True):
        record = json.loads(line)
        digest = record.pop("hash")
        assert record["seq"] == want["seq"]
        assert record_hash(canonical(record)) == digest == hashes[record["seq"]]


async def test_csv_has_the_flat_columns_and_guards_formula_cells(sqlite_url: str) -> None:
    rng = random.Random(3)
    hostile = event(
        rng,
        BASE_MS,
        subject='=HYPERLINK("http://evil","x")',
        tenant="+SUM(A1)",
        tool="-2+3",
        upstream="@evil",
        reason="\tcmd",
        method="\rsplit",
        arguments={"q": "=1+1"},
    )
    await append(sqlite_url, [hostile, event(rng, BASE_MS + 1, subject="alice", tenant="acme")])
    engine = create_engine(sqlite_url)
    try:
        text = "".join([c async for c in csv_chunks(engine, Filters())])
    finally:
        await engine.dispose()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == list(CSV_COLUMNS)
    first = dict(zip(CSV_COLUMNS, rows[1], strict=True))
    assert first["subject"] == '\'=HYPERLINK("http://evil","x")'
    assert first["tenant"] == "'+SUM(A1)"
    assert first["tool"] == "'-2+3"
    assert first["upstream"] == "'@evil"
    assert first["reason"] == "'\tcmd"
    assert first["method"] == "'\rsplit"
    assert first["seq"] == "1"
    assert first["error_code"].lstrip("-").isdigit() or first["error_code"] == ""  # numbers stay numbers
    stored = (await _stored(sqlite_url))[0]
    assert json.loads(first["args"]) == stored["args"]  # the redacted arguments, as JSON
    assert first["hash"] == stored["hash"]
    assert first["issuer"] == stored["actor"]["issuer"]
    second = dict(zip(CSV_COLUMNS, rows[2], strict=True))
    assert (second["subject"], second["tenant"]) == ("alice", "acme")  # ordinary text untouched
    assert csv_cell(-31001) == "-31001"
    assert csv_cell("-31001") == "'-31001"


# --- bundles --------------------------------------------------------------------------------------


async def _bundle(url: str, path: Path, from_seq: int | None = None, to_seq: int | None = None) -> None:
    engine = create_engine(url)
    try:
        plan = await plan_bundle(engine, store_for(engine), from_seq, to_seq)
        text = "".join([c async for c in bundle_chunks(engine, plan, page_size=50)])
        await asyncio.to_thread(path.write_text, text)
    finally:
        await engine.dispose()


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def _first(report: Report) -> tuple[int, str]:
    assert not report.ok
    return report.problems[0].seq, report.problems[0].kind


async def test_bundle_verifies_offline_with_given_or_own_keys(db: str, tmp_path: Path) -> None:
    path = tmp_path / "bundle.jsonl"
    await _bundle(db, path)
    lines = _lines(path)
    assert lines[0]["type"] == "arbiter-audit-bundle" and lines[0]["public_keys"] == [PUBLIC]
    assert [x["seq"] for x in lines if x["type"] == "record"] == list(range(1, 241))

    given = verify_bundle(path, [PUBLIC])
    assert given.ok and given.records == 240 and given.last_seq == 240
    checkpoints = [x["seq"] for x in lines if x["type"] == "checkpoint"]
    # The first batch (no checkpoint yet), then at the batch ending 40+ records later, then the last.
    assert checkpoints == [37, 111, 185, 240]
    assert given.checkpoints_valid == 4 and given.last_signed_seq == 240
    assert given.keys_source == "given" and "note" not in given.to_json()["keys"]  # type: ignore[operator]

    own = verify_bundle(path, None)
    assert own.ok and own.keys_source == "bundle"
    assert own.to_json()["keys"] == {"source": "bundle", "key_ids": own.key_ids, "note": SELF_KEYS_NOTE}


async def test_bundle_with_an_edited_record_reports_altered_at_that_seq(db: str, tmp_path: Path) -> None:
    path = tmp_path / "bundle.jsonl"
    await _bundle(db, path)
    lines = _lines(path)
    line = next(x for x in lines if x.get("seq") == 77 and x["type"] == "record")
    body = json.loads(line["body"])
    body["decision"] = "allow" if body["decision"] != "allow" else "deny"
    line["body"] = canonical(body)
    _write(path, lines)
    assert _first(verify_bundle(path, [PUBLIC])) == (77, "altered")


async def test_bundle_with_a_deleted_record_reports_missing_at_that_seq(db: str, tmp_path: Path) -> None:
    path = tmp_path / "bundle.jsonl"
    await _bundle(db, path)
    lines = [x for x in _lines(path) if not (x["type"] == "record" and x["seq"] == 150)]
    _write(path, lines)
    report = verify_bundle(path, [PUBLIC])
    assert _first(report) == (150, "missing")
    assert report.records == 239


async def test_bundle_with_a_tampered_checkpoint_reports_bad_checkpoint(db: str, tmp_path: Path) -> None:
    path = tmp_path / "bundle.jsonl"
    await _bundle(db, path)
    lines = _lines(path)
    cp = next(x for x in lines if x["type"] == "checkpoint")
    signature = bytearray(cp["signature"].encode())
    signature[5] = ord("A") if signature[5] != ord("A") else ord("B")
    cp["signature"] = signature.decode()
    _write(path, lines)
    report = verify_bundle(path, [PUBLIC])
    assert report.checkpoints_invalid == 1
    assert (cp["seq"], "bad_checkpoint") in [(p.seq, p.kind) for p in report.problems]


async def test_bundle_verified_with_a_wrong_public_key_has_invalid_checkpoints(
    db: str, tmp_path: Path
) -> None:
    path = tmp_path / "bundle.jsonl"
    await _bundle(db, path)
    checkpoints = sum(1 for x in _lines(path) if x["type"] == "checkpoint")
    report = verify_bundle(path, [OTHER_PUBLIC])
    assert not report.ok
    assert report.checkpoints_valid == 0 and report.checkpoints_invalid == checkpoints > 0
    assert {p.kind for p in report.problems} == {"bad_checkpoint"}
    assert report.last_signed_seq is None


async def test_a_bundle_of_a_range_verifies_from_its_anchor(db: str, tmp_path: Path) -> None:
    path = tmp_path / "range.jsonl"
    await _bundle(db, path, 50, 120)
    header = _lines(path)[0]
    assert (header["anchor_seq"], header["from_seq"], header["to_seq"]) == (49, 50, 120)
    report = verify_bundle(path, [PUBLIC])
    assert report.ok and (report.first_seq, report.last_seq, report.records) == (50, 120, 71)
    assert report.checkpoints_valid >= 1  # the checkpoints inside the range came along
    # The last record cut off: the header's range says it is missing even with no checkpoint on it.
    lines = [x for x in _lines(path) if not (x["type"] == "record" and x["seq"] == 120)]
    _write(path, lines)
    assert _first(verify_bundle(path, [PUBLIC])) == (120, "truncated")


async def test_bundle_ranges_are_validated(db: str) -> None:
    engine = create_engine(db)
    try:
        store = store_for(engine)
        with pytest.raises(InvalidInput, match="beyond the newest"):
            await plan_bundle(engine, store, 1, 10_000)
        with pytest.raises(InvalidInput, match="before"):
            await plan_bundle(engine, store, 50, 40)
        with pytest.raises(InvalidInput, match="purged"):
            await plan_bundle(engine, store, 0, 10)
    finally:
        await engine.dispose()


MALFORMED = [
    ("", "empty"),
    ('{"type":"something-else","version":1}\n', "line 1"),
    (
        '{"type":"arbiter-audit-bundle","version":2,"anchor_seq":0,"anchor_hash":"'
        + "0" * 64
        + '","public_keys":[]}\n',
        "version",
    ),
    ("HEADER\n" + '{"type":"record","seq":1,"body":"{}","hash":"x"}\n', "line 2"),
    ("HEADER\n" + '{"type":"record","seq":1,"body":"{}","hash":"x","prev_hash":"y"}\nnot json\n', "line 3"),
    ("HEADER\n" + '{"type":"checkpoint","seq":"one"}\n', "line 2"),
    ("HEADER\n" + '{"type":"mystery"}\n', "line 2"),
    ("HEADER\n" + "[1, 2]\n", "line 2"),
    (
        '{"type":"arbiter-audit-bundle","version":1,"anchor_seq":0,"anchor_hash":"'
        + "0" * 64
        + '","public_keys":["bm90IGEga2V5"]}\n',
        "public_keys",
    ),
]


@pytest.mark.parametrize(("text", "named"), MALFORMED)
def test_a_malformed_bundle_is_invalid_input_naming_the_line(tmp_path: Path, text: str, named: str) -> None:
    header = json.dumps(
        {
            "type": "arbiter-audit-bundle",
            "version": 1,
            "anchor_seq": 0,
            "anchor_hash": "0" * 64,
            "public_keys": [],
        }
    )
    path = tmp_path / "bad.jsonl"
    path.write_text(text.replace("HEADER", header))
    with pytest.raises(InvalidInput, match=named):
        verify_bundle(path, None)


def test_a_missing_bundle_file_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read"):
        verify_bundle(tmp_path / "nope.jsonl", None)


# --- query plans ----------------------------------------------------------------------------------


PLAN_CASES = [
    (Filters(subject="alice"), "ix_audit_subject_time"),
    (Filters(tenant="acme"), "ix_audit_tenant_time"),
    (Filters(tool="kb__search_docs"), "ix_audit_tool_time"),
    (Filters(upstream="kb"), "ix_audit_upstream_time"),
    (Filters(decision="deny"), "ix_audit_decision_time"),
    (Filters(reason="policy_denied"), "ix_audit_reason_time"),
    (Filters(trace_id="ab" * 16), "ix_audit_trace"),
    (Filters(since_ms=BASE_MS, until_ms=BASE_MS + DAY_MS), "ix_audit_time"),
    (Filters(subject="alice", since_ms=BASE_MS, until_ms=BASE_MS + DAY_MS), "ix_audit_subject_time"),
]


@pytest.mark.parametrize(("filters", "index"), PLAN_CASES, ids=[c[1] for c in PLAN_CASES])
@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("deep", [False, True], ids=["first-page", "with-cursor"])
async def test_each_filter_query_uses_its_index(
    db: str, filters: Filters, index: str, order: Order, deep: bool
) -> None:
    statement = page_statement(filters, order, (BASE_MS + DAY_MS // 2, 120) if deep else None, 101)
    sql = str(statement.compile(dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}))
    with sqlite3.connect(db.split("///", 1)[1]) as conn:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
    assert any(f"USING INDEX {index} " in step for step in plan), plan
    assert not any(step.startswith("SCAN audit_events") for step in plan), plan
    if index != "ix_audit_trace":  # the index already yields (ts_ms, seq) order: no sort of the matches
        assert not any("TEMP B-TREE" in step for step in plan), plan
        if deep:  # a later page starts at the cursor inside the index, not at the start of the range
            search = next(step for step in plan if index in step)
            assert ("ts_ms>?" if order == "asc" else "ts_ms<?") in search, plan


# --- the admin API --------------------------------------------------------------------------------


def _wait_for_events(client: httpx.Client, params: dict[str, str], count: int) -> list[Record]:
    deadline = time.monotonic() + 15
    while True:
        resp = client.get("/audit/events", params=params)
        assert resp.status_code == 200, resp.text
        events: list[Record] = resp.json()["events"]
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.1)


def test_auditor_reads_the_audit_api_and_nothing_else(
    arbiter_factory: ArbiterFactory, tmp_path: Path
) -> None:
    server = arbiter_factory(audit={"signing_key": SEED})
    with server.admin() as admin:
        resp = admin.post("/api-keys", json={"owner": "auditor-1", "roles": ["auditor"]})
        assert resp.status_code == 201, resp.text
    auditor = server.admin(resp.json()["key"])
    agent = server.admin(server.agent_key)
    with auditor, agent:
        assert auditor.get("/upstreams").status_code == 403
        assert auditor.get("/policies").status_code == 403
        assert agent.get("/audit/events").status_code == 403
        assert agent.get("/audit/verify").status_code == 403

        # The admin changes (two keys made) and the three refusals above are all in the log.
        denied = _wait_for_events(auditor, {"kind": "admin", "decision": "deny"}, 3)
        assert len(denied) >= 3 and all(r["reason"] == "forbidden" for r in denied)
        page = auditor.get("/audit/events", params={"limit": "2"}).json()
        assert len(page["events"]) == 2 and page["next_cursor"]
        following = auditor.get("/audit/events", params={"limit": "2", "cursor": page["next_cursor"]})
        assert following.status_code == 200
        assert following.json()["events"][0]["seq"] != page["events"][0]["seq"]

        verified = auditor.get("/audit/verify")
        assert verified.status_code == 200
        body = verified.json()
        assert body["ok"] is True and body["first_broken"] is None and body["head_seq"] >= 5

        jsonl = auditor.get("/audit/events", params={"format": "jsonl", "kind": "admin"})
        assert jsonl.status_code == 200 and jsonl.headers["content-type"].startswith("application/x-ndjson")
        for line in jsonl.text.splitlines():
            record = json.loads(line)
            assert record_hash(canonical({k: v for k, v in record.items() if k != "hash"})) == record["hash"]
        table = auditor.get("/audit/events", params={"format": "csv"})
        assert table.status_code == 200 and table.text.splitlines()[0] == ",".join(CSV_COLUMNS)

        checkpoints = auditor.get("/audit/checkpoints", params={"order": "desc"})
        assert checkpoints.status_code == 200
        listed = checkpoints.json()["checkpoints"]
        assert listed and all(cp["signature_valid"] for cp in listed)  # signed with SEED, which it trusts
        bundle = auditor.get("/audit/export", params={"format": "bundle"})
        assert bundle.status_code == 200
    path = tmp_path / "api-bundle.jsonl"
    path.write_bytes(bundle.content)
    assert verify_bundle(path, [PUBLIC]).ok


def test_bad_query_parameters_are_422_invalid_input(arbiter_factory: ArbiterFactory) -> None:
    server = arbiter_factory()
    with server.admin(ADMIN_TOKEN) as admin:
        for params, named in (
            ({"cursor": "not-a-cursor"}, "cursor"),
            ({"limit": "0"}, "limit"),
            ({"limit": "many"}, "limit"),
            ({"order": "sideways"}, "order"),
            ({"since": "last tuesday"}, "since"),
            ({"decision": "perhaps"}, "decision"),
            ({"subjct": "alice"}, "unknown query parameter 'subjct'"),
            ({"format": "xml"}, "format"),
            ({"format": "csv", "limit": "5"}, "limit"),
        ):
            resp = admin.get("/audit/events", params=params)
            assert resp.status_code == 422, (params, resp.text)
            error = resp.json()["error"]
            assert error["code"] == "invalid_input" and named in error["message"], (params, error)
        for params in ({"from_seq": "99999"}, {"format": "bundle", "subject": "a"}, {"from_seq": "x"}):
            resp = admin.get("/audit/export", params=params)
            assert resp.status_code == 422, (params, resp.text)
            assert resp.json()["error"]["code"] == "invalid_input"
