"""The result guard end to end: a real upstream (its own process) answers through a real Arbiter.

A 50 MB answer is refused, or truncated, while Arbiter reads no more than the cap of it (the process's
traced allocations stay a small multiple of the cap, where reading it would cost 50 MB); a PEM private
key and an AWS key reach the agent redacted; ``structuredContent`` that breaks the tool's published
output schema is caught. Both answer forms of a streamable-HTTP upstream (a JSON body, an event stream).
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import mcp_types as types
import pytest

from arbiter.errors import ResultTooLarge
from arbiter.integrity.results import ResultGuard
from arbiter.settings import Settings
from tests.audit.helpers import of_kind, wait_for
from tests.conftest import ArbiterFactory, ArbiterServer, UpstreamProc
from tests.integrity.guard_upstream import AWS_KEY, PEM
from tests.refusals import refusal_of, tool_refusal

CAP = 2 * 1024 * 1024
# A refused answer: Arbiter holds at most the cap (and its read buffers), the agent gets a few bytes.
REFUSED_BOUND = 3 * CAP
MODERN = "2026-07-28"
FORMS = ["json", "sse"]


@dataclass
class GuardUpstream(UpstreamProc):
    sse: bool = False

    def command(self) -> list[str]:
        return [*super().command(), *(["--sse"] if self.sse else [])]


@pytest.fixture(scope="module", params=FORMS)
def upstream(request: pytest.FixtureRequest) -> Iterator[GuardUpstream]:
    up = GuardUpstream("tests.integrity.guard_upstream", sse=request.param == "sse").start()
    yield up
    up.kill()


def _arbiter(factory: ArbiterFactory, upstream: GuardUpstream, **results: Any) -> ArbiterServer:
    server = factory(integrity={"results": {"max_bytes": CAP, **results}})
    server.register("g", upstream.url, auto_approve=True)
    return server


def _raw_call(server: ArbiterServer, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {
            "name": tool,
            "arguments": arguments,
            "_meta": {
                "io.modelcontextprotocol/protocolVersion": MODERN,
                "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "1"},
                "io.modelcontextprotocol/clientCapabilities": {},
            },
        },
    }
    headers = {
        **server.auth_headers,
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": MODERN,
        "mcp-method": "tools/call",
        "mcp-name": tool,
    }
    resp = httpx.post(server.mcp_url, content=json.dumps(body), headers=headers, timeout=60)
    assert resp.status_code == 200, resp.text[:500]
    if resp.headers["content-type"].startswith("text/event-stream"):
        data = [line[5:] for line in resp.text.splitlines() if line.startswith("data:")]
        found: dict[str, Any] = json.loads(data[-1])
        return found
    answer: dict[str, Any] = resp.json()
    return answer


def _peak_while(call: Any) -> tuple[Any, int]:
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return out, peak


@pytest.mark.parametrize("mode", ["refuse", "truncate"])
def test_a_50_mb_result_is_refused_or_truncated_without_arbiter_reading_it(
    arbiter_factory: ArbiterFactory, upstream: GuardUpstream, mode: str
) -> None:
    server = _arbiter(arbiter_factory, upstream, on_oversize=mode)
    warm = _raw_call(server, "g__plain", {})  # lazy imports and connections, outside the measurement
    assert warm["result"]["content"][0]["text"] == "nothing to see here"
    # What an answer of the cap's own size costs this process (Arbiter and the agent, which is this
    # test, both decode and encode it): a truncated answer is one of those, whatever the upstream sent.
    base, baseline = _peak_while(lambda: _raw_call(server, "g__huge", {"kb": CAP * 9 // 10 // 1024}))
    assert base["result"].get("isError") is not True  # under the cap (JSON escapes included): passed on
    answer, peak = _peak_while(lambda: _raw_call(server, "g__huge", {"kb": 50 * 1024}))
    bound = REFUSED_BOUND if mode == "refuse" else int(1.5 * baseline)
    assert peak < bound, f"peak traced memory {peak} bytes for a 50 MB answer (bound {bound})"
    assert peak < 50 * 1024 * 1024 // 2  # reading the answer would cost 50 MB at the very least
    if mode == "refuse":
        refusal = refusal_of(answer)
        assert refusal is not None and refusal["reason"] == "result_too_large", str(answer)[:500]
        assert refusal["max_bytes"] == CAP
    else:
        result = answer["result"]
        assert result.get("isError") is not True, str(result)[:500]
        text = result["content"][0]["text"]
        assert text.startswith("the quick brown fox") and 0 < len(text) <= CAP
        assert result["content"][-1]["text"].startswith("[TRUNCATED:")
        assert result["_meta"]["arbiter/truncated"] == {"max_bytes": CAP}

    def guarded(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in of_kind(records, "mcp") if "guard" in (r["outcome"] or {})]

    found = guarded(wait_for(server, lambda rs: bool(guarded(rs))))
    assert len(found) == 1, [(r["tool"], r["outcome"]) for r in found]
    (record,) = found
    assert record["outcome"]["guard"]["result"]["oversize"] == mode
    assert record["reason"] == ("result_too_large" if mode == "refuse" else "allowed")


async def test_a_private_key_in_a_result_reaches_the_agent_redacted(
    arbiter_factory: ArbiterFactory, upstream: GuardUpstream
) -> None:
    server = _arbiter(arbiter_factory, upstream)
    async with server.client(MODERN) as client:  # pyright: ignore[reportArgumentType]
        result = await client.session.call_tool("g__leak", {})
        clean = await client.session.call_tool("g__plain", {})
        structured = await client.session.call_tool("g__leak_structured", {})
    assert result.is_error is False
    text = result.content[0]
    assert isinstance(text, types.TextContent)
    assert "PRIVATE KEY" not in text.text and "MIIEowIBAAKCAQEA" not in text.text
    assert text.text == "here is the deploy key:\n[REDACTED:private_key]\nand that is all"
    assert PEM not in json.dumps(result.model_dump())
    first = clean.content[0]
    assert isinstance(first, types.TextContent) and first.text == "nothing to see here"  # untouched
    # structuredContent strings are redacted too, as is the text beside them.
    assert structured.structured_content == {"note": "the key is [REDACTED:api_key]"}
    assert AWS_KEY not in json.dumps(structured.model_dump())
    records = wait_for(server, lambda rs: any(r["tool"] == "g__leak" for r in of_kind(rs, "mcp")))
    (record,) = [r for r in of_kind(records, "mcp") if r["tool"] == "g__leak"]
    assert record["outcome"]["guard"]["result"]["redacted"] == {"private_key": 1}


async def test_structured_content_that_breaks_the_output_schema_is_caught(
    arbiter_factory: ArbiterFactory, upstream: GuardUpstream
) -> None:
    server = _arbiter(arbiter_factory, upstream)
    async with server.client(MODERN) as client:  # pyright: ignore[reportArgumentType]
        refused = tool_refusal(await client.session.call_tool("g__wrong", {}))
        fine = await client.session.call_tool("g__right", {})
    assert refused["reason"] == "invalid_result"
    assert refused["errors"] == [{"path": "$.count", "keyword": "type", "expected": "integer"}]
    assert "many" not in json.dumps(refused)  # the failing value is never echoed
    assert fine.is_error is False and fine.structured_content == {"count": 3}


async def test_without_validation_the_upstream_answer_passes(
    arbiter_factory: ArbiterFactory, upstream: GuardUpstream
) -> None:
    server = _arbiter(arbiter_factory, upstream, validate_output_schema=False, redact_secrets=False)
    answer = _raw_call(server, "g__wrong", {})
    assert answer["result"]["structuredContent"] == {"count": "many"}
    leaked = _raw_call(server, "g__leak", {})
    assert PEM in leaked["result"]["content"][0]["text"]  # the guard, not something else, redacts


def test_answers_through_the_sdk_are_measured_after_the_fact() -> None:
    """stdio and SSE upstreams answer through the MCP SDK, which reads each message whole: the guard has
    no raw bytes from the relay and measures the decoded result instead."""
    settings = Settings(database_url="sqlite://").integrity
    big = {"content": [{"type": "text", "text": "y" * (CAP + 10_000)}]}
    refusing = ResultGuard(settings.results.model_copy(update={"max_bytes": CAP}), {}, 8)
    with pytest.raises(ResultTooLarge):
        refusing.check("g__huge", big, None, refusing.probe())
    cutting = ResultGuard(
        settings.results.model_copy(update={"max_bytes": CAP, "on_oversize": "truncate"}), {}, 8
    )
    cut, _ = cutting.check("g__huge", big, None, cutting.probe())
    assert len(cut["content"][0]["text"]) == CAP and cut["_meta"] == {"arbiter/truncated": {"max_bytes": CAP}}
    leaked, found = cutting.check(
        "g__leak", {"content": [{"type": "text", "text": PEM}]}, None, cutting.probe()
    )
    assert leaked["content"][0]["text"] == "[REDACTED:private_key]" and found == {"private_key": 1}
