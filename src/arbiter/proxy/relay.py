"""The lean relay: one JSON-RPC request to a streamable-HTTP upstream, without the SDK's client models.

The SDK's client decodes every answer into protocol models and encodes every request from them; for a
gateway that only needs to pass a result on, that was most of the cost of a call. Here a request is one
``orjson``-encoded POST over a pooled aiohttp connection, and its answer (a JSON body, or an SSE stream
ending in the response) is decoded once into plain dicts. aiohttp, not httpx2: on the same POST against a
bare ASGI server its client took 5-9x less CPU per request (bench/http_clients.py). The SDK's session
still owns what it is good at: negotiating the era (``server/discover`` or the ``initialize``
handshake, whose session id the relay then sends), discovery, stdio and SSE upstreams.

A connection taken from the pool that the upstream had closed while it sat idle (servers drop idle
keep-alive connections after a few seconds) fails before any answer arrives. That failure cannot be told
apart from an upstream that read the request, ran it, then reset the connection, so only a request that
is safe to send twice (``UpstreamRequest.may_resend``: a read, or a tool a security admin marked
idempotent) is sent once more on a fresh connection; any other fails as ``Stale`` (it may have run:
RFC 9112 9.3.1 forbids resending a request that is not idempotent without knowing it was not applied),
which neither marks the upstream down nor counts against its circuit breaker. Pooled connections
expire after ``upstream.idle_connection_s`` (below common server timeouts), so the stale case is rare.
A new connection that fails without an answer is never sent again.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, cast

import aiohttp
import anyio
import mcp_types as types
import orjson
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import (
    MCP_METHOD_HEADER,
    MCP_NAME_HEADER,
    NAME_BEARING_METHODS,
    encode_header_value,
    find_invalid_x_mcp_header,
    mcp_param_headers,
    x_mcp_header_map,
)
from mcp_types import CLIENT_CAPABILITIES_META_KEY, CLIENT_INFO_META_KEY, PROTOCOL_VERSION_META_KEY
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from arbiter.errors import ResultTooLarge
from arbiter.proxy.sse import EventTooLarge, events

if TYPE_CHECKING:
    from arbiter.proxy.downstream import Downstream

log = logging.getLogger(__name__)

SESSION_HEADER = "mcp-session-id"
_PROTOCOL_HEADER = "mcp-protocol-version"
_MAX_EVENT_BYTES = 16 * 1024 * 1024  # one SSE event (a large tool result); the SDK's default is 1 MiB
_MAX_BODY_BYTES = 64 * 1024 * 1024  # one JSON answer
_CANCEL_TIMEOUT_S = 5.0  # a best-effort notifications/cancelled; nobody waits for it
# What a request written to a pooled connection meets when the peer had closed it: no answer at all.
_UNANSWERED = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientConnectionResetError)
# No connection to the upstream could be made at all.
_UNREACHABLE = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)


class _Attempt:
    """Per request: whether aiohttp took its connection from the pool (told by the trace below)."""

    __slots__ = ("reused",)

    def __init__(self) -> None:
        self.reused = False


async def _on_reuse(session: object, context: Any, params: object) -> None:
    attempt = context.trace_request_ctx
    if isinstance(attempt, _Attempt):
        attempt.reused = True


def _reuse_trace() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    trace.on_connection_reuseconn.append(_on_reuse)
    return trace


@asynccontextmanager
async def relay_sessions(
    pooled: aiohttp.BaseConnector, fresh: aiohttp.BaseConnector, *, connect_timeout_s: float
) -> AsyncGenerator[tuple[aiohttp.ClientSession, aiohttp.ClientSession]]:
    """The relay's pooled client and its no-keep-alive twin (for the retry's fresh connection).

    Only opening a socket is bounded here (waiting for a free pooled connection is not a connect
    failure); the caller bounds the whole request. Answers are asked for, and read, uncompressed, so
    the size limits count what is held in memory.
    """
    timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=connect_timeout_s)
    options: dict[str, Any] = {"timeout": timeout, "auto_decompress": False, "trust_env": False}
    async with (
        aiohttp.ClientSession(connector=pooled, trace_configs=[_reuse_trace()], **options) as http,
        aiohttp.ClientSession(connector=fresh, **options) as fresh_http,
    ):
        yield http, fresh_http


def _version() -> str:
    try:
        return version("arbiter")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without metadata
        return "0"


_CLIENT_INFO = {"name": "arbiter", "version": _version()}


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    """One request for an upstream, in the upstream's own names; ``input_schema`` (tools/call only) says
    which arguments a 2026-07-28 upstream wants mirrored into ``Mcp-Param-*`` headers."""

    method: str
    params: dict[str, Any]
    input_schema: Mapping[str, Any] | None = None
    # W3C trace context (traceparent, tracestate) when traces are on; also in params._meta (forward.py).
    trace_context: Mapping[str, str] | None = None
    # Safe to send twice (a read, or a tool a security admin marked idempotent; the pool sets it): only
    # then is a request resent after a reused connection failed without an answer.
    may_resend: bool = False
    # What the calling agent declared (its initialize, or its 2026-07-28 envelope): the 2026-07-28
    # envelope declares exactly these to the upstream. None: nothing declared.
    client_capabilities: Mapping[str, Any] | None = None
    # Where what the upstream streams for this request goes (progress, logs, its requests to the agent).
    downstream: Downstream | None = None
    # The result guard (integrity/results.py): the most of the answer read before it is refused as
    # ``ResultTooLarge`` (None: the relay's own limits), and who sees the answer's raw bytes first.
    max_result_bytes: int | None = None
    inspect: Callable[[bytes], None] | None = None


class RelayFailure(Exception):
    """The request got no answer from the upstream; ``str()`` says why, never with a credential."""


class Unreachable(RelayFailure):
    """No connection to the upstream could be opened: it is down (or its address is refused)."""


class Interrupted(RelayFailure):
    """The connection failed while the request was in flight; the upstream may have run it."""


class Stale(Interrupted):
    """A connection taken from the pool failed before any answer: most likely the upstream closed it while
    it sat idle. The request may still have run, so it is not sent again unless it may run twice; but it
    says nothing about the upstream's health (a fresh connection is taken next time)."""


