"""``arbiter audit verify | export | keygen | purge`` against a real SQLite file: what they print and
their exit codes (0 intact, 1 broken, 2 unreadable or invalid input, 5 schema behind, 9 unsigned or
unverifiable with --require-signatures)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from arbiter.audit.record import now_ms
from arbiter.audit.signing import Signer, key_id
from arbiter.cli import main
from tests.audit.corpus import DAY_MS, OTHER_PUBLIC, PUBLIC, SEED, append, event, populate
from tests.audit.helpers import execute, stored

Result = tuple[int, str, str]


@pytest.fixture
def env(sqlite_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("ARBITER_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("ARBITER_AUDIT__SIGNING_KEY", SEED)
    monkeypatch.delenv("ARBITER_AUDIT__RETENTION_DAYS", raising=False)
    monkeypatch.chdir(tmp_path)
    return sqlite_url


@pytest.fixture
def db(env: str) -> str:
    asyncio.run(populate(env))
    return env


def run(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    """The console script in-process: ``main()`` maps ArbiterError to exit 2, as installed."""
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["arbiter", *args])
        with pytest.raises(SystemExit) as exited:
            main()
    out, err = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 0 if code is None else 1), out, err


def test_verify_an_intact_database_exits_0(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "audit", "verify")
    assert code == 0, out
    assert out.startswith("OK: database: 240 records (seq 1..240)")
    assert "4 valid, 0 invalid" in out
    code, out, _ = run(capsys, "audit", "verify", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True and report["head_seq"] == 240


def test_verify_a_tampered_database_exits_1_and_names_the_first_broken_record(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    execute(
        db,
        "UPDATE audit_events SET body = replace(body, :a, :b) WHERE seq = 17",
        a='"cost":1.0',
        b='"cost":0.0',
    )
    execute(db, "DELETE FROM audit_events WHERE seq = 90")
    code, out, _ = run(capsys, "audit", "verify")
    assert code == 1
    assert out.startswith("BROKEN: database")
    assert "first broken record: seq 17 (altered)" in out
    assert "then seq 90 (missing)" in out


def test_verify_the_database_with_only_a_public_key(
    db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ARBITER_AUDIT__SIGNING_KEY")  # an auditor has the public key, not the private one
    code, out, _ = run(capsys, "audit", "verify", "--public-key", PUBLIC)
    assert code == 0, out
    code, out, _ = run(capsys, "audit", "verify", "--public-key", OTHER_PUBLIC)
    assert code == 1
    assert "0 valid, 4 invalid" in out and "bad_checkpoint" in out


def test_without_a_trusted_key_signatures_are_not_checked_and_an_intact_chain_exits_0(
    db: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ARBITER_AUDIT__SIGNING_KEY")  # no key at all: neither private nor public
    code, out, _ = run(capsys, "audit", "verify")
    assert code == 0, out
    assert out.startswith("OK: database: 240 records")
    assert "4 not checked" in out and "invalid signature" not in out
    assert "signatures not checked" in out and "--public-key" in out
    code, out, err = run(capsys, "audit", "verify", "--require-signatures")
    assert code == 9 and "not verifiably signed" in err
    code, out, _ = run(capsys, "audit", "verify", "--json")
    report = json.loads(out)
    assert code == 0 and report["signatures_checked"] is False and report["checkpoints"]["unchecked"] == 4
    # With the key, the same chain is verifiably signed.
    code, out, _ = run(capsys, "audit", "verify", "--public-key", PUBLIC, "--require-signatures")
    assert code == 0 and "4 valid" in out


def test_unreadable_or_invalid_input_exits_2(
    env: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(capsys, "audit", "verify", "--file", str(tmp_path / "missing.jsonl"))
    assert code == 2 and "cannot read" in err
    (tmp_path / "bad.jsonl").write_text('{"type":"arbiter-audit-bundle","version":1}\nnope\n')
    code, _, err = run(capsys, "audit", "verify", "--file", str(tmp_path / "bad.jsonl"))
    assert code == 2 and "line 1" in err
    code, _, err = run(capsys, "audit", "verify", "--public-key", "not-a-key")
    assert code == 2 and "public key" in err
    empty = tmp_path / "empty.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ARBITER_DATABASE_URL", f"sqlite:///{empty}")
        code, _, err = run(capsys, "audit", "verify")
    assert code == 5 and "arbiter migrate" in err  # an unmigrated database, not a broken chain
    code, _, err = run(capsys, "audit", "export", "--format", "xml")
    assert code == 2 and "--format" in err
    code, _, err = run(capsys, "audit", "export", "--format", "bundle", "--subject", "alice")
    assert code == 2 and "contiguous" in err
    code, _, err = run(capsys, "audit", "export", "--format", "jsonl", "--since", "last week")
    assert code == 2 and "since" in err
    code, _, err = run(
        capsys, "audit", "export", "--format", "jsonl", "--out", str(tmp_path / "no" / "f.jsonl")
    )
    assert code == 2 and "cannot write" in err


def test_console_script_exit_code_for_an_unreadable_bundle(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "arbiter.cli", "audit", "verify", "--file", str(tmp_path / "none.jsonl")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: cannot read")


def test_export_a_bundle_and_verify_it_offline(
    db: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "out" / "bundle.jsonl"
    bundle.parent.mkdir()
    code, _, err = run(capsys, "audit", "export", "--format", "bundle", "--out", str(bundle))
    assert code == 0 and "wrote 240 records" in err
    assert bundle.stat().st_mode & 0o777 == 0o600
    assert not list(bundle.parent.glob("*.partial"))

    monkeypatch.setenv("ARBITER_DATABASE_URL", "sqlite:////nonexistent/dir/x.db")  # offline: no database
    code, out, _ = run(capsys, "audit", "verify", "--file", str(bundle))
    assert code == 0 and "keys (from the bundle)" in out and "--public-key" in out
    code, out, _ = run(capsys, "audit", "verify", "--file", str(bundle), "--public-key", PUBLIC)
    assert code == 0 and f"keys (given): {key_id(PUBLIC)}" in out and "note:" not in out

    lines = bundle.read_text().splitlines()
    edited = json.loads(lines[30])  # record 30
    edited["body"] = edited["body"].replace('"kind":"', '"kind":"x', 1)
    lines[30] = json.dumps(edited)
    bundle.write_text("\n".join(lines) + "\n")
    code, out, _ = run(capsys, "audit", "verify", "--file", str(bundle), "--public-key", PUBLIC)
    assert code == 1 and "first broken record: seq 30 (altered)" in out


def test_export_jsonl_and_csv_with_filters(
    db: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    everything = stored(db)
    alice = [
        r["seq"] for r in sorted(everything, key=lambda r: (r["ts_ms"], r["seq"])) if r["subject"] == "alice"
    ]
    out_file = tmp_path / "alice.jsonl"
    code, _, err = run(
        capsys, "audit", "export", "--format", "jsonl", "--subject", "alice", "--out", str(out_file)
    )
    assert code == 0 and f"wrote {len(alice)} records" in err
    assert [json.loads(line)["seq"] for line in out_file.read_text().splitlines()] == alice

    code, out, _ = run(capsys, "audit", "export", "--format", "csv", "--decision", "deny", "--order", "desc")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    denied = sorted((r for r in everything if r["decision"] == "deny"), key=lambda r: (r["ts_ms"], r["seq"]))
    assert [int(r["seq"]) for r in rows] == [r["seq"] for r in reversed(denied)]


def test_keygen_prints_a_working_key_pair(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "audit", "keygen")
    assert code == 0
    values = dict(line.split("=", 1) for line in out.splitlines())
    signer = Signer.from_secret(SecretStr(values["ARBITER_AUDIT__SIGNING_KEY"]))
    assert signer.public_b64 == values["public_key"]
    assert values["key_id"] == key_id(values["public_key"]) == signer.key_id
    assert "TRUSTED_PUBLIC_KEYS" in err
    _, again, _ = run(capsys, "audit", "keygen")
    assert again != out


def test_purge_needs_a_retention_period(env: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "audit", "purge")
    assert code == 2 and "retention_days" in err


def test_purge_removes_old_records_and_keeps_the_chain_verifiable(
    env: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(9)
    now = now_ms()
    old = [event(rng, now - 5 * DAY_MS + i) for i in range(30)]
    recent = [event(rng, now - DAY_MS // 2 + i) for i in range(12)]
    asyncio.run(append(env, old + recent))
    monkeypatch.setenv("ARBITER_AUDIT__RETENTION_DAYS", "2")
    code, out, _ = run(capsys, "audit", "purge")
    assert code == 0 and out.startswith("purged 30 records")
    records: list[dict[str, Any]] = stored(env)
    assert [r["seq"] for r in records] == list(range(31, 44))  # 12 kept, then the purge's own record
    purge = records[-1]
    assert (purge["kind"], purge["reason"], purge["actor"]["auth_method"]) == ("audit", "purged", "cli")
    code, out, _ = run(capsys, "audit", "verify")
    assert code == 0, out
    code, out, _ = run(capsys, "audit", "purge")
    assert code == 0 and out.startswith("nothing purged")
