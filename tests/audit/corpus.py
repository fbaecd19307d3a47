"""A populated audit log for the query, export and CLI tests: many records with varied callers, tools,
outcomes and times, appended through the real store (so they are chained and checkpointed)."""

from __future__ import annotations

import random
from typing import Any

from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine

from arbiter.audit.record import Event, Renderer
from arbiter.audit.redact import Redactor
from arbiter.audit.signing import Signer, generate_key
from arbiter.audit.store import AuditStore
from arbiter.settings import AuditSettings, RedactSettings
from arbiter.store.db import create_engine

SEED, PUBLIC = generate_key()
OTHER_SEED, OTHER_PUBLIC = generate_key()
BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
DAY_MS = 86_400_000
SUBJECTS = ("alice", "bob", "carol", "dave", "erin", "svc-batch")
TENANTS = ("acme", "globex", "initech")
TOOLS = (("kb", "search_docs"), ("kb", "get_doc"), ("crm", "get_customer"), ("crm", "update_customer"))
OUTCOMES = (
    ("allow", "allowed", {"status": "ok"}),
    ("allow", "upstream_error", {"status": "error", "error_code": -32603, "message": "boom"}),
    ("deny", "policy_denied", {"status": "refused", "error_code": -31001, "message": "denied"}),
    ("deny", "rate_limited", {"status": "refused", "error_code": -31004, "message": "slow down"}),
    ("error", "internal_error", {"status": "error", "error_code": -32603}),
)
Record = dict[str, Any]


def renderer() -> Renderer:
    return Renderer(Redactor(RedactSettings()), b"corpus-hmac-key-0123456789abcdef")


def event(
    rng: random.Random, ts_ms: int, *, subject: str | None = None, tenant: str | None = None, **extra: Any
) -> Event:
    upstream, tool = rng.choice(TOOLS)
    decision, reason, outcome = rng.choice(OUTCOMES)
    kind = rng.choice(("mcp", "mcp", "mcp", "mcp", "auth", "admin"))
    fields: dict[str, Any] = {
        "kind": kind,
        "decision": decision,
        "reason": reason,
        "actor": {
            "subject": subject or rng.choice(SUBJECTS),
            "issuer": "https://idp.example.com",
            "tenant": tenant or rng.choice(TENANTS),
            "client_id": "agent-app",
            "api_key_id": None,
            "auth_method": "jwt",
            "roles": ["agent"],
            "source_ip": f"10.0.0.{rng.randrange(1, 250)}",
        },
        "ts_ms": ts_ms,
        "method": "tools/call" if kind == "mcp" else f"{kind}.action",
        "tool": f"{upstream}__{tool}",
        "upstream": upstream,
        "target": tool,
        "policy": {"decision": decision, "reason": reason, "rule": "p, role:agent, *, kb/*, call, allow"},
        "policy_version": 3,
        "outcome": dict(outcome),
        "latency_ms": round(rng.uniform(0.5, 80.0), 3),
        "cost": 1.0,
        "trace_id": f"{rng.getrandbits(128):032x}" if rng.random() < 0.8 else None,
        "arguments": {"query": f"refund {rng.randrange(1000)}", "limit": rng.randrange(1, 10)},
    }
    fields.update(extra)
    return Event(**fields)


def store_for(engine: AsyncEngine, settings: AuditSettings | None = None) -> AuditStore:
    cfg = settings or AuditSettings(checkpoint_every=40)
    return AuditStore(engine, Signer.from_secret(SecretStr(SEED)), cfg, renderer().render)


async def populate(url: str, count: int = 240, *, seed: int = 5, batch: int = 37) -> None:
    """``count`` records over ten days, appended in batches. Times are not in seq order (records from
    several replicas interleave), and some share a millisecond, so (ts_ms, seq) ordering is exercised."""
    rng = random.Random(seed)
    render = renderer().render
    bodies: list[Record] = []
    for i in range(count):
        ts = BASE_MS + (i // 3) * 997 if i % 4 == 0 else BASE_MS + rng.randrange(10 * DAY_MS)
        bodies.append(render(event(rng, ts)))
    await append_bodies(url, bodies, batch=batch)


async def append(url: str, events: list[Event]) -> None:
    render = renderer().render
    await append_bodies(url, [render(e) for e in events])


async def append_bodies(url: str, bodies: list[Record], *, batch: int = 37) -> None:
    engine = create_engine(url)
    try:
        store = store_for(engine)
        for start in range(0, len(bodies), batch):
            await store.append(bodies[start : start + batch])
        await store.checkpoint()
    finally:
        await engine.dispose()
