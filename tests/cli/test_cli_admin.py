"""The admin commands (keys, upstreams, policy export/import/dry-run, limits, audit query) against a
running Arbiter: in-process through typer's runner for the round trips, as a subprocess where the
one-line error and the exit code are what is tested."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from arbiter.cli import cli
from tests.cli.helpers import arbiter as run_arbiter
from tests.conftest import ADMIN_TOKEN, ArbiterServer, UpstreamProc

API_REFUSED, API_UNREACHABLE, USAGE = 10, 11, 2


@pytest.fixture
def run(arbiter: ArbiterServer) -> Callable[..., Any]:
    """``run(*args)``: the command's stdout (parsed with ``--json``); it must succeed. The server and
    token come from ARBITER_URL and ARBITER_TOKEN, as an operator would set them."""
    runner = CliRunner()
    env = {"ARBITER_URL": arbiter.base_url, "ARBITER_TOKEN": ADMIN_TOKEN}

    def invoke(*args: str, code: int = 0) -> Any:
        result = runner.invoke(cli, list(args), env=env)
        assert result.exit_code == code, (result.output, result.exception)
        assert ADMIN_TOKEN not in result.output
        return json.loads(result.stdout) if "--json" in args else result.stdout

    return invoke


def wait_for(check: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    """Poll ``check`` until it returns something truthy (the audit writer stores records off the
    request path)."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_keys_create_list_revoke(run: Callable[..., Any], arbiter: ArbiterServer) -> None:
    created = run("keys", "create", "--owner", "ops-bot", "--role", "security-admin", "--json")
    key, key_id = created["key"], created["id"]
    assert created["owner"] == "ops-bot" and created["roles"] == ["security-admin"]

    # The new key works as the CLI's token: it lists itself, never the secret.
    env = {"ARBITER_URL": arbiter.base_url}
    listed = CliRunner().invoke(cli, ["keys", "list", "--json", "--token", key], env=env)
    assert listed.exit_code == 0, listed.output
    mine = [k for k in json.loads(listed.stdout) if k["id"] == key_id]
    assert mine and mine[0]["revoked_at"] is None and "key" not in mine[0]
    table = run("keys", "list")
    assert key_id in table and "ops-bot" in table and key not in table

    assert f"revoked key {key_id}" in run("keys", "revoke", key_id)
    (after,) = [k for k in run("keys", "list", "--json") if k["id"] == key_id]
    assert after["revoked_at"] is not None
    assert key_id not in {k["id"] for k in run("keys", "list", "--active", "--json")}

    # The revoked key is refused: one line with the server's error, its own exit code, no secret.
    refused = run_arbiter("keys", "list", env={"ARBITER_URL": arbiter.base_url, "ARBITER_TOKEN": key})
    assert refused.code == API_REFUSED
    assert refused.err.strip().count("\n") == 0
    assert refused.error.startswith("error: GET /admin/v1/api-keys refused with HTTP 401: ")
    assert key not in refused.err and key not in refused.out


def test_a_created_key_is_printed_once_in_the_table(run: Callable[..., Any]) -> None:
    out = run("keys", "create", "--owner", "reader", "--role", "agent", "--tenant", "acme")
    key_line = [line for line in out.splitlines() if line.startswith("KEY")]
    assert len(key_line) == 1 and len(key_line[0].split()[-1]) > 20
    assert "reader" in out and "acme" in out


def test_upstreams_add_list_refresh_disable_enable(
    run: Callable[..., Any], kb_upstream: UpstreamProc
) -> None:
    added = run("upstreams", "add", "kb2", kb_upstream.url, "--timeout", "12", "--json")
    assert added["name"] == "kb2" and added["call_timeout_s"] == 12 and added["enabled"] is True
    assert added["catalog"]["tools"] > 0

    listed = run("upstreams", "list", "--json")
    assert {"kb", "crm", "kb2"} <= {u["name"] for u in listed}
    table = run("upstreams", "list")
    assert "kb2" in table and kb_upstream.url in table and "STATUS" in table

    refreshed = run("upstreams", "refresh", "kb2", "--json")  # by name
    assert refreshed["id"] == added["id"] and refreshed["last_refresh_at"] is not None

    disabled = run("upstreams", "disable", str(added["id"]), "--json")  # by id
    assert disabled["enabled"] is False and disabled["status"] == "disabled"
    (row,) = [u for u in run("upstreams", "list", "--json") if u["name"] == "kb2"]
    assert row["enabled"] is False

    updated = run("upstreams", "update", "kb2", "--connect-timeout", "3", "--json")
    assert updated["connect_timeout_s"] == 3 and updated["call_timeout_s"] == 12
    assert run("upstreams", "enable", "kb2", "--json")["enabled"] is True


