"""Pipeline step (after authorize): multi-round-trip requests (MCP 2026-07-28 ``input_required``).

An upstream may answer ``tools/call``, ``prompts/get`` or ``resources/read`` with ``input_required``:
``inputRequests`` for the agent to fulfil and a ``requestState`` to echo on the retry. This step

- passes the result on to a 2026-07-28 agent, keeping only the input requests of kinds the agent
  declared in its capabilities on this request (none left: ``input_unavailable``), with the upstream's
  ``requestState`` sealed to this round (``proxy/request_state.py``);
- on the retry, opens the state and checks it belongs to this caller, upstream, target and arguments
  and has not expired (else ``invalid_request_state``, before anything is forwarded); forward sends the
  upstream's own state and the agent's ``inputResponses`` on, to the upstream that issued the state (the
  tool's own, or the fallback that answered) and to no other;
- for a handshake-era agent, which cannot take ``input_required``, puts the questions to it over its own
  session (``elicitation/create``, ``sampling/createMessage``, ``roots/list``, when it declared them) and
  completes the rounds itself, bounded (``mcp.input_rounds_max`` rounds, each question answered within
  ``answer_timeout_s``); an agent that cannot answer gets ``input_unavailable`` (an ``isError`` result on
  tools/call);
- refuses an ``input_required`` result whose ``inputRequests`` is not an object or whose
  ``requestState`` is not a string (``upstream_protocol_error``): neither may reach the agent unchecked;
- tells the audit record what happened in this round: ``input_required`` and the request keys asked
  for, ``input_responses`` (keys only, never the content), or why a state was refused.

The authorize step before it decides every round like the first call, with the same arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import anyio
from mcp_types import CLIENT_CAPABILITIES_META_KEY
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from arbiter.errors import InputUnavailable, InvalidRequestState, UpstreamProtocolError
from arbiter.proxy.pipeline import CallContext, CallNext, Result
from arbiter.proxy.request_state import RequestStateSeal, Round, StateRefused

INPUT_METHODS = frozenset({"tools/call", "prompts/get", "resources/read"})
_BACKOFF_S = 0.05  # a state-only round: the upstream wants to be asked again, soon
_BACKOFF_CAP_S = 0.25


class InputRounds:
    def __init__(
        self, seal: RequestStateSeal, *, max_rounds: int = 10, answer_timeout_s: float = 600.0
    ) -> None:
        self._seal = seal
        self._max_rounds = max_rounds  # handshake-era agents: rounds Arbiter completes for them
        self._answer_timeout_s = answer_timeout_s  # ... and how long each question waits for the agent

    async def __call__(self, ctx: CallContext, call_next: CallNext) -> Result:
        if ctx.method not in INPUT_METHODS:
            return await call_next(ctx)
        params = ctx.params
        wire: Any = params.get("requestState")
        responses: Any = params.get("inputResponses")
        if wire is not None or responses is not None:
            self._retry(ctx, wire, responses)
        result = await call_next(ctx)
        if result.get("resultType") == "input_required":
            _check(ctx, result)
            if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
                return await self._complete_for(ctx, result, call_next)
            self._relay(ctx, result)
        return result

    def _retry(self, ctx: CallContext, wire: Any, responses: Any) -> None:
        round_info: dict[str, object] = {}
        ctx.input_round = round_info
        if isinstance(responses, dict):
            round_info["input_responses"] = sorted(str(k) for k in cast(dict[Any, Any], responses))
        if wire is None:
            return
        try:
            opened = self._seal.open(self._round(ctx), wire)
            if opened.kind is not None:  # Arbiter's own approval round, for a call no longer asking it
                raise StateRefused("kind")
        except StateRefused as exc:
            round_info["request_state"] = str(exc)
            raise InvalidRequestState("Invalid or expired requestState") from None
        ctx.request_state = opened.state
        ctx.state_upstream = opened.via  # the upstream whose state it is gets the retry, and no other

    def _relay(self, ctx: CallContext, result: Result) -> None:
        round_info = ctx.input_round if ctx.input_round is not None else {}
        ctx.input_round = round_info
        round_info["input_required"] = True
        requests: Any = result.get("inputRequests")
        if isinstance(requests, dict):
            requests = cast(dict[str, Any], requests)
            declared = _capabilities(ctx)
            kept = {key: ask for key, ask in requests.items() if _declared(ask, declared)}
            round_info["input_requests"] = sorted(kept)
            if len(kept) != len(requests):
                round_info["input_requests_dropped"] = sorted(set(requests) - set(kept))
                if not kept:
                    raise InputUnavailable(
                        f"{ctx.exposed} needs input of a kind this client did not declare it can give "
                        "(elicitation, sampling or roots)"
                    )
                result["inputRequests"] = kept
        state: Any = result.get("requestState")
        if isinstance(state, str):  # sealed with the upstream that answered (a fallback, maybe)
            result["requestState"] = self._seal.seal(self._round(ctx), state, via=ctx.fallback)

    async def _complete_for(self, ctx: CallContext, result: Result, call_next: CallNext) -> Result:
        """A handshake-era agent cannot take ``input_required``: Arbiter puts each question to it over its
        own session (``elicitation/create`` and friends, through the call's downstream channel, which
        checks the agent declared the capability) and retries the upstream itself, at most
        ``max_rounds`` times. The retries go through the rest of the pipeline (limits, forward) like the
        first round; the request keeps its one audit record."""
        round_info: dict[str, object] = {"input_required": True}
        ctx.input_round = round_info
        for done in range(self._max_rounds):
            requests: Any = result.get("inputRequests")
            asks = cast(dict[str, Any], requests) if isinstance(requests, dict) else {}
            if not asks and not isinstance(result.get("requestState"), str):
                break  # nothing to answer and nothing to carry: the upstream gave no way on
            responses: dict[str, Any] = {}
            for key, ask in asks.items():
                responses[key] = await self._ask(ctx, key, ask)
            if not asks:  # only a state: the upstream asks to be called again shortly
                await anyio.sleep(min(_BACKOFF_S * 2**done, _BACKOFF_CAP_S))
            state: Any = result.get("requestState")
            ctx.request_state = state if isinstance(state, str) else None
            # The answers and state go back to the upstream that asked (the fallback, if it answered).
            ctx.state_upstream = ctx.fallback or ctx.upstream
            params = {k: v for k, v in ctx.params.items() if k not in ("inputResponses", "requestState")}
            if responses:
                params["inputResponses"] = responses
            ctx.params = params
            round_info["input_rounds_completed"] = done + 1
            result = await call_next(ctx)
            if result.get("resultType") != "input_required":
                return result
            _check(ctx, result)
        raise InputUnavailable(
            f"{ctx.exposed} needs input from the user that could not be completed "
            f"within {self._max_rounds} rounds"
        )

    async def _ask(self, ctx: CallContext, key: str, ask: Any) -> dict[str, Any]:
        ask = cast(dict[str, Any], ask) if isinstance(ask, dict) else {}
        if ctx.downstream is None:
            raise InputUnavailable(f"{ctx.exposed} needs input from the user, which this client cannot give")
        message = {
            "jsonrpc": "2.0",
            "id": f"arbiter-input-{key}",
            "method": ask.get("method"),
            "params": ask.get("params"),
        }
        try:
            with anyio.fail_after(self._answer_timeout_s):
                reply = await ctx.downstream.message(message)
        except TimeoutError:
            raise InputUnavailable(
                f"{ctx.exposed} needs input from the user, which did not come within "
                f"{self._answer_timeout_s:g} s"
            ) from None
        answer: Any = reply.get("result") if reply is not None else None
        if not isinstance(answer, dict):
            error: Any = reply.get("error") if reply is not None else None
            why: Any = cast(dict[str, Any], error).get("message") if isinstance(error, dict) else None
            raise InputUnavailable(
                f"{ctx.exposed} needs input from the user, which this client cannot give"
                + (f" ({why})" if isinstance(why, str) else "")
            )
        return cast(dict[str, Any], answer)

    @staticmethod
    def _round(ctx: CallContext) -> Round:
        assert ctx.principal is not None and ctx.upstream is not None and ctx.target is not None
        return Round(ctx.principal, ctx.upstream, ctx.method, ctx.target, ctx.arguments)


def _check(ctx: CallContext, result: Result) -> None:
    """An ``input_required`` result's shape: anything else would reach the agent unfiltered or unsealed."""
    requests: Any = result.get("inputRequests")
    state: Any = result.get("requestState")
    what = (
        "inputRequests that is not an object"
        if requests is not None and not isinstance(requests, dict)
        else "a requestState that is not a string"
        if state is not None and not isinstance(state, str)
        else None
    )
    if what is not None:  # named by the tool's own upstream, never its fallback
        raise UpstreamProtocolError(
            f"upstream {ctx.upstream!r} answered {ctx.method} with input_required and {what}",
            upstream=ctx.upstream,
        )


