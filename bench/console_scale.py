"""The console's pages on a large installation: 100 upstreams, 2,000 tools, a million audit records.

Seeds a SQLite file (migrated to head) straight through sqlite3: the upstreams (disabled, so Arbiter
connects to none of them), their tools as approved catalog entries, and the audit records in bulk
(realistic bodies and indexed columns over the last 30 days, ``tools/call`` records with a latency; not
a valid hash chain, which no page here checks). Then starts Arbiter on it under uvicorn, logs in to the
console with the admin token and times each page (median and worst of ``--runs`` loads, after one
warm-up load): the overview, the upstreams list, an upstream's tools, audit search (first page, a
filtered one, and the next page of it) and the activity charts for each window.

Run: ``.venv/bin/python bench/console_scale.py [--records 1000000] [--runs 5] [--db PATH] [--keep]``
(``--db`` of an already seeded file skips the seeding).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sqlite3
import statistics
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from pydantic import SecretStr

from arbiter.app import create_app
from arbiter.audit.record import iso_ms
from arbiter.settings import Settings
from arbiter.store import schema

UPSTREAMS = 100
TOOLS_PER_UPSTREAM = 20
SPAN_MS = 30 * 86_400_000
CHUNK = 50_000
TOKEN = "bench-admin-token-0123456789abcdef0123"
OUTCOMES = [  # (weight, decision, reason, status)
    (0.86, "allow", "allowed", "ok"),
    (0.08, "deny", "policy_denied", "refused"),
    (0.03, "deny", "rate_limited", "refused"),
    (0.02, "allow", "upstream_error", "error"),
    (0.01, "error", "internal_error", "error"),
]
COLUMNS = "seq, id, ts_ms, kind, subject, tenant, method, tool, upstream, decision, reason, trace_id"
COLUMNS += ", body, prev_hash, hash"


def seed(path: Path, records: int) -> None:
    url = f"sqlite:///{path}"
    schema.upgrade(url)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    now = datetime.now(UTC).isoformat(sep=" ")
    with db:
        db.executemany(
            "INSERT INTO upstreams (id, name, transport, url, connect_timeout_s, call_timeout_s, enabled,"
            " source, created_at, updated_at, auto_approve)"
            " VALUES (?, ?, 'http', ?, 10, 30, 0, 'api', ?, ?, 0)",
            [(i, f"up{i:03d}", f"http://127.0.0.1:9/mcp/{i}", now, now) for i in range(1, UPSTREAMS + 1)],
        )
        items: list[tuple[Any, ...]] = []
        for u in range(1, UPSTREAMS + 1):
            for t in range(TOOLS_PER_UPSTREAM):
                name = f"tool_{t:02d}"
                definition = {
                    "name": name,
                    "description": f"Tool {t} of upstream {u}: " + "does a useful thing. " * 8,
                    "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}},
                }
                sha = f"{u:032x}{t:032x}"
                items.append((u, "tool", name, json.dumps(definition), sha, 1, now, now, "approved", 0))
        db.executemany(
            "INSERT INTO catalog_items (upstream_id, kind, name, definition, sha256, present, first_seen,"
            " last_seen, status, disabled) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            items,
        )
    rng = random.Random(7)
    start = int(time.time() * 1000) - SPAN_MS
    insert = f"INSERT INTO audit_events ({COLUMNS}) VALUES ({', '.join('?' * 15)})"
    weights = [w for w, *_ in OUTCOMES]
    seq = 0
    began = time.perf_counter()
    while seq < records:
        rows: list[tuple[Any, ...]] = []
        size = min(CHUNK, records - seq)
        outcomes = rng.choices(OUTCOMES, weights=weights, k=size)
        for _, decision, reason, status in outcomes:
            seq += 1
            ts = start + seq * SPAN_MS // records - rng.randrange(500)
            u = rng.randrange(1, UPSTREAMS + 1)
            tool = f"up{u:03d}__tool_{rng.randrange(TOOLS_PER_UPSTREAM):02d}"
            subject = f"user-{rng.randrange(2000):04d}@corp.example"
            tenant = f"tenant-{rng.randrange(50):02d}"
            kind = "mcp" if rng.random() < 0.95 else "admin"
            method = "tools/call" if kind == "mcp" else "upstreams.update"
            trace = f"{rng.getrandbits(128):032x}"
            rid = str(uuid.UUID(int=rng.getrandbits(128)))
            body = {
                "v": 1,
                "id": rid,
                "seq": seq,
                "ts": iso_ms(ts),
                "ts_ms": ts,
                "kind": kind,
                "actor": {"subject": subject, "tenant": tenant, "auth_method": "jwt", "roles": ["agent"]},
                "subject": subject,
                "tenant": tenant,
                "method": method,
                "tool": tool,
                "upstream": f"up{u:03d}",
                "decision": decision,
                "reason": reason,
                "policy": {
                    "decision": decision,
                    "reason": reason,
                    "rule": "p, role:agent, *, *, call, allow",
                },
                "outcome": {"status": status},
                "latency_ms": round(rng.lognormvariate(3.5, 0.8), 3),
                "trace_id": trace,
                "args": {"q": f"order status {rng.randrange(10**5)}"},
                "args_hmac": f"{rng.getrandbits(256):064x}",
            }
            text = json.dumps(body, sort_keys=True, separators=(",", ":"))
            cols = (ts, kind, subject, tenant, method, tool, f"up{u:03d}", decision, reason, trace)
            rows.append((seq, rid, *cols, text, "0" * 64, "0" * 64))
        with db:
            db.executemany(insert, rows)
        print(f"  seeded {seq:>9,} audit records ({time.perf_counter() - began:5.1f} s)", flush=True)
    with db:
        db.execute("UPDATE audit_chain SET seq = ?, hash = ? WHERE id = 1", (seq, "0" * 64))
    db.execute("ANALYZE")
    db.close()


def serve(path: Path) -> tuple[uvicorn.Server, threading.Thread, int]:
    settings = Settings(database_url=f"sqlite:///{path}", admin_token=SecretStr(TOKEN), port=0)
    app = create_app(settings)
    with socket_port() as port:
        pass
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise SystemExit("Arbiter did not start")
        time.sleep(0.05)
    return server, thread, port


class socket_port:
    """A free loopback port."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        port: int = self.sock.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def login(client: httpx.Client) -> None:
    page = client.get("/console/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf, page.text
    done = client.post("/console/login", data={"key": TOKEN, "csrf": csrf[1]})
    assert done.status_code in (200, 303), done.text


def timed(client: httpx.Client, path: str, runs: int) -> tuple[float, float, int]:
    client.get(path)  # warm-up: the first load of a page also compiles its template
    took: list[float] = []
    size = 0
    for _ in range(runs):
        began = time.perf_counter()
        resp = client.get(path)
        took.append((time.perf_counter() - began) * 1000)
        assert resp.status_code == 200, (path, resp.status_code, resp.text[:500])
        size = len(resp.content)
    return statistics.median(took), max(took), size


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--db", type=Path, help="a seeded file to reuse (seeded here if it does not exist)")
    parser.add_argument("--keep", action="store_true", help="keep the seeded file")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="arbiter-console-scale-"))
    path: Path = args.db or scratch / "arbiter.db"
    if not path.exists():
        print(
            f"seeding {path}: {UPSTREAMS} upstreams, {UPSTREAMS * TOOLS_PER_UPSTREAM} tools, "
            f"{args.records:,} audit records"
        )
        seed(path, args.records)
    server, thread, port = serve(path)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            login(client)
            last = client.get("/console/audit?upstream=up042&decision=deny")
            cursor = re.search(r"cursor=([A-Za-z0-9_\-%]+)", last.text)
            day_ago = iso_ms(int(time.time() * 1000) - 86_400_000)
            pages = [
                ("overview (24 h charts)", "/console"),
                ("overview, 1 h charts", "/console?window=1h"),
                ("overview, 7 d charts", "/console?window=7d"),
                ("upstreams, page 1", "/console/upstreams"),
                ("upstreams, page 2", "/console/upstreams?page=2"),
                ("an upstream's tools", "/console/upstreams/42"),
                ("audit search, first page", "/console/audit"),
                ("audit search, upstream + deny", "/console/audit?upstream=up042&decision=deny"),
                ("audit search, subject", "/console/audit?subject=user-0042%40corp.example"),
                ("audit search, tool + since", f"/console/audit?tool=up007__tool_03&since={day_ago}"),
            ]
            if cursor:
                pages.append(
                    (
                        "audit search, next page",
                        f"/console/audit?upstream=up042&decision=deny&cursor={cursor[1]}",
                    )
                )
            print(f"\n{'page':<36} {'median ms':>10} {'worst ms':>9} {'KiB':>6}")
            for name, path_ in pages:
                median, worst, size = timed(client, path_, args.runs)
                print(f"{name:<36} {median:>10.1f} {worst:>9.1f} {size / 1024:>6.0f}")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        if not args.keep and args.db is None:
            path.unlink(missing_ok=True)
        elif args.keep:
            print(f"\nkept {path}")


if __name__ == "__main__":
    main()