def test_review_definitions_and_approve_one(run: Callable[..., Any], kb_upstream: UpstreamProc) -> None:
    run("upstreams", "add", "kb3", kb_upstream.url, "--no-auto-approve")
    pending = run("upstreams", "definitions", "kb3", "--status", "pending", "--json")
    assert pending and all(d["status"] == "pending" for d in pending)
    first, second = pending[0], pending[1]

    table = run("upstreams", "definitions", "kb3", "--status", "pending")
    assert first["sha256"] in table and first["name"] in table

    approved = run("upstreams", "approve", "kb3", first["kind"], first["name"], first["sha256"], "--json")
    assert [(d["name"], d["status"]) for d in approved] == [(first["name"], "approved")]
    rejected = run("upstreams", "reject", "kb3", second["kind"], second["name"], second["sha256"], "--json")
    assert rejected[0]["status"] == "rejected"
    left = {d["name"] for d in run("upstreams", "definitions", "kb3", "--status", "pending", "--json")}
    assert first["name"] not in left and second["name"] not in left


def test_policy_export_then_import_with_the_expected_version(
    run: Callable[..., Any], arbiter: ArbiterServer, tmp_path: Path
) -> None:
    out = tmp_path / "policy.csv"
    exported = run("policy", "export", "--out", str(out), "--json")
    version = exported["version"]
    assert version >= 1 and exported["rules"] == 3 and "p, *, *, *, call, allow" in out.read_text()

    out.write_text(out.read_text() + "p, role:auditor, *, admin/audit, admin:read, allow\n")
    imported = run("policy", "import", str(out), "--expected-version", str(version), "--json")
    assert imported["version"] == version + 1 and len(imported["rules"]) == 4
    assert "role:auditor" in run("policy", "export")

    # A second import still naming the old version is refused, changing nothing.
    env = {"ARBITER_URL": arbiter.base_url, "ARBITER_TOKEN": ADMIN_TOKEN}
    stale = run_arbiter("policy", "import", str(out), "--expected-version", str(version), env=env)
    assert stale.code == API_REFUSED
    assert stale.error == (
        f"error: POST /admin/v1/policies/import refused with HTTP 409: conflict: the policy changed "
        f'since you read it ({{"expected_version":{version},"current_version":{version + 1}}})'
    )
    assert ADMIN_TOKEN not in stale.err
    assert run("policy", "export", "--json")["version"] == version + 1


def test_policy_dry_run_against_the_live_policy_and_a_candidate(
    run: Callable[..., Any], tmp_path: Path
) -> None:
    table = tmp_path / "cases.yaml"
    table.write_text("- {subject: alice, object: crm/get_customer, expected: allow}\n")
    report = run("policy", "dry-run", str(table), "--json")
    assert report["policy"] == "live" and report["passed"] == 1 and report["failed"] == 0

    candidate = tmp_path / "deny.csv"
    candidate.write_text("p, *, *, crm/*, call, deny\n")
    failed = run("policy", "dry-run", str(table), "--policy", str(candidate), code=1)
    assert "FAIL" in failed and "deny" in failed


def test_limits_list_and_usage(run: Callable[..., Any], arbiter: ArbiterServer) -> None:
    assert "Rate limits: none" in run("limits", "list")
    with arbiter.admin() as admin:
        resp = admin.post("/limits", json={"upstream": "crm", "limit": 5, "period": "minute"})
        assert resp.status_code == 201, resp.text
    listed = run("limits", "list", "--json")
    (rule,) = listed["limits"]["rules"]
    assert rule["upstream"] == "crm" and rule["limit"] == 5
    assert set(listed) == {"limits", "budgets", "tool_costs"}
    table = run("limits", "list")
    assert "crm" in table and "minute" in table

    usage = run("limits", "usage", "--by", "caller", "--by", "tool", "--json")
    assert usage["group_by"] == ["principal", "tool"] and usage["period"] == "day"


def test_audit_query_finds_the_changes(run: Callable[..., Any], kb_upstream: UpstreamProc) -> None:
    run("keys", "create", "--owner", "audited-bot", "--role", "agent")
    run("upstreams", "add", "kb4", kb_upstream.url)

    def changes() -> list[dict[str, Any]]:
        page = run("audit", "query", "--kind", "admin", "--order", "desc", "--limit", "50", "--json")
        return [e for e in page["events"] if e["tool"] in ("audited-bot", "kb4")]

    found = wait_for(lambda: len(changes()) == 2 and changes(), "the two admin changes in the audit log")
    assert {e["method"] for e in found} == {"api_key.create", "upstream.create"}
    table = run("audit", "query", "--method", "api_key.create")
    assert "audited-bot" in table and "api_key.create" in table
    every = run("audit", "query", "--limit", "1", "--all", "--json")
    assert len(every["events"]) > 2 and every["next_cursor"] is None


def test_unreachable_server_and_missing_token_are_one_line(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound but not listening: connections are refused
        ran = run_arbiter("upstreams", "list", "--url", f"http://127.0.0.1:{port}", "--token", "secret-x")
    assert ran.code == API_UNREACHABLE
    assert ran.error.startswith(
        f"error: cannot reach Arbiter at http://127.0.0.1:{port} (GET /admin/v1/upstreams)"
    )
    assert "secret-x" not in ran.err and "Traceback" not in ran.err

    ran = run_arbiter("keys", "list")
    assert ran.code == USAGE
    assert ran.error == "error: no admin token: give --token or set ARBITER_TOKEN"