class SessionLost(RelayFailure):
    """The upstream answered 404 to our session id: it restarted and forgot us; the request never ran."""


class MalformedAnswer(ValueError):
    """The upstream's answer is not a JSON-RPC response to the request (an upstream protocol error)."""


Observer = Callable[[dict[str, Any]], None]
Credential = Callable[[], dict[str, str]]
Renewal = Callable[[dict[str, str]], Awaitable[dict[str, str] | None]]
# Runs a coroutine function in the background (the client's task group): the cancellation notice.
Spawn = Callable[[Callable[[], Coroutine[Any, Any, None]]], None]


class Relay:
    """Sends requests to one upstream in the era its SDK session negotiated.

    ``http`` is the upstream's connection pool; ``fresh_http`` keeps no connection, so a request sent
    through it opens one of its own. ``credential`` gives Arbiter's header for the upstream (its
    token was fetched beforehand) and ``renew``, after a 401, a new one to retry with, or None.
    """

    def __init__(
        self,
        url: str,
        http: aiohttp.ClientSession,
        fresh_http: aiohttp.ClientSession,
        *,
        protocol_version: str,
        session_id: str | None,
        credential: Credential | None = None,
        renew: Renewal | None = None,
        spawn: Spawn | None = None,
    ) -> None:
        self._url = url
        self._spawn = spawn
        self._http = http
        self._fresh_http = fresh_http
        self._credential = credential
        self._renew = renew
        self._modern = protocol_version in MODERN_PROTOCOL_VERSIONS
        self._ids = itertools.count(1)
        self._headers = {
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            "accept-encoding": "identity",
            _PROTOCOL_HEADER: protocol_version,
        }
        if session_id is not None and not self._modern:
            self._headers[SESSION_HEADER] = session_id
        # The 2026-07-28 envelope: who is asking, on every request. Arbiter declares no client
        # capabilities of its own; a request declares its agent's (``UpstreamRequest.client_capabilities``).
        self._envelope: dict[str, Any] = {
            PROTOCOL_VERSION_META_KEY: protocol_version,
            CLIENT_INFO_META_KEY: _CLIENT_INFO,
            CLIENT_CAPABILITIES_META_KEY: {},
        }
        # Per tool: the schema it was computed from (identity) and its x-mcp-header map.
        self._param_maps: dict[str, tuple[object, dict[tuple[str, ...], str]]] = {}

    async def request(
        self,
        request: UpstreamRequest,
        *,
        on_send: Callable[[], None] | None = None,
        on_message: Observer | None = None,
    ) -> dict[str, Any]:
        """Send ``request`` and return the upstream's result; its JSON-RPC error is raised as ``MCPError``.

        ``on_message`` sees every other message the upstream streams for this request (progress, logs).
        """
        # String ids: in the handshake era the SDK's own requests (integers) share this session.
        rid = f"arbiter-{next(self._ids)}"
        headers = self._headers
        params = request.params
        if self._modern:
            headers = {**headers, **self._routing_headers(request)}
            meta: Any = params.get("_meta")
            envelope = (
                {**cast(dict[str, Any], meta), **self._envelope} if isinstance(meta, dict) else self._envelope
            )
            if request.client_capabilities:
                envelope = {**envelope, CLIENT_CAPABILITIES_META_KEY: request.client_capabilities}
            params = {**params, "_meta": envelope}
        if request.trace_context:
            headers = {**headers, **request.trace_context}
        content = encode({"jsonrpc": "2.0", "id": rid, "method": request.method, "params": params})
        sent = self._credential() if self._credential is not None else {}
        if on_send is not None:
            on_send()
        try:
            resend = request.may_resend
            response = await self._post(content, {**headers, **sent} if sent else headers, resend)
            try:
                if response.status == 401 and self._renew is not None:
                    fresh = await self._renew(sent)
                    if fresh is not None:
                        response.release()
                        response = await self._post(content, {**headers, **fresh}, resend)
                return await self._answer(response, rid, on_message, request)
            except aiohttp.ClientPayloadError as exc:
                raise Interrupted(f"the answer was cut off ({type(exc).__name__})") from None
            except aiohttp.ClientError as exc:
                raise Interrupted(type(exc).__name__) from None
            finally:
                response.release()  # unread: the connection is closed, which ends the upstream's stream
        except asyncio.CancelledError:
            # The call's deadline passed (or its agent went away) with the request out: tell the upstream
            # to stop, in the background, so the agent's answer does not wait for it.
            if self._spawn is not None:
                self._spawn(lambda: self.cancel(rid))
            raise

    async def cancel(self, rid: str, reason: str = "the caller's deadline passed") -> None:
        """Send ``notifications/cancelled`` for request ``rid``, best effort: on the request's own session
        in the handshake era, as a POST of its own in the 2026-07-28 era."""
        if self._http.closed:
            return
        params: dict[str, Any] = {"requestId": rid, "reason": reason}
        headers = self._headers
        if self._modern:
            headers = {**headers, MCP_METHOD_HEADER: "notifications/cancelled"}
            params["_meta"] = self._envelope
        content = encode({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": params})
        sent = self._credential() if self._credential is not None else {}
        try:
            with anyio.fail_after(_CANCEL_TIMEOUT_S):
                async with self._http.post(
                    self._url, data=content, headers={**headers, **sent}, allow_redirects=False
                ) as response:
                    await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            log.debug("notifications/cancelled for %s not delivered: %s", rid, type(exc).__name__)

    async def _reply(self, message: dict[str, Any]) -> None:
        """Answer a request the upstream made during a call: a JSON-RPC response POSTed on the call's
        session. Best effort, bounded: an upstream that cannot take it stops waiting at its own timeout."""
        sent = self._credential() if self._credential is not None else {}
        try:
            with anyio.fail_after(_CANCEL_TIMEOUT_S):
                async with self._http.post(
                    self._url, data=encode(message), headers={**self._headers, **sent}, allow_redirects=False
                ) as response:
                    await response.read()
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            log.warning("the answer to an upstream's request was not delivered: %s", type(exc).__name__)

    async def _post(
        self, content: bytes, headers: Mapping[str, str], may_resend: bool
    ) -> aiohttp.ClientResponse:
        if self._http.closed:  # the connection was closed meanwhile (the upstream changed or went away)
            raise Interrupted("the connection to the upstream was closed")
        attempt = _Attempt()
        try:
            try:
                return await self._http.post(
                    self._url, data=content, headers=headers, allow_redirects=False, trace_request_ctx=attempt
                )
            except _UNREACHABLE:
                raise
            except _UNANSWERED as exc:
                if not attempt.reused:
                    raise  # a new connection the upstream took and dropped: it may have run the request
                if not may_resend:
                    # A pooled connection failed without an answer: closed while idle, or the upstream read
                    # the request, ran it and reset the connection. Not safe to send twice: it may have run.
                    raise Stale(
                        f"a pooled connection failed before an answer ({type(exc).__name__}); not sent again"
                    ) from None
                # Likely a pooled connection the peer had closed while it sat idle, and the request is safe
                # to send twice: once more, on a connection of its own.
                log.debug(
                    "idle upstream connection closed before answering (%s); sending again", type(exc).__name__
                )
                return await self._fresh_http.post(
                    self._url, data=content, headers=headers, allow_redirects=False
                )
        except _UNREACHABLE as exc:
            raise Unreachable(f"cannot connect ({type(exc).__name__})") from None
        except aiohttp.ClientError as exc:
            raise Interrupted(type(exc).__name__) from None

    def _routing_headers(self, request: UpstreamRequest) -> dict[str, str]:
        headers = {MCP_METHOD_HEADER: request.method}
        key = NAME_BEARING_METHODS.get(request.method)
        name = request.params.get(key) if key is not None else None
        if isinstance(name, str):
            headers[MCP_NAME_HEADER] = encode_header_value(name)
            if request.method == "tools/call" and request.input_schema is not None:
                arguments: Any = request.params.get("arguments")
                if isinstance(arguments, dict) and arguments:
                    param_map = self._param_map(name, request.input_schema)
                    headers.update(mcp_param_headers(param_map, cast(dict[str, Any], arguments)))
        return headers

    def _param_map(self, name: str, schema: Mapping[str, Any]) -> dict[tuple[str, ...], str]:
        cached = self._param_maps.get(name)
        if cached is not None and cached[0] is schema:
            return cached[1]
        # A schema whose x-mcp-header annotations are invalid (a header name no HTTP field can carry)
        # mirrors nothing; the upstream then judges the call without the headers.
        found = {} if find_invalid_x_mcp_header(schema) is not None else x_mcp_header_map(schema)
        self._param_maps[name] = (schema, found)
        return found

    async def _answer(
        self,
        response: aiohttp.ClientResponse,
        rid: str,
        on_message: Observer | None,
        request: UpstreamRequest,
    ) -> dict[str, Any]:
        status = response.status
        kind = response.content_type.lower()
        if status == 404 and SESSION_HEADER in response.request_info.headers:
            raise SessionLost("the upstream lost our session (it restarted)")
        if 200 <= status < 300 and kind == "text/event-stream":
            return await self._from_stream(response, rid, on_message, request)
        if kind == "application/json":
            body = await _read_body(response, request.max_result_bytes)
            if request.inspect is not None and 200 <= status < 300:
                request.inspect(body)
            message = _decode(body)
            if status >= 400 and "error" in message:
                # A JSON-RPC error at an HTTP error status (400 invalid params, 404 unknown method): the
                # upstream's own answer, whatever id it could give it.
                return _outcome({**message, "id": rid}, rid)
            if 200 <= status < 300:
                return _outcome(message, rid)
        if status >= 400:
            # What the SDK's client reports for an error status without a JSON-RPC body.
            raise MCPError(types.INTERNAL_ERROR, f"Server returned an error response (HTTP {status})")
        raise MalformedAnswer(f"unexpected answer: HTTP {status} {kind or 'without a content type'}")

    async def _from_stream(
        self,
        response: aiohttp.ClientResponse,
        rid: str,
        on_message: Observer | None,
        request: UpstreamRequest,
    ) -> dict[str, Any]:
        downstream = request.downstream
        cap = request.max_result_bytes
        try:
            async for event in events(response.content.iter_any(), cap or _MAX_EVENT_BYTES):
                if event.type != "message" or not event.data:
                    continue
                data = event.data.encode()
                message = _decode(data)
                if "method" not in message:
                    if message.get("id") == rid:
                        if request.inspect is not None:
                            request.inspect(data)
                        return _outcome(message, rid)
                    continue  # no request of ours on this stream has another id
                if on_message is not None:
                    on_message(message)
                if downstream is not None:
                    reply = await downstream.message(message)
                elif "id" in message:  # a request from the upstream with nobody to put it to
                    reply = _no_agent(message)
                else:
                    continue
                if reply is not None:
                    await self._reply(reply)
        except EventTooLarge as exc:
            if cap is not None:  # the result guard's cap: what was read goes along, for truncation
                raise ResultTooLarge(
                    f"the upstream's answer exceeds {cap} bytes", partial=exc.partial
                ) from None
            raise MalformedAnswer(str(exc)) from None
        raise Interrupted("the upstream's event stream ended without a response")


async def _read_body(response: aiohttp.ClientResponse, cap: int | None = None) -> bytes:
    """The JSON body, read no further than ``cap`` (the result guard's) or the relay's own limit: past
    ``cap`` the rest is never read (the connection is closed on release) and ``ResultTooLarge`` carries
    the ``cap`` bytes read."""
    if response.headers.get("content-encoding", "identity").lower() != "identity":
        raise MalformedAnswer("the upstream compressed its answer although asked not to")
    limit = cap or _MAX_BODY_BYTES
    length = response.content_length
    if length is not None and length <= limit:
        return await response.read()  # read as sent (auto_decompress is off): at most length bytes
    if length is not None and cap is None:
        raise MalformedAnswer(f"the upstream's answer exceeds {_MAX_BODY_BYTES} bytes")
    body = bytearray()  # grown and cut in place: one copy of the answer in memory, not three
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > limit:
            if cap is None:
                raise MalformedAnswer(f"the upstream's answer exceeds {_MAX_BODY_BYTES} bytes")
            del body[cap:]
            raise ResultTooLarge(f"the upstream's answer exceeds {cap} bytes", partial=body)
    return bytes(body)


def encode(message: dict[str, Any]) -> bytes:
    """One JSON-RPC message as UTF-8 JSON: orjson, or the standard library for what orjson refuses."""
    try:
        return orjson.dumps(message)
    except TypeError:  # a value orjson does not encode (an integer beyond 64 bits): the slow way
        return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


def _decode(body: bytes) -> dict[str, Any]:
    try:
        decoded: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MalformedAnswer("the upstream's answer is not JSON") from None
    if not isinstance(decoded, dict):
        raise MalformedAnswer("the upstream's answer is not a JSON-RPC object")
    return cast(dict[str, Any], decoded)


def _no_agent(message: dict[str, Any]) -> dict[str, Any]:
    error = {"code": types.INVALID_REQUEST, "message": "Arbiter cannot put this request to an agent"}
    return {"jsonrpc": "2.0", "id": message.get("id"), "error": error}


def _outcome(message: dict[str, Any], rid: str) -> dict[str, Any]:
    if message.get("id") != rid:
        raise MalformedAnswer("the upstream answered another request's id")
    result = message.get("result")
    if isinstance(result, dict):
        return cast(dict[str, Any], result)
    error = message.get("error")
    if isinstance(error, dict):
        error = cast(dict[str, Any], error)
        code, text = error.get("code"), error.get("message")
        if isinstance(code, int) and not isinstance(code, bool) and isinstance(text, str):
            raise MCPError(code, text, error.get("data"))
    raise MalformedAnswer("the upstream's answer has neither a result object nor a valid error")
