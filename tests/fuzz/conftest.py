"""Shared pieces of the property-based tests: one Arbiter per module, a recording upstream, audit look-ups.

Hypothesis examples never start servers: each module starts one Arbiter (module-scoped fixture) and every
example sends raw HTTP to it. Example counts are bounded so the package stays quick in CI, and the
examples are the same on every run; set ``ARBITER_FUZZ_EXAMPLES`` (a number, or a multiplier such as
``x10``) for longer runs with fresh random examples.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from hypothesis import HealthCheck, settings
from mcp.server import MCPServer
from pydantic import Field
from starlette.types import Receive, Scope, Send

from arbiter.proxy.body import replay_body
from arbiter.settings import Settings
from arbiter.store import schema
from tests.conftest import ADMIN_TOKEN, ArbiterServer, Recorder, serve_in_thread

HANDSHAKE = "2025-11-25"
MODERN = "2026-07-28"
ACCEPT = "application/json, text/event-stream"
META = {
    "io.modelcontextprotocol/protocolVersion": MODERN,
    "io.modelcontextprotocol/clientInfo": {"name": "fuzz", "version": "1"},
    "io.modelcontextprotocol/clientCapabilities": {},
}
# Methods the upstream may see from Arbiter's own housekeeping (connect, catalog refresh, the watcher's
# own listen for list changes, reopened whenever it drops), never from a fuzzed request: anything else
# reaching the upstream came from an agent's request.
HOUSEKEEPING = frozenset(
    {
        "initialize",
        "notifications/initialized",
        "ping",
        "server/discover",
        "subscriptions/listen",
        "tools/list",
        "resources/list",
        "resources/templates/list",
        "prompts/list",
    }
)
POLICY = (
    "p, *, *, *, call, allow\np, *, *, *, read, allow\np, *, *, *, get, allow\n"
    # A tool that exists upstream but that no caller may see: it must answer like one that does not exist.
    "p, *, *, rec/hidden_lookup, call, deny\n"
)


def examples(default: int) -> int:
    """``default``, unless ``ARBITER_FUZZ_EXAMPLES`` says otherwise (``500`` or ``x10``)."""
    raw = os.environ.get("ARBITER_FUZZ_EXAMPLES", "").strip()
    if not raw:
        return default
    if raw.startswith("x"):
        return max(1, int(float(raw[1:]) * default))
    return max(1, int(raw))


def fuzz(default: int) -> settings:
    """Hypothesis settings for a test that drives a live server with ``default`` examples."""
    return settings(
        max_examples=examples(default),
        # The suite's runs (CI included) draw the same examples every time, so a landing never depends
        # on luck; asking for more examples (ARBITER_FUZZ_EXAMPLES) explores with fresh randomness.
        derandomize=not os.environ.get("ARBITER_FUZZ_EXAMPLES", "").strip(),
        deadline=None,
        database=None,  # nothing written into the checkout; a failure prints its reproduction
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


def new_trace() -> tuple[str, str]:
    """A fresh W3C trace id and the ``traceparent`` carrying it: how a test finds its request's record."""
    trace = secrets.token_hex(16)
    return trace, f"00-{trace}-{secrets.token_hex(8)}-01"


class RecordingUpstream:
    """A real MCP server (in this process, on a loopback port) that notes the JSON-RPC method of every
    message it receives, so a test can tell whether an agent's request got through to it."""

    def __init__(self) -> None:
        server = MCPServer("recorder")

        @server.tool()
        def echo(text: str = "") -> str:
            """Say it back."""
            return text

        @server.tool()
        def lookup(
            region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})], q: str = ""
        ) -> str:
            """A tool with a header-mirrored argument (Mcp-Param-Region under 2026-07-28)."""
            return f"{region}:{q}"

        @server.tool()
        def hidden_lookup(
            region: Annotated[str, Field(json_schema_extra={"x-mcp-header": "Region"})], q: str = ""
        ) -> str:
            """The policy hides this one from every caller."""
            return f"hidden {region}:{q}"

        @server.resource("rec://note")
        def note() -> str:
            return "a note"

        @server.prompt()
        def greet(who: str = "you") -> str:
            return f"hello {who}"

        self.app = server.streamable_http_app(stateless_http=True, json_response=True)
        self.methods: list[str] = []

    def agent_calls(self) -> list[str]:
        return [m for m in self.methods if m not in HOUSEKEEPING]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            decoded: Any = json.loads(body) if body else None
        except ValueError:
            decoded = None
        items: list[Any] = decoded if isinstance(decoded, list) else [decoded]
        self.methods.extend(str(i.get("method")) for i in items if isinstance(i, dict))
        await self.app(scope, replay_body(body, receive), send)


