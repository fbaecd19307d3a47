"""Every request that reaches the pipeline leaves exactly one complete audit record: allowed, denied,
refused at authentication, failed upstream. Real upstreams, a real SQLite file, real tokens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from tests.audit.helpers import Record, of_kind, verify, wait_for
from tests.conftest import ArbiterFactory, ArbiterServer, UpstreamProc
from tests.policies.conftest import MODERN, MODERN_META, new_key
from tests.refusals import refusal_of

POLICY = """\
p, role:support, *, kb/*, call, allow
p, role:support, *, crm/*, call, allow
p, role:support, *, crm/delete_customer, call, deny
p, role:support, *, crm/create_ticket, call, deny, r.args.priority == "high"
"""

FIELDS = {
    "v", "id", "seq", "prev_hash", "ts", "ts_ms", "kind", "actor", "subject", "tenant", "client_info",
    "method", "tool", "upstream", "target", "tool_hash", "decision", "reason", "policy", "policy_version",
    "outcome", "latency_ms", "cost", "trace_id", "request_id", "protocol_version", "args", "args_hmac",
    "args_bytes", "args_redactions", "args_truncated", "admin",
}  # fmt: skip
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def _call(server: ArbiterServer, token: str, name: str, arguments: dict[str, Any]) -> httpx.Response:
    body = {
        "jsonrpc": "2.0",
        "id": 11,
        "method": "tools/call",
        "params": {
            "name": name,
            "arguments": arguments,
            "_meta": {
                **MODERN_META,
                "io.modelcontextprotocol/clientInfo": {"name": "audit-test", "version": "1.2"},
            },
        },
    }
    headers = {
        **MODERN,
        "mcp-method": "tools/call",
        "mcp-name": name,
        "authorization": f"Bearer {token}",
        "traceparent": f"00-{TRACE}-00f067aa0ba902b7-01",
    }
    with httpx.Client(timeout=30) as http:
        return http.post(server.mcp_url, content=json.dumps(body), headers=headers)


def _mcp(records: list[Record]) -> list[Record]:
    return [r for r in of_kind(records, "mcp") if r["method"] == "tools/call"]


@pytest.fixture
def audited(
    arbiter_factory: ArbiterFactory, kb_upstream: UpstreamProc
) -> Iterator[tuple[ArbiterServer, str, UpstreamProc]]:
    crm = UpstreamProc("arbiter.demo.crm").start()
    server = arbiter_factory(policy=POLICY)
    server.register("kb", kb_upstream.url)
    server.register("crm", crm.url, call_timeout_s=5)
    yield server, new_key(server, "sam", ["support"], tenant="acme"), crm
    crm.kill()


def test_allowed_call_leaves_one_complete_record(audited: tuple[ArbiterServer, str, UpstreamProc]) -> None:
    server, key, _ = audited
    resp = _call(server, key, "crm__get_customer", {"customer_id": "C-1001"})
    assert resp.status_code == 200 and "error" not in resp.json(), resp.text
    records = _mcp(wait_for(server, lambda rs: len(_mcp(rs)) >= 1))
    assert len(records) == 1
    rec = records[0]
    assert set(rec) - {"hash"} == FIELDS
    assert rec["decision"] == "allow" and rec["reason"] == "allowed"
    assert rec["outcome"] == {"status": "ok"}
    assert rec["actor"]["subject"] == "sam" and rec["actor"]["tenant"] == "acme"
    assert rec["actor"]["auth_method"] == "api_key" and rec["actor"]["api_key_id"]
    assert rec["actor"]["source_ip"] == "127.0.0.1"
    assert rec["tool"] == "crm__get_customer" and rec["upstream"] == "crm" and rec["target"] == "get_customer"
    assert rec["tool_hash"] and len(rec["tool_hash"]) == 64
    assert rec["policy"]["rule"] == "p, role:support, *, crm/*, call, allow"
    assert rec["policy_version"] == rec["policy"]["policy_version"] >= 1
    assert rec["trace_id"] == TRACE
    assert rec["client_info"] == {"name": "audit-test", "version": "1.2", "title": None, "untrusted": True}
    assert rec["args_bytes"] == len(json.dumps({"customer_id": "C-1001"}, separators=(",", ":")))
    assert len(rec["args_hmac"]) == 64
    assert rec["latency_ms"] > 0 and rec["request_id"] == 11
    assert rec["ts"].endswith("Z") and len(rec["id"]) == 36 and rec["id"][14] == "7"  # UUIDv7


def test_denied_call_leaves_one_record_naming_the_rule(
    audited: tuple[ArbiterServer, str, UpstreamProc],
) -> None:
    server, key, _ = audited
    args = {"customer_id": "C-1001", "subject": "refund", "priority": "high"}
    resp = _call(server, key, "crm__create_ticket", args)
    # Answered as a tool result the model reads; the record is what the pipeline decided, as before.
    assert (refusal_of(resp.json()) or {}).get("reason") == "policy_denied", resp.text
    assert resp.json()["result"]["isError"] is True
    records = _mcp(wait_for(server, lambda rs: len(_mcp(rs)) >= 1))
    assert len(records) == 1
    rec = records[0]
    assert rec["decision"] == "deny" and rec["reason"] == "policy_denied"
    assert (
        rec["policy"]["rule"]
        == 'p, role:support, *, crm/create_ticket, call, deny, r.args.priority == "high"'
    )
    assert rec["args"] == args  # nothing secret in them: stored as sent
    assert rec["outcome"]["status"] == "refused" and rec["outcome"]["error_code"] == -31001


def test_refused_credential_leaves_one_auth_record(audited: tuple[ArbiterServer, str, UpstreamProc]) -> None:
    server, key, _ = audited
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    resp = _call(server, forged, "crm__get_customer", {"customer_id": "C-1001"})
    assert resp.status_code == 401
    records = wait_for(server, lambda rs: len(of_kind(rs, "auth")) >= 1)
    auth = of_kind(records, "auth")
    assert len(auth) == 1
    rec = auth[0]
    assert rec["decision"] == "deny" and rec["reason"] == "invalid_token"
    assert rec["actor"] == {"source_ip": "127.0.0.1"}
    assert rec["method"] == "tools/call" and rec["trace_id"] == TRACE
    assert rec["outcome"]["http_status"] == 401
    assert _mcp(records) == []  # nothing ran
    assert forged not in json.dumps(records)


async def test_upstream_failure_leaves_one_record(audited: tuple[ArbiterServer, str, UpstreamProc]) -> None:
    server, key, crm = audited
    crm.kill()
    resp = _call(server, key, "crm__get_customer", {"customer_id": "C-1001"})
    assert (refusal_of(resp.json()) or {}).get("reason") == "upstream_unavailable", resp.text
    records = _mcp(wait_for(server, lambda rs: len(_mcp(rs)) >= 1))
    assert len(records) == 1
    rec = records[0]
    assert rec["decision"] == "allow" and rec["reason"] == "upstream_unavailable"
    assert rec["outcome"]["status"] == "error" and rec["outcome"]["error_code"] == -31002


async def test_lists_unknown_tools_and_admin_changes_are_recorded_and_the_chain_verifies(
    audited: tuple[ArbiterServer, str, UpstreamProc],
) -> None:
    server, key, _ = audited
    with server.admin() as admin:
        created = admin.post(
            "/limits", json={"role": "support", "upstream": "crm", "limit": 60, "period": "minute"}
        )
        assert created.status_code == 201, created.text
        assert admin.delete(f"/limits/{created.json()['id']}").status_code == 204
    async with server.client("legacy", key) as client:
        await client.list_tools()
        with pytest.raises(MCPError):
            await client.session.call_tool("crm__no_such_tool", {})
    records = wait_for(server, lambda rs: any(r["reason"] == "unknown_target" for r in rs))
    lists = [r for r in of_kind(records, "mcp") if r["method"] == "tools/list"]
    assert lists and lists[-1]["decision"] == "allow" and lists[-1]["client_info"]["untrusted"] is True
    unknown = [r for r in records if r["reason"] == "unknown_target"]
    assert len(unknown) == 1 and unknown[0]["decision"] == "deny"
    admin = of_kind(records, "admin")
    assert {"upstream.create", "api_key.create", "policy.import", "limit.create", "limit.delete"} <= {
        r["method"] for r in admin
    }
    limit = next(r for r in admin if r["method"] == "limit.create")
    assert limit["tool"] == str(limit["admin"]["after"]["id"]) and limit["admin"]["before"] is None
    policy = next(r for r in admin if r["method"] == "policy.import")
    assert policy["admin"]["after"] == POLICY.strip().splitlines() and policy["admin"]["policy_version"] >= 1
    assert policy["actor"]["auth_method"] == "break_glass"
    seqs = [r["seq"] for r in records]
    assert seqs == list(range(1, len(records) + 1))
    report = verify(server.settings.database_url)
    assert report.ok, report.to_json()
    assert report.records == len(records)
