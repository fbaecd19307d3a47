"""Shared by the example agents: command line, model choice, the offline scripted model, the run loop.

Deliberately depends only on ``langchain`` and ``langchain_core`` (no ``arbiter``, no MCP library), so
both example scripts can use it: ``support_agent.py`` in the main environment and
``legacy_adapters_agent.py`` in its own ``mcp<2`` virtualenv.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, cast

from langchain.agents import create_agent
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolCall, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool

DEFAULT_QUESTION = (
    "Customer C-1001 reports that their SSO login keeps looping back to the sign-in page. "
    "Who are they, and what does our knowledge base say about setting up single sign-on?"
)
SYSTEM_PROMPT = (
    "You are a support agent. Use the knowledge-base search tool and the CRM tools to answer. "
    "Name the customer and the knowledge-base article you relied on."
)
RUN_TIMEOUT_S = 120.0

# Opens a connection to the MCP endpoint for the duration of the run and yields its tools.
ToolSource = Callable[[str, str | None], AbstractAsyncContextManager[list[BaseTool]]]


class ScriptError(RuntimeError):
    """The scripted model could not follow its script (a tool is missing or a tool call failed)."""


def find_tool(names: Sequence[str], suffix: str) -> str:
    """Pick ``suffix`` from ``names``, bare (upstream server) or prefixed ``<upstream>__`` (Arbiter)."""
    for name in names:
        if name == suffix or name.endswith("__" + suffix):
            return name
    raise ScriptError(f"required tool {suffix!r} is not offered by the MCP endpoint (saw: {sorted(names)})")


class ScriptedSupportModel(BaseChatModel):
    """An offline chat model that plays the SSO scenario with real tool calls.

    Turn 1 asks for a KB search and a customer lookup; turn 2 writes the answer from the tool results
    it got back, so the answer cannot exist unless the tools really ran.
    """

    tool_names: list[str] = []

    @property
    def _llm_type(self) -> str:
        return "scripted-support"

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        names = [t.name for t in tools if isinstance(t, BaseTool)]
        names += [str(cast(dict[str, Any], t).get("name", "")) for t in tools if isinstance(t, dict)]
        return self.model_copy(update={"tool_names": names})

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        last_human = max(i for i, m in enumerate(messages) if isinstance(m, HumanMessage))
        results = [m for m in messages[last_human:] if isinstance(m, ToolMessage)]
        reply = self._answer(results) if results else self._plan(messages[last_human].text)
        return ChatResult(generations=[ChatGeneration(message=reply)])

    def _plan(self, question: str) -> AIMessage:
        match = re.search(r"\bC-\d+\b", question)
        calls = [
            ToolCall(
                name=find_tool(self.tool_names, "search_docs"),
                id="call_kb_search",
                type="tool_call",
                args={"query": "single sign-on SSO login", "limit": 3},
            ),
            ToolCall(
                name=find_tool(self.tool_names, "get_customer"),
                id="call_crm_customer",
                type="tool_call",
                args={"customer_id": match.group(0) if match else "C-1001"},
            ),
        ]
        return AIMessage(content="", tool_calls=calls)

    def _answer(self, results: list[ToolMessage]) -> AIMessage:
        hits: list[dict[str, Any]] = _tool_json(results, "search_docs").get("hits") or []
        if not hits:
            raise ScriptError("the knowledge-base search returned no documents")
        doc = hits[0]
        article = (
            f'The knowledge-base article "{doc["title"]}" ({doc["doc_id"]}) covers it: '
            f"{doc['snippet'].rstrip()}…"
        )
        # A CRM that cannot answer (Arbiter says so in a failed tool result) does not end the run: the
        # answer comes from the documents, and says plainly what could not be checked.
        failure = _tool_failure(results, "get_customer")
        if failure is not None:
            return AIMessage(content=f"I could not look up the customer record ({failure}). {article}")
        customer = _tool_json(results, "get_customer")
        text = (
            f"{customer['name']} ({customer['customer_id']}, {customer['plan']} plan, region "
            f"{customer['region']}) is having trouble with SSO. {article}"
        )
        return AIMessage(content=text)


def _tool_failure(results: list[ToolMessage], suffix: str) -> str | None:
    """The text of a failed result from a ``suffix`` tool (the model's view of the error), or None."""
    for message in results:
        if message.name and (message.name == suffix or message.name.endswith("__" + suffix)):
            return message.text if message.status == "error" else None
    return None


def _tool_json(results: list[ToolMessage], suffix: str) -> dict[str, Any]:
    for message in results:
        if message.name and (message.name == suffix or message.name.endswith("__" + suffix)):
            if message.status == "error":
                raise ScriptError(f"tool {message.name} failed: {message.text}")
            try:
                return dict(json.loads(message.text))
            except ValueError as exc:
                raise ScriptError(f"tool {message.name} did not return JSON: {message.text[:200]!r}") from exc
    raise ScriptError(f"no result from a {suffix!r} tool in the conversation")


def build_chat_model(scripted: bool) -> BaseChatModel:
    """A real OpenAI(-compatible) model when configured, otherwise the offline scripted model."""
    if scripted or not os.environ.get("OPENAI_API_KEY"):
        return ScriptedSupportModel()
    try:
        # Imported only here: the scripted path must work without langchain-openai installed.
        from langchain_openai import ChatOpenAI  # type: ignore[import-not-found]
    except ImportError as exc:
        raise SystemExit(
            "OPENAI_API_KEY is set but langchain-openai is not installed "
            "(pip install langchain-openai, or pass --scripted)"
        ) from exc
    model = ChatOpenAI(
        model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"),
        base_url=os.environ.get("OPENAI_BASE_URL") or None,
        timeout=60,
    )
    return cast(BaseChatModel, model)


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--mcp-url", required=True, help="MCP endpoint, e.g. http://127.0.0.1:8080/mcp")
    parser.add_argument(
        "--token", default=os.environ.get("ARBITER_TOKEN"), help="bearer token (default: $ARBITER_TOKEN)"
    )
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument(
        "--scripted", action="store_true", help="use the offline scripted model even if OPENAI_API_KEY is set"
    )
    parser.add_argument("--debug", action="store_true", help="print the traceback of a failure")
    return parser.parse_args(argv)


async def run_agent(open_tools: ToolSource, args: argparse.Namespace) -> str:
    """Connect, show the tools, run the agent once and return its final answer."""
    async with asyncio.timeout(RUN_TIMEOUT_S), open_tools(args.mcp_url, args.token or None) as tools:
        print(f"Tools seen ({len(tools)}): {', '.join(t.name for t in tools)}", flush=True)
        agent = create_agent(build_chat_model(args.scripted), tools, system_prompt=SYSTEM_PROMPT)
        state = await agent.ainvoke({"messages": [HumanMessage(args.question)]}, {"recursion_limit": 12})
    messages: list[BaseMessage] = state["messages"]
    called = [c["name"] for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    print(f"Tools called: {', '.join(called) or '(none)'}", flush=True)
    for m in messages:  # the transcript of tool results, as the model saw them
        if isinstance(m, ToolMessage):
            print(f"Tool result {m.name} [{m.status}]: {m.text[:300]}", flush=True)
    return messages[-1].text


def _leaf_messages(group: BaseExceptionGroup[BaseException]) -> list[str]:
    return [
        m
        for e in group.exceptions
        for m in (_leaf_messages(e) if isinstance(e, BaseExceptionGroup) else [str(e) or type(e).__name__])
    ]


def server_answer(url: str, token: str | None) -> str | None:
    """What the MCP endpoint says to a plain ``initialize``, when it refuses it (e.g. ``401`` and its
    body), in one line. MCP client libraries turn such an answer into a generic "Server returned an
    error response", losing the server's reason; asking once more with the standard library recovers
    it without depending on any of them."""
    body = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "example-agent", "version": "0"},
            },
        }
    ).encode()
    headers = {"content-type": "application/json", "accept": "application/json, text/event-stream"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10):
            return None
    except urllib.error.HTTPError as exc:
        text = " ".join(exc.read(2000).decode("utf-8", "replace").split())
        return f"{url} answered {exc.code} {exc.reason}: {text or '(no body)'}"
    except (urllib.error.URLError, OSError) as exc:
        return f"cannot reach {url}: {getattr(exc, 'reason', exc)}"


def main(open_tools: ToolSource, description: str) -> int:
    args = parse_args(description)
    failure, answer = "", ""
    # except*: the MCP clients run the agent inside anyio task groups, which wrap our errors in groups.
    try:
        answer = asyncio.run(run_agent(open_tools, args))
    except* ScriptError as group:
        failure = "; ".join(_leaf_messages(group))
    except* TimeoutError:
        failure = f"the agent did not finish within {RUN_TIMEOUT_S:.0f}s"
    except* Exception as group:  # noqa: BLE001 - the top of a script: any failure becomes one line
        # A failure to connect or to be let in: one line with the server's own reason, not a traceback
        # (--debug prints it).
        if args.debug:
            traceback.print_exception(group)
        failure = server_answer(args.mcp_url, args.token or None) or "; ".join(_leaf_messages(group))
    if not failure and not answer.strip():
        failure = "the agent produced an empty answer"
    if failure:
        print(f"error: {failure}", file=sys.stderr)
        return 1
    print("Answer:")
    print(answer)
    return 0