@dataclass
class Target:
    """The module's Arbiter, what reached its pipeline, and what reached its upstream."""

    server: ArbiterServer
    recorder: Recorder
    upstream: RecordingUpstream
    audit_http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        with self.server.admin() as admin:  # an auditor's key: break-glass would log a warning per query
            resp = admin.post("/api-keys", json={"owner": "fuzz-auditor", "roles": ["auditor"]})
        assert resp.status_code == 201, resp.text
        self.audit_http = self.server.admin(resp.json()["key"])

    @property
    def key(self) -> str:
        return self.server.agent_key

    def audit_events(self, trace_id: str) -> list[dict[str, Any]]:
        resp = self.audit_http.get("/audit/events", params={"trace_id": trace_id, "limit": "1000"})
        assert resp.status_code == 200, resp.text
        events: list[dict[str, Any]] = resp.json()["events"]
        return events

    def wait_audited(self, trace_id: str, within_s: float = 20.0) -> list[dict[str, Any]]:
        """The records with ``trace_id``, polling until there is one (the writer batches); [] if none came."""
        deadline = time.monotonic() + within_s
        while True:
            events = self.audit_events(trace_id)
            if events or time.monotonic() > deadline:
                return events
            time.sleep(0.02)

    def settle(self, trace_id: str, within_s: float = 20.0) -> list[dict[str, Any]]:
        """Records with ``trace_id`` once the writer has flushed past them: after a later marker record
        is visible, nothing earlier is still queued, so an empty answer is final."""
        marker, parent = new_trace()
        with httpx.Client(timeout=10) as http:
            http.post(  # an auth refusal: always audited, queued after the request under test
                self.server.mcp_url,
                content=b"{}",
                headers={"authorization": "Bearer not-a-credential", "traceparent": parent},
            )
        assert self.wait_audited(marker, within_s), "the audit writer did not flush a marker record"
        return self.audit_events(trace_id)


@pytest.fixture(scope="module")
def recording_upstream() -> Iterator[tuple[RecordingUpstream, str]]:
    rec = RecordingUpstream()
    with serve_in_thread(rec) as port:
        yield rec, f"http://127.0.0.1:{port}/mcp"


def make_server(tmp: Path, recorder: Recorder, **overrides: Any) -> ArbiterServer:
    """An Arbiter on its own SQLite file with the fuzz policy (like ``arbiter_factory``, module-scoped)."""
    url = f"sqlite+aiosqlite:///{tmp / 'arbiter.db'}"
    schema.upgrade(url)
    audit = {"spool_dir": str(tmp / "audit-spool"), "flush_interval_s": 0.02, **overrides.pop("audit", {})}
    # The fuzzers aim at the transport and the pipeline, not at reviews: tools are used as they come.
    integrity = {"auto_approve_default": True, **overrides.pop("integrity", {})}
    settings_ = Settings(
        **{
            "database_url": url,
            "admin_token": ADMIN_TOKEN,
            "audit": audit,
            "integrity": integrity,
            **overrides,
        }  # pyright: ignore[reportArgumentType]
    )
    server = ArbiterServer(settings_, [recorder]).start()
    server.seed_policy(POLICY)
    return server


@pytest.fixture(scope="module")
def target(
    tmp_path_factory: pytest.TempPathFactory, recording_upstream: tuple[RecordingUpstream, str]
) -> Iterator[Target]:
    """One Arbiter for the whole module, with the recording upstream registered as ``rec``."""
    recorder = Recorder()
    server = make_server(tmp_path_factory.mktemp("arbiter"), recorder)
    server.register("rec", recording_upstream[1])
    t = Target(server, recorder, recording_upstream[0])
    yield t
    t.audit_http.close()
    server.stop()
