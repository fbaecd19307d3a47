"""``arbiter approvals list | show | approve | deny`` against a running Arbiter (issue 19): an approver finds
the pending call, reads it, decides it, and the agent's retry runs (or is told no); a refusal is the
server's one line with exit code 10.

Real parts: Arbiter on SQLite and the ``pay`` upstream that counts the refunds it ran, set up as
tests/proxy/test_approver_flow.py does; the commands run in-process through typer's runner for the
round trips, as a subprocess where the one-line error and the exit code are what is tested.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from typer.testing import CliRunner

from arbiter.cli import cli
from tests.cli.helpers import arbiter as run_arbiter
from tests.conftest import ArbiterFactory, ArbiterServer
from tests.policies.conftest import new_key
from tests.proxy.test_approval import CARD, MODERN, Payments
from tests.proxy.test_approver_flow import _refund, _start, payments  # pyright: ignore[reportPrivateUsage]
from tests.refusals import tool_refusal

__all__ = ["payments"]  # fixture

API_REFUSED = 10


def runner_for(server: ArbiterServer, key: str) -> Callable[..., Any]:
    """``run(*args)``: the command's stdout (parsed with ``--json``) as the holder of ``key``; it must
    succeed. The server and token come from ARBITER_URL and ARBITER_TOKEN, as an approver would set them."""
    runner = CliRunner()
    env = {"ARBITER_URL": server.base_url, "ARBITER_TOKEN": key}

    def invoke(*args: str) -> Any:
        result = runner.invoke(cli, list(args), env=env)
        assert result.exit_code == 0, (result.output, result.exception)
        assert key not in result.output
        return json.loads(result.stdout) if "--json" in args else result.stdout

    return invoke


def field(out: str, heading: str) -> str:
    """The value on ``heading``'s line of a record printed as ``HEADING  value`` lines."""
    found = re.search(rf"^{re.escape(heading)} {{2,}}(.*)$", out, re.MULTILINE)
    assert found, f"no {heading} line in:\n{out}"
    return found.group(1).strip()


async def test_an_approver_lists_shows_and_approves_and_the_agents_retry_runs(
    arbiter_factory: ArbiterFactory, payments: Payments
) -> None:
    server = _start(arbiter_factory, payments)
    run = runner_for(server, new_key(server, "lena", ["billing-lead"]))
    approval_id = tool_refusal(await _refund(server, MODERN))["approval_id"]

    (listed,) = run("approvals", "list", "--json")
    assert listed["id"] == approval_id and listed["status"] == "pending" and listed["may_decide"] is True
    table = run("approvals", "list")
    assert approval_id in table and "pay__refund" in table and "test-agent" in table and "MAY DECIDE" in table

    shown = run("approvals", "show", approval_id)
    assert field(shown, "STATUS") == "pending" and field(shown, "TOOL") == "pay__refund"
    assert field(shown, "UPSTREAM") == "pay" and field(shown, "TARGET") == "refund"
    assert "approve by role:billing-lead" in field(shown, "RULE") and "pay/refund" in field(shown, "RULE")
    assert field(shown, "APPROVERS") == "role:billing-lead" and field(shown, "SUBJECT") == "test-agent"
    arguments = shown.split("\nARGUMENTS\n", 1)[1]
    assert json.loads(arguments)["amount"] == 500 and arguments.startswith('  {\n    "amount": 500,\n')
    assert CARD not in shown  # redacted as the audit log shows it
    assert run("approvals", "show", approval_id, "--json")["arguments"]["customer"] == "acme"

    approved = run("approvals", "approve", approval_id, "--note", "customer called")
    assert field(approved, "STATUS") == "approved" and field(approved, "DECIDED BY") == "user:lena"
    assert field(approved, "NOTE") == "customer called"
    assert payments.refunds() == []

    ran = await _refund(server, MODERN)
    assert not ran.is_error, ran
    assert payments.refunds() == [{"amount": 500, "customer": "acme"}]
    assert run("approvals", "list", "--json") == []
    (used,) = run("approvals", "list", "--status", "used", "--limit", "5", "--json")
    assert used["id"] == approval_id and used["note"] == "customer called" and used["used"] is not None


async def test_a_denied_request_prints_its_status_and_the_retry_is_declined(
    arbiter_factory: ArbiterFactory, payments: Payments
) -> None:
    server = _start(arbiter_factory, payments)
    lead = new_key(server, "lena", ["billing-lead"])
    run = runner_for(server, lead)
    approval_id = tool_refusal(await _refund(server, MODERN))["approval_id"]

    denied = run("approvals", "deny", approval_id, "--note", "not this one")
    assert field(denied, "ID") == approval_id and field(denied, "STATUS") == "denied"
    assert field(denied, "NOTE") == "not this one"
    refused = tool_refusal(await _refund(server, MODERN))
    assert refused["reason"] == "approval_declined" and refused["approval_id"] == approval_id
    assert payments.refunds() == []

    # Decided once: a second decision is the server's 409, naming the status it has now.
    env = {"ARBITER_URL": server.base_url, "ARBITER_TOKEN": lead}
    again = run_arbiter("approvals", "approve", approval_id, env=env)
    assert again.code == API_REFUSED and again.err.strip().count("\n") == 0
    assert again.error.startswith(
        f"error: POST /admin/v1/approvals/{approval_id}/approve refused with HTTP 409: "
    )
    assert '"status":"denied"' in again.error
    assert run("approvals", "list", "--status", "denied", "--json")[0]["status"] == "denied"


async def test_approving_your_own_request_is_refused_with_the_servers_message(
    arbiter_factory: ArbiterFactory, payments: Payments
) -> None:
    server = _start(arbiter_factory, payments)
    own = new_key(server, "test-agent", ["agent", "billing-lead"])  # the caller, holding the role too
    approval_id = tool_refusal(await _refund(server, MODERN, own))["approval_id"]
    (mine,) = runner_for(server, own)("approvals", "list", "--json")
    assert mine["id"] == approval_id and mine["may_decide"] is False

    env = {"ARBITER_URL": server.base_url, "ARBITER_TOKEN": own}
    refused = run_arbiter("approvals", "approve", approval_id, "--note", "mine", env=env)
    assert refused.code == API_REFUSED and refused.err.strip().count("\n") == 0
    assert refused.error.startswith(
        f"error: POST /admin/v1/approvals/{approval_id}/approve refused with HTTP 403: forbidden: "
    )
    assert "own request" in refused.error
    assert own not in refused.err and own not in refused.out
    missing = run_arbiter("approvals", "show", "apr_nosuchrequest", env=env)
    assert missing.code == API_REFUSED and "HTTP 404" in missing.error
    assert payments.refunds() == []
