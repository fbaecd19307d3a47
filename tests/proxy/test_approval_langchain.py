"""Approval (issue 19) as a LangChain agent meets it: ``langchain.mcp`` tools on a FastMCP client that
carries the agent's own elicitation handler, against a real Arbiter and the real ``pay`` upstream.

A tool is invoked with a model's tool call, as an agent's tool node does when the model picks it; no model
is needed for that. ``MCPAdapter`` keeps a handler the client already has (instead of arming its own
LangGraph-interrupt one), and FastMCP answers both eras with it: a 2026-07-28 ``input_required`` round
through the SDK's input-required driver, a handshake-era ``elicitation/create`` on the session.
"""

from __future__ import annotations

from typing import Any

import mcp_types as types
import pytest
from fastmcp import Client as FastMCPClient
from fastmcp.client.elicitation import ElicitResult
from langchain_core._api import suppress_langchain_beta_warning
from langchain_core.messages import ToolMessage
from langchain_core.tools import BaseTool
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

from tests.conftest import ArbiterFactory, ArbiterServer
from tests.proxy.test_approval import (  # noqa: F401 - arbiter and payments are the fixtures
    BIG,
    CARD,
    LEGACY,
    MODERN,
    Payments,
    _refund_records,  # pyright: ignore[reportPrivateUsage]
    _start,  # pyright: ignore[reportPrivateUsage]
    arbiter,  # pyright: ignore[reportUnusedImport]
    payments,  # pyright: ignore[reportUnusedImport]
)

with suppress_langchain_beta_warning():
    from langchain.mcp import MCPAdapter

TIMEOUT_S = 30.0


class User:
    """The person at the agent's client, in FastMCP's handler shape: answers each form with ``action``,
    noting what it was shown and what the upstream had run by the time it was asked."""

    def __init__(self, upstream: Payments, action: str) -> None:
        self.upstream = upstream
        self.action = action
        self.seen: list[str] = []
        self.ran_before_answer: list[list[dict[str, Any]]] = []

    async def __call__(
        self, message: str, response_type: Any, params: types.ElicitRequestParams, context: Any
    ) -> ElicitResult[dict[str, Any]]:
        self.seen.append(message)
        self.ran_before_answer.append(self.upstream.refunds())
        content = {"approve": True} if self.action == "accept" else None
        return ElicitResult(action=self.action, content=content)  # pyright: ignore[reportArgumentType]


async def _call_refund(server: ArbiterServer, mode: str, user: User) -> ToolMessage:
    """Load Arbiter's tools through ``langchain.mcp`` and run ``pay__refund`` as a model's tool call."""
    client: FastMCPClient[Any] = FastMCPClient(
        server.mcp_url,
        auth=server.agent_key,
        mode="legacy" if mode == LEGACY else MODERN,  # pyright: ignore[reportArgumentType]
        timeout=TIMEOUT_S,
        elicitation_handler=user,
    )
    async with MCPAdapter(client) as adapter:
        assert adapter.client is client  # its own handler kept, not replaced by the interrupt sentinel
        era = client.protocol_version
        assert (era == MODERN) if mode == MODERN else (era in HANDSHAKE_PROTOCOL_VERSIONS), era
        tools: dict[str, BaseTool] = {t.name: t for t in await adapter.list_tools()}
        call = {"name": "pay__refund", "args": BIG, "id": "call-1", "type": "tool_call"}
        message = await tools["pay__refund"].ainvoke(call)
    assert isinstance(message, ToolMessage), message
    return message


def _text(message: ToolMessage) -> str:
    blocks: Any = message.content
    return " ".join(b["text"] for b in blocks if b.get("type") == "text")


@pytest.mark.parametrize("mode", [MODERN, LEGACY])
async def test_a_langchain_agent_runs_the_call_once_its_user_accepts(
    arbiter: ArbiterServer,  # noqa: F811 - the imported fixture
    payments: Payments,  # noqa: F811
    mode: str,
) -> None:
    user = User(payments, "accept")
    message = await _call_refund(arbiter, mode, user)
    assert message.status == "success" and _text(message) == "refunded 500 to acme", message
    assert payments.refunds() == [{"amount": 500, "customer": "acme"}]  # exactly once
    (shown,) = user.seen
    assert "pay__refund" in shown and '"amount": 500' in shown and CARD not in shown
    assert user.ran_before_answer == [[]]  # the call waited for the user
    ran = _refund_records(arbiter, 2 if mode == MODERN else 1)[-1]
    assert ran["decision"] == "allow" and ran["outcome"]["status"] == "ok"
    assert ran["outcome"]["approval"] == {
        "requested": True,
        "via": "input_required" if mode == MODERN else "elicitation",
        "answer": "accepted",
    }


@pytest.mark.parametrize("mode", [MODERN, LEGACY])
@pytest.mark.parametrize(("action", "answer"), [("decline", "declined"), ("cancel", "cancelled")])
async def test_a_langchain_agent_whose_user_declines_is_told_so_and_nothing_runs(
    arbiter_factory: ArbiterFactory,
    payments: Payments,  # noqa: F811
    mode: str,
    action: str,
    answer: str,
) -> None:
    server = _start(arbiter_factory, payments)
    user = User(payments, action)
    message = await _call_refund(server, mode, user)
    # A failed tool message for the model (approval_declined's sentence: its wording is tool_errors.py's),
    # not an exception that ends the agent's run; the reason itself is in the audit record below.
    said = _text(message)
    assert message.status == "error" and "pay__refund" in said and "not approve" in said, message
    assert "do not retry" in said and "500" not in said, message
    assert len(user.seen) == 1
    assert payments.refunds() == []
    record = _refund_records(server, 2 if mode == MODERN else 1)[-1]
    assert record["decision"] == "deny" and record["reason"] == "approval_declined"
    assert record["outcome"]["approval"]["answer"] == answer
