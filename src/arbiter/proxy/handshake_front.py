"""The direct path for handshake-era requests on an established session: answered without the SDK's
session transport, checked as it checks them.

A handshake-era agent opens a session (``initialize``, ``notifications/initialized``) and then sends each
request as a POST carrying the session id. The SDK's session transport hands each one to the session's
task through memory streams, builds request and result models, and writes the response back through the
same streams: most of what Arbiter spent on the agent's side of a handshake-era call. This path answers
the pipeline's methods on a session the SDK established, keeping the SDK's checks in its order and
answering exactly as it does when they fail, by leaving every such request to it:

1. the session id must name a live session the SDK holds, opened with the caller's credential (else
   the SDK answers 404), whose handshake completed (``notifications/initialized``: until then the SDK
   answers, with its init gate);
2. ``Accept`` must admit JSON (406) and ``Content-Type`` must be JSON (415);
3. the body must be one JSON-RPC request (the SDK's parse and validation errors);
4. the params must be valid for the method at the session's version (-32602, answered here as the SDK
   answers it).

What stays with the SDK: the handshake itself, the agent's GET stream and DELETE, notifications and
responses the agent posts (a ``notifications/cancelled`` for a call answered here cancels it, and is then
passed on), every other method and the event-stream response mode (``mcp.json_response`` off). A call
still running here when the SDK ends its session (DELETE, shutdown) is cancelled and answered as the SDK
answers its own then.

The result is shaped by the SDK's own per-version serializer, as on its path (fields of the 2026-07-28
era that a handshake-era agent does not know are dropped); the answer is JSON, or an event stream once
the upstream streams something for the call (progress, log messages: ``streamed.py``), so an agent that
accepts one gets its call's progress on the call's own stream, before its result. A request the upstream
puts to the agent during the call (elicitation, sampling, roots) goes on the session's standalone stream,
as the SDK would send it.

With ``mcp.stateless_legacy`` there are no sessions: each POST is taken as the SDK's stateless transport
takes it (the header's version or the default, nothing declared, nothing asked of the agent) and answered
here, without the transport, runner and task the SDK starts for each one.

The SDK keeps its session table and idle countdown to itself; ``SdkSessions`` is the one place that reads
them, and tests pin what it relies on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import anyio
import mcp_types as types
from mcp.server import Server
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, authorization_context
from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.session import ServerSession
from mcp.server.streamable_http import (
    MCP_SESSION_ID_HEADER,
    StreamableHTTPServerTransport,
    check_accept_headers,
)
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.dispatcher import as_request_id, coerce_request_id
from mcp.shared.exceptions import MCPError
from mcp_types import DEFAULT_NEGOTIATED_VERSION, INTERNAL_ERROR, INVALID_PARAMS
from mcp_types import methods as _methods
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import Receive, Send

from arbiter.proxy.call_channel import MAX_REQUESTS, SessionChannel, ask_session
from arbiter.proxy.exchange import Exchange
from arbiter.proxy.front import is_direct, send_json, valid_envelope
from arbiter.proxy.pipeline import TARGET_KEYS, CallContext, Pipeline
from arbiter.proxy.server import answer, session_capabilities, session_client_info
from arbiter.proxy.streamed import StreamedAnswer

log = logging.getLogger(__name__)

REQUEST_CANCELLED = -32800  # what the SDK's handshake-era transport answers a cancelled request with
_CANCELLED = "notifications/cancelled"
_PROTOCOL_HEADER = "mcp-protocol-version"
_SESSION_HEADER = MCP_SESSION_ID_HEADER.lower()
# What the SDK's transport answers a request whose session ended before its response (status 500).
_ENDED = {
    "jsonrpc": "2.0",
    "id": None,
    "error": {"code": INTERNAL_ERROR, "message": "Session terminated before the request completed"},
}


@dataclass(slots=True)
class Session:
    """An established handshake-era session: the agent's SDK session (what it declared, its standalone
    stream) and the calls answered directly on it, by request id (as the SDK correlates them: "7" is 7)."""

    session: ServerSession
    calls: dict[object, anyio.CancelScope] = field(default_factory=lambda: {})
    ended: bool = False  # the SDK ended the session (DELETE, idle timeout, shutdown)
    _read_from: object = field(default_factory=object)  # the client params the two below were read from
    _client_info: dict[str, Any] | None = None
    _capabilities: dict[str, Any] | None = None

    def declared(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """What the agent declared (its client info, its capabilities) in its latest ``initialize``: the SDK
        takes another on an open session. Read again only when that changed."""
        params = self.session.client_params
        if params is not self._read_from:
            self._read_from = params
            self._client_info = session_client_info(self.session)
            self._capabilities = session_capabilities(self.session)
        return self._client_info, self._capabilities


class SdkSessions:
    """The handshake-era sessions the SDK's session manager established, as this path needs them.

    A session is registered when its agent sends ``notifications/initialized`` (the SDK calls the handler
    after marking the connection initialized) and forgotten when the SDK tears its connection down.
    ``find`` answers only for a session the manager still holds, opened with the caller's credential.
    """

    def __init__(self, manager: StreamableHTTPSessionManager) -> None:
        self._manager = manager
        self._sessions: dict[str, Session] = {}

    def install(self, server: Server[Any]) -> None:
        """Register on ``server``'s ``notifications/initialized``, keeping any handler already there."""
        before = server.get_notification_handler("notifications/initialized")

        async def initialized(ctx: ServerRequestContext[Any, Any], params: types.NotificationParams) -> None:
            self._register(ctx)
            if before is not None:
                await before.handler(ctx, params)

        server.add_notification_handler("notifications/initialized", types.NotificationParams, initialized)

    def _register(self, ctx: ServerRequestContext[Any, Any]) -> None:
        request: object = ctx.request
        connection: object = getattr(ctx.session, "_connection", None)  # the SDK hands handlers no connection
        if not isinstance(request, Request) or not isinstance(connection, Connection):
            return
        sid = request.headers.get(_SESSION_HEADER)
        if sid is None or sid in self._sessions or connection.session_id != sid:
            return
        session = ctx.session
        self._sessions[sid] = Session(session)
        connection.exit_stack.callback(self._forget, sid)

    def _forget(self, sid: str) -> None:
        """The SDK ended session ``sid``: forget it, and end the calls still running on it, as the SDK
        ends its own (their upstream requests are cancelled; see ``_ENDED``)."""
        session = self._sessions.pop(sid, None)
        if session is None:
            return
        session.ended = True
        for scope in session.calls.values():
            scope.cancel()

    def find(self, sid: str, user: object) -> tuple[Session, StreamableHTTPServerTransport] | None:
        """The established session ``sid`` and its transport, if the caller (``user``, the ASGI scope's)
        opened it and the SDK still serves it; None leaves the request to the SDK."""
        found = self._sessions.get(sid)
        if found is None:
            return None
        transport = self._manager._server_instances.get(sid)  # pyright: ignore[reportPrivateUsage]
        if transport is None or transport.is_terminated:
            return None
        requestor = authorization_context(user) if isinstance(user, AuthenticatedUser) else None
        if requestor != self._manager._session_owners.get(sid):  # pyright: ignore[reportPrivateUsage]
            return None
        idle = transport.idle_scope
        if idle is not None and idle.cancel_called:
            return None
        return found, transport

    def __len__(self) -> int:
        return len(self._sessions)


