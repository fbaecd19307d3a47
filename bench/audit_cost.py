"""CPU cost of auditing one call: on the request path (build the event, queue it) and in the writer
(redact, HMAC, hash-chain and insert, per record in batches of 500 on SQLite).

Run: ``.venv/bin/python bench/audit_cost.py``.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from arbiter.audit.record import Event, Renderer
from arbiter.audit.redact import Redactor
from arbiter.audit.signing import Signer
from arbiter.audit.store import AuditStore
from arbiter.auth.principal import Principal
from arbiter.proxy.interceptors.audit import mcp_event
from arbiter.proxy.pipeline import CallContext
from arbiter.settings import AuditSettings, RedactSettings
from arbiter.store import schema
from arbiter.store.db import create_engine

PRINCIPAL = Principal("sam", "arbiter", "api_key", "acme", frozenset({"support-agent"}), api_key_id="k1")
DEFINITION = {"name": "get_customer", "description": "Return a customer", "inputSchema": {"type": "object"}}
ARGS = {"customer_id": "C-1001", "note": "call me at jane@example.com", "limit": 5, "status": "open"}


def _ctx(i: int) -> CallContext:
    return CallContext(
        method="tools/call",
        params={},
        request_id=i,
        principal=PRINCIPAL,
        exposed="crm__get_customer",
        upstream="crm",
        target="get_customer",
        arguments=dict(ARGS),
        definition=DEFINITION,
    )


def per_call_us(n: int, fn: object) -> float:
    assert callable(fn)
    start = time.process_time()
    for i in range(n):
        fn(i)
    return (time.process_time() - start) / n * 1e6


async def store_cost(n: int, render: Renderer) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}"
        await asyncio.to_thread(schema.upgrade, url)
        engine = create_engine(url)
        settings = AuditSettings()
        store = AuditStore(engine, Signer.from_secret(None), settings, render.render)
        bodies = [render.render(mcp_event(_ctx(i), {"content": []}, None)) for i in range(n)]
        start = time.process_time()
        for at in range(0, n, 500):
            await store.append(bodies[at : at + 500])
        spent = time.process_time() - start
        await engine.dispose()
        return spent / n * 1e6


def main() -> None:
    n = 20_000
    renderer = Renderer(Redactor(RedactSettings()), b"k" * 32)
    ctxs = [_ctx(i) for i in range(n)]
    build = per_call_us(n, lambda i: mcp_event(ctxs[i], {"content": []}, None))
    events: list[Event] = [mcp_event(c, {"content": []}, None) for c in ctxs]
    render = per_call_us(n, lambda i: renderer.render(events[i]))
    stored = asyncio.run(store_cost(n, renderer))
    print(f"request path: build the event           {build:7.1f} µs per call")
    print(f"writer: redact + HMAC + render           {render:7.1f} µs per record")
    print(f"writer: chain + insert (SQLite, 500/txn) {stored:7.1f} µs per record (this process's CPU)")


if __name__ == "__main__":
    main()