def _capabilities(ctx: CallContext) -> Mapping[str, Any]:
    """What the agent declared on this request: the context's, else the 2026-07-28 ``_meta`` envelope."""
    if ctx.client_capabilities is not None:
        return ctx.client_capabilities
    meta: Any = ctx.params.get("_meta")
    caps: Any = cast(dict[str, Any], meta).get(CLIENT_CAPABILITIES_META_KEY) if isinstance(meta, dict) else {}
    return cast(dict[str, Any], caps) if isinstance(caps, dict) else {}


def _declared(ask: Any, caps: Mapping[str, Any]) -> bool:
    """Whether the agent can answer one input request (an embedded elicitation, sampling or roots
    request), by the capability it declared."""
    if not isinstance(ask, dict):
        return False
    ask = cast(dict[str, Any], ask)
    method = ask.get("method")
    if method == "elicitation/create":
        elicitation: Any = caps.get("elicitation")
        if not isinstance(elicitation, dict):
            return False
        elicitation = cast(dict[str, Any], elicitation)
        params: Any = ask.get("params")
        mode: Any = cast(dict[str, Any], params).get("mode", "form") if isinstance(params, dict) else "form"
        if mode == "url":
            return "url" in elicitation
        # An empty elicitation capability means form mode (as declared before modes existed).
        return "form" in elicitation or not elicitation
    if method == "sampling/createMessage":
        return isinstance(caps.get("sampling"), dict)
    if method == "roots/list":
        return isinstance(caps.get("roots"), dict)
    return False