@contextmanager
def held(transport: StreamableHTTPServerTransport) -> Generator[None]:
    """Hold the session's idle countdown while a call answered here runs, as the transport does for each
    request it serves itself (``session_idle_timeout``): the countdown restarts once none is in flight."""
    scope = transport.idle_scope
    timeout: float | None = transport._idle_timeout  # pyright: ignore[reportPrivateUsage]
    if scope is None or timeout is None:
        yield
        return
    transport._requests_in_flight += 1  # pyright: ignore[reportPrivateUsage]
    scope.deadline = math.inf
    try:
        yield
    finally:
        transport._requests_in_flight -= 1  # pyright: ignore[reportPrivateUsage]
        if not transport._requests_in_flight:  # pyright: ignore[reportPrivateUsage]
            scope.deadline = anyio.current_time() + timeout


class HandshakeFront:
    """Answers handshake-era POSTs for the pipeline's methods on established sessions, or, with
    ``sessions`` None (``mcp.stateless_legacy``), each POST on its own (``serve``)."""

    def __init__(
        self,
        pipeline: Pipeline,
        sessions: SdkSessions | None,
        *,
        error_results: bool = True,
        relay_requests: bool = True,
        max_requests: int = MAX_REQUESTS,
    ) -> None:
        self._pipeline = pipeline
        self._sessions = sessions
        self._error_results = error_results  # mcp.tool_errors == "result" (see server.answer)
        self._relay_requests = relay_requests  # mcp.relay_server_requests
        self._max_requests = max_requests  # mcp.input_requests_max

    async def serve(
        self, request: Request, receive: Receive, send: Send, message: dict[str, Any], exchange: Exchange
    ) -> bool:
        """Answer the POST of ``message`` (its decoded body) if this path takes it; False: nothing was sent,
        the SDK answers it."""
        headers = request.headers
        sid = headers.get(_SESSION_HEADER)
        version_header = headers.get(_PROTOCOL_HEADER)
        if version_header is not None and version_header not in HANDSHAKE_PROTOCOL_VERSIONS:
            return False
        if self._sessions is None:
            return await self._stateless(request, receive, send, message, exchange, version_header)
        if sid is None:
            return False
        if message.get("method") == _CANCELLED and "id" not in message:
            # Only a notification the SDK's transport takes (Accept, Content-Type) cancels anything.
            if check_accept_headers(request)[0] and _json_content(headers.get("content-type", "")):
                self._cancel(sid, request, message)
            return False  # the SDK still takes it (and answers 202, or refuses it)
        if not is_direct(message) or not valid_envelope(message):
            return False
        found = self._sessions.find(sid, request.scope.get("user"))
        if found is None:
            return False
        session, transport = found
        has_json, has_sse = check_accept_headers(request)
        if not has_json or not _json_content(headers.get("content-type", "")):
            return False
        if coerce_request_id(message["id"]) in session.calls:
            return False  # the same id twice in flight: the SDK's to sort out
        with held(transport):  # as the transport holds the session for each request it serves
            await self._answer(request, receive, send, message, exchange, session, sid, has_sse)
        return True

    async def _stateless(
        self,
        request: Request,
        receive: Receive,
        send: Send,
        message: dict[str, Any],
        exchange: Exchange,
        version_header: str | None,
    ) -> bool:
        """A POST without a session (``mcp.stateless_legacy``), taken as the SDK's stateless transport takes
        it: its version is the header's (or the default), it declared nothing, and nothing can be asked of
        it (no session stream to answer on); progress and logs still ride its own answer."""
        if not is_direct(message) or not valid_envelope(message):
            return False
        has_json, has_sse = check_accept_headers(request)
        if not has_json or not _json_content(request.headers.get("content-type", "")):
            return False
        await self._answer(request, receive, send, message, exchange, None, None, has_sse, version_header)
        return True

    def _cancel(self, sid: str, request: Request, message: dict[str, Any]) -> None:
        """The agent's ``notifications/cancelled`` for a call answered here: cancel it (its answer is then
        ``REQUEST_CANCELLED``, as the SDK answers, and its record says ``cancelled``)."""
        params: Any = message.get("params")
        named: Any = cast(dict[str, Any], params).get("requestId") if isinstance(params, dict) else None
        rid = as_request_id(named)  # as the SDK reads it: not true, not 1.0; "7" names call 7
        sessions = self._sessions
        found = sessions.find(sid, request.scope.get("user")) if rid is not None and sessions else None
        if found is None or rid is None:
            return
        scope = found[0].calls.get(coerce_request_id(rid))
        if scope is not None:
            scope.cancel()

    async def _answer(
        self,
        request: Request,
        receive: Receive,
        send: Send,
        message: dict[str, Any],
        exchange: Exchange,
        session: Session | None,
        sid: str | None,
        has_sse: bool,
        version_header: str | None = None,
    ) -> None:
        rid: Any = message["id"]
        method: str = message["method"]
        params: Any = message.get("params")
        if session is not None:
            version = session.session.protocol_version
            client_info, capabilities = session.declared()
        else:  # stateless: what the SDK's stateless connection is born with
            version = version_header or DEFAULT_NEGOTIATED_VERSION
            client_info, capabilities = None, None
        session_header = [(b"mcp-session-id", sid.encode("latin-1"))] if sid is not None else []
        try:
            _methods.validate_client_request(method, version, params)
        except (KeyError, ValueError, ValidationError):
            # As the SDK's runner answers params its surface refuses.
            error = {"code": INVALID_PARAMS, "message": "Invalid request parameters", "data": ""}
            await send_json(send, {"jsonrpc": "2.0", "id": rid, "error": error}, 200, session_header)
            return
        call = CallContext(
            method=method,
            params=cast(dict[str, Any], params) if isinstance(params, dict) else {},
            request_id=rid,
            protocol_version=version,
            http_request=Request(request.scope, receive),
            principal=exchange.principal,
            client_info=client_info,
            client_capabilities=capabilities,
            exchange=exchange,
        )
        streamed: StreamedAnswer | None = None
        if method in TARGET_KEYS:  # what the upstream streams for the call goes back to this agent
            if has_sse:
                streamed = StreamedAnswer(
                    call,
                    send,
                    ask=partial(ask_session, session.session) if session is not None else None,
                    relay_requests=self._relay_requests,
                    max_requests=self._max_requests,
                    headers=session_header,
                )
                call.downstream = streamed
            elif session is not None:
                call.downstream = SessionChannel(
                    call,
                    session.session,
                    relay_requests=self._relay_requests,
                    max_requests=self._max_requests,
                )
        response = await self._run(call, session.calls if session is not None else {}, method, version)
        status = 200
        if (
            session is not None and session.ended
        ):  # during the call: answered as the SDK answers a request its session outlived
            status, response = 500, _ENDED
        if streamed is not None and await streamed.finish(response):
            return
        await send_json(send, response, status, session_header)  # 200 for errors too, as the SDK

    async def _run(
        self,
        call: CallContext,
        calls: dict[object, anyio.CancelScope],
        method: str,
        version: str,
    ) -> dict[str, Any]:
        """The JSON-RPC response to ``call``: its result shaped for ``version``, or its error. While it
        runs it can be cancelled through ``calls`` (its session's)."""
        rid = call.request_id
        key = coerce_request_id(rid) if rid is not None else None  # never None: the envelope has an id
        error: dict[str, Any] | None = None
        result: dict[str, Any] | None = None
        with anyio.CancelScope() as cancel:
            calls[key] = cancel
            try:
                result = await answer(self._pipeline, call, error_results=self._error_results)
            except MCPError as exc:
                error = exc.error.model_dump(mode="json", exclude_none=True)
            finally:
                calls.pop(key, None)
        if cancel.cancelled_caught:
            error = {"code": REQUEST_CANCELLED, "message": "Request cancelled"}
        if error is not None or result is None:
            return {"jsonrpc": "2.0", "id": rid, "error": error}
        try:
            shaped = _methods.serialize_server_result(method, version, result)
        except (KeyError, ValidationError):
            # As the SDK's runner: an upstream's invalid result is not the client's fault; details stay here.
            log.exception("the result for %r is not valid at %s", method, version)
            error = {"code": INTERNAL_ERROR, "message": "Handler returned an invalid result"}
            return {"jsonrpc": "2.0", "id": rid, "error": error}
        return {"jsonrpc": "2.0", "id": rid, "result": shaped}


def _json_content(content_type: str) -> bool:
    # The SDK's content-type check: application/json, parameters and lists allowed.
    return any(part.strip() == "application/json" for part in content_type.split(";")[0].split(","))
