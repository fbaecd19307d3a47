"""The per-call downstream channel (a ``downstream.Downstream``): what an upstream sends while it answers
one request goes to the agent that made that request, and only to it.

The relay (``relay.py``) reads the upstream's answer for one request; every message in it that is not the
response is handed to that request's ``Downstream`` (a ``CallContext`` field, set by ``server.py`` for
requests the SDK's server session carries and by ``front.py`` for the direct 2026-07-28 path):

- ``notifications/progress`` (for the progress token the agent sent, which Arbiter passes on unchanged)
  and ``notifications/message`` are sent on to the agent; any other notification is not relayed per call;
- a server-to-client request (``elicitation/create``, ``sampling/createMessage``, ``roots/list``; handshake
  era only) is put to the agent when relaying is on (``mcp.relay_server_requests``) and the agent declared
  the capability, and its answer is what the relay posts back to the upstream. Otherwise the upstream gets
  a JSON-RPC error saying why. Each such round is recorded on the call (``CallContext.input_rounds``: the
  kind and, for elicitation, whether the user accepted, declined or cancelled, never the content), and the
  call's one audit record carries it;
- at most ``max_requests`` server-to-client requests per call (``mcp.input_requests_max``) are handled so;
  beyond that each is refused at once, without asking the agent or recording it, and the record carries
  one entry counting them (``{"kind": "over_limit", "action": "refused", "count": n}``): an upstream
  cannot flood an agent's user with questions, nor a call's record with rounds.

How a message reaches the agent depends on its side: ``SessionChannel`` (here) uses the SDK's server
session, ``StreamedAnswer`` (``streamed.py``) writes the 2026-07-28 answer as an event stream.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import mcp_types as types
from mcp.server.session import ServerSession
from mcp.shared.exceptions import MCPError
from mcp.shared.message import ServerMessageMetadata
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, ConfigDict, ValidationError

from arbiter.proxy.pipeline import CallContext

log = logging.getLogger(__name__)

PROGRESS = "notifications/progress"
LOG_MESSAGE = "notifications/message"
# Server-to-client requests an upstream may make during a call, and the client capability each needs.
ASKS: dict[str, str] = {
    "elicitation/create": "elicitation",
    "sampling/createMessage": "sampling",
    "roots/list": "roots",
}
_REFUSED = types.INVALID_REQUEST  # what the SDK's client answers for a capability it lacks
MAX_REQUESTS = 20  # the mcp.input_requests_max default


class CallChannel:
    """One call's channel back to its agent (a ``Downstream``); subclasses say how a message is delivered
    (``_send``) and how the agent is asked (``_ask``)."""

    __slots__ = ("_asked", "_ctx", "_max_requests", "_over", "_progress_token", "_relay_requests")

    def __init__(self, ctx: CallContext, *, relay_requests: bool, max_requests: int = MAX_REQUESTS) -> None:
        self._ctx = ctx
        self._relay_requests = relay_requests
        self._max_requests = max_requests
        self._asked = 0  # server-to-client requests this call has seen
        self._over: dict[str, str | int] | None = None  # the record's entry counting those refused
        meta: Any = ctx.params.get("_meta")
        token: Any = cast(dict[str, Any], meta).get("progressToken") if isinstance(meta, dict) else None
        self._progress_token: object = token

    async def message(self, message: dict[str, Any]) -> dict[str, Any] | None:
        """Take one message the upstream streamed for this call: relay a notification (``None``), or answer
        a server-to-client request (the JSON-RPC response to send back to the upstream)."""
        method: Any = message.get("method")
        if "id" in message:
            return await self._request(method, message)
        params: Any = message.get("params")
        if method == PROGRESS:
            # Only progress for the token this call carried: Arbiter sent the agent's token unchanged, so
            # anything else is not this agent's to see.
            token: Any = (
                cast(dict[str, Any], params).get("progressToken") if isinstance(params, dict) else None
            )
            if self._progress_token is None or token != self._progress_token:
                return None
        elif method != LOG_MESSAGE:
            return None  # list changes and resource updates are not per call
        try:
            await self._send(message)
        except ValidationError:
            log.debug("dropped a malformed %s from upstream %s", method, self._ctx.upstream)
        return None

    async def _request(self, method: Any, message: dict[str, Any]) -> dict[str, Any]:
        rid: Any = message.get("id")
        self._asked += 1
        if self._asked > self._max_requests:
            return self._refuse_over(rid)
        kind = ASKS.get(method) if isinstance(method, str) else None
        if kind is None:
            return _error(
                rid, types.METHOD_NOT_FOUND, f"Arbiter does not relay {method!r} requests to agents"
            )
        if not self._can_ask():
            text = (
                f"the agent cannot be asked: its protocol version ({self._ctx.protocol_version}) has no "
                "requests from server to client"
            )
            return self._round(kind, "refused", _error(rid, _REFUSED, text))
        if not self._relay_requests:
            return self._round(
                kind, "refused", _error(rid, _REFUSED, f"Arbiter does not relay {kind} requests (turned off)")
            )
        caps = self._ctx.client_capabilities
        if not caps or caps.get(kind) is None:
            text = f"the agent does not support {kind}: it did not declare the {kind} capability"
            return self._round(kind, "refused", _error(rid, _REFUSED, text))
        try:
            result = await self._ask(method, message)
        except MCPError as exc:
            return self._round(kind, "error", _error(rid, exc.error.code, exc.error.message))
        except ValidationError:
            return self._round(kind, "error", _error(rid, types.INVALID_PARAMS, f"invalid {method} request"))
        action: Any = result.get("action") if kind == "elicitation" else None
        done = action if isinstance(action, str) else "answered"
        return self._round(kind, done, {"jsonrpc": "2.0", "id": rid, "result": result})

    def _round(self, kind: str, action: str, response: dict[str, Any]) -> dict[str, Any]:
        self._rounds().append({"kind": kind, "action": action})
        return response

    def _rounds(self) -> list[dict[str, str | int]]:
        rounds = self._ctx.input_rounds
        if rounds is None:
            rounds = self._ctx.input_rounds = []
        return rounds

    def _refuse_over(self, rid: Any) -> dict[str, Any]:
        """One request beyond the call's limit: refused, and only counted."""
        if self._over is None:
            self._over = {"kind": "over_limit", "action": "refused", "count": 0}
            self._rounds().append(self._over)
            log.warning(
                "upstream %s made more than %d requests to the agent during one call; refusing the rest",
                self._ctx.upstream,
                self._max_requests,
            )
        self._over["count"] = self._asked - self._max_requests
        text = f"Arbiter refuses more than {self._max_requests} requests to the agent during one call"
        return _error(rid, _REFUSED, text)

    async def _send(self, message: dict[str, Any]) -> None:
        raise NotImplementedError

    def _can_ask(self) -> bool:
        return False  # the 2026-07-28 era has no server-to-client requests (MRTR replaces them)

    async def _ask(self, method: str, message: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError


class _Passed(BaseModel):
    """An agent's result, kept as it came (the SDK validates it for the method before)."""

    model_config = ConfigDict(extra="allow")


_REQUESTS: dict[str, type[BaseModel]] = {
    "elicitation/create": types.ElicitRequest,
    "sampling/createMessage": types.CreateMessageRequest,
    "roots/list": types.ListRootsRequest,
}
_NOTIFICATIONS: dict[str, type[BaseModel]] = {
    PROGRESS: types.ProgressNotification,
    LOG_MESSAGE: types.LoggingMessageNotification,
}


class SessionChannel(CallChannel):
    """Through the SDK's server session of the agent (both eras, each response mode).

    Messages ride the request's own response stream when it has one; in the handshake era's JSON response
    mode (``mcp.json_response``) a request has none, so they ride the session's standalone stream (the
    agent's GET): it is this agent's own session, and progress finds its call by token.
    """

    __slots__ = ("_modern", "_scoped", "_session")

    def __init__(
        self,
        ctx: CallContext,
        session: ServerSession,
        *,
        relay_requests: bool,
        max_requests: int = MAX_REQUESTS,
    ) -> None:
        super().__init__(ctx, relay_requests=relay_requests, max_requests=max_requests)
        self._session = session
        self._modern = ctx.protocol_version in MODERN_PROTOCOL_VERSIONS
        self._scoped = self._modern or session.can_send_request

    async def _send(self, message: dict[str, Any]) -> None:
        model: Any = _NOTIFICATIONS[message["method"]].model_validate(message)
        related = self._ctx.request_id if self._scoped else None
        await self._session.send_notification(model, related_request_id=related)

    def _can_ask(self) -> bool:
        return not self._modern

    async def _ask(self, method: str, message: dict[str, Any]) -> dict[str, Any]:
        related = self._ctx.request_id if self._scoped else None
        return await ask_session(self._session, method, message, related)


async def ask_session(
    session: ServerSession, method: str, message: dict[str, Any], related: Any = None
) -> dict[str, Any]:
    """Put the upstream's request ``message`` to the agent on its SDK session: on the request's own stream
    (``related``, its id) or, without one, the session's standalone stream; the agent's result as it came."""
    request: Any = _REQUESTS[method].model_validate({"method": method, "params": message.get("params")})
    result = await session.send_request(
        request, _Passed, metadata=ServerMessageMetadata(related_request_id=related)
    )
    return result.model_dump(mode="json", by_alias=True, exclude_none=True)


def _error(rid: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message}}
