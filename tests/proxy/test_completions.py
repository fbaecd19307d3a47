"""completion/complete through Arbiter, in both eras, against real upstreams.

Routed to the upstream in its own names when the caller may use the prompt or resource template;
answered exactly like a missing one when not; an upstream without completions suggests nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mcp_types as types
import pytest
from mcp import Client
from mcp.server import MCPServer
from mcp.shared.exceptions import MCPError

from tests.audit.helpers import of_kind, wait_for
from tests.conftest import ArbiterFactory, ArbiterServer, authed_transport, serve_in_thread

MODES = ["legacy", "2026-07-28"]
POLICY = """\
p, role:agent, *, comp/greet, get, allow
p, role:agent, *, comp/files://*, read, allow
p, role:agent, *, plain/*, get, allow
"""
TEMPLATE = "arbiter://comp/files://{path}"


@dataclass
class Upstreams:
    comp: str
    plain: str
    seen: list[tuple[str, str, str, dict[str, str]]] = field(
        default_factory=list[tuple[str, str, str, dict[str, str]]]
    )
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture(scope="module")
def upstreams() -> Iterator[Upstreams]:
    comp = MCPServer("comp")
    plain = MCPServer("plain")
    found = Upstreams("", "")

    @comp.prompt()
    def greet(name: str, style: str = "warm") -> str:
        return f"Greet {name}, {style}"

    @comp.prompt()
    def secret(name: str) -> str:
        return f"secret {name}"

    @comp.resource("files://{path}")
    def file(path: str) -> str:
        return f"file {path}"

    @comp.completion()
    async def complete(
        ref: types.PromptReference | types.ResourceTemplateReference,
        argument: types.CompletionArgument,
        context: types.CompletionContext | None,
    ) -> types.Completion:
        target = ref.name if isinstance(ref, types.PromptReference) else ref.uri
        given = dict(context.arguments or {}) if context is not None else {}
        with found.lock:
            found.seen.append((target, argument.name, argument.value, given))
        return types.Completion(values=[f"{argument.value}-1", f"{argument.value}-2"], has_more=False)

    @plain.prompt()
    def hello(name: str) -> str:
        return f"Hello {name}"

    with (
        serve_in_thread(comp.streamable_http_app(json_response=True)) as comp_port,
        serve_in_thread(plain.streamable_http_app(json_response=True)) as plain_port,
    ):
        found.comp = f"http://127.0.0.1:{comp_port}/mcp"
        found.plain = f"http://127.0.0.1:{plain_port}/mcp"
        yield found


@pytest.fixture
def arbiter(arbiter_factory: ArbiterFactory, upstreams: Upstreams) -> ArbiterServer:
    server = arbiter_factory(policy=POLICY)
    server.register("comp", upstreams.comp)
    server.register("plain", upstreams.plain)
    with upstreams.lock:
        upstreams.seen.clear()
    return server


def _client(server: ArbiterServer, mode: str) -> Client:
    return Client(authed_transport(server.mcp_url, server.agent_key), mode=mode, cache=None)  # pyright: ignore[reportArgumentType]


def _completions(server: ArbiterServer, count: int) -> list[dict[str, Any]]:
    def found(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in of_kind(records, "mcp") if r["method"] == "completion/complete"]

    return found(wait_for(server, lambda rs: len(found(rs)) >= count))


@pytest.mark.parametrize("mode", MODES)
async def test_completions_reach_the_upstream_in_its_own_names(
    arbiter: ArbiterServer, upstreams: Upstreams, mode: str
) -> None:
    async with _client(arbiter, mode) as client:
        if mode == "legacy":  # advertised at initialize (a forced 2026-07-28 client does not discover)
            assert (
                client.server_capabilities is not None and client.server_capabilities.completions is not None
            )
        prompt = await client.complete(
            types.PromptReference(name="comp__greet"), {"name": "style", "value": "co"}, {"name": "Ada"}
        )
        template = await client.complete(
            types.ResourceTemplateReference(uri=TEMPLATE), {"name": "path", "value": "rep"}
        )
    assert prompt.completion.values == ["co-1", "co-2"]
    assert template.completion.values == ["rep-1", "rep-2"]
    with upstreams.lock:
        assert upstreams.seen == [
            ("greet", "style", "co", {"name": "Ada"}),
            ("files://{path}", "path", "rep", {}),
        ]
    records = _completions(arbiter, 2)
    assert [(r["decision"], r["upstream"], r["target"], r["tool"]) for r in records] == [
        ("allow", "comp", "greet", "comp__greet"),
        ("allow", "comp", "files://{path}", TEMPLATE),
    ]


@pytest.mark.parametrize("mode", MODES)
async def test_a_prompt_or_template_the_caller_may_not_use_answers_like_a_missing_one(
    arbiter: ArbiterServer, upstreams: Upstreams, mode: str
) -> None:
    errors: dict[str, MCPError] = {}
    refs: dict[str, types.PromptReference | types.ResourceTemplateReference] = {
        "hidden prompt": types.PromptReference(name="comp__secret"),
        "missing prompt": types.PromptReference(name="comp__nothing"),
        "missing template": types.ResourceTemplateReference(uri="arbiter://comp/files://{other}"),
        "unknown upstream": types.ResourceTemplateReference(uri="arbiter://nope/files://{path}"),
    }
    async with _client(arbiter, mode) as client:
        for what, ref in refs.items():
            with pytest.raises(MCPError) as refused:
                await client.complete(ref, {"name": "name", "value": "a"})
            errors[what] = refused.value
        with pytest.raises(MCPError) as missing_get:
            await client.get_prompt("comp__nothing", {"name": "a"})
    hidden, missing = errors["hidden prompt"].error, errors["missing prompt"].error
    assert (hidden.code, hidden.message.replace("secret", "X"), hidden.data) == (
        missing.code,
        missing.message.replace("nothing", "X"),
        missing.data,
    )
    assert (missing.code, missing.message) == (missing_get.value.error.code, missing_get.value.error.message)
    assert errors["missing template"].error.code == errors["unknown upstream"].error.code == -32002
    with upstreams.lock:
        assert upstreams.seen == []  # the upstream never heard of any of them
    records = _completions(arbiter, 4)
    assert {r["decision"] for r in records} == {"deny"}
    # The agent cannot tell the hidden prompt from a missing one; the auditor can: it is a denial.
    reasons = {r["tool"]: r["reason"] for r in records}
    assert reasons.pop("comp__secret") == "policy_denied"
    assert set(reasons.values()) == {"unknown_target"}


@pytest.mark.parametrize("mode", MODES)
async def test_an_upstream_without_completions_suggests_nothing(arbiter: ArbiterServer, mode: str) -> None:
    async with _client(arbiter, mode) as client:
        result = await client.complete(
            types.PromptReference(name="plain__hello"), {"name": "name", "value": "A"}
        )
    assert result.completion.values == []
    (record,) = _completions(arbiter, 1)
    assert record["decision"] == "allow" and record["upstream"] == "plain"
